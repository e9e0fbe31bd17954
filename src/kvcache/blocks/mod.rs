//! Block pool and per-(layer, seq, kv-head) block tables: the bookkeeping of the paged cache,
//! plain data with no tensors (the storage in [`super::paged`] owns K/V and follows the moves
//! planned here).
//!
//! As KV-Compress: one physical block holds `block_size` tokens of ONE kv-head of ONE layer, so
//! block tables are indexed `[seq][layer][kv_head][logical_block]` with a context length per
//! (layer, seq, kv-head). A *slot* is a physical token place, `block * block_size + offset`;
//! every slot carries a metric (f32, the eviction score) and a token position (u32). The slots of
//! a head are listed in *logical order* (block table order); eviction reorders them, so logical
//! order is not position order after a compaction (attention is order-independent).
//!
//! Departure from the paper's implementation: free blocks are a plain stack (lowest id first)
//! instead of a GPU free mask; the CUDA port keeps the same contract.
//!
//! Memory accounting: a block costs its K and V rows plus its slots' metric and position and its
//! block-table entry ([`MemoryLayout::bytes_per_block`]), so `--kv-memory` includes metadata.
//!
//! Files: this one holds the pool and its tables; `plan.rs` the eviction plans and the moves
//! and copies the storage executes (re-exported here); `tests.rs` the unit tests.
use std::collections::BTreeMap;

use super::SeqId;
use crate::cuda::evict::HeadTables;

mod plan;

pub use plan::{BlockCopy, Compaction, EvictionPlan, HeadEviction, Move};

/// Bookkeeping errors; each says what was asked and what exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error(
        "KV cache out of blocks: {needed} more needed, {free} free of {total} (raise --kv-memory)"
    )]
    OutOfBlocks {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error("unknown sequence {0}")]
    UnknownSeq(SeqId),
    #[error("sequence {0} already exists")]
    DuplicateSeq(SeqId),
    #[error("(layer {layer}, kv-head {kv_head}) is out of range: the cache has {layers} layers and {kv_heads} kv-heads")]
    BadHead {
        layer: usize,
        kv_head: usize,
        layers: usize,
        kv_heads: usize,
    },
    #[error("slot {slot} of (layer {layer}, seq {seq}, kv-head {kv_head}) is out of range or repeated: the head holds {len} slots")]
    BadSlot {
        layer: usize,
        seq: SeqId,
        kv_head: usize,
        slot: usize,
        len: usize,
    },
    #[error("{what}: got {got} values for {len} slots")]
    BadLength {
        what: &'static str,
        got: usize,
        len: usize,
    },
    #[error("--kv-memory {bytes} B is smaller than one block ({per_block} B)")]
    TooSmall { bytes: u64, per_block: u64 },
    #[error("block size must be at least 1")]
    ZeroBlockSize,
}

/// Sizes that turn a byte budget into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Tokens per block.
    pub block_size: usize,
    /// Elements per K (and per V) row.
    pub head_dim: usize,
    /// Bytes per K/V element (4 for f32).
    pub dtype_bytes: usize,
}

impl MemoryLayout {
    /// Bytes one block costs: K and V rows, metric (f32) and position (u32) per slot, and one
    /// u32 block-table entry.
    pub fn bytes_per_block(&self) -> u64 {
        let bs = self.block_size as u64;
        bs * (2 * self.head_dim as u64 * self.dtype_bytes as u64 + 4 + 4) + 4
    }

    /// Blocks that fit in `bytes`.
    pub fn blocks_for_bytes(&self, bytes: u64) -> Result<usize, BlockError> {
        if self.block_size == 0 {
            return Err(BlockError::ZeroBlockSize);
        }
        let n = bytes / self.bytes_per_block();
        if n == 0 {
            return Err(BlockError::TooSmall {
                bytes,
                per_block: self.bytes_per_block(),
            });
        }
        Ok(n as usize)
    }
}

/// Used / free report of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryReport {
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Blocks held by some head.
    pub used_blocks: usize,
    /// Blocks on the free stack.
    pub free_blocks: usize,
    /// Bytes per block (K, V, metadata).
    pub bytes_per_block: u64,
    /// `used_blocks * bytes_per_block`.
    pub used_bytes: u64,
    /// `free_blocks * bytes_per_block`.
    pub free_bytes: u64,
}

/// Block tables of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqTable {
    /// Physical block ids per `[layer][kv_head]`, in logical order.
    pub blocks: Vec<Vec<Vec<u32>>>,
    /// Cached tokens per `[layer][kv_head]` (the context length of the head).
    pub len: Vec<Vec<usize>>,
}

/// What [`BlockPool::append_step`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepAppend {
    /// The new token's slot per row `(layer * batch + i) * kv_heads + head`.
    pub slots: Vec<u32>,
    /// Blocks taken: (row, index in the row's table, block id), sequence by sequence.
    pub new_blocks: Vec<(u32, u32, u32)>,
}

/// The block pool, per-slot metadata and every sequence's block tables.
#[derive(Debug, Clone)]
pub struct BlockPool {
    /// Tokens per block.
    block_size: usize,
    /// Layers of the model.
    layers: usize,
    /// Kv-heads per layer.
    kv_heads: usize,
    /// Blocks in the pool.
    num_blocks: usize,
    /// Free block ids; popped from the end (initialised so the lowest id comes first).
    free: Vec<u32>,
    /// Eviction metric per physical slot (`block * block_size + offset`).
    metric: Vec<f32>,
    /// Token position per physical slot.
    position: Vec<u32>,
    /// Block tables of every live sequence.
    seqs: BTreeMap<SeqId, SeqTable>,
}

/// The elements of `src` over `runs`, in order (a block-sized slice copy each).
fn gather<T: Copy>(src: &[T], runs: Vec<std::ops::Range<usize>>) -> Vec<T> {
    let mut out = Vec::with_capacity(runs.iter().map(|r| r.len()).sum());
    for r in runs {
        out.extend_from_slice(&src[r]);
    }
    out
}

impl BlockPool {
    /// Tables of every head of `seqs`, (sequence, layer, kv-head) order, blocks back to back:
    /// what a batched device eviction takes.
    pub fn head_tables(&self, seqs: &[SeqId]) -> Result<HeadTables, BlockError> {
        let tables = seqs
            .iter()
            .map(|&s| self.table(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HeadTables::from_heads(tables.into_iter().flat_map(|t| {
            t.blocks
                .iter()
                .flatten()
                .zip(t.len.iter().flatten())
                .map(|(b, &l)| (&b[..], l))
        })))
    }

    /// A pool of `num_blocks` blocks of `block_size` tokens for `layers` x `kv_heads` heads.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self, BlockError> {
        if block_size == 0 {
            return Err(BlockError::ZeroBlockSize);
        }
        Ok(BlockPool {
            block_size,
            layers,
            kv_heads,
            num_blocks,
            free: (0..num_blocks as u32).rev().collect(),
            metric: vec![0.0; num_blocks * block_size],
            position: vec![0; num_blocks * block_size],
            seqs: BTreeMap::new(),
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Layers.
    pub fn layers(&self) -> usize {
        self.layers
    }
    /// Kv-heads per layer.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }
    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    /// Blocks on the free stack.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    /// Blocks held by sequences.
    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free.len()
    }
    /// Live sequences.
    pub fn seq_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    /// Used/free report with `layout`'s block cost.
    pub fn report(&self, layout: &MemoryLayout) -> MemoryReport {
        let b = layout.bytes_per_block();
        MemoryReport {
            total_blocks: self.num_blocks,
            used_blocks: self.used_blocks(),
            free_blocks: self.free_blocks(),
            bytes_per_block: b,
            used_bytes: self.used_blocks() as u64 * b,
            free_bytes: self.free_blocks() as u64 * b,
        }
    }

    /// Register an empty sequence.
    pub fn add_seq(&mut self, seq: SeqId) -> Result<(), BlockError> {
        if self.seqs.contains_key(&seq) {
            return Err(BlockError::DuplicateSeq(seq));
        }
        self.seqs.insert(
            seq,
            SeqTable {
                blocks: vec![vec![Vec::new(); self.kv_heads]; self.layers],
                len: vec![vec![0; self.kv_heads]; self.layers],
            },
        );
        Ok(())
    }

    /// Register `dst` as a copy of `src`: the same length in every head, in newly allocated
    /// blocks, with metrics and positions copied. Returns the block copies the storage must
    /// make for K/V (whole blocks: slots past a head's length carry nothing that is read).
    /// Nothing changes when blocks run out.
    pub fn fork_seq(&mut self, src: SeqId, dst: SeqId) -> Result<Vec<BlockCopy>, BlockError> {
        if self.seqs.contains_key(&dst) {
            return Err(BlockError::DuplicateSeq(dst));
        }
        let t = self.table(src)?.clone();
        let need: usize = t.blocks.iter().flatten().map(|b| b.len()).sum();
        if need > self.free.len() {
            return Err(BlockError::OutOfBlocks {
                needed: need,
                free: self.free.len(),
                total: self.num_blocks,
            });
        }
        let bs = self.block_size;
        let mut blocks = vec![vec![Vec::new(); self.kv_heads]; self.layers];
        let mut copies = Vec::new();
        for (l, layer) in t.blocks.iter().enumerate() {
            for (h, head) in layer.iter().enumerate() {
                for (i, &b) in head.iter().enumerate() {
                    let nb = self.free.pop().expect("checked above");
                    blocks[l][h].push(nb);
                    let used = (t.len[l][h] - i * bs).min(bs);
                    for o in 0..used {
                        let (from, to) = (b as usize * bs + o, nb as usize * bs + o);
                        self.metric[to] = self.metric[from];
                        self.position[to] = self.position[from];
                    }
                    copies.push(BlockCopy {
                        from: b as usize,
                        to: nb as usize,
                    });
                }
            }
        }
        self.seqs.insert(dst, SeqTable { blocks, len: t.len });
        Ok(copies)
    }

    /// Replace `seq`'s tables as they are, breaking the pool's invariants (tests of the checks
    /// that catch a broken pool).
    #[cfg(test)]
    pub(crate) fn set_table_for_test(&mut self, seq: SeqId, t: SeqTable) {
        self.seqs.insert(seq, t);
    }

    /// Drop a sequence; its blocks go back to the pool.
    pub fn remove_seq(&mut self, seq: SeqId) -> Result<(), BlockError> {
        let t = self.seqs.remove(&seq).ok_or(BlockError::UnknownSeq(seq))?;
        for layer in t.blocks {
            for head in layer {
                self.free.extend(head.into_iter().rev());
            }
        }
        Ok(())
    }

    /// The block tables of `seq`.
    pub fn table(&self, seq: SeqId) -> Result<&SeqTable, BlockError> {
        self.seqs.get(&seq).ok_or(BlockError::UnknownSeq(seq))
    }

    fn check_head(&self, layer: usize, kv_head: usize) -> Result<(), BlockError> {
        if layer >= self.layers || kv_head >= self.kv_heads {
            return Err(BlockError::BadHead {
                layer,
                kv_head,
                layers: self.layers,
                kv_heads: self.kv_heads,
            });
        }
        Ok(())
    }

    /// Cached tokens of (layer, seq, kv_head).
    pub fn len(&self, layer: usize, seq: SeqId, kv_head: usize) -> Result<usize, BlockError> {
        self.check_head(layer, kv_head)?;
        Ok(self.table(seq)?.len[layer][kv_head])
    }

    /// Blocks held by `seq` over all its heads.
    pub fn seq_blocks(&self, seq: SeqId) -> Result<usize, BlockError> {
        Ok(self
            .table(seq)?
            .blocks
            .iter()
            .flatten()
            .map(|b| b.len())
            .sum())
    }

    /// Physical slot of every logical slot of (layer, seq, kv_head).
    pub fn slots(
        &self,
        layer: usize,
        seq: SeqId,
        kv_head: usize,
    ) -> Result<Vec<usize>, BlockError> {
        Ok(self
            .runs(layer, seq, kv_head)?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Token positions of (layer, seq, kv_head) in logical order.
    pub fn positions(
        &self,
        layer: usize,
        seq: SeqId,
        kv_head: usize,
    ) -> Result<Vec<u32>, BlockError> {
        Ok(gather(&self.position, self.runs(layer, seq, kv_head)?))
    }

    /// Metrics of (layer, seq, kv_head) in logical order.
    pub fn metrics(
        &self,
        layer: usize,
        seq: SeqId,
        kv_head: usize,
    ) -> Result<Vec<f32>, BlockError> {
        Ok(gather(&self.metric, self.runs(layer, seq, kv_head)?))
    }

    /// Every physical slot's metric and position (`block * block_size + offset`): what a
    /// cache mirrors to its device when metrics move there.
    pub fn slot_meta(&self) -> (&[f32], &[u32]) {
        (&self.metric, &self.position)
    }

    /// Shorten (layer, seq, kv_head) to its first `new_len` slots and free the blocks past
    /// them: the bookkeeping of a compaction done elsewhere (the device's eviction kernels move
    /// the surviving slots into the head's first `new_len` logical slots). The pool's
    /// metric/position of the head are not moved: the caller keeps them elsewhere. Returns the
    /// blocks freed.
    pub fn truncate(
        &mut self,
        layer: usize,
        seq: SeqId,
        kv_head: usize,
        new_len: usize,
    ) -> Result<usize, BlockError> {
        self.check_head(layer, kv_head)?;
        let len = self.len(layer, seq, kv_head)?;
        if new_len > len {
            return Err(BlockError::BadLength {
                what: "truncated length",
                got: new_len,
                len,
            });
        }
        let blocks = &self.table(seq)?.blocks[layer][kv_head];
        let keep = new_len.div_ceil(self.block_size);
        let c = Compaction {
            layer,
            seq,
            kv_head,
            moves: Vec::new(),
            new_len,
            freed: blocks[keep..].to_vec(),
        };
        self.apply(&c)?;
        Ok(c.freed.len())
    }

    /// Shorten every head of `seq` whose `new_lens` entry (`[layers * kv_heads]`, (layer,
    /// kv-head) order) is below its length, as [`Self::truncate`] does one head: one table
    /// lookup and no allocation for the whole sequence (a device eviction step shrinks a few
    /// heads of each of ~200 sequences). Heads whose entry is not shorter are left alone.
    /// Returns the tokens evicted and the blocks freed. Errors (an unknown sequence, a wrong
    /// count) change nothing.
    pub fn truncate_heads(
        &mut self,
        seq: SeqId,
        new_lens: &[u32],
    ) -> Result<(usize, usize), BlockError> {
        let (nl, nkv, bs) = (self.layers, self.kv_heads, self.block_size);
        if new_lens.len() != nl * nkv {
            return Err(BlockError::BadLength {
                what: "new lengths (layers x kv-heads)",
                got: new_lens.len(),
                len: nl * nkv,
            });
        }
        let t = self.seqs.get_mut(&seq).ok_or(BlockError::UnknownSeq(seq))?;
        let (mut evicted, mut freed) = (0, 0);
        for l in 0..nl {
            for h in 0..nkv {
                let (len, new_len) = (t.len[l][h], new_lens[l * nkv + h] as usize);
                if new_len >= len {
                    continue;
                }
                let blocks = &mut t.blocks[l][h];
                let keep = new_len.div_ceil(bs);
                freed += blocks.len() - keep;
                evicted += len - new_len;
                // The same order as `apply`: the freed blocks go back last first.
                self.free.extend(blocks.drain(keep..).rev());
                t.len[l][h] = new_len;
            }
        }
        Ok((evicted, freed))
    }

    /// Add `delta[i]` to the metric of logical slot `i` (a prefix of the head's slots).
    pub fn add_metric(
        &mut self,
        layer: usize,
        seq: SeqId,
        kv_head: usize,
        delta: &[f32],
    ) -> Result<(), BlockError> {
        let runs = self.runs(layer, seq, kv_head)?;
        let len: usize = runs.iter().map(|r| r.len()).sum();
        if delta.len() > len {
            return Err(BlockError::BadLength {
                what: "metric update",
                got: delta.len(),
                len,
            });
        }
        let mut rest = delta;
        for r in runs {
            let n = r.len().min(rest.len());
            for (m, d) in self.metric[r.start..r.start + n].iter_mut().zip(&rest[..n]) {
                *m += d;
            }
            rest = &rest[n..];
        }
        Ok(())
    }

    /// The physical slot ranges of (layer, seq, kv_head), one per block, in logical order
    /// (the last one partial). Metrics and positions are read and written a block at a time
    /// through these: continual compression snapshots every head of every sequence after
    /// every decode step, and a per-slot index list was most of that cost.
    fn runs(
        &self,
        layer: usize,
        seq: SeqId,
        kv_head: usize,
    ) -> Result<Vec<std::ops::Range<usize>>, BlockError> {
        self.check_head(layer, kv_head)?;
        let t = self.table(seq)?;
        let bs = self.block_size;
        let len = t.len[layer][kv_head];
        Ok(t.blocks[layer][kv_head]
            .iter()
            .enumerate()
            .take(len.div_ceil(bs))
            .map(|(i, &b)| {
                let start = b as usize * bs;
                start..start + bs.min(len - i * bs)
            })
            .collect())
    }

    /// Append tokens at `positions` to (layer, seq, kv_head); returns their physical slots.
    /// New slots start with metric 0. Nothing changes when blocks run out.
    pub fn append(
        &mut self,
        layer: usize,
        seq: SeqId,
        kv_head: usize,
        positions: &[u32],
    ) -> Result<Vec<usize>, BlockError> {
        self.check_head(layer, kv_head)?;
        let bs = self.block_size;
        let total = self.num_blocks;
        let t = self.seqs.get_mut(&seq).ok_or(BlockError::UnknownSeq(seq))?;
        let len = t.len[layer][kv_head];
        let blocks = &mut t.blocks[layer][kv_head];
        let need = (len + positions.len()).div_ceil(bs) - blocks.len();
        if need > self.free.len() {
            return Err(BlockError::OutOfBlocks {
                needed: need,
                free: self.free.len(),
                total,
            });
        }
        for _ in 0..need {
            blocks.push(self.free.pop().expect("checked above"));
        }
        let mut out = Vec::with_capacity(positions.len());
        for (i, &p) in positions.iter().enumerate() {
            let l = len + i;
            let s = blocks[l / bs] as usize * bs + l % bs;
            self.metric[s] = 0.0;
            self.position[s] = p;
            out.push(s);
        }
        t.len[layer][kv_head] = len + positions.len();
        Ok(out)
    }

    /// One decode step of a batch: sequence `seqs[i].0` appends one token at position
    /// `seqs[i].1` to every head of every layer. Checks first that the pool holds every block
    /// the step needs (nothing changes otherwise), then appends with one table lookup per
    /// sequence: [`Self::append`] per (layer, sequence, head) cost a lookup and an allocation
    /// each, 20k per step at 224 SmolLM2 sequences. Rows are `(layer * seqs.len() + i) *
    /// kv_heads + head`.
    ///
    /// `host_meta(seq)` false: the new slots' metric and position are not written here (the
    /// sequence keeps them elsewhere, as a cache whose metric lives on the device does; the
    /// pool's copies of its slots are stale anyway). Those writes land all over a pool-sized
    /// array, two cache and TLB misses per row: half of this call's time at 224 sequences.
    pub fn append_step(
        &mut self,
        seqs: &[(SeqId, u32)],
        host_meta: impl Fn(SeqId) -> bool,
    ) -> Result<StepAppend, BlockError> {
        let (bs, nl, nkv, n) = (self.block_size, self.layers, self.kv_heads, seqs.len());
        let mut need = 0;
        let mut seen = std::collections::BTreeSet::new();
        for &(seq, _) in seqs {
            if !seen.insert(seq) {
                return Err(BlockError::DuplicateSeq(seq));
            }
            let t = self.table(seq)?;
            need += t.len.iter().flatten().filter(|&&l| l % bs == 0).count();
        }
        if need > self.free.len() {
            return Err(BlockError::OutOfBlocks {
                needed: need,
                free: self.free.len(),
                total: self.num_blocks,
            });
        }
        let mut out = StepAppend {
            slots: vec![0; nl * n * nkv],
            new_blocks: Vec::new(),
        };
        for (i, &(seq, p)) in seqs.iter().enumerate() {
            let meta = host_meta(seq);
            let t = self.seqs.get_mut(&seq).expect("looked up above");
            for l in 0..nl {
                for h in 0..nkv {
                    let row = (l * n + i) * nkv + h;
                    let len = t.len[l][h];
                    let blocks = &mut t.blocks[l][h];
                    if len % bs == 0 {
                        let b = self.free.pop().expect("counted above");
                        blocks.push(b);
                        out.new_blocks
                            .push((row as u32, (blocks.len() - 1) as u32, b));
                    }
                    let s = blocks[len / bs] as usize * bs + len % bs;
                    if meta {
                        self.metric[s] = 0.0;
                        self.position[s] = p;
                    }
                    out.slots[row] = s as u32;
                    t.len[l][h] = len + 1;
                }
            }
        }
        Ok(out)
    }

    /// Plan the compaction of (layer, seq, kv_head) after evicting the logical slots `evict`:
    /// survivors in the tail (logical index >= new length) move, tail-most first, into the
    /// lowest evicted holes, so the head's last blocks empty out. Pure: see [`Self::apply`].
    pub fn plan_compaction(
        &self,
        layer: usize,
        seq: SeqId,
        kv_head: usize,
        evict: &[usize],
    ) -> Result<Compaction, BlockError> {
        let slots = self.slots(layer, seq, kv_head)?;
        let len = slots.len();
        let mut gone = vec![false; len];
        for &e in evict {
            if e >= len || gone[e] {
                return Err(BlockError::BadSlot {
                    layer,
                    seq,
                    kv_head,
                    slot: e,
                    len,
                });
            }
            gone[e] = true;
        }
        let new_len = len - evict.len();
        let holes = (0..new_len).filter(|&i| gone[i]);
        let tail = (new_len..len).rev().filter(|&i| !gone[i]);
        let moves = holes
            .zip(tail)
            .map(|(h, t)| Move {
                from: slots[t],
                to: slots[h],
            })
            .collect();
        let blocks = &self.table(seq)?.blocks[layer][kv_head];
        let keep_blocks = new_len.div_ceil(self.block_size);
        Ok(Compaction {
            layer,
            seq,
            kv_head,
            moves,
            new_len,
            freed: blocks[keep_blocks..].to_vec(),
        })
    }

    /// Apply a compaction to the bookkeeping: copy metric and position along the moves, shrink
    /// the head, return its emptied blocks to the pool. (The storage copies K/V along the same
    /// moves before this.)
    pub fn apply(&mut self, c: &Compaction) -> Result<(), BlockError> {
        self.check_head(c.layer, c.kv_head)?;
        for m in &c.moves {
            self.metric[m.to] = self.metric[m.from];
            self.position[m.to] = self.position[m.from];
        }
        let t = self
            .seqs
            .get_mut(&c.seq)
            .ok_or(BlockError::UnknownSeq(c.seq))?;
        let blocks = &mut t.blocks[c.layer][c.kv_head];
        let keep = blocks.len() - c.freed.len();
        debug_assert_eq!(&blocks[keep..], &c.freed[..]);
        blocks.truncate(keep);
        t.len[c.layer][c.kv_head] = c.new_len;
        self.free.extend(c.freed.iter().rev());
        Ok(())
    }

    /// Check the pool's invariants: every block is either free or in exactly one table, each
    /// head holds exactly `ceil(len / block_size)` blocks. Returns a description of the first
    /// violation.
    pub fn check(&self) -> Result<(), String> {
        let mut owner = vec![0u8; self.num_blocks];
        for &b in &self.free {
            owner[b as usize] += 1;
        }
        for (seq, t) in &self.seqs {
            for (l, layer) in t.blocks.iter().enumerate() {
                for (h, head) in layer.iter().enumerate() {
                    let len = t.len[l][h];
                    if head.len() != len.div_ceil(self.block_size) {
                        return Err(format!(
                            "seq {seq} layer {l} head {h}: {} blocks for {len} tokens",
                            head.len()
                        ));
                    }
                    for &b in head {
                        owner[b as usize] += 1;
                    }
                }
            }
        }
        match owner.iter().position(|&o| o != 1) {
            Some(b) => Err(format!("block {b} is owned {} times", owner[b])),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
