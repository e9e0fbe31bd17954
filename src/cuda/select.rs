//! The pure selection of KV-Compress's eviction and KVCrush's block picks: what the eviction
//! kernel's twin ([`super::evict::kvcompress_evict_twin`]), the paged cache's host planning and
//! the methods in `crate::compress` share. Plain data in, plain data out; no tensors.
//!
//! KV-Compress (the paper's implementation): protected slots masked to +inf, each head's slots
//! sorted ascending, the j-th candidate of a head scored by its sorted slot `j * bs + h - 1`
//! (`h` = tokens in the head's last block), the lowest candidates over all heads of a sequence
//! taken; a head giving k candidates evicts its `(k - 1) * bs + h` lowest slots. Ties between
//! equal candidates are broken by (head, candidate index), equal slot metrics by slot order.
//!
//! KVCrush's block form: see [`block_picks`]; anchors as [`Anchor`].
use rand::{Rng, SeedableRng};
use std::collections::HashSet;

/// Per-head candidates of KV-Compress's block selection: how many candidates each head gives
/// (`counts[i]`) when the `n_evict` lowest candidates over all heads are taken. `metrics[i]`:
/// slot metrics of head `i` with protected slots already +inf. Candidates with +inf (or NaN)
/// scores are never taken, so fewer than `n_evict` may be.
pub fn select_blocks(metrics: &[Vec<f32>], block_size: usize, n_evict: usize) -> Vec<usize> {
    counts_of(
        lowest_candidates(metrics, 0, block_size, n_evict),
        metrics.len(),
        n_evict,
    )
}

/// A candidate of [`select_blocks`]: (score, head, index within the head), ordered by score,
/// then head, then index (the selection's total order).
pub type Candidate = (f32, usize, usize);

/// The `n_evict` lowest finite candidates of `metrics`' heads, numbered from `first_head`, in
/// the selection's order. Under tensor parallelism each rank computes these for its heads
/// (`first_head`: its first global kv-head index); the `n_evict` lowest of all ranks' lists
/// are exactly the one-GPU selection's ([`select_from_shards`]; docs/design.md, "Tensor
/// parallel").
pub fn lowest_candidates(
    metrics: &[Vec<f32>],
    first_head: usize,
    block_size: usize,
    n_evict: usize,
) -> Vec<Candidate> {
    // A head can give at most `n_evict` candidates, and its first k candidates need only its
    // `(k - 1) * bs + h` lowest slots: partial selection instead of sorting every head (with
    // continual compression this runs after nearly every decode step, where `n_evict` is 1 or 2
    // and heads hold thousands of slots). Same result as sorting: the order is total.
    let mut cands: Vec<Candidate> = Vec::new();
    for (i, m) in metrics.iter().enumerate() {
        let h = last_block_tokens(m.len(), block_size);
        let k = m.len().div_ceil(block_size).min(n_evict);
        if k == 0 {
            continue;
        }
        let order = lowest_order(m, (k - 1) * block_size + h);
        for j in 0..k {
            let s = m[order[j * block_size + h - 1]];
            if !s.is_finite() {
                break; // candidates are non-decreasing within a head
            }
            cands.push((s, first_head + i, j));
        }
    }
    cands.sort_by(candidate_order);
    cands.truncate(n_evict);
    cands
}

fn candidate_order(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
}

/// [`select_blocks`] over heads split among ranks: `shards[r]` is rank `r`'s
/// [`lowest_candidates`] (what an all-gather collects); returns the candidates taken per
/// global head (`heads` in all), equal to [`select_blocks`] on every head together.
pub fn select_from_shards(shards: &[Vec<Candidate>], heads: usize, n_evict: usize) -> Vec<usize> {
    let mut all: Vec<Candidate> = shards.iter().flatten().copied().collect();
    all.sort_by(candidate_order);
    counts_of(all, heads, n_evict)
}

/// Candidates taken per head: the first `n_evict` of `cands` (in the selection's order).
fn counts_of(cands: Vec<Candidate>, heads: usize, n_evict: usize) -> Vec<usize> {
    let mut counts = vec![0; heads];
    for &(_, i, _) in cands.iter().take(n_evict) {
        counts[i] += 1;
    }
    counts
}

/// [`select_blocks`] in its straightforward form: every head sorted fully, every candidate
/// scored. The reference the tests and `kvc-plan-bench` compare the partial selection with.
pub fn select_blocks_by_full_sort(metrics: &[Vec<f32>], bs: usize, n_evict: usize) -> Vec<usize> {
    let mut cands: Vec<Candidate> = Vec::new();
    for (i, m) in metrics.iter().enumerate() {
        let mut sorted = m.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        for (j, s) in candidate_scores(&sorted, bs).into_iter().enumerate() {
            if s.is_finite() {
                cands.push((s, i, j));
            }
        }
    }
    cands.sort_by(candidate_order);
    counts_of(cands, metrics.len(), n_evict)
}

/// Logical indices of the `n` lowest slots of `m` in ascending (metric, index) order: a
/// partial selection (O(len + n log n)), equal to the first `n` of a full sort. Sorts packed
/// u64 keys (order-preserving metric bits, then the index) rather than indices through a
/// comparator: no indirection, and ties fall to the index by construction.
fn lowest_order(m: &[f32], n: usize) -> Vec<usize> {
    let n = n.min(m.len());
    if n == 0 {
        return Vec::new();
    }
    let mut keys: Vec<u64> = m
        .iter()
        .enumerate()
        .map(|(i, &x)| (u64::from(total_order_key(x)) << 32) | i as u64)
        .collect();
    if n < keys.len() {
        keys.select_nth_unstable(n - 1);
        keys.truncate(n);
    }
    keys.sort_unstable();
    keys.into_iter()
        .map(|k| (k & 0xffff_ffff) as usize)
        .collect()
}

/// A u32 whose unsigned order is `f32::total_cmp`'s order (sign bit flipped for positives,
/// all bits flipped for negatives).
pub(crate) fn total_order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Tokens in the last block of a head of `len` tokens (`bs` when full, 0 when empty).
pub fn last_block_tokens(len: usize, bs: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len - 1) % bs + 1
    }
}

/// Candidate scores of one head from its ascending metrics: candidate j frees j + 1 blocks and
/// is scored by the largest metric it must evict, `sorted[j * bs + h - 1]`.
pub fn candidate_scores(sorted: &[f32], bs: usize) -> Vec<f32> {
    let h = last_block_tokens(sorted.len(), bs);
    (0..sorted.len().div_ceil(bs))
        .map(|j| sorted[j * bs + h - 1])
        .collect()
}

/// Slots of a head (logical indices) evicted when it gives `k` candidates: its
/// `(k - 1) * bs + h` lowest-metric slots.
pub fn head_evictions(metric: &[f32], bs: usize, k: usize) -> Vec<usize> {
    if k == 0 {
        return vec![];
    }
    lowest_order(metric, (k - 1) * bs + last_block_tokens(metric.len(), bs))
}

/// A head's metrics with the slots at positions `>= first_protected` masked to +inf.
pub fn mask_protected(metric: &[f32], position: &[u32], first_protected: u32) -> Vec<f32> {
    metric
        .iter()
        .zip(position)
        .map(|(&m, &p)| {
            if p >= first_protected {
                f32::INFINITY
            } else {
                m
            }
        })
        .collect()
}

/// What each head evicts when head `i` gives `counts[i]` candidates of its metrics, already
/// masked ([`head_evictions`]).
pub fn head_evictions_of(
    masked: &[Vec<f32>],
    block_size: usize,
    counts: &[usize],
) -> Vec<Vec<usize>> {
    masked
        .iter()
        .zip(counts)
        .map(|(m, &k)| head_evictions(m, block_size, k))
        .collect()
}

/// Anchor signature the Hamming distances are measured to.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Anchor {
    /// Random bits from `--kvcrush-seed`.
    Random,
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Per-bit majority over the candidates.
    Mean,
    /// 0101...
    Alternate,
}

/// The anchor of `bits` bits for `mode` (`cands`: the candidates' signatures, for `Mean`).
pub fn anchor(mode: Anchor, bits: usize, cands: &[Vec<bool>], seed: u64) -> Vec<bool> {
    match mode {
        Anchor::Zeros => vec![false; bits],
        Anchor::Ones => vec![true; bits],
        Anchor::Alternate => (0..bits).map(|i| i % 2 == 1).collect(),
        Anchor::Random => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..bits).map(|_| rng.random::<bool>()).collect()
        }
        Anchor::Mean => (0..bits)
            .map(|b| 2 * cands.iter().filter(|c| c[b]).count() > cands.len())
            .collect(),
    }
}

/// Hamming distance.
pub fn hamming(a: &[bool], b: &[bool]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

/// Indices (into `sigs`) of `k` representatives: ordered by distance to the anchor (stable),
/// taken at indices `floor(i * n / k)` of that order. All when `k >= n`.
pub fn pick(sigs: &[Vec<bool>], k: usize, mode: Anchor, seed: u64) -> Vec<usize> {
    let n = sigs.len();
    if k >= n {
        return (0..n).collect();
    }
    if k == 0 {
        return vec![];
    }
    let bits = sigs[0].len();
    let a = anchor(mode, bits, sigs, seed);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| hamming(&sigs[i], &a));
    (0..k).map(|i| order[i * n / k]).collect()
}

/// KVCrush's block form as one step of an eviction (what `kernels/evict.cu: kvc_crush_pick`
/// runs on the device between the base's block selection and the compaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPicks {
    /// Groups kept per head on average: `groups_per_head * kv_heads` per layer.
    pub groups_per_head: usize,
    /// Anchor mode.
    pub anchor: Anchor,
    /// Seed of the random anchor.
    pub seed: u64,
}

/// Longest block (bits of a group's signature) [`BlockPicks`] runs with on the device.
pub const DEVICE_MAX_BLOCK: usize = 64;

/// The anchor of a `bits`-bit signature as a bit mask (bit `i`: the `i`-th slot of a group in
/// position order), for the device; `None` for [`Anchor::Mean`], which depends on the groups.
pub fn anchor_mask(mode: Anchor, bits: usize, seed: u64) -> Option<u64> {
    if mode == Anchor::Mean {
        return None;
    }
    let a = anchor(mode, bits.min(64), &[], seed);
    Some(
        a.iter()
            .enumerate()
            .fold(0, |m, (i, &b)| m | (b as u64) << i),
    )
}

/// KVCrush's block form on a base eviction, layer by layer (the module docs): `heads[i]` is
/// head `i`'s (metric, position) by logical slot in (layer, kv-head) order (`kv_heads` per
/// layer), `evicted[i]` the slots the base evicts from
/// it (changed in place: the representatives' slots are taken out), slots at positions `>=
/// first_protected` are never evictable. Per layer, the median of the evictable metrics splits
/// each slot into 1 (`>=` median) or 0; each head's evicted slots, in (metric, slot) order, are
/// cut from the top into groups of `block_size`; a group's signature is its bits in position
/// order; [`pick`] chooses `groups_per_head * kv_heads` of the layer's groups (ties in distance
/// keep (head, group-from-the-top) order).
pub fn block_picks(
    heads: &[(&[f32], &[u32])],
    evicted: &mut [Vec<usize>],
    kv_heads: usize,
    first_protected: u32,
    block_size: usize,
    p: &BlockPicks,
) {
    let bs = block_size.max(1);
    let kvh = kv_heads.max(1);
    for (layer, ev_layer) in heads.chunks(kvh).zip(evicted.chunks_mut(kvh)) {
        let mut scores: Vec<f32> = layer
            .iter()
            .flat_map(|(m, pos)| {
                m.iter()
                    .zip(pos.iter())
                    .filter(|(_, &q)| q < first_protected)
                    .map(|(&x, _)| x)
            })
            .collect();
        scores.sort_by(|a, b| a.total_cmp(b));
        let median = scores.get(scores.len() / 2).copied().unwrap_or(0.0);
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (h, ((metric, _), ev)) in layer.iter().zip(ev_layer.iter_mut()).enumerate() {
            ev.sort_by(|&a, &b| metric[a].total_cmp(&metric[b]).then(a.cmp(&b)));
            let mut end = ev.len();
            while end >= bs {
                groups.push((h, ev[end - bs..end].to_vec()));
                end -= bs;
            }
        }
        let sigs: Vec<Vec<bool>> = groups
            .iter()
            .map(|(h, g)| {
                let (metric, pos) = layer[*h];
                let mut g = g.clone();
                g.sort_by_key(|&i| pos[i]);
                g.iter().map(|&i| metric[i] >= median).collect()
            })
            .collect();
        let mut back: Vec<HashSet<usize>> = vec![HashSet::new(); layer.len()];
        for j in pick(&sigs, p.groups_per_head * layer.len(), p.anchor, p.seed) {
            back[groups[j].0].extend(groups[j].1.iter().copied());
        }
        for (ev, b) in ev_layer.iter_mut().zip(&back) {
            ev.retain(|i| !b.contains(i));
        }
    }
}

/// KV-Compress's evictions of `n_evict` blocks over the heads of one sequence, from each
/// head's (metric, position) in (layer, kv-head) order (`kv_heads` per layer): slots with
/// `position >= first_protected` are kept; with `crush`, KVCrush's block form then takes its
/// representatives out of the evictions ([`block_picks`]). Per head, the evicted logical slots.
pub fn evictions_from_meta(
    meta: &[(Vec<f32>, Vec<u32>)],
    kv_heads: usize,
    block_size: usize,
    first_protected: u32,
    n_evict: usize,
    crush: Option<&BlockPicks>,
) -> Vec<Vec<usize>> {
    let masked: Vec<Vec<f32>> = meta
        .iter()
        .map(|(m, p)| mask_protected(m, p, first_protected))
        .collect();
    let counts = select_blocks(&masked, block_size, n_evict);
    let mut evicted = head_evictions_of(&masked, block_size, &counts);
    if let Some(picks) = crush {
        let heads: Vec<(&[f32], &[u32])> = meta.iter().map(|(m, p)| (&m[..], &p[..])).collect();
        block_picks(
            &heads,
            &mut evicted,
            kv_heads,
            first_protected,
            block_size,
            picks,
        );
    }
    evicted
}
