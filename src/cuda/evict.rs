//! `kernels/evict.cu`: KV-Compress's eviction step for a batch of sequences on the device
//! (per-head sort, candidate scoring, selection per sequence, KVCrush's block-form picks where
//! asked, compaction); only block tables and lengths go up and per-head counts and lengths come
//! back. [`kvcompress_evict_twin`] is the same step on host slices, built from the selection in
//! [`super::select`] that the host planners use too.
//!
//! One file, over the usual length, because the layer keeps one wrapper file per kernel file:
//! the twin, the host checks and uploads, and the launches of `evict.cu`'s five kernels share
//! private argument structs (`EvictArgs`, `CrushArgs`, `HeadsAt`).
use candle_core::{DType, Device, Result, Tensor};

use super::kv_cache::move_slots_twin;
use super::paged_attention::DecodeShape;
use super::select::{self, BlockPicks};
use super::{check_cache, check_len, check_meta, distinct_blocks, OpsError, OpsResult};

/// What one device-side KV-Compress eviction step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictStep {
    /// Candidates (blocks) taken per head.
    pub counts: Vec<u32>,
    /// Context length of each head after compaction.
    pub new_lens: Vec<u32>,
}

/// KV-Compress's eviction step for ONE sequence on slices (twin of `kernels/evict.cu`):
/// protected slots (`position >= seq.first_protected`) count as +inf, each head's slots are
/// sorted ascending (ties by logical index), candidates scored, the `seq.n_evict` lowest finite
/// candidates over all heads taken ([`super::select::select_blocks`]), each head
/// evicts the prefix [`super::select::head_evictions`] gives; with `seq.crush`,
/// KVCrush's block form takes its representatives back out of those prefixes
/// ([`super::select::block_picks`], layers of `seq.kv_heads` heads). Then each head
/// is compacted (tail survivors, tail-most first, into the lowest holes, as
/// the block pool's compaction plan (`crate::kvcache::blocks`)) moving K, V, metric and position.
///
/// `block_tables`: `[heads, max_blocks]` (`heads` = `ctx_lens.len()`, `seq.heads` is not
/// read); `ctx_lens`: `[heads]` (updated); unprotected metrics must be finite.
#[allow(clippy::too_many_arguments)]
pub fn kvcompress_evict_twin<T: Copy>(
    k_cache: &mut [T],
    v_cache: &mut [T],
    metric: &mut [f32],
    position: &mut [u32],
    block_tables: &[u32],
    ctx_lens: &mut [u32],
    max_blocks: usize,
    block_size: usize,
    head_dim: usize,
    seq: &EvictSeq,
) -> OpsResult<EvictStep> {
    use select::{head_evictions_of, select_blocks};
    let heads = ctx_lens.len();
    let num_slots = metric.len();
    check_len("position", position.len(), num_slots)?;
    check_len("k_cache", k_cache.len(), num_slots * head_dim)?;
    let shape = DecodeShape::for_eviction(heads, head_dim, max_blocks, block_size, num_slots);
    shape.check_disjoint(block_tables, ctx_lens)?;
    let slots: Vec<Vec<usize>> = (0..heads)
        .map(|h| {
            let t = &block_tables[h * max_blocks..];
            (0..ctx_lens[h] as usize)
                .map(|i| t[i / block_size] as usize * block_size + i % block_size)
                .collect()
        })
        .collect();
    let masked: Vec<Vec<f32>> = slots
        .iter()
        .map(|s| {
            s.iter()
                .map(|&x| {
                    if position[x] >= seq.first_protected {
                        f32::INFINITY
                    } else {
                        metric[x]
                    }
                })
                .collect()
        })
        .collect();
    let counts = select_blocks(&masked, block_size, seq.n_evict);
    let mut evicted = head_evictions_of(&masked, block_size, &counts);
    if let Some(picks) = &seq.crush {
        if seq.kv_heads == 0 || heads % seq.kv_heads != 0 {
            return Err(OpsError::Shape(format!(
                "KVCrush's picks group {heads} heads into layers of {} kv-heads",
                seq.kv_heads
            )));
        }
        let meta: Vec<(Vec<f32>, Vec<u32>)> = slots
            .iter()
            .map(|s| {
                (
                    s.iter().map(|&x| metric[x]).collect(),
                    s.iter().map(|&x| position[x]).collect(),
                )
            })
            .collect();
        let views: Vec<(&[f32], &[u32])> = meta.iter().map(|(m, p)| (&m[..], &p[..])).collect();
        select::block_picks(
            &views,
            &mut evicted,
            seq.kv_heads,
            seq.first_protected,
            block_size,
            picks,
        );
    }
    for (h, evict) in evicted.iter().enumerate() {
        if evict.is_empty() {
            continue;
        }
        let (from, to) = compaction_moves(&slots[h], evict);
        move_slots_twin(
            k_cache,
            v_cache,
            Some(metric),
            Some(position),
            &from,
            &to,
            head_dim,
        )?;
        ctx_lens[h] -= evict.len() as u32;
    }
    Ok(EvictStep {
        counts: counts.into_iter().map(|c| c as u32).collect(),
        new_lens: ctx_lens.to_vec(),
    })
}

/// The compaction of one head that evicts the logical slots `evict` (distinct) of its
/// physical `slots`: tail survivors, tail-most first, move into the lowest holes, so the head
/// keeps its first `slots.len() - evict.len()` logical slots. (from, to) physical slots.
fn compaction_moves(slots: &[usize], evict: &[usize]) -> (Vec<u32>, Vec<u32>) {
    let len = slots.len();
    let mut gone = vec![false; len];
    for &e in evict {
        gone[e] = true;
    }
    let new_len = len - evict.len();
    let holes = (0..new_len).filter(|&i| gone[i]);
    let tail = (new_len..len).rev().filter(|&i| !gone[i]);
    holes
        .zip(tail)
        .map(|(hole, t)| (slots[t] as u32, slots[hole] as u32))
        .unzip()
}

/// One sequence of a batched eviction step ([`kvcompress_evict_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvictSeq {
    /// Its heads (layers x kv-heads): the next `heads` rows of the batch's tables.
    pub heads: usize,
    /// kv-heads per layer (how KVCrush's picks group the heads; read only with `crush`).
    pub kv_heads: usize,
    /// Its slots with `position >= first_protected` are never evicted.
    pub first_protected: u32,
    /// Blocks to evict over its heads.
    pub n_evict: usize,
    /// KVCrush's block form after the selection.
    pub crush: Option<BlockPicks>,
}

/// The block tables of many heads back to back, as the batched eviction takes them: head `h`
/// owns `blocks[start[h]..start[h + 1]]`, exactly `ceil(lens[h] / block_size)` blocks. Unlike a
/// `[heads, max_blocks]` array padded to the longest head, its size is the blocks in use (one
/// long head sets the width of a padded table for all;
/// docs/findings/2026-12-02-ragged-tables-and-a-220-ms-scatter-per-fork.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeadTables {
    /// Physical block ids, head after head.
    pub blocks: Vec<u32>,
    /// `[heads + 1]`: where each head's blocks start in `blocks` (the last is `blocks.len()`).
    pub start: Vec<u32>,
    /// `[heads]`: tokens cached per head.
    pub lens: Vec<u32>,
}

impl HeadTables {
    /// Tables of `heads`, each its blocks and length.
    pub fn from_heads<'a>(heads: impl IntoIterator<Item = (&'a [u32], usize)>) -> Self {
        let mut t = HeadTables {
            start: vec![0],
            ..Default::default()
        };
        for (b, len) in heads {
            t.blocks.extend_from_slice(b);
            t.start.push(t.blocks.len() as u32);
            t.lens.push(len as u32);
        }
        t
    }

    /// Tables of a padded `[heads, max_blocks]` array (each row's first `ceil(len /
    /// block_size)` blocks).
    pub fn from_padded(tables: &[u32], lens: &[u32], max_blocks: usize, block_size: usize) -> Self {
        Self::from_heads(lens.iter().enumerate().map(|(h, &l)| {
            let n = (l as usize).div_ceil(block_size.max(1)).min(max_blocks);
            (&tables[h * max_blocks..][..n], l as usize)
        }))
    }

    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.lens.len()
    }

    /// Blocks of the longest head's table (at least 1, as a padded table's width).
    pub fn max_blocks(&self) -> usize {
        self.start
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
            .max(1)
    }

    /// `blocks` as a device upload takes it: never empty (an empty tensor cannot be launched
    /// on), one unread block 0 when no head holds any.
    pub fn upload_blocks(&self) -> &[u32] {
        if self.blocks.is_empty() {
            &[0]
        } else {
            &self.blocks
        }
    }

    /// Blocks of head `h`.
    pub fn head(&self, h: usize) -> &[u32] {
        &self.blocks[self.start[h] as usize..self.start[h + 1] as usize]
    }

    /// What the kernels need for memory safety: `start` partitions `blocks`, every head holds
    /// exactly `ceil(len / block_size)` blocks, and every block id is below `num_slots /
    /// block_size`.
    pub fn check(&self, block_size: usize, num_slots: usize) -> OpsResult<()> {
        self.validate(block_size, num_slots, false)
    }

    /// [`Self::check`], and no block belongs to two heads (one pass with a bitmap of the
    /// pool's blocks): what the eviction kernels and a decode call that adds the metric need.
    pub fn check_disjoint(&self, block_size: usize, num_slots: usize) -> OpsResult<()> {
        self.validate(block_size, num_slots, true)
    }

    pub(crate) fn validate(
        &self,
        block_size: usize,
        num_slots: usize,
        disjoint: bool,
    ) -> OpsResult<()> {
        let heads = self.heads();
        check_len("head table starts", self.start.len(), heads + 1)?;
        if block_size == 0 || self.start[0] != 0 || self.start[heads] as usize != self.blocks.len()
        {
            return Err(OpsError::Shape(format!(
                "head tables: starts must run from 0 to the {} blocks (got {:?}..{:?}), block size {block_size}",
                self.blocks.len(),
                self.start.first(),
                self.start.last()
            )));
        }
        for h in 0..heads {
            let (a, b) = (self.start[h], self.start[h + 1]);
            let want = (self.lens[h] as usize).div_ceil(block_size);
            if b < a || (b - a) as usize != want {
                return Err(OpsError::Shape(format!(
                    "head {h}: {} tokens need {want} blocks, its table has {}",
                    self.lens[h],
                    b as i64 - a as i64
                )));
            }
        }
        let num_blocks = num_slots / block_size;
        if let Some(&b) = self.blocks.iter().find(|&&b| b as usize >= num_blocks) {
            return Err(OpsError::Slot {
                what: "head tables (block id)",
                slot: b as usize,
                num_slots: num_blocks,
            });
        }
        if !disjoint {
            return Ok(());
        }
        distinct_blocks(
            "head tables (block id)",
            self.blocks.iter().copied(),
            num_blocks,
        )
    }
}

/// [`kvcompress_evict`] for several sequences at once (twin of the batched launches of
/// `kernels/evict.cu`): sequence `i` owns the next `seqs[i].heads` heads of `tables` and is
/// evicted on its own. Tables must be disjoint (sequences own their blocks); `tables` is not
/// changed (the new lengths are in the returned steps).
#[allow(clippy::too_many_arguments)]
pub fn kvcompress_evict_batch_twin<T: Copy>(
    k_cache: &mut [T],
    v_cache: &mut [T],
    metric: &mut [f32],
    position: &mut [u32],
    tables: &HeadTables,
    seqs: &[EvictSeq],
    block_size: usize,
    head_dim: usize,
) -> OpsResult<Vec<EvictStep>> {
    let heads: usize = seqs.iter().map(|s| s.heads).sum();
    check_len("head tables", tables.heads(), heads)?;
    tables.check_disjoint(block_size, metric.len())?;
    let mut first = 0;
    let mut steps = Vec::with_capacity(seqs.len());
    for s in seqs {
        let rows = first..first + s.heads;
        first = rows.end;
        // This sequence's heads as the one-sequence twin takes them (padded to its longest).
        let max_blocks = rows
            .clone()
            .map(|h| tables.head(h).len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut padded = vec![0u32; s.heads * max_blocks];
        for (row, h) in padded.chunks_exact_mut(max_blocks).zip(rows.clone()) {
            row[..tables.head(h).len()].copy_from_slice(tables.head(h));
        }
        let mut lens = tables.lens[rows].to_vec();
        steps.push(kvcompress_evict_twin(
            k_cache, v_cache, metric, position, &padded, &mut lens, max_blocks, block_size,
            head_dim, s,
        )?);
    }
    Ok(steps)
}

/// Longest head the eviction kernels sort and compact in shared memory (`SMEM_MAX_LEN` in
/// kernels/evict.cu: 16384 keys of 8 bytes fill 128 KB of an sm_90 block's); longer heads take
/// the global-memory sort (`kvc_long_*`) and keep their compaction lists in device scratch.
const EVICT_SMEM_MAX_LEN: usize = 16384;

/// Keys one `kvc_long_chunk` block sorts in shared memory (`LONG_CHUNK` in kernels/evict.cu).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const EVICT_LONG_CHUNK: usize = 16384;

/// Longest sorted prefix `kvc_sort_prefix` selects (`PREFIX_MAX` in kernels/evict.cu).
const EVICT_PREFIX_MAX: usize = 512;

/// KV-Compress's eviction step for one sequence on the device: [`kvcompress_evict_batch`]
/// with one sequence owning every row of `block_tables` `[heads, max_blocks]` and `ctx_lens`
/// `[heads]` (all layers x kv-heads).
#[allow(clippy::too_many_arguments)]
pub fn kvcompress_evict(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: &Tensor,
    position: &Tensor,
    block_tables: &[u32],
    ctx_lens: &[u32],
    block_size: usize,
    first_protected: u32,
    n_evict: usize,
) -> Result<EvictStep> {
    let seq = EvictSeq {
        heads: ctx_lens.len(),
        kv_heads: ctx_lens.len(),
        first_protected,
        n_evict,
        crush: None,
    };
    let max_blocks = block_tables.len() / ctx_lens.len().max(1);
    let tables = HeadTables::from_padded(block_tables, ctx_lens, max_blocks, block_size);
    let mut steps = kvcompress_evict_batch(
        k_cache,
        v_cache,
        metric,
        position,
        &tables,
        &[seq],
        block_size,
    )?;
    Ok(steps.pop().expect("one sequence"))
}

/// KV-Compress's eviction step for several sequences on the device (twin:
/// [`kvcompress_evict_batch_twin`]): sequence `i` owns the next `seqs[i].heads` heads of
/// `tables`; its slots with `position >= first_protected` are never evicted and `n_evict`
/// blocks are taken over its heads; with `crush`, KVCrush's block form keeps its groups out of
/// the evictions (`kvc_crush_pick`: block size <= [`CRUSH_MAX_BLOCK`], layers of at most
/// [`CRUSH_MAX_KV_HEADS`] kv-heads, the same `kv_heads` for every sequence). Moves K, V,
/// `metric` `[num_slots]` f32 and `position` `[num_slots]` u32 in place; returns each sequence's per-head counts and new lengths (the
/// only data coming back). Three launches whatever the number of sequences; what goes up is
/// the blocks in use (not a table padded to the longest head) and a few numbers per head.
pub fn kvcompress_evict_batch(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: &Tensor,
    position: &Tensor,
    tables: &HeadTables,
    seqs: &[EvictSeq],
    block_size: usize,
) -> Result<Vec<EvictStep>> {
    let heads = tables.heads();
    tables.check_disjoint(block_size, k_cache.dim(0)?)?;
    let blocks = tables.upload_blocks();
    let blocks = Tensor::from_slice(blocks, blocks.len(), k_cache.device())?;
    let heads_at = HeadsAt {
        blocks: &blocks,
        tab: &tables.start[..heads],
        start: &tables.start,
        lens: &tables.lens,
    };
    evict_heads(
        k_cache, v_cache, metric, position, &heads_at, seqs, block_size,
    )
}

/// [`kvcompress_evict_batch`] on block tables already on the device: head `h`'s table is
/// `blocks[tab[h]..]`, `lens[h]` tokens (a decode batch's
/// [`super::step_tables::StepTables`], which checked its ids for range and overlap when it
/// built them and takes later ids from the pool). Only `tab`, the lengths and a few numbers
/// per sequence go up: no table is gathered, checked or uploaded per step. Checked here: every
/// head's table lies inside `blocks`.
#[allow(clippy::too_many_arguments)]
pub fn kvcompress_evict_on_tables(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: &Tensor,
    position: &Tensor,
    blocks: &Tensor,
    tab: &[u32],
    lens: &[u32],
    seqs: &[EvictSeq],
    block_size: usize,
) -> Result<Vec<EvictStep>> {
    let heads = tab.len();
    let table_len = blocks.dims1()?;
    if lens.len() != heads || blocks.dtype() != DType::U32 || block_size == 0 {
        return Err(OpsError::Shape(format!(
            "{heads} table offsets, {} lengths, {:?} blocks, block size {block_size}",
            lens.len(),
            blocks.dtype()
        ))
        .into());
    }
    let mut start = Vec::with_capacity(heads + 1);
    start.push(0u32);
    for (h, (&t, &l)) in tab.iter().zip(lens).enumerate() {
        let n = (l as usize).div_ceil(block_size);
        if t as usize + n > table_len {
            return Err(OpsError::Shape(format!(
                "head {h}: {n} blocks at {t} pass the {table_len} of the device table"
            ))
            .into());
        }
        start.push(start[h] + n as u32);
    }
    let heads_at = HeadsAt {
        blocks,
        tab,
        start: &start,
        lens,
    };
    evict_heads(
        k_cache, v_cache, metric, position, &heads_at, seqs, block_size,
    )
}

/// Where a batched eviction finds its heads: head `h`'s table at `blocks[tab[h]..]`, its
/// outputs at `start[h]..start[h + 1]` (`ceil(lens[h] / block_size)` blocks).
struct HeadsAt<'a> {
    blocks: &'a Tensor,
    tab: &'a [u32],
    start: &'a [u32],
    lens: &'a [u32],
}

/// The launches of [`kvcompress_evict_batch`] once the tables are on the device (the checks
/// both front doors share first).
fn evict_heads(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: &Tensor,
    position: &Tensor,
    at: &HeadsAt<'_>,
    seqs: &[EvictSeq],
    block_size: usize,
) -> Result<Vec<EvictStep>> {
    let num_slots = check_cache(k_cache, v_cache, k_cache.dim(1)?)?;
    check_meta(Some(metric), Some(position), num_slots)?;
    let heads = at.lens.len();
    let seq_heads: usize = seqs.iter().map(|s| s.heads).sum();
    if seq_heads != heads {
        return Err(OpsError::Shape(format!(
            "{heads} heads in the tables, {seq_heads} in the sequences"
        ))
        .into());
    }
    let max_len = at.lens.iter().copied().max().unwrap_or(0) as usize;
    if heads == 0 || max_len == 0 || seqs.iter().all(|s| s.n_evict == 0) {
        return Ok(split_steps(seqs, &vec![0; heads], at.lens));
    }
    let dev = k_cache.device();
    let crush = crush_args(seqs, block_size, dev)?;
    // Per head: protected position; per sequence: first head row and blocks to take.
    let mut protect = Vec::with_capacity(heads);
    let mut head_start = Vec::with_capacity(seqs.len() + 1);
    head_start.push(0u32);
    for s in seqs {
        protect.extend(std::iter::repeat_n(s.first_protected, s.heads));
        head_start.push(head_start.last().copied().unwrap_or(0) + s.heads as u32);
    }
    // i64 on the device (candle has no u64), read as unsigned long long by the kernel.
    let n_evict: Vec<i64> = seqs.iter().map(|s| s.n_evict as i64).collect();
    // Sorted slots each head's step needs: n_evict blocks' worth (a head gives at most
    // n_evict blocks), all of them with KVCrush (its median reads the whole order).
    let mut want = Vec::with_capacity(heads);
    for s in seqs {
        let w = match s.crush {
            Some(_) => u32::MAX,
            None => u32::try_from(s.n_evict.saturating_mul(block_size)).unwrap_or(u32::MAX),
        };
        want.extend(std::iter::repeat_n(w, s.heads));
    }
    // Launch each sort only when some head needs it (the kernels' own split, `takes_prefix`
    // in kernels/evict.cu): a decode step's ~17k heads all take the prefix sort, and 17k
    // 1024-thread blocks that return at once still cost their scheduling.
    let prefix = |h: usize| want[h] < at.lens[h] && want[h] as usize <= EVICT_PREFIX_MAX;
    let sort_prefix = (0..heads).any(prefix);
    let long = |h: usize| at.lens[h] as usize > EVICT_SMEM_MAX_LEN;
    let sort_full = (0..heads).any(|h| at.lens[h] > 0 && !prefix(h) && !long(h));
    let long_sort = LongSort::new((0..heads).filter(|&h| long(h) && !prefix(h)), at.lens, dev)?;
    let long_lists = LongLists::new(at.lens, dev)?;
    let short_max = at
        .lens
        .iter()
        .map(|&l| l as usize)
        .filter(|&l| l <= EVICT_SMEM_MAX_LEN)
        .max()
        .unwrap_or(0)
        .max(1);
    let lens = Tensor::from_slice(at.lens, heads, dev)?;
    let counts = imp::kvcompress_evict(
        k_cache,
        v_cache,
        metric,
        position,
        &EvictArgs {
            blocks: at.blocks,
            tab: &Tensor::from_slice(at.tab, heads, dev)?,
            start: &Tensor::from_slice(at.start, heads + 1, dev)?,
            out_blocks: at.start[heads] as usize,
            lens: &lens,
            protect: &Tensor::from_slice(&protect, heads, dev)?,
            head_start: &Tensor::from_slice(&head_start, seqs.len() + 1, dev)?,
            n_evict: &Tensor::from_slice(&n_evict, seqs.len(), dev)?,
            want: &Tensor::from_slice(&want, heads, dev)?,
            sort_full,
            sort_prefix,
            long_sort,
            long_lists,
            crush,
        },
        block_size,
        short_max,
    )?;
    Ok(split_steps(
        seqs,
        &counts.to_vec1::<u32>()?,
        &lens.to_vec1::<u32>()?,
    ))
}

/// Longest block KVCrush's device picks take (a group's signature is one u64).
pub const CRUSH_MAX_BLOCK: usize = select::DEVICE_MAX_BLOCK;

/// Most kv-heads per layer KVCrush's device picks take (`kernels/evict.cu: CRUSH_MAX_HEADS`).
pub const CRUSH_MAX_KV_HEADS: usize = 64;

/// What `kvc_crush_pick` needs, checked and uploaded (`None`: no sequence asks for KVCrush).
fn crush_args(seqs: &[EvictSeq], block_size: usize, dev: &Device) -> Result<Option<CrushArgs>> {
    let Some(first) = seqs.iter().find(|s| s.crush.is_some()) else {
        return Ok(None);
    };
    let kv_heads = first.kv_heads;
    if block_size > CRUSH_MAX_BLOCK || kv_heads == 0 || kv_heads > CRUSH_MAX_KV_HEADS {
        return Err(OpsError::Shape(format!(
            "KVCrush's device picks take blocks of at most {CRUSH_MAX_BLOCK} tokens and 1..={CRUSH_MAX_KV_HEADS} kv-heads per layer, got {block_size} and {kv_heads}"
        ))
        .into());
    }
    let (mut groups, mut anchor, mut mean) = (vec![], vec![], vec![]);
    let mut layers = 0;
    for s in seqs {
        if s.kv_heads != kv_heads || s.heads % kv_heads != 0 {
            return Err(OpsError::Shape(format!(
                "KVCrush's device picks need every sequence in layers of {kv_heads} kv-heads, got {} heads in layers of {}",
                s.heads, s.kv_heads
            ))
            .into());
        }
        layers = layers.max(s.heads / kv_heads);
        let (g, bits) = match &s.crush {
            Some(p) => (
                p.groups_per_head * kv_heads,
                select::anchor_mask(p.anchor, block_size, p.seed),
            ),
            None => (0, Some(0)),
        };
        groups.push(
            u32::try_from(g)
                .map_err(|_| OpsError::Shape(format!("KVCrush: {g} groups per layer")))?,
        );
        mean.push(bits.is_none() as u32);
        // i64 on the device (candle has no u64), read as unsigned long long by the kernel.
        anchor.push(bits.unwrap_or(0) as i64);
    }
    let n = seqs.len();
    Ok(Some(CrushArgs {
        groups: Tensor::from_vec(groups, n, dev)?,
        anchor: Tensor::from_vec(anchor, n, dev)?,
        mean: Tensor::from_vec(mean, n, dev)?,
        kv_heads,
        layers,
    }))
}

/// Per-head `counts` and `new_lens` of a batched eviction cut into each sequence's rows.
fn split_steps(seqs: &[EvictSeq], counts: &[u32], new_lens: &[u32]) -> Vec<EvictStep> {
    let mut first = 0;
    seqs.iter()
        .map(|s| {
            let rows = first..first + s.heads;
            first = rows.end;
            EvictStep {
                counts: counts[rows.clone()].to_vec(),
                new_lens: new_lens[rows].to_vec(),
            }
        })
        .collect()
}

/// The device inputs of a batched eviction (see [`kvcompress_evict_batch`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct EvictArgs<'a> {
    /// Block ids: head `h`'s table at `blocks[tab[h]..]`.
    blocks: &'a Tensor,
    /// `[heads]` u32: where each head's table starts in `blocks`.
    tab: &'a Tensor,
    /// `[heads + 1]` u32: where each head's per-block outputs start.
    start: &'a Tensor,
    /// Per-block outputs in all (the last of `start`).
    out_blocks: usize,
    /// `[heads]` u32 (updated in place).
    lens: &'a Tensor,
    /// `[heads]` u32: first protected position.
    protect: &'a Tensor,
    /// `[sequences + 1]` u32: first head row of each sequence.
    head_start: &'a Tensor,
    /// `[sequences]` i64: blocks to take.
    n_evict: &'a Tensor,
    /// `[heads]` u32: sorted slots each head's step needs (`kvc_sort_prefix` takes the heads
    /// that need fewer than they hold).
    want: &'a Tensor,
    /// Whether some head needs `kvc_sort_candidates` / `kvc_sort_prefix`.
    sort_full: bool,
    sort_prefix: bool,
    /// Heads past the shared-memory sort that need their whole order (`kvc_long_*`).
    long_sort: Option<LongSort>,
    /// Heads past the shared-memory compaction lists.
    long_lists: Option<LongLists>,
    /// KVCrush's picks (`kvc_crush_pick` runs between the selection and the compaction).
    crush: Option<CrushArgs>,
}

/// The heads longer than the shared-memory sort holds that need their whole sorted order
/// (`kvc_long_*` in kernels/evict.cu), `None` when there are none.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct LongSort {
    /// `[long heads]` u32: head index.
    heads: Tensor,
    /// `[long heads + 1]` u32: first key of each in the sort's scratch (each head's width is
    /// its length's next power of two).
    off: Tensor,
    /// Long heads; widest head's width; keys in all.
    n: usize,
    widest: usize,
    keys: usize,
}

impl LongSort {
    fn new(heads: impl Iterator<Item = usize>, lens: &[u32], dev: &Device) -> Result<Option<Self>> {
        let heads: Vec<u32> = heads.map(|h| h as u32).collect();
        if heads.is_empty() {
            return Ok(None);
        }
        let widths: Vec<usize> = heads
            .iter()
            .map(|&h| (lens[h as usize] as usize).next_power_of_two())
            .collect();
        let mut off = vec![0u32];
        for &w in &widths {
            let end = *off.last().expect("one") as usize + w;
            off.push(u32::try_from(end).map_err(|_| {
                OpsError::Shape(format!("{end} sort keys in one eviction (u32 offsets)"))
            })?);
        }
        let (n, keys) = (heads.len(), *off.last().expect("one") as usize);
        Ok(Some(Self {
            heads: Tensor::from_vec(heads, n, dev)?,
            off: Tensor::from_vec(off, n + 1, dev)?,
            n,
            widest: widths.into_iter().max().unwrap_or(0),
            keys,
        }))
    }
}

/// Where the compaction of each head longer than the shared-memory lists hold keeps its hole
/// and survivor lists (u32) and evicted flags (u8) in device scratch, `None` when no head is.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct LongLists {
    /// `[heads]` u32: a long head's first scratch slot (0 for the others).
    at: Tensor,
    /// Scratch slots in all (the long heads' lengths).
    slots: usize,
}

impl LongLists {
    fn new(lens: &[u32], dev: &Device) -> Result<Option<Self>> {
        let mut at = Vec::with_capacity(lens.len());
        let mut slots = 0usize;
        for &l in lens {
            let long = l as usize > EVICT_SMEM_MAX_LEN;
            at.push(if long { slots as u32 } else { 0 });
            if long {
                slots += l as usize;
            }
        }
        if slots == 0 {
            return Ok(None);
        }
        if u32::try_from(slots).is_err() {
            return Err(OpsError::Shape(format!(
                "{slots} slots of long heads in one eviction (u32 offsets)"
            ))
            .into());
        }
        let n = at.len();
        Ok(Some(Self {
            at: Tensor::from_vec(at, n, dev)?,
            slots,
        }))
    }
}

/// The device inputs of KVCrush's picks ([`crush_args`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct CrushArgs {
    /// `[sequences]` u32: groups kept per layer (0: no KVCrush).
    groups: Tensor,
    /// `[sequences]` i64: anchor bits (read as u64).
    anchor: Tensor,
    /// `[sequences]` u32: 1 = the anchor is the per-bit majority.
    mean: Tensor,
    /// kv-heads per layer (the same for every sequence).
    kv_heads: usize,
    /// Most layers of a sequence (the launch's grid).
    layers: usize,
}
#[cfg(not(feature = "cuda"))]
mod imp {
    //! Stubs of a build without CUDA.
    use super::*;

    pub fn kvcompress_evict(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &EvictArgs<'_>,
        _: usize,
        _: usize,
    ) -> Result<Tensor> {
        Err(OpsError::NoCuda.into())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    //! Launches through cudarc on candle's stream.
    use super::*;
    use crate::cuda::launch::{cu, device, func, ptr};
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    pub fn kvcompress_evict(
        k_cache: &Tensor,
        v_cache: &Tensor,
        metric: &Tensor,
        position: &Tensor,
        a: &EvictArgs<'_>,
        block_size: usize,
        short_max: usize,
    ) -> Result<Tensor> {
        use cudarc::driver::sys::CUfunction_attribute_enum as Attr;
        let dev = k_cache.device();
        let stream = device(k_cache)?.cuda_stream();
        let heads = a.lens.dim(0)?;
        let total_blocks = a.out_blocks.max(1);
        let n_seqs = a.n_evict.dim(0)?;
        // Sized by the longest head kept in shared memory (<= EVICT_SMEM_MAX_LEN).
        let sort_smem = short_max.next_power_of_two() * 8;
        // Holes and survivors as u16, evicted flags as u8 (see kvc_compact_heads).
        let compact_smem = (5 * short_max).next_multiple_of(4);
        let sort = func(&stream, "evict", "kvc_sort_candidates")?;
        let select = func(&stream, "evict", "kvc_select_blocks")?;
        let compact = func(&stream, "evict", "kvc_compact_heads")?;
        for (f, bytes, what) in [
            (&sort, sort_smem, "sort"),
            (&compact, compact_smem, "compaction"),
        ] {
            f.set_attribute(
                Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(|e| cu(format!("{bytes} B of shared memory for the {what}: {e}")))?;
        }
        // Safety (all three): every element is written by the kernels before it is read — the
        // sort writes each head's order and candidates, the selection every head's counts and
        // `lt` of its sequence (head_start partitions the heads).
        let order = unsafe { Tensor::empty(total_blocks * block_size, DType::U32, dev)? };
        let cand = unsafe { Tensor::empty(total_blocks, DType::F32, dev)? };
        let counts = unsafe { Tensor::empty(heads, DType::U32, dev)? };
        let lt = unsafe { Tensor::empty(heads, DType::U32, dev)? };
        let bs = block_size as i32;
        let (order_p, cand_p, metric_p, position_p) = (
            ptr(Some(&order), &stream)?,
            ptr(Some(&cand), &stream)?,
            ptr(Some(metric), &stream)?,
            ptr(Some(position), &stream)?,
        );
        let (blocks_p, tab_p, start_p, lens_p) = (
            ptr(Some(a.blocks), &stream)?,
            ptr(Some(a.tab), &stream)?,
            ptr(Some(a.start), &stream)?,
            ptr(Some(a.lens), &stream)?,
        );
        let cfg = |grid: usize, smem: usize| LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // The two sorts' shared leading arguments (kvc_sort_candidates, kvc_sort_prefix).
        let sort_args = [
            order_p, cand_p, metric_p, position_p, blocks_p, tab_p, start_p, lens_p,
        ];
        let protect = ptr(Some(a.protect), &stream)?;
        let want_p = ptr(Some(a.want), &stream)?;
        if a.sort_full {
            let mut b = stream.launch_builder(&sort);
            for x in &sort_args {
                b.arg(x);
            }
            b.arg(&bs).arg(&protect).arg(&want_p);
            // Safety: arguments match kvc_sort_candidates; the tables were checked on the host.
            unsafe { b.launch(cfg(heads, sort_smem)) }.map_err(cu)?;
        }
        if a.sort_prefix {
            let prefix = func(&stream, "evict", "kvc_sort_prefix")?;
            let mut b = stream.launch_builder(&prefix);
            for x in &sort_args {
                b.arg(x);
            }
            let heads_i = heads as i32;
            b.arg(&bs).arg(&protect).arg(&want_p).arg(&heads_i);
            let warps = LaunchConfig {
                grid_dim: (heads.div_ceil(4) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // Safety: arguments match kvc_sort_prefix; it writes order and candidates of
            // exactly the heads kvc_sort_candidates skipped (the same takes_prefix test).
            unsafe { b.launch(warps) }.map_err(cu)?;
        }
        if let Some(long) = &a.long_sort {
            long_sort(long, &sort_args, &bs, &protect, dev, &stream)?;
        }
        let (counts_p, lt_p) = (ptr(Some(&counts), &stream)?, ptr(Some(&lt), &stream)?);
        let head_start = ptr(Some(a.head_start), &stream)?;
        let n_evict = ptr(Some(a.n_evict), &stream)?;
        let mut b = stream.launch_builder(&select);
        for x in [&counts_p, &lt_p, &cand_p, &start_p, &head_start, &n_evict] {
            b.arg(x);
        }
        // Safety: arguments match kvc_select_blocks; head_start partitions the heads.
        unsafe { b.launch(cfg(n_seqs, 0)) }.map_err(cu)?;
        // KVCrush: the kept groups and each head's evicted count, for the compaction.
        let crushed = match &a.crush {
            Some(c) => {
                let pick = func(&stream, "evict", "kvc_crush_pick")?;
                // Safety: kvc_crush_pick writes every head's evict_n and every group's picked
                // flag that the compaction reads (groups of the base's prefix), and its
                // scratch before reading it.
                let evict_n = unsafe { Tensor::empty(heads, DType::U32, dev)? };
                let picked = unsafe { Tensor::empty(total_blocks, DType::U8, dev)? };
                let sig = unsafe { Tensor::empty(total_blocks, DType::I64, dev)? };
                let rank = unsafe { Tensor::empty(total_blocks, DType::U32, dev)? };
                let ps = [
                    ptr(Some(&evict_n), &stream)?,
                    ptr(Some(&picked), &stream)?,
                    ptr(Some(&sig), &stream)?,
                    ptr(Some(&rank), &stream)?,
                    metric_p,
                    position_p,
                    order_p,
                    counts_p,
                    blocks_p,
                    tab_p,
                    start_p,
                    lens_p,
                    protect,
                    head_start,
                    ptr(Some(&c.groups), &stream)?,
                    ptr(Some(&c.anchor), &stream)?,
                    ptr(Some(&c.mean), &stream)?,
                ];
                let mut b = stream.launch_builder(&pick);
                for x in &ps {
                    b.arg(x);
                }
                let kvh = c.kv_heads as i32;
                b.arg(&bs).arg(&kvh);
                let grid = LaunchConfig {
                    grid_dim: (c.layers as u32, n_seqs as u32, 1),
                    block_dim: (1024, 1, 1),
                    shared_mem_bytes: 0,
                };
                // Safety: arguments match kvc_crush_pick; kv_heads and block_size were checked
                // against its limits, every sequence's heads are whole layers.
                unsafe { b.launch(grid) }.map_err(cu)?;
                Some((evict_n, picked))
            }
            None => None,
        };
        let (evict_n_p, picked_p) = match &crushed {
            Some((e, p)) => (ptr(Some(e), &stream)?, ptr(Some(p), &stream)?),
            None => (0, 0),
        };
        let row_bytes = k_cache.dim(1)? * k_cache.dtype().size_in_bytes();
        if row_bytes % 4 != 0 {
            return Err(OpsError::Shape(format!(
                "K/V rows of {row_bytes} B (need a multiple of 4)"
            ))
            .into());
        }
        let (row_words, max_len) = ((row_bytes / 4) as i32, short_max as i32);
        // Safety: kvc_compact_heads writes a long head's lists and flags before reading them.
        let long_scratch = match &a.long_lists {
            Some(l) => Some((
                unsafe { Tensor::empty(2 * l.slots, DType::U32, dev)? },
                unsafe { Tensor::empty(l.slots, DType::U8, dev)? },
                &l.at,
            )),
            None => None,
        };
        let (lists_p, gone_p, at_p) = match &long_scratch {
            Some((lists, gone, at)) => (
                ptr(Some(lists), &stream)?,
                ptr(Some(gone), &stream)?,
                ptr(Some(*at), &stream)?,
            ),
            None => (0, 0, 0),
        };
        let (k_p, v_p) = (ptr(Some(k_cache), &stream)?, ptr(Some(v_cache), &stream)?);
        let mut b = stream.launch_builder(&compact);
        for x in [
            &k_p,
            &v_p,
            &metric_p,
            &position_p,
            &lens_p,
            &order_p,
            &counts_p,
            &blocks_p,
            &tab_p,
            &start_p,
            &evict_n_p,
            &picked_p,
        ] {
            b.arg(x);
        }
        b.arg(&bs).arg(&max_len).arg(&row_words);
        b.arg(&lists_p).arg(&gone_p).arg(&at_p);
        // Safety: arguments match kvc_compact_heads; the lists of heads up to short_max fit
        // `compact_smem`, longer heads' are in `long_scratch` at their `at`.
        unsafe { b.launch(cfg(heads, compact_smem)) }.map_err(cu)?;
        Ok(counts)
    }

    /// The whole sorted order and candidates of the heads in `long` (kernels/evict.cu's
    /// `kvc_long_*` launches: keys, chunks, then per stage its global steps and chunk steps,
    /// then the order). `sort_args`: `kvc_sort_candidates`' leading pointers (order,
    /// candidates, metric, position, blocks, tab, start, lengths).
    fn long_sort(
        long: &LongSort,
        sort_args: &[u64; 8],
        bs: &i32,
        protect: &u64,
        dev: &Device,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        use cudarc::driver::sys::CUfunction_attribute_enum as Attr;
        let [order_p, cand_p, metric_p, position_p, blocks_p, tab_p, start_p, lens_p] = *sort_args;
        // Safety: kvc_long_keys writes every key (padding included) before any is read.
        let gkeys = unsafe { Tensor::empty(long.keys, DType::I64, dev)? };
        let gkeys_p = ptr(Some(&gkeys), stream)?;
        let (heads_p, off_p) = (
            ptr(Some(&long.heads), stream)?,
            ptr(Some(&long.off), stream)?,
        );
        let n = long.n as u32;
        let chunks = long.widest.div_ceil(EVICT_LONG_CHUNK) as u32;
        // Grid-stride kernels: enough blocks per head to fill the GPU, at most one per 1024 keys.
        let per_head = (long.widest.div_ceil(2048) as u32).clamp(1, 64);
        let wide = |x: u32, smem: usize| LaunchConfig {
            grid_dim: (x, n, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let keys = func(stream, "evict", "kvc_long_keys")?;
        let mut b = stream.launch_builder(&keys);
        for x in [
            &gkeys_p,
            &heads_p,
            &off_p,
            &metric_p,
            &position_p,
            &blocks_p,
            &tab_p,
            &lens_p,
        ] {
            b.arg(x);
        }
        b.arg(bs).arg(protect);
        // Safety: arguments match kvc_long_keys; the tables were checked on the host.
        unsafe { b.launch(wide(per_head, 0)) }.map_err(cu)?;
        let chunk = func(stream, "evict", "kvc_long_chunk")?;
        let chunk_smem = EVICT_LONG_CHUNK * 8;
        chunk
            .set_attribute(
                Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                chunk_smem as i32,
            )
            .map_err(|e| {
                cu(format!(
                    "{chunk_smem} B of shared memory for the long sort: {e}"
                ))
            })?;
        let step = func(stream, "evict", "kvc_long_step")?;
        let run_chunk = |k: u32| -> Result<()> {
            let mut b = stream.launch_builder(&chunk);
            b.arg(&gkeys_p).arg(&off_p).arg(&k);
            // Safety: arguments match kvc_long_chunk; every head's width is a multiple of
            // LONG_CHUNK (a power of two past it).
            unsafe { b.launch(wide(chunks, chunk_smem)) }.map_err(cu)?;
            Ok(())
        };
        run_chunk(0)?;
        let mut k = 2 * EVICT_LONG_CHUNK;
        while k <= long.widest {
            let mut j = k / 2;
            while j >= EVICT_LONG_CHUNK {
                let (k32, j32) = (k as u32, j as u32);
                let mut b = stream.launch_builder(&step);
                b.arg(&gkeys_p).arg(&off_p).arg(&k32).arg(&j32);
                // Safety: arguments match kvc_long_step; pairs lie inside each head's width.
                unsafe { b.launch(wide(per_head, 0)) }.map_err(cu)?;
                j /= 2;
            }
            run_chunk(k as u32)?;
            k *= 2;
        }
        let emit = func(stream, "evict", "kvc_long_emit")?;
        let mut b = stream.launch_builder(&emit);
        for x in [
            &order_p, &cand_p, &gkeys_p, &heads_p, &off_p, &start_p, &lens_p,
        ] {
            b.arg(x);
        }
        b.arg(bs);
        // Safety: arguments match kvc_long_emit; each long head's rows of order and candidates
        // are its own (start partitions them).
        unsafe { b.launch(wide(per_head, 0)) }.map_err(cu)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    #[test]
    fn head_tables_hold_the_blocks_in_use_and_refuse_bad_ones() {
        // bs 4: head 0 has 5 tokens (2 blocks), head 1 none, head 2 4 tokens (1 block).
        let padded = [7, 2, 9, 9, 9, 9, 3, 9, 9];
        let t = HeadTables::from_padded(&padded, &[5, 0, 4], 3, 4);
        assert_eq!(t.blocks, vec![7, 2, 3]);
        assert_eq!(t.start, vec![0, 2, 2, 3]);
        assert_eq!(
            (t.head(0), t.head(1), t.head(2)),
            (&[7, 2][..], &[][..], &[3][..])
        );
        assert_eq!(t.check_disjoint(4, 8 * 4), Ok(()));
        assert_eq!((t.max_blocks(), t.upload_blocks()), (2, &[7, 2, 3][..]));
        let none = HeadTables::from_padded(&[5, 5], &[0, 0], 1, 4);
        assert_eq!((none.max_blocks(), none.upload_blocks()), (1, &[0][..]));
        // a block id past the pool, a block twice, a head with a block too few or too many
        let e = t.check_disjoint(4, 7 * 4);
        assert!(matches!(e, Err(OpsError::Slot { slot: 7, .. })), "{e:?}");
        let mut dup = t.clone();
        dup.blocks[2] = 7;
        let e = dup.check_disjoint(4, 8 * 4);
        assert!(
            matches!(e, Err(OpsError::Repeated { slot: 7, .. })),
            "{e:?}"
        );
        let mut short = t.clone();
        short.lens[2] = 5;
        assert!(matches!(
            short.check_disjoint(4, 32),
            Err(OpsError::Shape(_))
        ));
        let mut cut = t.clone();
        cut.start[3] = 2;
        assert!(matches!(cut.check_disjoint(4, 32), Err(OpsError::Shape(_))));
    }
}
