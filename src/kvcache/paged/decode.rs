//! The CUDA decode step: one token per sequence of a batch through the paged-attention kernels,
//! with the batch's block tables kept on the device between steps.
use candle_core::{Device, Result, Tensor};

use super::{be, DecodeStep, DeviceMeta, PagedCache, SCRATCH_STRIDE_STEP};
use crate::cuda::kv_cache;
use crate::cuda::paged_attention::{self, DecodeShape, DeviceTables};
use crate::kvcache::blocks::BlockError;
use crate::kvcache::step_tables::StepTables;
use crate::kvcache::{AttnCall, AttnOut, Probe, SeqId};

impl PagedCache {
    /// Decode step of every sequence of `call` (one token each) with the CUDA paged-attention
    /// kernels. The layer-0 call appends the step's token to every head of every layer and
    /// brings the batch's device block tables up to date ([`Self::begin_decode_step`]); every
    /// layer then writes its K/V and attends through views of them: one write launch and one
    /// launch pair per layer, no upload.
    pub(super) fn attend_decode_cuda(&mut self, call: &AttnCall<'_>) -> Result<AttnOut> {
        let (b, nh, _, d) = call.q.dims4()?;
        let nkv = self.spec.kv_heads;
        self.check_decode_kv(call, b, d)?;
        if call.layer == 0 {
            let mut clock = crate::profile::start(&self.spec.device);
            self.begin_decode_step(call.seqs)?;
            crate::profile::mark(&self.spec.device, &mut clock, "decode.attend/step_tables");
        }
        let step = match &mut self.step {
            Some(s) if s.next_layer == call.layer && s.tables.matches(call.seqs) => s,
            _ => candle_core::bail!(
                "decode call for layer {} of a batch whose step did not start at layer 0 \
                 (calls must run layer 0, 1, ... with the same sequences)",
                call.layer
            ),
        };
        step.next_layer += 1;
        let views = step.tables.layer(call.layer)?;
        let rows = |x: &Tensor| x.contiguous()?.reshape((b * nkv, d));
        let (m, p) = DeviceMeta::tensors(self.meta.as_ref());
        kv_cache::write_kv_at(
            &self.k,
            &self.v,
            m,
            p,
            &rows(call.k)?,
            &rows(call.v)?,
            &views.slots,
            &views.positions,
        )?;
        let want = call.probe != Probe::None;
        let stride = probs_stride(want, views.max_len, step.tables.max_len());
        let shape = DecodeShape {
            batch: b,
            num_kv_heads: nkv,
            group: nh / nkv,
            head_dim: d,
            max_blocks: views.max_blocks,
            block_size: self.spec.block_size,
            probs_stride: stride,
            num_slots: self.pool.num_blocks() * self.spec.block_size,
        };
        // The decode metric goes straight into the device metric when a sequence of the call
        // keeps its metric there (it adds to the others' slots too, whose device metric is
        // unused: theirs is on the host).
        let metric = self
            .meta
            .as_ref()
            .filter(|m| call.seqs.iter().any(|s| m.seqs.contains(s)))
            .map(|m| &m.metric);
        let tables =
            DeviceTables::prechecked(shape, views.blocks, views.starts, views.lens, views.max_len)?;
        let mut q = call.q.reshape((b, nh, d))?.contiguous()?;
        if q.layout().start_offset() != 0 {
            q = q.copy()?;
        }
        let dev = &self.spec.device;
        let out = Tensor::zeros((b, nh, d), q.dtype(), dev)?;
        let ws = decode_workspace(want, &mut step.ws, &shape, stride, dev)?;
        paged_attention::paged_decode_into(
            &q,
            &self.k,
            &self.v,
            &tables,
            &ws,
            &out,
            call.scale as f32,
            metric,
            want,
        )?;
        let probs = if want {
            Some(ws.probs.reshape((b, nh, 1, stride))?)
        } else {
            step.ws = Some(ws);
            None
        };
        if call.layer + 1 == self.spec.layers {
            for &sid in call.seqs {
                *self.pos.get_mut(&sid).expect("appended at layer 0") += 1;
            }
        }
        Ok(AttnOut {
            out: out.reshape((b, nh, 1, d))?,
            probs,
        })
    }

    /// Refuse K/V of a decode call that are not `[b, kv_heads, 1, d]` each (`b`, `d` of its
    /// queries) or whose head dim is not the cache's.
    fn check_decode_kv(&self, call: &AttnCall<'_>, b: usize, d: usize) -> Result<()> {
        let nkv = self.spec.kv_heads;
        let (kb, kh, kt, kd) = call.k.dims4()?;
        if (kb, kh, kt, kd) != (b, nkv, 1, d)
            || d != self.spec.head_dim
            || call.v.dims() != call.k.dims()
        {
            candle_core::bail!(
                "decode call expects k, v [{b}, {nkv}, 1, {}], got {:?} / {:?}",
                self.spec.head_dim,
                call.k.dims(),
                call.v.dims()
            );
        }
        Ok(())
    }

    /// The layer-0 work of a CUDA decode step: append one token to every head of every layer
    /// of every sequence ([`BlockPool::append_step`], all or nothing) and bring the batch's
    /// device tables up to date: follow the appends and the rows of sequences changed since
    /// the last step when the batch is the same, rebuild them otherwise.
    fn begin_decode_step(&mut self, seqs: &[SeqId]) -> Result<()> {
        let positions = seqs
            .iter()
            .map(|s| {
                self.pos
                    .get(s)
                    .map(|&p| p as u32)
                    .ok_or_else(|| be(BlockError::UnknownSeq(*s)))
            })
            .collect::<Result<Vec<u32>>>()?;
        let with_pos: Vec<(SeqId, u32)> = seqs
            .iter()
            .copied()
            .zip(positions.iter().copied())
            .collect();
        // Sequences whose metric lives on the device keep their positions there too.
        let meta = self.meta.as_ref().map(|m| &m.seqs);
        let app = self
            .pool
            .append_step(&with_pos, |s| !meta.is_some_and(|m| m.contains(&s)))
            .map_err(be)?;
        let mut step = self.step.take();
        let followed = match &mut step {
            Some(s) if s.tables.matches(seqs) => {
                let changed: Vec<usize> = (0..seqs.len())
                    .filter(|&i| self.changed.contains(&seqs[i]))
                    .collect();
                let shrunk: Vec<usize> = (0..seqs.len())
                    .filter(|&i| self.shrunk.contains(&seqs[i]) && !self.changed.contains(&seqs[i]))
                    .collect();
                s.tables
                    .follow(&self.pool, &app, &positions, &changed, &shrunk)?
            }
            _ => false,
        };
        self.changed.clear();
        self.shrunk.clear();
        let step = if followed {
            step.expect("followed")
        } else {
            let mut tables = StepTables::build(&self.pool, seqs, &self.spec.device)?;
            tables.start_step(&app, &positions)?;
            DecodeStep {
                tables,
                next_layer: 0,
                ws: step.and_then(|s| s.ws),
            }
        };
        self.step = Some(DecodeStep {
            next_layer: 0,
            ..step
        });
        Ok(())
    }
}

/// The probability stride of a decode launch (at least 1): probabilities asked for (`want`)
/// come back as wide as the layer's longest head (`layer_max`); otherwise one stride for every
/// layer of the step, the step's longest head (`step_max`) rounded up to
/// [`SCRATCH_STRIDE_STEP`], so that the scratch serves the steps until the longest head grows
/// past it (a new one each step re-filled `batch * heads * stride` f32 and four tensors per
/// step).
fn probs_stride(want: bool, layer_max: usize, step_max: usize) -> usize {
    if want {
        layer_max
    } else {
        step_max.next_multiple_of(SCRATCH_STRIDE_STEP)
    }
    .max(1)
}

/// The scratch of a decode launch of `shape` and `stride`: a new one when probabilities are
/// asked for (`want`: they are returned in it), else the step's shared scratch taken from
/// `shared` when it fits, a new one otherwise.
fn decode_workspace(
    want: bool,
    shared: &mut Option<paged_attention::DecodeWorkspace>,
    shape: &DecodeShape,
    stride: usize,
    dev: &Device,
) -> Result<paged_attention::DecodeWorkspace> {
    Ok(if want {
        paged_attention::DecodeWorkspace::new(shape, stride, None, dev)?
    } else {
        match shared.take() {
            Some(ws) if ws.fits(shape, stride) => ws,
            _ => paged_attention::DecodeWorkspace::new(shape, stride, None, dev)?,
        }
    })
}
