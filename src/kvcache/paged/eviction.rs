//! Eviction in the storage: executing host plans ([`PagedCache::evict`]), deferring their moves,
//! and KV-Compress's device eviction ([`PagedCache::evict_on_device`]).
use candle_core::{DType, Result, Tensor};

use super::{be, DeferredMoves, DeviceEvict, EvictStats, PagedCache};
use crate::cuda::evict;
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::SeqId;

impl PagedCache {
    /// KV-Compress's eviction step for several sequences whose metric is on the device
    /// ([`PagedCache::keep_metric_on_device`]): each evicts `n_evict` blocks chosen over its
    /// heads from the device metric (protected positions kept), and is compacted, by
    /// `kernels/evict.cu` in one batch on CUDA (three launches; the block tables go up, the new
    /// lengths come back) or by its twin ([`evict::kvcompress_evict_batch_twin`]) elsewhere. The pool
    /// then shortens each head and frees its emptied blocks. Heads of any length stay on the
    /// device (past 16384 tokens the kernels sort and compact in device scratch).
    pub fn evict_on_device(&mut self, reqs: &[DeviceEvict]) -> Result<Vec<EvictStats>> {
        let dev = self.spec.device.clone();
        let mut clock = crate::profile::start(&dev);
        self.run_pending()?;
        let (layers, nkv) = (self.spec.layers, self.spec.kv_heads);
        let mut stats = vec![EvictStats::default(); reqs.len()];
        let batch = self.device_batch(reqs)?;
        if batch.is_empty() {
            return Ok(stats);
        }
        let ids: Vec<SeqId> = batch.iter().map(|&i| reqs[i].seq).collect();
        let seqs: Vec<evict::EvictSeq> = batch
            .iter()
            .map(|&i| evict::EvictSeq {
                heads: layers * nkv,
                kv_heads: nkv,
                first_protected: reqs[i].first_protected,
                n_evict: reqs[i].n_evict,
                crush: reqs[i].crush,
            })
            .collect();
        crate::profile::mark(&dev, &mut clock, "compress/evict.prepare");
        let steps = self.evict_batch(&ids, &seqs)?;
        crate::profile::mark(&dev, &mut clock, "compress/evict.kernels+counts");
        for (&i, step) in batch.iter().zip(steps) {
            let seq = reqs[i].seq;
            let (evicted, freed) = self.pool.truncate_heads(seq, &step.new_lens).map_err(be)?;
            if evicted > 0 {
                self.shrunk.insert(seq);
            }
            stats[i].evicted += evicted;
            stats[i].freed_blocks += freed;
        }
        crate::profile::mark(&dev, &mut clock, "compress/evict.pool_update");
        Ok(stats)
    }

    /// The requests of [`PagedCache::evict_on_device`] that evict something, as indices into
    /// `reqs` in order; an error for a sequence whose metric is on the host.
    fn device_batch(&self, reqs: &[DeviceEvict]) -> Result<Vec<usize>> {
        let mut batch = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            if !self.metric_on_device(r.seq) {
                candle_core::bail!("sequence {} keeps its metric on the host", r.seq);
            }
            if r.n_evict > 0 {
                batch.push(i);
            }
        }
        Ok(batch)
    }

    /// The device part of [`PagedCache::evict_on_device`]: evict and compact sequences `ids`
    /// as `seqs` says (one entry each, same order) by `kernels/evict.cu` on CUDA, or by its
    /// twin elsewhere. The kernels read the decode batch's device tables when they hold every
    /// one of these sequences as the pool does (none changed since the step); else the pool's,
    /// gathered and uploaded. Returns each sequence's new head lengths; the pool is not
    /// updated here.
    fn evict_batch(
        &mut self,
        ids: &[SeqId],
        seqs: &[evict::EvictSeq],
    ) -> Result<Vec<evict::EvictStep>> {
        let bs = self.spec.block_size;
        let on_step = match &self.step {
            Some(st)
                if self.on_cuda()
                    && ids
                        .iter()
                        .all(|s| !self.changed.contains(s) && !self.shrunk.contains(s)) =>
            {
                st.tables.heads_of(ids)
            }
            _ => None,
        };
        Ok(match on_step {
            Some((tab, lens)) => {
                let m = self.meta.as_ref().expect("checked above");
                let st = self.step.as_ref().expect("matched above");
                evict::kvcompress_evict_on_tables(
                    &self.k,
                    &self.v,
                    &m.metric,
                    &m.position,
                    st.tables.blocks(),
                    &tab,
                    &lens,
                    seqs,
                    bs,
                )?
            }
            None => {
                let tables = self.pool.head_tables(ids).map_err(be)?;
                if self.on_cuda() {
                    let m = self.meta.as_ref().expect("checked above");
                    evict::kvcompress_evict_batch(
                        &self.k,
                        &self.v,
                        &m.metric,
                        &m.position,
                        &tables,
                        seqs,
                        bs,
                    )?
                } else {
                    self.evict_batch_twin(&tables, seqs)?
                }
            }
        })
    }

    /// [`evict::kvcompress_evict_batch_twin`] on host copies of the storage, written back (the CPU
    /// side of [`PagedCache::evict_on_device`]: slow, for tests and CPU runs that ask for it).
    fn evict_batch_twin(
        &mut self,
        tables: &evict::HeadTables,
        seqs: &[evict::EvictSeq],
    ) -> Result<Vec<evict::EvictStep>> {
        fn run<T: candle_core::WithDType>(
            c: &mut PagedCache,
            tables: &evict::HeadTables,
            seqs: &[evict::EvictSeq],
        ) -> Result<Vec<evict::EvictStep>> {
            let (rows, d) = c.k.dims2()?;
            let dev = c.spec.device.clone();
            let mut k = c.k.flatten_all()?.to_vec1::<T>()?;
            let mut v = c.v.flatten_all()?.to_vec1::<T>()?;
            let m = c.meta.as_mut().expect("checked by the caller");
            let mut metric = m.metric.to_vec1::<f32>()?;
            let mut position = m.position.to_vec1::<u32>()?;
            let steps = evict::kvcompress_evict_batch_twin(
                &mut k,
                &mut v,
                &mut metric,
                &mut position,
                tables,
                seqs,
                c.spec.block_size,
                d,
            )
            .map_err(candle_core::Error::wrap)?;
            m.metric = Tensor::from_vec(metric, rows, &dev)?;
            m.position = Tensor::from_vec(position, rows, &dev)?;
            c.k = Tensor::from_vec(k, (rows, d), &dev)?;
            c.v = Tensor::from_vec(v, (rows, d), &dev)?;
            Ok(steps)
        }
        match self.spec.dtype {
            DType::F32 => run::<f32>(self, tables, seqs),
            DType::BF16 => run::<half::bf16>(self, tables, seqs),
            DType::F16 => run::<half::f16>(self, tables, seqs),
            dt => candle_core::bail!("paged cache dtype {dt:?}"),
        }
    }

    /// Execute an eviction plan for `seq`: compact every listed head (K, V, metric, position
    /// move together) and free the emptied blocks.
    pub fn evict(&mut self, seq: SeqId, plan: &EvictionPlan) -> Result<EvictStats> {
        if self
            .deferred
            .as_ref()
            .is_some_and(|d| d.seqs.contains(&seq))
        {
            // Its earlier moves must land before slots of it move again.
            self.run_pending()?;
        }
        let mut st = EvictStats::default();
        // Plan every head first, then one move launch for the whole plan: heads own disjoint
        // blocks, so their moves never alias (with continual compression this runs after
        // nearly every decode step; a launch and an upload per head was most of its cost).
        let mut compactions = Vec::with_capacity(plan.heads.len());
        let (mut from, mut to) = (Vec::new(), Vec::new());
        let mut seen = std::collections::BTreeSet::new();
        for h in &plan.heads {
            if h.evict.is_empty() {
                continue;
            }
            if !seen.insert((h.layer, h.kv_head)) {
                candle_core::bail!(
                    "eviction plan lists layer {} kv-head {} twice",
                    h.layer,
                    h.kv_head
                );
            }
            let c = self
                .pool
                .plan_compaction(h.layer, seq, h.kv_head, &h.evict)
                .map_err(be)?;
            from.extend(c.moves.iter().map(|m| m.from as u32));
            to.extend(c.moves.iter().map(|m| m.to));
            st.evicted += h.evict.len();
            st.moved += c.moves.len();
            st.freed_blocks += c.freed.len();
            compactions.push(c);
        }
        match &mut self.deferred {
            Some(d) if !from.is_empty() => {
                d.from.extend(from);
                d.to.extend(to);
                d.seqs.insert(seq);
            }
            _ => self.copy_rows(from, &to)?,
        }
        if !compactions.is_empty() {
            self.changed.insert(seq);
        }
        for c in &compactions {
            self.pool.apply(c).map_err(be)?;
        }
        Ok(st)
    }

    /// Roll `seq` back to its first `len` positions: every slot at a position `>= len` is
    /// dropped from every head and the sequence's length becomes `len`, so the next token is
    /// written at position `len` again (KVzip's repeat passes, appended after the context and
    /// removed after scoring). The dropped slots must be each head's last logical slots (they
    /// were appended after position `len` and nothing was evicted since); otherwise, or for a
    /// sequence whose metric lives on the device, it is an error and nothing changes. Returns
    /// the blocks freed.
    pub fn truncate_seq(&mut self, seq: SeqId, len: usize) -> Result<usize> {
        self.run_pending()?;
        if self.metric_on_device(seq) {
            candle_core::bail!(
                "sequence {seq} keeps its metric on the device: cannot roll it back"
            );
        }
        let cur = self.pos.get(&seq).copied();
        if cur.is_none_or(|c| len > c) {
            candle_core::bail!("cannot roll sequence {seq} of length {cur:?} back to {len}");
        }
        let (nl, nkv) = (self.spec.layers, self.spec.kv_heads);
        let mut new_lens = Vec::with_capacity(nl * nkv);
        for l in 0..nl {
            for h in 0..nkv {
                let pos = self.pool.positions(l, seq, h).map_err(be)?;
                let keep = pos.iter().take_while(|&&p| (p as usize) < len).count();
                if pos[keep..].iter().any(|&p| (p as usize) < len) {
                    candle_core::bail!(
                        "layer {l} kv-head {h} of sequence {seq}: positions past {len} are not the head's last slots"
                    );
                }
                new_lens.push(keep as u32);
            }
        }
        let (_, freed) = self.pool.truncate_heads(seq, &new_lens).map_err(be)?;
        self.pos.insert(seq, len);
        self.changed.insert(seq);
        Ok(freed)
    }

    /// Collect the K/V moves of the following [`PagedCache::evict`] calls instead of running
    /// each at once; [`PagedCache::flush_moves`] runs them all in one copy. Continual
    /// compression of a decode batch evicts from every sequence after every step: on a GPU one
    /// launch and two synchronising uploads per sequence, where one of each does. Sequences
    /// own disjoint blocks, so the moves of different sequences never alias. The block
    /// bookkeeping moves at once; attention flushes first, so the cache never reads stale
    /// rows. If the deferred copy fails, the sequences with collected moves are unusable (the
    /// caller fails them all, as a failed decode step does).
    pub fn defer_moves(&mut self) {
        self.deferred.get_or_insert_with(DeferredMoves::default);
    }

    /// Run the moves collected since [`PagedCache::defer_moves`] and stop collecting.
    pub fn flush_moves(&mut self) -> Result<()> {
        self.run_pending()?;
        self.deferred = None;
        Ok(())
    }

    /// Run the collected moves, if any, and keep collecting.
    pub(super) fn run_pending(&mut self) -> Result<()> {
        let Some(d) = &mut self.deferred else {
            return Ok(());
        };
        let from = std::mem::take(&mut d.from);
        let to = std::mem::take(&mut d.to);
        d.seqs.clear();
        self.copy_rows(from, &to)
    }

    /// Readers of K/V storage through `&self` cannot run collected moves: refuse instead.
    pub(super) fn check_no_pending(&self) -> Result<()> {
        if self.deferred.as_ref().is_some_and(|d| !d.from.is_empty()) {
            candle_core::bail!("paged cache: evictions are pending; call flush_moves first");
        }
        Ok(())
    }
}
