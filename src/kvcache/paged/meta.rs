//! Where the per-slot metric and position live (see the parent module): the device copies of
//! [`PagedCache::keep_metric_on_device`] and the reads and writes that go to wherever they are.
use candle_core::{DType, Result, Tensor};

use super::{be, DeviceMeta, PagedCache};
use crate::cuda::kv_cache;
use crate::kvcache::blocks::BlockError;
use crate::kvcache::SeqId;

impl PagedCache {
    /// Add `delta[i]` to the metric of logical slot `i` of (layer, seq, kv_head).
    pub fn add_metric(
        &mut self,
        layer: usize,
        seq: SeqId,
        kv_head: usize,
        delta: &[f32],
    ) -> Result<()> {
        if self.metric_on_device(seq) {
            let mut slots = self.pool.slots(layer, seq, kv_head).map_err(be)?;
            if delta.len() > slots.len() {
                return Err(be(BlockError::BadLength {
                    what: "metric update",
                    got: delta.len(),
                    len: slots.len(),
                }));
            }
            slots.truncate(delta.len());
            let add = Tensor::from_slice(delta, delta.len(), &self.spec.device)?;
            return self.add_device_metric(&slots, &add);
        }
        self.pool.add_metric(layer, seq, kv_head, delta).map_err(be)
    }

    /// From now on keep `seq`'s per-slot metric and position in tensors on the cache's device:
    /// decode steps add KV-Compress's decode metric (`sum over the group of p^2`) there (the
    /// decode kernel does it as it attends; nothing goes to the host), and
    /// [`PagedCache::evict_on_device`] evicts from them. The host pool's metric/position of
    /// `seq` are stale from here on; [`PagedCache::seq_meta`] and `slot_positions` read the
    /// device's. The first call mirrors the pool's metadata of every slot to the device;
    /// later calls upload `seq`'s.
    pub fn keep_metric_on_device(&mut self, seq: SeqId) -> Result<()> {
        if !self.device_compression {
            candle_core::bail!("device compression is off for this cache");
        }
        self.run_pending()?;
        if !self.pos.contains_key(&seq) {
            return Err(be(BlockError::UnknownSeq(seq)));
        }
        let dev = self.spec.device.clone();
        if self.meta.is_none() {
            // Only the slots of sequences listed in `seqs` are ever read here (every later
            // write and move keeps them), so the tensors start as zeros, not as an upload of
            // the pool's arrays (360 MB for a 32-sample SmolLM2 batch).
            let n = self.pool.slot_meta().0.len();
            self.meta = Some(DeviceMeta {
                metric: Tensor::zeros(n, DType::F32, &dev)?,
                position: Tensor::zeros(n, DType::U32, &dev)?,
                seqs: Default::default(),
            });
        }
        let m = self.meta.as_mut().expect("created above");
        if !m.seqs.contains(&seq) {
            let (mut slots, mut metric, mut position) = (Vec::new(), Vec::new(), Vec::new());
            for l in 0..self.spec.layers {
                for h in 0..self.spec.kv_heads {
                    slots.extend(self.pool.slots(l, seq, h).map_err(be)?);
                    metric.extend(self.pool.metrics(l, seq, h).map_err(be)?);
                    position.extend(self.pool.positions(l, seq, h).map_err(be)?);
                }
            }
            let slots: Vec<u32> = slots.into_iter().map(|s| s as u32).collect();
            if dev.is_cuda() {
                kv_cache::set_meta(&m.metric, &m.position, &slots, &metric, &position)?;
            } else {
                let n = slots.len();
                let idx = Tensor::from_vec(slots, n, &dev)?;
                m.metric
                    .scatter_set(&idx, &Tensor::from_vec(metric, n, &dev)?, 0)?;
                m.position
                    .scatter_set(&idx, &Tensor::from_vec(position, n, &dev)?, 0)?;
            }
            m.seqs.insert(seq);
        }
        Ok(())
    }

    /// Whether `seq` keeps its metric on the device.
    pub fn metric_on_device(&self, seq: SeqId) -> bool {
        self.meta.as_ref().is_some_and(|m| m.seqs.contains(&seq))
    }

    /// Token positions of (layer, seq, kv_head) in logical order, from wherever they live.
    pub fn positions(&self, layer: usize, seq: SeqId, kv_head: usize) -> Result<Vec<u32>> {
        if self.metric_on_device(seq) {
            let mut one = self.device_meta(seq, &[(layer, kv_head)])?;
            return Ok(one.pop().expect("one head").1);
        }
        self.pool.positions(layer, seq, kv_head).map_err(be)
    }

    /// Metrics and positions of every head of `seq`, in (layer, kv-head) order, from wherever
    /// they live (one download for a sequence whose metric is on the device).
    pub fn seq_meta(&self, seq: SeqId) -> Result<Vec<(Vec<f32>, Vec<u32>)>> {
        let heads: Vec<(usize, usize)> = (0..self.spec.layers)
            .flat_map(|l| (0..self.spec.kv_heads).map(move |h| (l, h)))
            .collect();
        if self.metric_on_device(seq) {
            return self.device_meta(seq, &heads);
        }
        heads
            .into_iter()
            .map(|(l, h)| {
                Ok((
                    self.pool.metrics(l, seq, h).map_err(be)?,
                    self.pool.positions(l, seq, h).map_err(be)?,
                ))
            })
            .collect()
    }

    /// The metric and position of `heads` (layer, kv-head) of `seq` from the device tensors:
    /// one gather and one download of each for all of them.
    fn device_meta(
        &self,
        seq: SeqId,
        heads: &[(usize, usize)],
    ) -> Result<Vec<(Vec<f32>, Vec<u32>)>> {
        self.check_no_pending()?;
        let m = self.meta.as_ref().expect("sequence on the device");
        let mut slots = Vec::new();
        let mut lens = Vec::with_capacity(heads.len());
        for &(l, h) in heads {
            let s = self.pool.slots(l, seq, h).map_err(be)?;
            lens.push(s.len());
            slots.extend(s);
        }
        let idx = self.slot_index(&slots)?;
        let metric = m.metric.index_select(&idx, 0)?.to_vec1::<f32>()?;
        let position = m.position.index_select(&idx, 0)?.to_vec1::<u32>()?;
        let mut at = 0;
        Ok(lens
            .into_iter()
            .map(|n| {
                let r = at..at + n;
                at += n;
                (metric[r.clone()].to_vec(), position[r].to_vec())
            })
            .collect())
    }

    /// Add KV-Compress's decode metric of one decode step of `seq` in `layer` to the device
    /// metric off the CUDA decode kernel (which adds it itself): `p` `[1, nh, 1, max_len]`
    /// probabilities, zero past each head's length; slot `i` of kv-head `h` gains
    /// `sum over h's query group of p^2`.
    pub(super) fn add_decode_metric(&mut self, layer: usize, seq: SeqId, p: &Tensor) -> Result<()> {
        let nkv = self.spec.kv_heads;
        let (_, nh, _, max) = p.dims4()?;
        // Summed over the group in head order, as the host scorer does.
        let m2 = p
            .reshape((nkv, nh / nkv, max))?
            .sqr()?
            .sum(1)?
            .to_dtype(DType::F32)?;
        let (mut slots, mut rows) = (Vec::new(), Vec::new());
        for h in 0..nkv {
            let s = self.pool.slots(layer, seq, h).map_err(be)?;
            rows.push(m2.get(h)?.narrow(0, 0, s.len())?);
            slots.extend(s);
        }
        self.add_device_metric(&slots, &Tensor::cat(&rows, 0)?)
    }

    /// `metric[slots[i]] += add[i]` in the device metric.
    fn add_device_metric(&mut self, slots: &[usize], add: &Tensor) -> Result<()> {
        let idx = self.slot_index(slots)?;
        let m = self.meta.as_mut().expect("sequence on the device");
        m.metric = m.metric.index_add(&idx, add, 0)?;
        Ok(())
    }
}
