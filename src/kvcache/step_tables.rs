//! The block tables of a decode batch, kept on the device from one step to the next.
//!
//! A decode step attends every (layer, sequence, kv-head) of the batch through its block table.
//! Gathering, checking and uploading every table for every layer of every step grows with the
//! batch's blocks and made the host set the pace of a small model's decode step
//! (docs/findings/2026-12-03-decode-tables-stay-on-device.md). Here the tables stay on the
//! device: one row per (layer, sequence, kv-head), layer-major, each with room to grow. A step
//! uploads one buffer (the new tokens' slots and positions, every row's length, and the block
//! ids appended or changed) and scatters the changed ids into place. A different batch, or a
//! row that outgrows its room, rebuilds the whole table (checked for range and overlap then;
//! later ids come from the pool's free list or from the pool's own tables).
//!
//! The bookkeeping is plain host code over [`BlockPool`]; the tensor ops are candle's or have a
//! candle twin (`crate::cuda::kv_cache::scatter_u32`), so the same code runs, and is tested, on the CPU.
use candle_core::{Device, Result, Tensor};

use super::blocks::{BlockPool, StepAppend};
use super::SeqId;
use crate::cuda::evict::HeadTables;

/// Blocks of room every row gets beyond the blocks it holds at a rebuild.
const GROWTH_BLOCKS: u32 = 8;

/// See the module docs.
pub struct StepTables {
    seqs: Vec<SeqId>,
    layers: usize,
    kv_heads: usize,
    block_size: usize,
    /// Per row: where its blocks start in the flat table.
    start: Vec<u32>,
    /// Per row: blocks it may hold before a rebuild.
    room: Vec<u32>,
    /// Per row: tokens cached, as of the last upload.
    lens: Vec<u32>,
    /// Flat block ids, `room` per row (unused entries are 0 and never read).
    blocks: Tensor,
    /// `blocks` as the host last wrote it: a changed row uploads only the ids that differ (an
    /// eviction shortens a row and keeps its first blocks, so usually none).
    host: Vec<u32>,
    /// `[rows]` u32: `start` on the device.
    starts: Tensor,
    /// The last step's upload: `[slots | positions | lens]`, `rows` each.
    step: Option<Tensor>,
}

/// The device views of one layer of a step, for the decode kernels.
pub struct LayerViews {
    /// Flat block ids (the whole table; rows index it through `starts`).
    pub blocks: Tensor,
    /// `[batch * kv_heads]` u32.
    pub starts: Tensor,
    /// `[batch * kv_heads]` u32.
    pub lens: Tensor,
    /// `[batch * kv_heads]` u32: the new token's slot per head.
    pub slots: Tensor,
    /// `[batch * kv_heads]` u32: the new token's position per head.
    pub positions: Tensor,
    /// Longest head of the layer, in tokens.
    pub max_len: usize,
    /// Longest head of the layer, in blocks (at least 1).
    pub max_blocks: usize,
}

impl StepTables {
    /// Tables of `seqs` as `pool` holds them now, checked (block ids in range, no block in two
    /// rows) and uploaded. [`Self::start_step`] must follow before [`Self::layer`].
    pub fn build(pool: &BlockPool, seqs: &[SeqId], device: &Device) -> Result<Self> {
        let (layers, kv_heads, bs) = (pool.layers(), pool.kv_heads(), pool.block_size());
        let tables = seqs
            .iter()
            .map(|&s| pool.table(s))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(candle_core::Error::wrap)?;
        let rows = layers * seqs.len() * kv_heads;
        let (mut start, mut room, mut lens) = (
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
        );
        let mut flat = Vec::new();
        for l in 0..layers {
            for t in &tables {
                for h in 0..kv_heads {
                    let b = &t.blocks[l][h];
                    start.push(flat.len() as u32);
                    room.push(b.len() as u32 + GROWTH_BLOCKS);
                    lens.push(t.len[l][h] as u32);
                    flat.extend_from_slice(b);
                    flat.extend(std::iter::repeat_n(0, GROWTH_BLOCKS as usize));
                }
            }
        }
        // The rows' blocks in use, checked as a decode call checks its tables.
        HeadTables::from_heads((0..rows).map(|r| {
            (
                &flat[start[r] as usize..][..blocks_of(lens[r], bs)],
                lens[r] as usize,
            )
        }))
        .validate(bs, pool.num_blocks() * bs, true)
        .map_err(candle_core::Error::wrap)?;
        if flat.is_empty() {
            flat.push(0); // an empty tensor cannot be launched on
        }
        let n = flat.len();
        let host = flat.clone();
        Ok(StepTables {
            host,
            seqs: seqs.to_vec(),
            layers,
            kv_heads,
            block_size: bs,
            blocks: Tensor::from_vec(flat, n, device)?,
            starts: Tensor::from_slice(&start, rows, device)?,
            start,
            room,
            lens,
            step: None,
        })
    }

    /// Whether these are the tables of batch `seqs` (same sequences, same order).
    pub fn matches(&self, seqs: &[SeqId]) -> bool {
        self.seqs == seqs
    }

    fn rows(&self) -> usize {
        self.start.len()
    }

    /// Follow the step `app` (just done on `pool` for this batch, at `positions[i]` for
    /// sequence `i`), the sequences `changed` (indices into the batch) whose tables the pool
    /// changed otherwise since the last step (host evictions, prompt appends), and the
    /// sequences `shrunk` whose tables only lost tail blocks since then (device evictions,
    /// [`BlockPool::truncate`]; not also in `changed`): scatter the block ids appended or
    /// changed, take the shrunk rows' lengths (their remaining blocks are a prefix of what the
    /// device holds, so no block is compared), and upload the step. Returns `false`, changing
    /// nothing, when a row outgrew its room: the caller rebuilds.
    pub fn follow(
        &mut self,
        pool: &BlockPool,
        app: &StepAppend,
        positions: &[u32],
        changed: &[usize],
        shrunk: &[usize],
    ) -> Result<bool> {
        if app.slots.len() != self.rows() {
            candle_core::bail!(
                "decode step of {} rows for tables of {} rows",
                app.slots.len(),
                self.rows()
            );
        }
        let n = self.seqs.len();
        let mut lens: Vec<u32> = self.lens.iter().map(|l| l + 1).collect();
        let (mut idx, mut val) = (Vec::new(), Vec::new());
        for &(row, i, b) in &app.new_blocks {
            let row = row as usize;
            if i >= self.room[row] {
                return Ok(false);
            }
            idx.push(self.start[row] + i);
            val.push(b);
        }
        // Rows of changed sequences: every row is checked against its room before any
        // difference is recorded, so a `false` return leaves the mirror as the device has it.
        let tables = changed
            .iter()
            .map(|&i| pool.table(self.seqs[i]).map(|t| (i, t)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(candle_core::Error::wrap)?;
        for &(i, t) in &tables {
            for l in 0..self.layers {
                for h in 0..self.kv_heads {
                    let row = (l * n + i) * self.kv_heads + h;
                    if t.blocks[l][h].len() as u32 > self.room[row] {
                        return Ok(false);
                    }
                }
            }
        }
        for (&j, &b) in idx.iter().zip(&val) {
            self.host[j as usize] = b;
        }
        for &(i, t) in &tables {
            for l in 0..self.layers {
                for h in 0..self.kv_heads {
                    let row = (l * n + i) * self.kv_heads + h;
                    lens[row] = t.len[l][h] as u32;
                    let at = self.start[row] as usize;
                    for (j, &b) in t.blocks[l][h].iter().enumerate() {
                        if self.host[at + j] != b {
                            self.host[at + j] = b;
                            idx.push((at + j) as u32);
                            val.push(b);
                        }
                    }
                }
            }
        }
        for &i in shrunk {
            let t = pool.table(self.seqs[i]).map_err(candle_core::Error::wrap)?;
            for l in 0..self.layers {
                for h in 0..self.kv_heads {
                    let row = (l * n + i) * self.kv_heads + h;
                    lens[row] = t.len[l][h] as u32;
                    debug_assert_eq!(
                        &self.host[self.start[row] as usize..][..t.blocks[l][h].len()],
                        &t.blocks[l][h][..],
                        "row {row} of a shrunk sequence is not a prefix of its device row"
                    );
                }
            }
        }
        self.upload(&app.slots, positions, lens, (idx, val))?;
        Ok(true)
    }

    /// Upload the first step after [`Self::build`] (the pool already holds the step `app`,
    /// taken at `positions[i]` for sequence `i`; the rows' lengths are the built ones).
    pub fn start_step(&mut self, app: &StepAppend, positions: &[u32]) -> Result<()> {
        let lens = self.lens.clone();
        self.upload(&app.slots, positions, lens, Default::default())
    }

    /// Upload a step's `slots` (per row), `positions` (per sequence) and the rows' `lens`
    /// in one buffer, and scatter `patch` (flat index, block id; already in `host`) into the
    /// table.
    fn upload(
        &mut self,
        slots: &[u32],
        positions: &[u32],
        lens: Vec<u32>,
        patch: (Vec<u32>, Vec<u32>),
    ) -> Result<()> {
        let rows = self.rows();
        if slots.len() != rows || lens.len() != rows || positions.len() != self.seqs.len() {
            candle_core::bail!(
                "decode step of {} slots / {} lens / {} positions for tables of {rows} rows and {} sequences",
                slots.len(),
                lens.len(),
                positions.len(),
                self.seqs.len()
            );
        }
        let (idx, val) = patch;
        let k = idx.len();
        let mut buf = Vec::with_capacity(3 * rows + 2 * k);
        buf.extend_from_slice(slots);
        for _ in 0..self.layers {
            for &p in positions {
                buf.extend(std::iter::repeat_n(p, self.kv_heads));
            }
        }
        buf.extend_from_slice(&lens);
        buf.extend(idx);
        buf.extend(val);
        let len = buf.len();
        let up = Tensor::from_vec(buf, len, self.blocks.device())?;
        if k > 0 {
            crate::cuda::kv_cache::scatter_u32(
                &self.blocks,
                &up.narrow(0, 3 * rows, k)?,
                &up.narrow(0, 3 * rows + k, k)?,
            )?;
        }
        self.step = Some(up);
        self.lens = lens;
        Ok(())
    }

    /// The flat block ids on the device (row `r` at `start[r]`).
    pub fn blocks(&self) -> &Tensor {
        &self.blocks
    }

    /// Where every head of `seqs` (each sequence's layers x kv-heads, (layer, kv-head) order)
    /// starts in [`Self::blocks`], and its length as of the last upload; `None` when one of
    /// them is not in the batch. Current only while the pool has not changed those sequences
    /// since the step (the caller knows: `PagedCache::changed`).
    pub fn heads_of(&self, seqs: &[SeqId]) -> Option<(Vec<u32>, Vec<u32>)> {
        let index: std::collections::HashMap<SeqId, usize> =
            self.seqs.iter().enumerate().map(|(i, &s)| (s, i)).collect();
        let n = self.seqs.len();
        let heads = seqs.len() * self.layers * self.kv_heads;
        let (mut tab, mut lens) = (Vec::with_capacity(heads), Vec::with_capacity(heads));
        for s in seqs {
            let i = *index.get(s)?;
            for l in 0..self.layers {
                let row = (l * n + i) * self.kv_heads;
                tab.extend_from_slice(&self.start[row..row + self.kv_heads]);
                lens.extend_from_slice(&self.lens[row..row + self.kv_heads]);
            }
        }
        Some((tab, lens))
    }

    /// Longest row, in tokens, as of the last upload.
    pub fn max_len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0) as usize
    }

    /// Tokens per row as of the last upload.
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }

    /// The device views of `layer` for the step last uploaded.
    pub fn layer(&self, layer: usize) -> Result<LayerViews> {
        let Some(step) = &self.step else {
            candle_core::bail!("no decode step uploaded for these tables");
        };
        if layer >= self.layers {
            candle_core::bail!("layer {layer} of a {}-layer table", self.layers);
        }
        let per = self.seqs.len() * self.kv_heads;
        let r = layer * per..(layer + 1) * per;
        let max_len = self.lens[r.clone()].iter().copied().max().unwrap_or(0);
        let rows = self.rows();
        Ok(LayerViews {
            blocks: self.blocks.clone(),
            starts: self.starts.narrow(0, r.start, per)?,
            slots: step.narrow(0, r.start, per)?,
            positions: step.narrow(0, rows + r.start, per)?,
            lens: step.narrow(0, 2 * rows + r.start, per)?,
            max_len: max_len as usize,
            max_blocks: blocks_of(max_len, self.block_size).max(1),
        })
    }

    /// Every row's blocks in use as the device holds them (row order), for tests.
    pub fn device_rows(&self) -> Result<Vec<Vec<u32>>> {
        let flat = self.blocks.to_vec1::<u32>()?;
        Ok((0..self.rows())
            .map(|r| {
                flat[self.start[r] as usize..][..blocks_of(self.lens[r], self.block_size)].to_vec()
            })
            .collect())
    }
}

fn blocks_of(len: u32, block_size: usize) -> usize {
    (len as usize).div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvcache::blocks::BlockError;

    const LAYERS: usize = 2;
    const KV: usize = 3;
    const BS: usize = 4;

    /// A pool with three sequences whose heads hold 0..=13 tokens each, all different.
    fn pool() -> (BlockPool, Vec<SeqId>) {
        let mut pool = BlockPool::new(LAYERS, KV, BS, 400).unwrap();
        let seqs = vec![7, 3, 11];
        for (i, &s) in seqs.iter().enumerate() {
            pool.add_seq(s).unwrap();
            for l in 0..LAYERS {
                for h in 0..KV {
                    let n = (i * 5 + l * 3 + h * 2) % 14;
                    let pos: Vec<u32> = (0..n as u32).collect();
                    pool.append(l, s, h, &pos).unwrap();
                }
            }
        }
        (pool, seqs)
    }

    /// Every row's blocks and length as the pool holds them, layer-major.
    fn pool_rows(pool: &BlockPool, seqs: &[SeqId]) -> (Vec<Vec<u32>>, Vec<u32>) {
        let (mut blocks, mut lens) = (Vec::new(), Vec::new());
        for l in 0..LAYERS {
            for &s in seqs {
                for h in 0..KV {
                    let t = pool.table(s).unwrap();
                    blocks.push(t.blocks[l][h].clone());
                    lens.push(t.len[l][h] as u32);
                }
            }
        }
        (blocks, lens)
    }

    /// `append_step` is `append` per (layer, sequence, head): same slots, same pool.
    #[test]
    fn append_step_equals_appends_one_by_one() {
        let (mut pool, seqs) = pool();
        let mut oracle = pool.clone();
        let with_pos: Vec<(SeqId, u32)> = seqs.iter().map(|&s| (s, 100 + s as u32)).collect();
        let app = pool.append_step(&with_pos, |_| true).unwrap();
        let mut new_blocks = 0;
        // In the step's order: sequence, layer, head (the free list hands out blocks in it).
        for (i, &(s, p)) in with_pos.iter().enumerate() {
            for l in 0..LAYERS {
                for h in 0..KV {
                    let before = oracle.table(s).unwrap().blocks[l][h].len();
                    let slot = oracle.append(l, s, h, &[p]).unwrap()[0];
                    let row = (l * seqs.len() + i) * KV + h;
                    assert_eq!(app.slots[row] as usize, slot, "row {row}");
                    new_blocks += oracle.table(s).unwrap().blocks[l][h].len() - before;
                }
            }
        }
        assert_eq!(app.new_blocks.len(), new_blocks);
        assert!(new_blocks > 0, "the case must take blocks");
        for &s in &seqs {
            assert_eq!(pool.table(s).unwrap(), oracle.table(s).unwrap());
        }
        assert_eq!(pool.slot_meta(), oracle.slot_meta());
        assert_eq!(pool.free_blocks(), oracle.free_blocks());
        pool.check().unwrap();
    }

    /// Without host metadata for a sequence, the step takes the same slots and blocks and
    /// leaves that sequence's slots' metric and position as they were (the others' are set).
    #[test]
    fn append_step_without_host_meta_skips_only_those_writes() {
        let (mut pool, seqs) = pool();
        let mut with_meta = pool.clone();
        let before = pool.slot_meta();
        let (m0, p0) = (before.0.to_vec(), before.1.to_vec());
        let skip = seqs[1];
        let with_pos: Vec<(SeqId, u32)> = seqs.iter().map(|&s| (s, 100 + s as u32)).collect();
        let app = pool.append_step(&with_pos, |s| s != skip).unwrap();
        let want = with_meta.append_step(&with_pos, |_| true).unwrap();
        assert_eq!(app, want);
        for &s in &seqs {
            assert_eq!(pool.table(s).unwrap(), with_meta.table(s).unwrap());
        }
        let (m, p) = pool.slot_meta();
        for (i, &(s, pos)) in with_pos.iter().enumerate() {
            for row in (0..LAYERS * KV).map(|lh| ((lh / KV) * seqs.len() + i) * KV + lh % KV) {
                let slot = app.slots[row] as usize;
                if s == skip {
                    assert_eq!((m[slot], p[slot]), (m0[slot], p0[slot]), "row {row}");
                } else {
                    assert_eq!((m[slot], p[slot]), (0.0, pos), "row {row}");
                }
            }
        }
    }

    /// A step the pool cannot hold, or naming a sequence twice, changes nothing.
    #[test]
    fn append_step_is_all_or_nothing() {
        let mut pool = BlockPool::new(1, 2, 2, 3).unwrap();
        pool.add_seq(0).unwrap();
        pool.add_seq(1).unwrap();
        pool.append(0, 0, 0, &[0, 1]).unwrap();
        let before = pool.clone();
        // Seq 0 needs a block for head 0 and head 1, seq 1 two more: 4 > 2 free.
        let err = pool.append_step(&[(0, 2), (1, 0)], |_| true).unwrap_err();
        assert!(
            matches!(
                err,
                BlockError::OutOfBlocks {
                    needed: 4,
                    free: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(pool.table(0).unwrap(), before.table(0).unwrap());
        assert_eq!(pool.free_blocks(), before.free_blocks());
        let err = pool.append_step(&[(1, 0), (1, 0)], |_| true).unwrap_err();
        assert!(matches!(err, BlockError::DuplicateSeq(1)), "{err:?}");
        assert_eq!(pool.table(1).unwrap(), before.table(1).unwrap());
    }

    /// Over 40 steps with evictions in between, the device tables equal the pool's after every
    /// step: followed when the batch is the same and no row outgrew its room, rebuilt
    /// otherwise (both happen), and the views of each layer carry the step's slots.
    #[test]
    fn device_tables_follow_the_pool() {
        let (mut pool, seqs) = pool();
        let dev = Device::Cpu;
        let mut tables = StepTables::build(&pool, &seqs, &dev).unwrap();
        let (mut followed, mut rebuilt) = (0, 0);
        for step in 0..40u32 {
            let (mut changed, mut shrunk) = (Vec::new(), Vec::new());
            if step % 7 == 3 || step % 5 == 1 {
                // Evict from seq index 1: shorten two heads (as a compaction does). Followed
                // as a shrink (lengths only) or, every seventh step, as a change (a diff).
                let s = seqs[1];
                for (l, h) in [(0, 1), (1, 2)] {
                    let len = pool.len(l, s, h).unwrap();
                    pool.truncate(l, s, h, len / 2).unwrap();
                }
                if step % 7 == 3 {
                    changed.push(1);
                } else {
                    shrunk.push(1);
                }
            }
            if step % 3 == 2 {
                // Seq 0 loses a whole tail block and a partial one of two heads.
                let s = seqs[0];
                for (l, h) in [(1, 0), (0, 2)] {
                    let len = pool.len(l, s, h).unwrap();
                    pool.truncate(l, s, h, len.saturating_sub(BS + 1)).unwrap();
                }
                shrunk.push(0);
            }
            if step % 11 == 5 {
                // Blocks change hands: seq 1's row empties, seq 2 takes its blocks, seq 1's row
                // refills from other ids (rows that are not a prefix of what they were).
                let (a, b) = (seqs[1], seqs[2]);
                pool.truncate(0, a, 1, 0).unwrap();
                let n = pool.len(1, b, 0).unwrap() as u32;
                pool.append(1, b, 0, &(n..n + 3 * BS as u32).collect::<Vec<_>>())
                    .unwrap();
                pool.append(0, a, 1, &(0..2 * BS as u32).collect::<Vec<_>>())
                    .unwrap();
                changed.extend([1, 2]);
            }
            let with_pos: Vec<(SeqId, u32)> = seqs.iter().map(|&s| (s, step + s as u32)).collect();
            let positions: Vec<u32> = with_pos.iter().map(|p| p.1).collect();
            let app = pool.append_step(&with_pos, |_| true).unwrap();
            shrunk.retain(|i| !changed.contains(i));
            if tables
                .follow(&pool, &app, &positions, &changed, &shrunk)
                .unwrap()
            {
                followed += 1;
            } else {
                rebuilt += 1;
                tables = StepTables::build(&pool, &seqs, &dev).unwrap();
                tables.start_step(&app, &positions).unwrap();
            }
            let (want_blocks, want_lens) = pool_rows(&pool, &seqs);
            assert_eq!(tables.lens(), want_lens, "step {step}");
            assert_eq!(tables.device_rows().unwrap(), want_blocks, "step {step}");
            for l in 0..LAYERS {
                let v = tables.layer(l).unwrap();
                let per = seqs.len() * KV;
                let slots = v.slots.to_vec1::<u32>().unwrap();
                assert_eq!(slots, app.slots[l * per..][..per], "step {step} layer {l}");
                let pos = v.positions.to_vec1::<u32>().unwrap();
                let want_pos: Vec<u32> = positions
                    .iter()
                    .flat_map(|&p| std::iter::repeat_n(p, KV))
                    .collect();
                assert_eq!(pos, want_pos);
                assert_eq!(
                    v.lens.to_vec1::<u32>().unwrap(),
                    want_lens[l * per..][..per]
                );
                let starts = v.starts.to_vec1::<u32>().unwrap();
                let flat = v.blocks.to_vec1::<u32>().unwrap();
                for (j, &st) in starts.iter().enumerate() {
                    let row = &want_blocks[l * per + j];
                    assert_eq!(&flat[st as usize..][..row.len()], &row[..]);
                }
                let longest = want_lens[l * per..][..per].iter().copied().max().unwrap();
                assert_eq!(v.max_len, longest as usize);
                assert_eq!(v.max_blocks, (longest as usize).div_ceil(BS).max(1));
            }
        }
        assert!(
            followed > 20 && rebuilt > 0,
            "followed {followed}, rebuilt {rebuilt}"
        );
    }

    /// A table whose rows share a block is refused at build.
    #[test]
    fn build_refuses_shared_blocks() {
        let (pool, seqs) = pool();
        assert!(StepTables::build(&pool, &seqs, &Device::Cpu).is_ok());
        let mut bad = pool.clone();
        // Two sequences sharing their tables: a fork without copies.
        let t = bad.table(seqs[0]).unwrap().clone();
        bad.add_seq(99).unwrap();
        bad.set_table_for_test(99, t);
        let err = StepTables::build(&bad, &[seqs[0], 99], &Device::Cpu)
            .err()
            .expect("shared blocks");
        assert!(err.to_string().contains("twice"), "{err}");
    }
}
