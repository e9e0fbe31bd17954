//! Eviction plans and the moves that carry them out: what the pool plans and the paged
//! storage executes (plain data, no tensors).
use crate::kvcache::SeqId;

/// One slot copy of a compaction (physical slot ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// Slot whose K, V, metric and position are copied.
    pub from: usize,
    /// Slot they are copied to (an evicted hole).
    pub to: usize,
}

/// One block copy of a fork (physical block ids): K, V, metric and position of every slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    /// Block copied.
    pub from: usize,
    /// Newly allocated block it is copied to.
    pub to: usize,
}

/// What to evict from one head (logical slot indices of that head, any order, no repeats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadEviction {
    /// Layer of the head.
    pub layer: usize,
    /// Kv-head in the layer.
    pub kv_head: usize,
    /// Logical slots to evict.
    pub evict: Vec<usize>,
}

/// The evictions of one compression step of one sequence.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EvictionPlan {
    /// Per-head evictions (heads not listed keep everything).
    pub heads: Vec<HeadEviction>,
}

impl EvictionPlan {
    /// KV-Compress's plan taking `n_evict` blocks over the heads of one sequence from each
    /// head's (metric, position), (layer, kv-head) order; see
    /// [`crate::cuda::select::evictions_from_meta`].
    pub fn from_meta(
        meta: &[(Vec<f32>, Vec<u32>)],
        kv_heads: usize,
        block_size: usize,
        first_protected: u32,
        n_evict: usize,
        crush: Option<&crate::cuda::select::BlockPicks>,
    ) -> EvictionPlan {
        let evicted = crate::cuda::select::evictions_from_meta(
            meta,
            kv_heads,
            block_size,
            first_protected,
            n_evict,
            crush,
        );
        Self::from_heads(evicted, kv_heads)
    }

    /// The plan evicting `evicted[i]` from head `i` of a sequence, heads in (layer, kv-head)
    /// order with `kv_heads` per layer; heads with nothing to evict are left out.
    pub fn from_heads(evicted: impl IntoIterator<Item = Vec<usize>>, kv_heads: usize) -> Self {
        let kvh = kv_heads.max(1);
        EvictionPlan {
            heads: evicted
                .into_iter()
                .enumerate()
                .filter(|(_, e)| !e.is_empty())
                .map(|(i, evict)| HeadEviction {
                    layer: i / kvh,
                    kv_head: i % kvh,
                    evict,
                })
                .collect(),
        }
    }

    /// Total slots evicted.
    pub fn evicted(&self) -> usize {
        self.heads.iter().map(|h| h.evict.len()).sum()
    }
}

/// The moves and frees that compact one head after an eviction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compaction {
    /// Layer of the head.
    pub layer: usize,
    /// Sequence of the head.
    pub seq: SeqId,
    /// Kv-head in the layer.
    pub kv_head: usize,
    /// Tail survivors copied into holes (tail-most survivor to lowest hole).
    pub moves: Vec<Move>,
    /// Context length after compaction.
    pub new_len: usize,
    /// Blocks emptied by the compaction (the head's last blocks), returned to the pool.
    pub freed: Vec<u32>,
}
