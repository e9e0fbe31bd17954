use super::*;
use crate::kvcache::blocks::{EvictionPlan, HeadEviction};
use crate::kvcache::contiguous::{causal_attention, ContiguousCache};
use crate::kvcache::Probe;

fn spec(layers: usize, nkv: usize, d: usize, bs: usize) -> PagedSpec {
    PagedSpec {
        layers,
        kv_heads: nkv,
        head_dim: d,
        block_size: bs,
        dtype: DType::F32,
        device: Device::Cpu,
    }
}

fn call<'a>(
    seqs: &'a [SeqId],
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    probe: Probe,
) -> AttnCall<'a> {
    AttnCall {
        layer: 0,
        seqs,
        q,
        k,
        v,
        scale: 0.5,
        probe,
    }
}

/// Largest absolute elementwise difference of two f32 tensors (shared by test modules).
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn no_eviction_equals_contiguous_bitwise() {
    let dev = Device::Cpu;
    let (nh, nkv, d, total) = (6, 2, 8, 21);
    let q = Tensor::randn(0f32, 1.0, (1, nh, total, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, nkv, total, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, nkv, total, d), &dev).unwrap();
    let mut paged = PagedCache::new(spec(1, nkv, d, 4), 64).unwrap();
    let mut cont = ContiguousCache::new(1);
    let sp = paged.add_sequence().unwrap();
    let sc = cont.add_sequence().unwrap();
    for (start, len) in [(0, 7), (7, 1), (8, 9), (17, 1), (18, 3)] {
        let (qn, kn, vn) = (
            q.narrow(2, start, len).unwrap(),
            k.narrow(2, start, len).unwrap(),
            v.narrow(2, start, len).unwrap(),
        );
        let a = paged
            .attend(call(&[sp], &qn, &kn, &vn, Probe::LastQueries(3)))
            .unwrap();
        let b = cont
            .attend(call(&[sc], &qn, &kn, &vn, Probe::LastQueries(3)))
            .unwrap();
        assert_eq!(max_diff(&a.out, &b.out), 0.0);
        assert_eq!(max_diff(&a.probs.unwrap(), &b.probs.unwrap()), 0.0);
    }
    assert_eq!(paged.seq_len(sp), total);
    assert_eq!(paged.kv_len(0, sp, 1), total);
    assert_eq!(paged.memory().used_blocks, 2 * 6);
    paged.remove_sequence(sp).unwrap();
    assert_eq!(paged.memory().used_blocks, 0);
}

/// Deferred evictions of several sequences (and a second eviction of one of them before
/// the flush) leave every head with the same K/V rows as evicting one plan at a time.
#[test]
fn deferred_moves_equal_immediate_evictions() {
    let dev = Device::Cpu;
    let (nkv, d, total, bs) = (2, 4, 23, 4);
    let fill = |c: &mut PagedCache| -> Vec<SeqId> {
        (0..3)
            .map(|i| {
                let s = c.add_sequence().unwrap();
                let k = Tensor::arange(0f32, (nkv * total * d) as f32, &dev)
                    .unwrap()
                    .affine(1.0, 1000.0 * i as f64)
                    .unwrap()
                    .reshape((1, nkv, total, d))
                    .unwrap();
                let v = (&k * -1.0).unwrap();
                let q = Tensor::ones((1, nkv, total, d), DType::F32, &dev).unwrap();
                c.attend(call(&[s], &q, &k, &v, Probe::None)).unwrap();
                s
            })
            .collect()
    };
    let plan = |evict: &[usize]| EvictionPlan {
        heads: (0..nkv)
            .map(|h| HeadEviction {
                layer: 0,
                kv_head: h,
                evict: evict.iter().map(|&x| (x + 3 * h) % total).collect(),
            })
            .collect(),
    };
    // The first plan's holes are near the tail, so the second compaction's sources are
    // rows the first one moved there.
    let first = [15usize, 16];
    let second = [0usize, 1, 2, 3, 4, 5, 6];
    let mut now = PagedCache::new(spec(1, nkv, d, bs), 64).unwrap();
    let mut late = PagedCache::new(spec(1, nkv, d, bs), 64).unwrap();
    let (a, b) = (fill(&mut now), fill(&mut late));
    for &s in &a {
        now.evict(s, &plan(&first)).unwrap();
    }
    now.evict(a[1], &plan(&second)).unwrap();
    late.defer_moves();
    for &s in &b {
        late.evict(s, &plan(&first)).unwrap();
    }
    // The same sequence again: its first moves must land before these.
    late.evict(b[1], &plan(&second)).unwrap();
    assert!(
        late.head_k(0, b[0], 0).is_err(),
        "readers refuse pending moves"
    );
    late.flush_moves().unwrap();
    late.pool().check().unwrap();
    for (&sa, &sb) in a.iter().zip(&b) {
        for h in 0..nkv {
            assert_eq!(now.slot_positions(0, sa, h), late.slot_positions(0, sb, h));
            for (x, y) in [
                (
                    now.head_k(0, sa, h).unwrap(),
                    late.head_k(0, sb, h).unwrap(),
                ),
                (
                    now.head_v(0, sa, h).unwrap(),
                    late.head_v(0, sb, h).unwrap(),
                ),
            ] {
                assert_eq!(max_diff(&x, &y), 0.0, "seq {sb} head {h}");
            }
        }
    }
    // Not collecting any more: evictions run at once again.
    late.evict(b[0], &plan(&second)).unwrap();
    late.head_k(0, b[0], 0).unwrap();
}

/// The device-metric path of several sequences (one batched eviction, here through the
/// kernels' twin) leaves every head as the host path leaves it: a KV-Compress plan made
/// from the same metrics on the host and run through `evict`. Metrics are quantised so
/// ties are common; sequences have different lengths (ragged heads after a first round).
#[test]
fn device_eviction_equals_host_plan() {
    use crate::cuda::select::{Anchor, BlockPicks};
    use rand::{Rng, SeedableRng};
    let dev = Device::Cpu;
    let (layers, nkv, d, bs) = (2, 3, 4, 4);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut host = PagedCache::new(spec(layers, nkv, d, bs), 400).unwrap();
    let lens = [37usize, 20, 51];
    let mut seqs = Vec::new();
    for (i, &t) in lens.iter().enumerate() {
        let s = host.add_sequence().unwrap();
        for l in 0..layers {
            let k = Tensor::randn(0f32, 1.0, (1, nkv, t, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, nkv, t, d), &dev).unwrap();
            let q = Tensor::randn(0f32, 1.0, (1, nkv, t, d), &dev).unwrap();
            let one = [s];
            let mut c = call(&one, &q, &k, &v, Probe::None);
            c.layer = l;
            host.attend(c).unwrap();
            for h in 0..nkv {
                let m: Vec<f32> = (0..t)
                    .map(|_| rng.random_range(0..6) as f32 + i as f32)
                    .collect();
                host.add_metric(l, s, h, &m).unwrap();
            }
        }
        seqs.push(s);
    }
    let mut device = host.deep_copy().unwrap();
    device.set_device_compression(true);
    for &s in &seqs {
        device.keep_metric_on_device(s).unwrap();
    }
    for (round, n_evict) in [(0, [5usize, 7, 9]), (1, [3, 0, 4])] {
        let reqs: Vec<DeviceEvict> = seqs
            .iter()
            .zip(n_evict)
            .map(|(&seq, n)| DeviceEvict {
                seq,
                n_evict: n,
                first_protected: (host.seq_len(seq) - 3 - round) as u32,
                // KVCrush's block form on the second sequence (its twin's picks).
                crush: (seq == seqs[1]).then_some(BlockPicks {
                    groups_per_head: 1,
                    anchor: Anchor::Mean,
                    seed: 0,
                }),
            })
            .collect();
        let got = device.evict_on_device(&reqs).unwrap();
        for (r, st) in reqs.iter().zip(got) {
            let meta = host.seq_meta(r.seq).unwrap();
            let plan = EvictionPlan::from_meta(
                &meta,
                nkv,
                bs,
                r.first_protected,
                r.n_evict,
                r.crush.as_ref(),
            );
            if r.crush.is_some() && r.n_evict > 0 {
                let plain =
                    EvictionPlan::from_meta(&meta, nkv, bs, r.first_protected, r.n_evict, None);
                assert!(
                    plan.evicted() < plain.evicted(),
                    "KVCrush keeps groups back"
                );
            }
            let want = host.evict(r.seq, &plan).unwrap();
            assert_eq!(
                (st.evicted, st.freed_blocks),
                (want.evicted, want.freed_blocks)
            );
        }
        assert_eq!(device.pool().free_blocks(), host.pool().free_blocks());
        device.pool().check().unwrap();
        for &s in &seqs {
            assert_eq!(
                device.seq_meta(s).unwrap(),
                host.seq_meta(s).unwrap(),
                "round {round}"
            );
            for l in 0..layers {
                for h in 0..nkv {
                    for (x, y) in [
                        (
                            device.head_k(l, s, h).unwrap(),
                            host.head_k(l, s, h).unwrap(),
                        ),
                        (
                            device.head_v(l, s, h).unwrap(),
                            host.head_v(l, s, h).unwrap(),
                        ),
                    ] {
                        assert_eq!(max_diff(&x, &y), 0.0, "seq {s} layer {l} head {h}");
                    }
                }
            }
        }
    }
    // A sequence whose metric is on the host is refused, not evicted from stale data.
    let e = host.evict_on_device(&[DeviceEvict {
        seq: seqs[0],
        n_evict: 1,
        first_protected: 0,
        crush: None,
    }]);
    assert!(e.is_err());
}

#[test]
fn compacted_heads_attend_like_contiguous_over_survivors() {
    let dev = Device::Cpu;
    let (nh, nkv, d, total, bs) = (4, 2, 8, 19, 4);
    let q = Tensor::randn(0f32, 1.0, (1, nh, total + 1, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, nkv, total + 1, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, nkv, total + 1, d), &dev).unwrap();
    let mut paged = PagedCache::new(spec(1, nkv, d, bs), 32).unwrap();
    let s = paged.add_sequence().unwrap();
    let pre = |x: &Tensor| x.narrow(2, 0, total).unwrap();
    paged
        .attend(call(&[s], &pre(&q), &pre(&k), &pre(&v), Probe::None))
        .unwrap();
    // Metric = position, so we can check it moved with its slot.
    for h in 0..nkv {
        let m: Vec<f32> = (0..total).map(|p| p as f32).collect();
        paged.add_metric(0, s, h, &m).unwrap();
    }
    let evict0 = vec![0, 3, 4, 5, 9, 17];
    let evict1 = vec![1, 2, 6, 7, 8, 10, 11, 12, 13, 14];
    let plan = EvictionPlan {
        heads: vec![
            HeadEviction {
                layer: 0,
                kv_head: 0,
                evict: evict0.clone(),
            },
            HeadEviction {
                layer: 0,
                kv_head: 1,
                evict: evict1.clone(),
            },
        ],
    };
    let used = paged.memory().used_blocks;
    let st = paged.evict(s, &plan).unwrap();
    assert_eq!(st.evicted, 16);
    // head 0: 19 -> 13 tokens (5 -> 4 blocks); head 1: 19 -> 9 (5 -> 3)
    assert_eq!(st.freed_blocks, 3);
    assert_eq!(paged.memory().used_blocks, used - 3);
    paged.pool().check().unwrap();
    for (h, ev) in [(0, &evict0), (1, &evict1)] {
        let pos = paged.slot_positions(0, s, h);
        let mut sorted = pos.clone();
        sorted.sort();
        let want: Vec<u32> = (0..total as u32)
            .filter(|p| !ev.contains(&(*p as usize)))
            .collect();
        assert_eq!(sorted, want, "head {h}");
        let m = paged.pool().metrics(0, s, h).unwrap();
        assert_eq!(m, pos.iter().map(|&p| p as f32).collect::<Vec<_>>());
        // K rows moved with their positions
        let kh = paged.head_k(0, s, h).unwrap();
        let idx = Tensor::new(pos.as_slice(), &dev).unwrap();
        let want_k = k
            .squeeze(0)
            .unwrap()
            .get(h)
            .unwrap()
            .index_select(&idx, 0)
            .unwrap();
        assert_eq!(max_diff(&kh, &want_k), 0.0);
    }
    // Decode one token: equals attention over the survivors of each head.
    let last = |x: &Tensor| x.narrow(2, total, 1).unwrap();
    let out = paged
        .attend(call(&[s], &last(&q), &last(&k), &last(&v), Probe::All))
        .unwrap();
    let probs = out.probs.unwrap();
    assert_eq!(probs.dims(), &[1, nh, 1, 14]);
    for h in 0..nkv {
        let pos = paged.slot_positions(0, s, h);
        let idx = Tensor::new(pos.as_slice(), &dev).unwrap();
        let sel = |x: &Tensor| {
            x.narrow(1, h, 1)
                .unwrap()
                .index_select(&idx, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let qh = last(&q).narrow(1, h * 2, 2).unwrap();
        let (want, _) = causal_attention(&qh, &sel(&k), &sel(&v), 0.5).unwrap();
        let got = out.out.narrow(1, h * 2, 2).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
        // probabilities beyond the head's length are zero
        let n = pos.len();
        if n < 14 {
            let pad = probs
                .narrow(1, h * 2, 2)
                .unwrap()
                .narrow(3, n, 14 - n)
                .unwrap();
            assert_eq!(
                pad.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
    }
}

#[test]
fn sequences_share_the_pool_and_running_out_is_an_error() {
    let dev = Device::Cpu;
    let (nh, nkv, d) = (2, 1, 4);
    let mut paged = PagedCache::new(spec(1, nkv, d, 4), 3).unwrap();
    let a = paged.add_sequence().unwrap();
    let b = paged.add_sequence().unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, nh, 6, d), &dev).unwrap();
    let kv = Tensor::randn(0f32, 1.0, (1, nkv, 6, d), &dev).unwrap();
    paged.attend(call(&[a], &x, &kv, &kv, Probe::None)).unwrap();
    let e = paged
        .attend(call(&[b], &x, &kv, &kv, Probe::None))
        .err()
        .unwrap();
    assert!(e.to_string().contains("out of blocks"), "{e}");
    assert_eq!(paged.kv_len(0, b, 0), 0);
    paged.remove_sequence(a).unwrap();
    paged.attend(call(&[b], &x, &kv, &kv, Probe::None)).unwrap();
    assert_eq!(paged.memory().free_blocks, 1);
}

/// One head's K and V rows (flattened) and positions.
type HeadRows = (Vec<f32>, Vec<f32>, Vec<u32>);

/// Every head's K, V and positions, the length of the sequence and the blocks in use.
fn snapshot(c: &PagedCache, seq: SeqId) -> (Vec<HeadRows>, usize, usize) {
    let mut heads = Vec::new();
    for l in 0..c.spec().layers {
        for h in 0..c.spec().kv_heads {
            let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            heads.push((
                flat(c.head_k(l, seq, h).unwrap()),
                flat(c.head_v(l, seq, h).unwrap()),
                c.slot_positions(l, seq, h),
            ));
        }
    }
    (heads, c.seq_len(seq), c.memory().used_blocks)
}

#[test]
fn truncate_seq_after_appends_restores_the_cache() {
    let dev = Device::Cpu;
    let (nh, nkv, d, layers) = (4, 2, 4, 2);
    let mut c = PagedCache::new(spec(layers, nkv, d, 4), 64).unwrap();
    let s = c.add_sequence().unwrap();
    let other = c.add_sequence().unwrap();
    let chunk = |c: &mut PagedCache, seq: SeqId, t: usize| {
        let q = Tensor::randn(0f32, 1.0, (1, nh, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, nkv, t, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, nkv, t, d), &dev).unwrap();
        let seqs = [seq];
        for l in 0..layers {
            let mut a = call(&seqs, &q, &k, &v, Probe::None);
            a.layer = l;
            c.attend(a).unwrap();
        }
    };
    chunk(&mut c, s, 10);
    chunk(&mut c, other, 5);
    let before = snapshot(&c, s);
    assert_eq!(before.1, 10);
    // Two appends past the context (one crossing into new blocks), then the roll-back.
    chunk(&mut c, s, 7);
    chunk(&mut c, s, 1);
    assert_eq!(c.seq_len(s), 18);
    let freed = c.truncate_seq(s, 10).unwrap();
    assert_eq!(
        freed,
        layers * nkv * (18usize.div_ceil(4) - 10usize.div_ceil(4))
    );
    assert_eq!(snapshot(&c, s), before);
    assert_eq!(c.seq_len(other), 5);
    c.pool().check().unwrap();
    // The next token goes to position 10 again.
    chunk(&mut c, s, 1);
    assert_eq!(c.slot_positions(1, s, 1).last(), Some(&10));
    // Rolling forward, or past evicted slots out of order, is refused.
    assert!(c.truncate_seq(s, 12).is_err());
    let plan = EvictionPlan {
        heads: vec![HeadEviction {
            layer: 0,
            kv_head: 0,
            evict: vec![1],
        }],
    };
    c.evict(s, &plan).unwrap();
    let kept = snapshot(&c, s);
    assert!(c.truncate_seq(s, 5).is_err());
    assert_eq!(snapshot(&c, s), kept);
}
