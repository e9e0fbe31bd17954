//! The kernels' twins against the cache layer: the eviction twin compacts as the block pool
//! plans, the prefill twins equal the candle chain with the cache's causal mask, and every twin
//! agrees with the CPU paged cache (the contiguous cache's equal). These sit here, not beside
//! the twins in `crate::cuda`, because they need the cache (a lower layer cannot import it).
#![allow(clippy::needless_range_loop)]
use crate::cuda::evict::*;
use crate::cuda::paged_attention::*;
use crate::cuda::prefill_attention::*;
use crate::cuda::prefill_softmax::*;
use half::bf16;

#[test]
fn evict_twin_compacts_like_the_pool() {
    use crate::kvcache::blocks::BlockPool;
    // 2 heads, block size 2; head 0: 5 tokens, head 1: 3 tokens.
    let mut pool = BlockPool::new(1, 2, 2, 8).unwrap();
    pool.add_seq(0).unwrap();
    pool.append(0, 0, 0, &[0, 1, 2, 3, 4]).unwrap();
    pool.append(0, 0, 1, &[0, 1, 2]).unwrap();
    let mut metric = vec![0f32; 16];
    let mut position = vec![0u32; 16];
    let ms = [[5.0, 0.1, 0.2, 9.0, 1.0], [0.05, 7.0, 1.0, 0.0, 0.0]];
    for h in 0..2 {
        for (i, s) in pool.slots(0, 0, h).unwrap().into_iter().enumerate() {
            metric[s] = ms[h][i];
            position[s] = i as u32;
        }
    }
    let t = pool.table(0).unwrap();
    let mut tables = vec![0u32; 2 * 3];
    for h in 0..2 {
        tables[h * 3..][..t.blocks[0][h].len()].copy_from_slice(&t.blocks[0][h]);
    }
    let mut lens = vec![5u32, 3];
    let d = 1;
    let mut k: Vec<f32> = (0..16).map(|x| x as f32).collect();
    let mut v = k.clone();
    // protect position 4 (head 0's last token); evict 2 blocks.
    let st = kvcompress_evict_twin(
        &mut k,
        &mut v,
        &mut metric,
        &mut position,
        &tables,
        &mut lens,
        3,
        2,
        d,
        &EvictSeq {
            heads: 2,
            kv_heads: 2,
            first_protected: 4,
            n_evict: 2,
            crush: None,
        },
    )
    .unwrap();
    // head 0 (h = 1): masked sorted [0.1, 0.2, 5, 9, inf] -> candidates (sorted index
    // 0, 2, 4) [0.1, 5, inf]; head 1 (h = 1): sorted [0.05, 1, 7] -> [0.05, 7].
    // Lowest two: 0.05 (head 1), 0.1 (head 0); each head evicts its lowest slot.
    assert_eq!(st.counts, vec![1, 1]);
    assert_eq!(st.new_lens, vec![4, 2]);
    let mut sorted0: Vec<u32> = (0..4)
        .map(|i| position[tables[i / 2] as usize * 2 + i % 2])
        .collect();
    sorted0.sort();
    assert_eq!(sorted0, vec![0, 2, 3, 4]);
}

/// The twins agree with the CPU paged cache (the oracle path): after random appends and a
/// compaction, `paged_decode` over the pool's tables equals `PagedCache::attend` for a
/// decode step (outputs and probabilities), and `kvcompress_evict` equals the host plan
/// (`select_blocks` + `head_evictions` + `BlockPool::plan_compaction`).
/// Key positions of `nkv` heads of `n` keys, unsorted (as after evictions), some after the
/// first queries of the prefill tests, the last key of head 1 padding.
fn unsorted_positions(nkv: usize, n: usize) -> Vec<u32> {
    (0..nkv * n)
        .map(|i| {
            let (h, j) = (i / n, i % n);
            if h == 1 && j == n - 1 {
                u32::MAX
            } else {
                ((j * 7 + h * 3) % 15) as u32
            }
        })
        .collect()
}

/// The candle chain's additive causal mask `[1, kv_heads, g * t, n]` from positions `kp`
/// `[kv_heads, n]`, every query head of a group masked alike.
fn group_mask(kp: &candle_core::Tensor, q_start: u32, g: usize, t: usize) -> candle_core::Tensor {
    let (nkv, n) = kp.dims2().unwrap();
    crate::kvcache::causal_mask(kp, q_start as usize, t)
        .unwrap()
        .reshape((nkv, 1, t, n))
        .unwrap()
        .broadcast_as((nkv, g, t, n))
        .unwrap()
        .reshape((1, nkv, g * t, n))
        .unwrap()
}

/// The prefill softmax twin (the oracle of `kernels/prefill_softmax.cu`) computes what the
/// candle chain of the CPU paged cache computes: scale in T, f32, causal mask from
/// unsorted key positions with padding, softmax; probed rows are the last queries.
#[test]
fn prefill_softmax_twin_matches_the_candle_chain() {
    use candle_core::{DType, Device, Tensor};
    let dev = Device::Cpu;
    let (nkv, g, t, n, q_start, probed) = (2usize, 3usize, 5usize, 13usize, 9u32, 2usize);
    let scale = 0.37f32;
    // Unsorted positions (as after evictions), some after the first queries, one padding.
    let key_pos = unsorted_positions(nkv, n);
    let shape = SoftmaxShape {
        kv_heads: nkv,
        group: g,
        t,
        n,
        probed,
    };
    for dtype in [DType::F32, DType::BF16] {
        let att = Tensor::randn(0f32, 3.0, (1, nkv, g * t, n), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let kp = Tensor::from_vec(key_pos.clone(), (nkv, n), &dev).unwrap();
        let mask = group_mask(&kp, q_start, g, t);
        let scaled = (att.clone() * scale as f64)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scaled.broadcast_add(&mask).unwrap()).unwrap();
        let want_f: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let want_t: Vec<f32> = want
            .to_dtype(dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (got_t, got_p): (Vec<f32>, Vec<f32>) = match dtype {
            DType::F32 => {
                let a: Vec<f32> = att.flatten_all().unwrap().to_vec1().unwrap();
                prefill_softmax_twin(&shape, &a, &key_pos, q_start, scale).unwrap()
            }
            _ => {
                let a: Vec<bf16> = att.flatten_all().unwrap().to_vec1().unwrap();
                let (p, probs) =
                    prefill_softmax_twin(&shape, &a, &key_pos, q_start, scale).unwrap();
                (p.iter().map(|x| x.to_f32()).collect(), probs)
            }
        };
        let ulp_t = if dtype == DType::F32 { 1e-6 } else { 8e-3 };
        for (i, (a, b)) in got_t.iter().zip(&want_t).enumerate() {
            assert!(
                (a - b).abs() <= 1e-7 + ulp_t * b.abs(),
                "{dtype:?} p[{i}]: {a} vs {b}"
            );
        }
        let mut hidden = 0;
        for h in 0..nkv * g {
            for qq in 0..probed {
                let q = t - probed + qq;
                for j in 0..n {
                    let a = got_p[(h * probed + qq) * n + j];
                    let b = want_f[(h * t + q) * n + j];
                    assert!(
                        (a - b).abs() <= 1e-6,
                        "{dtype:?} probs h{h} q{q} k{j}: {a} vs {b}"
                    );
                    hidden += usize::from(b == 0.0);
                }
            }
        }
        assert!(
            hidden > 0,
            "the mask must hide some keys of the probed queries"
        );
    }
    // Bad shapes are refused.
    let bad = SoftmaxShape {
        probed: t + 1,
        ..shape
    };
    assert!(prefill_softmax_twin(&bad, &vec![0f32; shape.rows() * n], &key_pos, 0, 1.0).is_err());
    assert!(prefill_softmax_twin(&shape, &[0f32; 3], &key_pos, 0, 1.0).is_err());
}

/// The flash prefill twin (the oracle of `kernels/prefill_attention.cu`) computes the CPU
/// paged cache's candle chain in f32 (scores, scale, causal mask from unsorted positions,
/// softmax, p @ v), and never reads a padding key's K/V (NaN there changes nothing).
#[test]
fn prefill_attention_twin_matches_the_candle_chain() {
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let (nkv, g, t, n, d, q_start) = (2usize, 3usize, 5usize, 13usize, 8usize, 9u32);
    let scale = 0.37f32;
    let key_pos = unsorted_positions(nkv, n);
    let shape = SoftmaxShape {
        kv_heads: nkv,
        group: g,
        t,
        n,
        probed: 0,
    };
    let q = Tensor::randn(0f32, 1.0, (1, nkv, g * t, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, nkv, n, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, nkv, n, d), &dev).unwrap();
    let kp = Tensor::from_vec(key_pos.clone(), (nkv, n), &dev).unwrap();
    let mask = group_mask(&kp, q_start, g, t);
    let att = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
    let p = candle_nn::ops::softmax_last_dim(&att.broadcast_add(&mask).unwrap()).unwrap();
    let want: Vec<f32> = p
        .matmul(&v)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let flat = |x: &Tensor| -> Vec<f32> { x.flatten_all().unwrap().to_vec1().unwrap() };
    let (qf, mut kf, mut vf) = (flat(&q), flat(&k), flat(&v));
    // The padding key's rows: NaN.
    for x in kf[(2 * n - 1) * d..][..d]
        .iter_mut()
        .chain(&mut vf[(2 * n - 1) * d..][..d])
    {
        *x = f32::NAN;
    }
    let got = prefill_attention_twin(&shape, d, (&qf, &kf, &vf), &key_pos, q_start, scale).unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= 1e-5, "out[{i}]: {a} vs {b}");
    }
    // A query that sees no key (every position later than it) gives zeros.
    let late: Vec<u32> = key_pos.iter().map(|p| p.saturating_add(100)).collect();
    let zeros = prefill_attention_twin(&shape, d, (&qf, &kf, &vf), &late, 0, scale).unwrap();
    assert!(zeros.iter().all(|x| *x == 0.0));
    assert!(prefill_attention_twin(&shape, d, (&qf[1..], &kf, &vf), &key_pos, 0, 1.0).is_err());
}

#[test]
fn twins_agree_with_the_cpu_paged_cache() {
    use crate::cuda::select::{head_evictions, select_blocks};
    use crate::kvcache::blocks::{EvictionPlan, HeadEviction};
    use crate::kvcache::paged::{PagedCache, PagedSpec};
    use crate::kvcache::{AttnCall, CacheBackend, Probe};
    use candle_core::{DType, Device, Tensor};
    let dev = Device::Cpu;
    let (nkv, g, d, bs, t) = (2usize, 3usize, 8usize, 4usize, 23usize);
    let nh = nkv * g;
    let spec = PagedSpec {
        layers: 1,
        kv_heads: nkv,
        head_dim: d,
        block_size: bs,
        dtype: DType::F32,
        device: dev.clone(),
    };
    let mut cache = PagedCache::new(spec, 40).unwrap();
    let s = cache.add_sequence().unwrap();
    let q = Tensor::randn(0f32, 1.0, (1, nh, t + 1, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, nkv, t + 1, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, nkv, t + 1, d), &dev).unwrap();
    let nar = |x: &Tensor, a: usize, n: usize| x.narrow(2, a, n).unwrap().contiguous().unwrap();
    cache
        .attend(AttnCall {
            layer: 0,
            seqs: &[s],
            q: &nar(&q, 0, t),
            k: &nar(&k, 0, t),
            v: &nar(&v, 0, t),
            scale: 0.35,
            probe: Probe::None,
        })
        .unwrap();
    // Evict a few slots of head 1 so the tables are not in position order.
    cache
        .evict(
            s,
            &EvictionPlan {
                heads: vec![HeadEviction {
                    layer: 0,
                    kv_head: 1,
                    evict: vec![0, 3, 7, 8, 9],
                }],
            },
        )
        .unwrap();
    // Decode step on the CPU path, then the twin over the same (post-append) state.
    let out = cache
        .attend(AttnCall {
            layer: 0,
            seqs: &[s],
            q: &nar(&q, t, 1),
            k: &nar(&k, t, 1),
            v: &nar(&v, t, 1),
            scale: 0.35,
            probe: Probe::All,
        })
        .unwrap();
    let pool = cache.pool();
    let lens: Vec<u32> = (0..nkv)
        .map(|h| pool.len(0, s, h).unwrap() as u32)
        .collect();
    let max_len = *lens.iter().max().unwrap() as usize;
    let mb = max_len.div_ceil(bs);
    let mut tables = vec![0u32; nkv * mb];
    for h in 0..nkv {
        let bl = &pool.table(s).unwrap().blocks[0][h];
        tables[h * mb..][..bl.len()].copy_from_slice(bl);
    }
    // Whole K/V storage as slices (gathering every slot in physical order).
    let num_slots = pool.num_blocks() * bs;
    let all: Vec<u32> = (0..num_slots as u32).collect();
    let idx = Tensor::new(all.as_slice(), &dev).unwrap();
    let shape = DecodeShape {
        batch: 1,
        num_kv_heads: nkv,
        group: g,
        head_dim: d,
        max_blocks: mb,
        block_size: bs,
        probs_stride: max_len,
        num_slots,
    };
    let phys = |x: &Tensor| -> Vec<f32> {
        x.index_select(&idx, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (kv_k, kv_v) = cache.storage();
    let qv: Vec<f32> = nar(&q, t, 1).flatten_all().unwrap().to_vec1().unwrap();
    let r = paged_decode_twin(
        &shape,
        &qv,
        &phys(kv_k),
        &phys(kv_v),
        &tables,
        &lens,
        0.35,
        None,
    )
    .unwrap();
    let want_out: Vec<f32> = out.out.flatten_all().unwrap().to_vec1().unwrap();
    let want_p: Vec<f32> = out.probs.unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for (a, b) in r.out.iter().zip(&want_out) {
        assert!((a - b).abs() < 1e-5, "out {a} vs {b}");
    }
    for (a, b) in r.probs.iter().zip(&want_p) {
        assert!((a - b).abs() < 1e-6, "probs {a} vs {b}");
    }

    // Eviction twin vs the host plan on the pool's own metrics (with ties).
    let metrics: Vec<Vec<f32>> = (0..nkv)
        .map(|h| {
            (0..lens[h] as usize)
                .map(|i| ((i * 7 + h) % 5) as f32)
                .collect()
        })
        .collect();
    for (h, m) in metrics.iter().enumerate() {
        cache.add_metric(0, s, h, m).unwrap();
    }
    let first_protected = (t + 1 - 3) as u32;
    let pool = cache.pool();
    let mut metric = vec![0f32; num_slots];
    let mut position = vec![0u32; num_slots];
    let mut masked = Vec::new();
    for h in 0..nkv {
        let sl = pool.slots(0, s, h).unwrap();
        let mm = pool.metrics(0, s, h).unwrap();
        let pp = pool.positions(0, s, h).unwrap();
        for i in 0..sl.len() {
            metric[sl[i]] = mm[i];
            position[sl[i]] = pp[i];
        }
        masked.push(
            mm.iter()
                .zip(&pp)
                .map(|(&m, &p)| {
                    if p >= first_protected {
                        f32::INFINITY
                    } else {
                        m
                    }
                })
                .collect::<Vec<f32>>(),
        );
    }
    let counts = select_blocks(&masked, bs, 3);
    let mut plan = EvictionPlan::default();
    for (h, &c) in counts.iter().enumerate() {
        plan.heads.push(HeadEviction {
            layer: 0,
            kv_head: h,
            evict: head_evictions(&masked[h], bs, c),
        });
    }
    let mut kf = phys(cache.storage().0);
    let mut vf = phys(cache.storage().1);
    let mut lens2 = lens.clone();
    let st = kvcompress_evict_twin(
        &mut kf,
        &mut vf,
        &mut metric,
        &mut position,
        &tables,
        &mut lens2,
        mb,
        bs,
        d,
        &EvictSeq {
            heads: lens.len(),
            kv_heads: lens.len(),
            first_protected,
            n_evict: 3,
            crush: None,
        },
    )
    .unwrap();
    assert_eq!(
        st.counts,
        counts.iter().map(|&c| c as u32).collect::<Vec<_>>()
    );
    cache.evict(s, &plan).unwrap();
    let pool = cache.pool();
    for h in 0..nkv {
        assert_eq!(pool.len(0, s, h).unwrap() as u32, lens2[h]);
        let sl = pool.slots(0, s, h).unwrap();
        let got_pos: Vec<u32> = sl.iter().map(|&x| position[x]).collect();
        assert_eq!(got_pos, pool.positions(0, s, h).unwrap(), "head {h}");
        let got_m: Vec<f32> = sl.iter().map(|&x| metric[x]).collect();
        assert_eq!(got_m, pool.metrics(0, s, h).unwrap(), "head {h}");
    }
    assert_eq!(phys(cache.storage().0), kf);
}
