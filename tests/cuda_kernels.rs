//! GPU tests (feature `cuda`, run on the device machine): every kernel of `kernels/` against its
//! plain-Rust twin in `kvc::cuda` (beside its wrapper) on fresh random inputs, at block sizes 16 and 32, head
//! dims 64 and 128, GQA ratios 1, 3, 4, 8, ragged per-head lengths (empty heads, partial last
//! blocks), after evictions (compaction moves executed by the kernel), with NaN-poisoned outputs
//! and scratch, per-dtype tolerances; plus end to end: the CUDA paged backend at rate 1 gives the
//! contiguous cache's greedy output on tiny f32 models.
//!
//! Run: `cargo test --release --features cuda --test cuda_kernels` (see
//! `scripts/gpu/cuda-tests.sh`). Each test prints a one-line summary (max errors per case).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use kvc::cuda::paged_attention::DecodeShape;
use kvc::cuda::paged_attention::{DecodePipeline, DecodeWorkspace, DeviceTables};
use kvc::cuda::KvElem;
use kvc::kvcache::blocks::BlockPool;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (these tests run on the GPU machine)")
}

/// Uniform in [-a, a).
fn rnd(rng: &mut StdRng, n: usize, a: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * a)
        .collect()
}

fn to_dev<T: KvElem + candle_core::WithDType>(x: &[f32], shape: &[usize], dev: &Device) -> Tensor {
    let v: Vec<T> = x.iter().map(|&f| T::from_f32(f)).collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

fn host<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1::<T>().unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Largest violation of |a - b| <= atol + rtol * |b| (NaN counts as infinite), and the max abs error.
fn compare(got: &[f32], want: &[f32], atol: f32, rtol: f32) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    let mut maxabs = 0f32;
    for (g, w) in got.iter().zip(want) {
        let e = (g - w).abs();
        if !e.is_finite() {
            return (f32::INFINITY, f32::INFINITY);
        }
        maxabs = maxabs.max(e);
        worst = worst.max(e / (atol + rtol * w.abs()));
    }
    (worst, maxabs)
}

/// Tolerances (atol, rtol) for the attention output and for probabilities / metrics.
fn tols(dt: DType) -> ((f32, f32), (f32, f32)) {
    match dt {
        DType::F32 => ((2e-5, 1e-4), (1e-6, 1e-4)),
        DType::F16 => ((2e-3, 2e-3), (1e-6, 1e-4)),
        _ => ((1e-2, 1e-2), (1e-6, 1e-4)),
    }
}

struct Case {
    dtype: DType,
    block_size: usize,
    head_dim: usize,
    group: usize,
    num_kv_heads: usize,
    batch: usize,
    max_ctx: usize,
    part_slots: Option<usize>,
    pipeline: DecodePipeline,
    seed: u64,
}

/// One full round: random ragged heads written by `write_kv`, random evictions compacted by
/// `move_slots`, then decode — each kernel checked against its twin.
fn run_case<T: KvElem + candle_core::WithDType>(c: &Case) -> String {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(c.seed);
    let (bs, d, g, nkv, b) = (c.block_size, c.head_dim, c.group, c.num_kv_heads, c.batch);
    let nh = nkv * g;
    // Pool: one "layer", `b` sequences; lengths ragged per head, some empty.
    let per_head_blocks = c.max_ctx.div_ceil(bs);
    let num_blocks = b * nkv * per_head_blocks + 7;
    let num_slots = num_blocks * bs;
    let mut pool = BlockPool::new(1, nkv, bs, num_blocks).unwrap();
    // Interleave appends so block ids are scattered over the pool.
    let lens: Vec<usize> = (0..b * nkv)
        .map(|i| {
            if i % 7 == 3 {
                0
            } else {
                rng.random_range(1..=c.max_ctx)
            }
        })
        .collect();
    for s in 0..b {
        pool.add_seq(s).unwrap();
    }
    let mut k_host = rnd(&mut rng, num_slots * d, 1.0);
    let mut v_host = rnd(&mut rng, num_slots * d, 1.0);
    // Round trip through T so host and device hold identical values.
    let round = |x: &mut Vec<f32>| x.iter_mut().for_each(|f| *f = T::from_f32(*f).to_f32());
    round(&mut k_host);
    round(&mut v_host);
    let mut kt: Vec<T> = k_host.iter().map(|&f| T::from_f32(f)).collect();
    let mut vt: Vec<T> = v_host.iter().map(|&f| T::from_f32(f)).collect();
    let k_dev = to_dev::<T>(&k_host, &[num_slots, d], &dev);
    let v_dev = to_dev::<T>(&v_host, &[num_slots, d], &dev);
    let mut metric_h = rnd(&mut rng, num_slots, 1.0)
        .into_iter()
        .map(|x| x.abs())
        .collect::<Vec<f32>>();
    let mut pos_h: Vec<u32> = (0..num_slots as u32).map(|x| x.wrapping_mul(7)).collect();
    let metric_d = Tensor::from_slice(&metric_h, num_slots, &dev).unwrap();
    let pos_d = Tensor::from_slice(&pos_h, num_slots, &dev).unwrap();

    // --- write_kv: append in chunks so heads interleave in the pool.
    let mut appended = vec![0usize; b * nkv];
    let chunk = 37;
    loop {
        let mut slots = Vec::new();
        let mut positions = Vec::new();
        for s in 0..b {
            for h in 0..nkv {
                let r = s * nkv + h;
                let n = (lens[r] - appended[r]).min(chunk);
                if n == 0 {
                    continue;
                }
                let p: Vec<u32> = (appended[r] as u32..(appended[r] + n) as u32).collect();
                let sl = pool.append(0, s, h, &p).unwrap();
                slots.extend(sl.into_iter().map(|x| x as u32));
                positions.extend(p);
                appended[r] += n;
            }
        }
        if slots.is_empty() {
            break;
        }
        let n = slots.len();
        let kn = rnd(&mut rng, n * d, 1.0);
        let vn = rnd(&mut rng, n * d, 1.0);
        let knt: Vec<T> = kn.iter().map(|&f| T::from_f32(f)).collect();
        let vnt: Vec<T> = vn.iter().map(|&f| T::from_f32(f)).collect();
        kvc::cuda::kv_cache::write_kv_twin(
            &mut kt,
            &mut vt,
            Some(&mut metric_h),
            Some(&mut pos_h),
            &knt,
            &vnt,
            &slots,
            &positions,
            d,
        )
        .unwrap();
        kvc::cuda::kv_cache::write_kv(
            &k_dev,
            &v_dev,
            Some(&metric_d),
            Some(&pos_d),
            &to_dev::<T>(&kn, &[n, d], &dev),
            &to_dev::<T>(&vn, &[n, d], &dev),
            &slots,
            &positions,
        )
        .unwrap();
    }
    let bits = |x: &[T]| x.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&host::<T>(&k_dev)), bits(&kt), "write_kv K");
    assert_eq!(bits(&host::<T>(&v_dev)), bits(&vt), "write_kv V");
    assert_eq!(host::<u32>(&pos_d), pos_h, "write_kv position");
    assert_eq!(host::<f32>(&metric_d), metric_h, "write_kv metric");

    // --- move_slots: evict a random share of every head, compact (tail into holes).
    let mut moves_total = 0;
    for s in 0..b {
        for h in 0..nkv {
            let len = pool.len(0, s, h).unwrap();
            let evict: Vec<usize> = (0..len).filter(|_| rng.random::<f32>() < 0.3).collect();
            let comp = pool.plan_compaction(0, s, h, &evict).unwrap();
            let from: Vec<u32> = comp.moves.iter().map(|m| m.from as u32).collect();
            let to: Vec<u32> = comp.moves.iter().map(|m| m.to as u32).collect();
            moves_total += from.len();
            kvc::cuda::kv_cache::move_slots_twin(
                &mut kt,
                &mut vt,
                Some(&mut metric_h),
                Some(&mut pos_h),
                &from,
                &to,
                d,
            )
            .unwrap();
            kvc::cuda::kv_cache::move_slots(
                &k_dev,
                &v_dev,
                Some(&metric_d),
                Some(&pos_d),
                &from,
                &to,
            )
            .unwrap();
            pool.apply(&comp).unwrap();
        }
    }
    assert_eq!(bits(&host::<T>(&k_dev)), bits(&kt), "move_slots K");
    assert_eq!(bits(&host::<T>(&v_dev)), bits(&vt), "move_slots V");
    assert_eq!(host::<u32>(&pos_d), pos_h, "move_slots position");
    assert_eq!(host::<f32>(&metric_d), metric_h, "move_slots metric");
    pool.check().unwrap();

    // --- decode over the compacted tables.
    let lens: Vec<u32> = (0..b)
        .flat_map(|s| (0..nkv).map(move |h| (s, h)))
        .map(|(s, h)| pool.len(0, s, h).unwrap() as u32)
        .collect();
    let max_len = lens.iter().copied().max().unwrap_or(0) as usize;
    let max_blocks = max_len.div_ceil(bs).max(1) + 1; // one unused column
    let mut tables = vec![u32::MAX; b * nkv * max_blocks]; // poison unused entries
    for s in 0..b {
        let t = pool.table(s).unwrap();
        for h in 0..nkv {
            let bl = &t.blocks[0][h];
            tables[(s * nkv + h) * max_blocks..][..bl.len()].copy_from_slice(bl);
        }
    }
    let shape = DecodeShape {
        batch: b,
        num_kv_heads: nkv,
        group: g,
        head_dim: d,
        max_blocks,
        block_size: bs,
        probs_stride: max_len + 5,
        num_slots,
    };
    let q = rnd(&mut rng, b * nh * d, 3.0);
    let qt: Vec<T> = q.iter().map(|&f| T::from_f32(f)).collect();
    let scale = 1.0 / (d as f32).sqrt();
    let want = kvc::cuda::paged_attention::paged_decode_twin(
        &shape,
        &qt,
        &kt,
        &vt,
        &tables,
        &lens,
        scale,
        Some(&mut metric_h),
    )
    .unwrap();
    let tabs = DeviceTables::upload_disjoint(shape, &tables, &lens, &dev).unwrap();
    let mut ws = DecodeWorkspace::filled(&shape, max_len, c.part_slots, &dev, f32::NAN).unwrap();
    ws.pipeline = c.pipeline;
    let out = Tensor::full(f32::NAN, (b, nh, d), &dev)
        .unwrap()
        .to_dtype(c.dtype)
        .unwrap();
    let q_dev = to_dev::<T>(&q, &[b, nh, d], &dev);
    kvc::cuda::paged_attention::paged_decode_into(
        &q_dev,
        &k_dev,
        &v_dev,
        &tabs,
        &ws,
        &out,
        scale,
        Some(&metric_d),
        true,
    )
    .unwrap();
    let ((oa, or), (pa, pr)) = tols(c.dtype);
    let (wo, eo) = compare(&f32s(&out), &want.out, oa, or);
    let (wp, ep) = compare(&f32s(&ws.probs), &want.probs, pa, pr);
    let (wm, em) = compare(&host::<f32>(&metric_d), &metric_h, pa, pr);
    let line = format!(
        "{:?} {:?} bs={bs} d={d} g={g} nkv={nkv} batch={b} max_len={max_len} parts={}x{}: moves={moves_total} out_err={eo:.2e} probs_err={ep:.2e} metric_err={em:.2e}",
        c.dtype, c.pipeline, ws.num_parts, ws.part_slots
    );
    assert!(
        wo <= 1.0 && wp <= 1.0 && wm <= 1.0,
        "out of tolerance: {line}"
    );
    line
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut seed = 1;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // 24: a block size that is not a power of two (the kernels divide instead of shifting).
        for (bs, d) in [(16, 64), (32, 128), (16, 128), (32, 64), (24, 128)] {
            for g in [1, 3, 4, 8] {
                for part_slots in [None, Some(64)] {
                    for pipeline in [DecodePipeline::Async, DecodePipeline::Registers] {
                        seed += 1;
                        v.push(Case {
                            dtype,
                            block_size: bs,
                            head_dim: d,
                            group: g,
                            num_kv_heads: 2 + (seed as usize % 2),
                            batch: 3,
                            max_ctx: 300,
                            part_slots,
                            pipeline,
                            seed,
                        });
                    }
                }
            }
        }
    }
    v
}

fn run(c: &Case) -> String {
    match c.dtype {
        DType::F32 => run_case::<f32>(c),
        DType::BF16 => run_case::<bf16>(c),
        _ => run_case::<f16>(c),
    }
}

#[test]
fn kernels_match_twins_on_random_ragged_evicted_caches() {
    let all = cases();
    for c in &all {
        eprintln!("{}", run(c));
    }
    eprintln!("SUMMARY kernels_match_twins: {} cases passed", all.len());
}

#[test]
fn long_context_split_k_matches_twin() {
    // Long ragged contexts; default partitioning (split for a small batch) and explicit sizes.
    let mut n = 0;
    for (dtype, part_slots, pipeline) in [
        (DType::BF16, None, DecodePipeline::Async),
        (DType::BF16, Some(512), DecodePipeline::Async),
        (DType::F32, None, DecodePipeline::Async),
        (DType::F16, Some(1000), DecodePipeline::Async),
        (DType::BF16, None, DecodePipeline::Registers),
        (DType::F16, Some(1000), DecodePipeline::Registers),
    ] {
        let c = Case {
            dtype,
            block_size: 16,
            head_dim: 128,
            group: 4,
            num_kv_heads: 2,
            batch: 2,
            max_ctx: 5000,
            part_slots,
            pipeline,
            seed: 99 + n,
        };
        eprintln!("{}", run(&c));
        n += 1;
    }
    eprintln!("SUMMARY long_context_split_k: {n} cases passed");
}

fn prefill_softmax_case<T: KvElem + candle_core::WithDType>(
    shape: &kvc::cuda::prefill_softmax::SoftmaxShape,
    rng: &mut StdRng,
) -> String {
    let dev = gpu();
    let (nkv, n, t) = (shape.kv_heads, shape.n, shape.t);
    // Positions: a shuffled 0..n per kv-head (unsorted, as after evictions), the last 3 keys
    // padding; queries start so that the first ones cannot see every key.
    let mut key_pos = Vec::with_capacity(nkv * n);
    for _ in 0..nkv {
        let mut p: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            p.swap(i, rng.random_range(0..=i));
        }
        for x in p.iter_mut().skip(n.saturating_sub(3)) {
            *x = u32::MAX;
        }
        key_pos.extend(p);
    }
    let q_start = (n.saturating_sub(t + 5)) as u32;
    let att = rnd(rng, shape.rows() * n, 6.0);
    let att_t: Vec<T> = att.iter().map(|&x| T::from_f32(x)).collect();
    let scale = 0.125f32 * 1.37;
    let (want_p, want_probs) =
        kvc::cuda::prefill_softmax::prefill_softmax_twin(shape, &att_t, &key_pos, q_start, scale)
            .unwrap();
    let att_d = to_dev::<T>(&att, &[1, nkv, shape.group * t, n], &dev);
    let kp = Tensor::from_vec(key_pos, (nkv, n), &dev).unwrap();
    let (p, probs) =
        kvc::cuda::prefill_softmax::prefill_softmax(&att_d, &kp, shape, q_start, scale).unwrap();
    assert_eq!(p.dims(), att_d.dims());
    assert_eq!(p.dtype(), att_d.dtype());
    let want_p: Vec<f32> = want_p.iter().map(|x| x.to_f32()).collect();
    // p in T: one rounding of a probability that may differ by an f32 ulp.
    let rt = if T::DTYPE == DType::F32 { 2e-6 } else { 8e-3 };
    let (wp, ep) = compare(&f32s(&p), &want_p, 1e-7, rt);
    let (wq, eq) = match (&probs, shape.probed) {
        (None, 0) => (0.0, 0.0),
        (Some(pr), _) => {
            assert_eq!(pr.dims(), &[nkv * shape.group, shape.probed, n]);
            compare(&host::<f32>(pr), &want_probs, 1e-7, 2e-6)
        }
        (None, _) => panic!("probed queries asked, no probabilities returned"),
    };
    let line = format!(
        "{:?} kv={nkv} g={} t={t} n={n} probed={}: p_err={ep:.2e} probs_err={eq:.2e}",
        T::DTYPE,
        shape.group,
        shape.probed
    );
    assert!(wp <= 1.0 && wq <= 1.0, "out of tolerance: {line}");
    line
}

/// The prefill softmax kernel (scale + causal mask from positions + softmax, f32 probabilities
/// of the probed queries) against its twin: every dtype, groups 1-8, one query to 64, rows
/// shorter and much longer than the 256-thread block, no probe / a window / every query.
#[test]
fn prefill_softmax_matches_twin() {
    let mut rng = StdRng::seed_from_u64(77);
    let mut n = 0;
    for (g, t, keys, probed) in [
        (1usize, 1usize, 9usize, 1usize),
        (3, 7, 300, 4),
        (4, 33, 1000, 0),
        (8, 16, 2500, 16),
        (3, 64, 70, 32),
        (3, 20, 9000, 8),
    ] {
        let shape = kvc::cuda::prefill_softmax::SoftmaxShape {
            kv_heads: 2,
            group: g,
            t,
            n: keys,
            probed,
        };
        eprintln!("{}", prefill_softmax_case::<f32>(&shape, &mut rng));
        eprintln!("{}", prefill_softmax_case::<bf16>(&shape, &mut rng));
        eprintln!("{}", prefill_softmax_case::<f16>(&shape, &mut rng));
        n += 3;
    }
    eprintln!("SUMMARY prefill_softmax: {n} cases passed");
}

/// One flash prefill case: random q/k/v, per kv-head positions either ascending from 0 (a
/// prompt, with chunk offsets) or shuffled (after evictions), the last keys padding with NaN
/// K/V; the kernel against the f32 twin.
fn prefill_flash_case<T: KvElem + candle_core::WithDType>(
    shape: &kvc::cuda::prefill_softmax::SoftmaxShape,
    d: usize,
    shuffled: bool,
    rng: &mut StdRng,
) -> String {
    let dev = gpu();
    let (nkv, n, t) = (shape.kv_heads, shape.n, shape.t);
    let pad = if n > 4 { 3 } else { 0 };
    let mut key_pos = Vec::with_capacity(nkv * n);
    for _ in 0..nkv {
        let mut p: Vec<u32> = (0..n as u32).collect();
        if shuffled {
            p.shuffle(rng);
        }
        for x in p.iter_mut().skip(n - pad) {
            *x = u32::MAX;
        }
        key_pos.extend(p);
    }
    // The chunk's queries are the last t positions of the n - pad real keys.
    let q_start = (n - pad).saturating_sub(t) as u32;
    let q = rnd(rng, shape.rows() * d, 1.5);
    let mut k = rnd(rng, nkv * n * d, 1.5);
    let mut v = rnd(rng, nkv * n * d, 1.0);
    let to_t = |x: &[f32]| -> Vec<T> { x.iter().map(|&e| T::from_f32(e)).collect() };
    let scale = 1.0 / (d as f32).sqrt();
    let want: Vec<f32> = kvc::cuda::prefill_attention::prefill_attention_twin(
        shape,
        d,
        (&to_t(&q), &to_t(&k), &to_t(&v)),
        &key_pos,
        q_start,
        scale,
    )
    .unwrap()
    .iter()
    .map(|x| x.to_f32())
    .collect();
    for (h, j) in (0..nkv).flat_map(|h| (n - pad..n).map(move |j| (h, j))) {
        k[(h * n + j) * d..][..d].fill(f32::NAN);
        v[(h * n + j) * d..][..d].fill(f32::NAN);
    }
    let qd = to_dev::<T>(&q, &[1, nkv, shape.group * t, d], &dev);
    let kd = to_dev::<T>(&k, &[1, nkv, n, d], &dev);
    let vd = to_dev::<T>(&v, &[1, nkv, n, d], &dev);
    // The same K/V as the first n rows of each head of a cache with 37 spare rows per head
    // (NaN there): read in place.
    let spare = |x: &Tensor| {
        let nan = Tensor::full(f32::NAN, (1, nkv, 37, d), &dev)
            .unwrap()
            .to_dtype(T::DTYPE)
            .unwrap();
        Tensor::cat(&[x, &nan], 2).unwrap().narrow(2, 0, n).unwrap()
    };
    let (ks, vs) = (spare(&kd), spare(&vd));
    let kp = Tensor::from_vec(key_pos, (nkv, n), &dev).unwrap();
    // p rounded to T before p . v, output rounded to T: a few ulps of T of the output scale.
    let (atol, rtol) = if T::DTYPE == DType::F16 {
        (4e-3, 4e-3)
    } else {
        (2e-2, 2e-2)
    };
    let mut line = format!(
        "{:?} kv={nkv} g={} t={t} n={n} d={d} shuffled={shuffled}: out_err",
        T::DTYPE,
        shape.group
    );
    for (m_tiles, (kk, vv)) in [(1, (&kd, &vd)), (2, (&kd, &vd)), (2, (&ks, &vs))] {
        let out = kvc::cuda::prefill_attention::prefill_attention_tiled(
            &qd, kk, vv, &kp, shape, q_start, scale, m_tiles,
        )
        .unwrap();
        assert_eq!(out.dims(), qd.dims());
        let (w, e) = compare(&f32s(&out), &want, atol, rtol);
        let strided = !kk.is_contiguous();
        line.push_str(&format!(
            " m{m_tiles}{}={e:.2e}",
            if strided { "/strided" } else { "" }
        ));
        assert!(w <= 1.0, "out of tolerance: {line}");
    }
    line
}

/// The flash prefill kernel (tensor cores, online softmax, causal tile skipping) against its
/// twin: bf16 and f16, head dims 64 and 128, 16 and 32 query rows per warp, K/V contiguous and
/// read in place from a cache with spare rows, groups 1-8, chunks of 1 to 300 queries over up
/// to 2500 keys (tiles partly visible, wholly hidden, padding with NaN K/V), positions in order
/// and shuffled; unsupported dtypes and a probe are refused.
#[test]
fn prefill_flash_matches_twin() {
    let mut rng = StdRng::seed_from_u64(91);
    let mut cases = 0;
    for (g, t, keys, shuffled) in [
        (1usize, 1usize, 9usize, false),
        (3, 7, 300, true),
        (4, 65, 70, false),
        (8, 16, 2500, true),
        (3, 300, 300, false),
        (3, 130, 1200, false),
        (1, 64, 4, false),
    ] {
        let shape = kvc::cuda::prefill_softmax::SoftmaxShape {
            kv_heads: 2,
            group: g,
            t,
            n: keys,
            probed: 0,
        };
        for d in [64, 128] {
            eprintln!(
                "{}",
                prefill_flash_case::<bf16>(&shape, d, shuffled, &mut rng)
            );
            eprintln!(
                "{}",
                prefill_flash_case::<f16>(&shape, d, shuffled, &mut rng)
            );
            cases += 2;
        }
    }
    let dev = gpu();
    let shape = kvc::cuda::prefill_softmax::SoftmaxShape {
        kv_heads: 1,
        group: 1,
        t: 2,
        n: 4,
        probed: 0,
    };
    let x = Tensor::zeros((1, 1, 2, 64), DType::F32, &dev).unwrap();
    let kv = Tensor::zeros((1, 1, 4, 64), DType::F32, &dev).unwrap();
    let kp = Tensor::from_vec(vec![0u32, 1, 2, 3], (1, 4), &dev).unwrap();
    assert!(
        kvc::cuda::prefill_attention::prefill_attention(&x, &kv, &kv, &kp, &shape, 0, 1.0).is_err()
    );
    let xb = x.to_dtype(DType::BF16).unwrap();
    let kvb = kv.to_dtype(DType::BF16).unwrap();
    let probed = kvc::cuda::prefill_softmax::SoftmaxShape { probed: 1, ..shape };
    assert!(
        kvc::cuda::prefill_attention::prefill_attention(&xb, &kvb, &kvb, &kp, &probed, 0, 1.0)
            .is_err()
    );
    assert!(
        kvc::cuda::prefill_attention::prefill_attention(&xb, &kvb, &kvb, &kp, &shape, 0, 1.0)
            .is_ok()
    );
    eprintln!("SUMMARY prefill_flash: {cases} cases passed");
}

/// The CUDA paged cache's chunked bf16 prefill (flash attention, the probed window scored by
/// prefill_softmax), and the contiguous cache's unprobed flash prefill (K/V read in place from
/// its growing tensors), against the contiguous cache's probed path on the same GPU (candle's
/// matmul + softmax chain, the oracle): outputs within bf16 noise, the window's probabilities
/// within the rounding of the scores, every chunk.
#[test]
fn paged_flash_prefill_matches_contiguous_chain() {
    use kvc::kvcache::contiguous::ContiguousCache;
    use kvc::kvcache::paged::{PagedCache, PagedSpec};
    use kvc::kvcache::{AttnCall, CacheBackend, Probe};
    let dev = gpu();
    let mut cases = 0;
    for (nh, nkv, d) in [(9usize, 3usize, 64usize), (8, 2, 128)] {
        let total = 700;
        let mk = |heads: usize| {
            Tensor::randn(0f32, 1.0, (1, heads, total, d), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let (q, k, v) = (mk(nh), mk(nkv), mk(nkv));
        let spec = PagedSpec {
            layers: 1,
            kv_heads: nkv,
            head_dim: d,
            block_size: 16,
            dtype: DType::BF16,
            device: dev.clone(),
        };
        let mut paged = PagedCache::new(spec, 256).unwrap();
        let mut cont = ContiguousCache::new(1);
        // The contiguous cache unprobed: its own flash path, in place over its capacity.
        let mut cont_flash = ContiguousCache::new(1);
        let (sp, sc, sf) = (
            [paged.add_sequence().unwrap()],
            [cont.add_sequence().unwrap()],
            [cont_flash.add_sequence().unwrap()],
        );
        for (start, len) in [(0, 256), (256, 300), (556, 144)] {
            let (qn, kn, vn) = (
                q.narrow(2, start, len).unwrap(),
                k.narrow(2, start, len).unwrap(),
                v.narrow(2, start, len).unwrap(),
            );
            let call = |seqs, probe| AttnCall {
                layer: 0,
                seqs,
                q: &qn,
                k: &kn,
                v: &vn,
                scale: 1.0 / (d as f64).sqrt(),
                probe,
            };
            let a = paged.attend(call(&sp, Probe::LastQueries(8))).unwrap();
            let b = cont.attend(call(&sc, Probe::LastQueries(8))).unwrap();
            let f = cont_flash.attend(call(&sf, Probe::None)).unwrap();
            assert!(f.probs.is_none());
            let (w, e) = compare(&f32s(&a.out), &f32s(&b.out), 2e-2, 2e-2);
            let (wf, ef) = compare(&f32s(&f.out), &f32s(&b.out), 2e-2, 2e-2);
            let (wp, ep) = compare(
                &f32s(&a.probs.unwrap()),
                &f32s(&b.probs.unwrap()),
                1e-4,
                3e-2,
            );
            let line = format!(
                "heads {nh}/{nkv} d={d} chunk {start}+{len}: out_err={e:.2e} probs_err={ep:.2e} contiguous_flash_err={ef:.2e}"
            );
            assert!(
                w <= 1.0 && wp <= 1.0 && wf <= 1.0,
                "out of tolerance: {line}"
            );
            eprintln!("{line}");
            cases += 1;
        }
    }
    eprintln!("SUMMARY paged_flash_prefill: {cases} chunks passed");
}

#[test]
fn set_meta_matches_twin() {
    // A large scattered write (candle's scatter_set ran such lists in one thread) and a bad one.
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(11);
    let num_slots = 1 << 21;
    let mut all: Vec<u32> = (0..num_slots as u32).collect();
    all.shuffle(&mut rng);
    let slots = &all[..700_000];
    let m = rnd(&mut rng, slots.len(), 4.0);
    let p: Vec<u32> = (0..slots.len())
        .map(|_| rng.random_range(0..9000))
        .collect();
    let mut metric = rnd(&mut rng, num_slots, 1.0);
    let mut position: Vec<u32> = (0..num_slots as u32).collect();
    let m_dev = Tensor::from_slice(&metric, num_slots, &dev).unwrap();
    let p_dev = Tensor::from_slice(&position, num_slots, &dev).unwrap();
    kvc::cuda::kv_cache::set_meta(&m_dev, &p_dev, slots, &m, &p).unwrap();
    kvc::cuda::kv_cache::set_meta_twin(&mut metric, &mut position, slots, &m, &p).unwrap();
    assert_eq!(host::<f32>(&m_dev), metric);
    assert_eq!(host::<u32>(&p_dev), position);
    let e = kvc::cuda::kv_cache::set_meta(&m_dev, &p_dev, &[3, 3], &[0.0; 2], &[0; 2]);
    assert!(e.is_err(), "a repeated slot must be refused");
    eprintln!(
        "SUMMARY set_meta: {} slots identical to the twin; repeats refused",
        slots.len()
    );
}

#[test]
fn argmax_rows_matches_twin() {
    // Logits with many ties (few distinct values) and some NaNs, SmolLM2's vocabulary and a
    // small one; a row starting with NaN and an all -inf row.
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(13);
    for (rows, vocab) in [(224usize, 49152usize), (5, 7), (1, 1)] {
        let mut x: Vec<f32> = (0..rows * vocab)
            .map(|_| match rng.random_range(0..100) {
                0 => f32::NAN,
                k => (k % 9) as f32,
            })
            .collect();
        if rows > 2 {
            x[0] = f32::NAN;
            x[vocab..2 * vocab].fill(f32::NEG_INFINITY);
        }
        let d = Tensor::from_slice(&x, (rows, vocab), &dev).unwrap();
        let got = kvc::cuda::layer_ops::argmax_rows(&d, true).unwrap();
        let want = kvc::cuda::layer_ops::argmax_rows(&d, false).unwrap();
        assert_eq!(got, want, "rows {rows} vocab {vocab}");
    }
    eprintln!("SUMMARY argmax_rows: 3 shapes identical to the host scan");
}

#[test]
fn scatter_u32_matches_candle() {
    // A decode step's table patch and a large one, against candle's scatter_set on the CPU.
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(12);
    for (len, n) in [(5000usize, 1300usize), (1 << 20, 300_000), (7, 1)] {
        let mut all: Vec<u32> = (0..len as u32).collect();
        all.shuffle(&mut rng);
        let idx = &all[..n];
        let val: Vec<u32> = (0..n).map(|_| rng.random()).collect();
        let start: Vec<u32> = (0..len).map(|_| rng.random()).collect();
        let d = Tensor::from_slice(&start, len, &dev).unwrap();
        let c = Tensor::from_slice(&start, len, &Device::Cpu).unwrap();
        let up = |v: &[u32], dev: &Device| Tensor::from_slice(v, v.len(), dev).unwrap();
        kvc::cuda::kv_cache::scatter_u32(&d, &up(idx, &dev), &up(&val, &dev)).unwrap();
        kvc::cuda::kv_cache::scatter_u32(&c, &up(idx, &Device::Cpu), &up(&val, &Device::Cpu))
            .unwrap();
        assert_eq!(
            host::<u32>(&d),
            c.to_vec1::<u32>().unwrap(),
            "len {len} n {n}"
        );
    }
    eprintln!("SUMMARY scatter_u32: 3 cases identical to candle's scatter_set");
}

/// `gather_kv` equals its twin (`index_select`) on small caches of both layouts, and reads the
/// right rows of a cache past 2^32 elements, where candle's `index_select` wraps its 32-bit
/// offsets (what corrupted the prefills of the last samples of a `--batch-samples 64` sweep).
#[test]
fn gather_kv_matches_twin_and_reads_past_4g_elements() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(21);
    for (dt, d) in [(DType::BF16, 64), (DType::F32, 128), (DType::F16, 64)] {
        let rows = 5000;
        let k = Tensor::from_vec(rnd(&mut rng, rows * d, 2.0), (rows, d), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let v = Tensor::from_vec(rnd(&mut rng, rows * d, 2.0), (rows, d), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let ids: Vec<u32> = (0..3001)
            .map(|_| rng.random_range(0..rows as u32))
            .collect();
        let top = ids.iter().copied().max();
        let idx = Tensor::from_slice(&ids, ids.len(), &dev).unwrap();
        let (gk, gv) = kvc::cuda::kv_cache::gather_kv(&k, &v, &idx, top).unwrap();
        assert_eq!(f32s(&gk), f32s(&k.index_select(&idx, 0).unwrap()), "{dt:?}");
        assert_eq!(f32s(&gv), f32s(&v.index_select(&idx, 0).unwrap()), "{dt:?}");
        let bad = kvc::cuda::kv_cache::gather_kv(&k, &v, &idx, Some(rows as u32));
        assert!(bad.is_err(), "an id past the cache must be refused");
    }
    // 2^32 / 64 rows + 1M of bf16 head dim 64: 4.36G elements per cache (8.7 GB each).
    let (d, rows) = (64usize, (1usize << 32) / 64 + 1_000_000);
    let k = Tensor::zeros((rows, d), DType::BF16, &dev).unwrap();
    let v = Tensor::zeros((rows, d), DType::BF16, &dev).unwrap();
    let slots: Vec<u32> = vec![rows as u32 - 1, (1 << 26) + 5, 7, rows as u32 - 1000];
    let n = slots.len();
    let kn = rnd(&mut rng, n * d, 3.0);
    let vn = rnd(&mut rng, n * d, 3.0);
    let k_new = to_dev::<bf16>(&kn, &[n, d], &dev);
    let v_new = to_dev::<bf16>(&vn, &[n, d], &dev);
    kvc::cuda::kv_cache::write_kv(&k, &v, None, None, &k_new, &v_new, &slots, &[0; 4]).unwrap();
    let idx = Tensor::from_slice(&slots, n, &dev).unwrap();
    let (gk, gv) =
        kvc::cuda::kv_cache::gather_kv(&k, &v, &idx, slots.iter().copied().max()).unwrap();
    assert_eq!(f32s(&gk), f32s(&k_new), "K rows past 2^32 elements");
    assert_eq!(f32s(&gv), f32s(&v_new), "V rows past 2^32 elements");
    let wrapped = f32s(&k.index_select(&idx, 0).unwrap()) != f32s(&k_new);
    eprintln!(
        "SUMMARY gather_kv: bf16/f32/f16 identical to index_select; rows past 2^32 elements read right (candle index_select {} there)",
        if wrapped { "reads wrong rows" } else { "also right" }
    );
}

/// Block copies (a fork) against the twin: bf16 K/V of head dim 64 and f32 of head dim 128,
/// with and without the metric and position, 40k blocks copied in a shuffled pool; overlapping
/// lists refused.
#[test]
fn copy_blocks_matches_twin() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(12);
    let mut n_cases = 0;
    for (bs, d, with_meta, bf) in [
        (16usize, 64usize, true, true),
        (16, 128, false, false),
        (32, 64, true, false),
    ] {
        let num_blocks = 100_000;
        let num_slots = num_blocks * bs;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(&mut rng);
        let (from, to) = (&ids[..40_000], &ids[40_000..80_000]);
        let kf = rnd(&mut rng, num_slots * d, 1.0);
        let vf = rnd(&mut rng, num_slots * d, 1.0);
        let mut metric = rnd(&mut rng, num_slots, 1.0);
        let mut position: Vec<u32> = (0..num_slots as u32).collect();
        let m_dev = Tensor::from_slice(&metric, num_slots, &dev).unwrap();
        let p_dev = Tensor::from_slice(&position, num_slots, &dev).unwrap();
        let meta = |on: bool| {
            if on {
                (Some(&m_dev), Some(&p_dev))
            } else {
                (None, None)
            }
        };
        let (m_arg, p_arg) = meta(with_meta);
        if bf {
            let mut k: Vec<bf16> = kf.iter().map(|&x| bf16::from_f32(x)).collect();
            let mut v: Vec<bf16> = vf.iter().map(|&x| bf16::from_f32(x)).collect();
            let k_dev = Tensor::from_slice(&k, (num_slots, d), &dev).unwrap();
            let v_dev = Tensor::from_slice(&v, (num_slots, d), &dev).unwrap();
            kvc::cuda::kv_cache::copy_blocks(&k_dev, &v_dev, m_arg, p_arg, from, to, bs).unwrap();
            let (m_h, p_h) = if with_meta {
                (Some(&mut metric[..]), Some(&mut position[..]))
            } else {
                (None, None)
            };
            kvc::cuda::kv_cache::copy_blocks_twin(&mut k, &mut v, m_h, p_h, from, to, bs, d)
                .unwrap();
            let bits = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&host::<bf16>(&k_dev)), bits(&k), "K");
            assert_eq!(bits(&host::<bf16>(&v_dev)), bits(&v), "V");
            assert!(kvc::cuda::kv_cache::copy_blocks(
                &k_dev,
                &v_dev,
                None,
                None,
                &[1, 2],
                &[2, 3],
                bs
            )
            .is_err());
        } else {
            let (mut k, mut v) = (kf.clone(), vf.clone());
            let k_dev = Tensor::from_slice(&k, (num_slots, d), &dev).unwrap();
            let v_dev = Tensor::from_slice(&v, (num_slots, d), &dev).unwrap();
            kvc::cuda::kv_cache::copy_blocks(&k_dev, &v_dev, m_arg, p_arg, from, to, bs).unwrap();
            let (m_h, p_h) = if with_meta {
                (Some(&mut metric[..]), Some(&mut position[..]))
            } else {
                (None, None)
            };
            kvc::cuda::kv_cache::copy_blocks_twin(&mut k, &mut v, m_h, p_h, from, to, bs, d)
                .unwrap();
            assert_eq!(host::<f32>(&k_dev), k, "K");
            assert_eq!(host::<f32>(&v_dev), v, "V");
        }
        assert_eq!(host::<f32>(&m_dev), metric, "metric");
        assert_eq!(host::<u32>(&p_dev), position, "position");
        n_cases += 1;
    }
    eprintln!("SUMMARY copy_blocks: {n_cases} cases (40000 blocks each) identical to the twin; overlaps refused");
}

/// The window scorer (`kernels/score.cu`) against its twin: GQA groups 1-8, one probed query
/// (a decode step) or a window, ragged heads (one empty, one full), lengths off the kernel's
/// 256-slot tile, every aggregation and pooling the methods use, with and without the
/// unpooled tail; the zeros past each head are compared too.
#[test]
fn window_score_matches_twin() {
    use kvc::compress::scorer::window_score_twin;
    use kvc::cuda::window_score::WindowScoreArgs;
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(21);
    let mut n_cases = 0;
    let mut worst = 0f32;
    for (nkv, group, probed, max_len) in [
        (3, 3, 32, 7431),
        (2, 1, 1, 300),
        (4, 4, 8, 257),
        (1, 8, 16, 1000),
        (8, 2, 32, 4096),
    ] {
        let p: Vec<f32> = (0..nkv * group * probed * max_len)
            .map(|_| rng.random::<f32>() / 64.0)
            .collect();
        let probs = Tensor::from_slice(&p, (1, nkv * group, probed, max_len), &dev).unwrap();
        let lens: Vec<usize> = (0..nkv)
            .map(|h| match h {
                0 => max_len,
                1 => 0,
                _ => rng.random_range(1..=max_len),
            })
            .collect();
        // Slot positions as a compacted cache holds them: increasing with gaps, unsorted
        // within a head after evictions (the buffer compares each slot's own position).
        let positions: Vec<Vec<u32>> = lens
            .iter()
            .map(|&l| {
                let mut v: Vec<u32> = (0..l as u32).map(|j| j * 2).collect();
                v.shuffle(&mut rng);
                v
            })
            .collect();
        for squared in [false, true] {
            for (pool_k, pool_max, buffer) in [
                (0, true, 0),
                (7, true, 0),
                (5, false, 0),
                (64, true, 0),
                (0, true, 10),
                (7, true, 3),
            ] {
                for pool_skip_last in [0, 32] {
                    let a = WindowScoreArgs {
                        group,
                        squared,
                        pool_k,
                        pool_max,
                        pool_skip_last,
                        buffer,
                    };
                    let got = host::<f32>(
                        &kvc::cuda::window_score::window_score(&probs, &lens, &a, &positions)
                            .unwrap(),
                    );
                    let want = window_score_twin(&p, &lens, probed, max_len, &a, &positions);
                    let (w, maxabs) = compare(&got, &want, 1e-7, 1e-5);
                    assert!(
                        w <= 1.0,
                        "{a:?} nkv {nkv} probed {probed} max_len {max_len}: max err {maxabs}"
                    );
                    worst = worst.max(maxabs);
                    n_cases += 1;
                }
            }
        }
    }
    // Bad shapes are refused before any launch: `score::tests` checks that on the CPU.
    eprintln!("SUMMARY window_score: {n_cases} cases match the twin (max abs err {worst:.2e})");
}

/// The fused decoder-layer ops (`kernels/layer_ops.cu`) against their twins (candle's op
/// chains, run on the same GPU) on random inputs: residual add + RMSNorm below and above 1024
/// columns (candle's two block sizes), SiLU * up, RoPE + q/k/v split at ragged per-row
/// positions (decode: t = 1; prefill: t > 1) for SmolLM2's and Llama-3.1-8B's head layouts.
/// add+norm and SiLU * up follow candle's arithmetic, so they must agree to the bit; RoPE's
/// multiply-subtract may be contracted differently, hence one unit of the dtype's last place.
#[test]
fn layer_ops_match_twins() {
    use kvc::cuda::layer_ops::{self, QkvHeads};
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(41);
    let ulp = |dt: DType| match dt {
        DType::F32 => 1e-6f32,
        DType::F16 => 1e-3,
        _ => 8e-3,
    };
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let mk = |rng: &mut StdRng, shape: &[usize], a: f32| {
            Tensor::from_vec(rnd(rng, shape.iter().product(), a), shape, &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap()
        };
        for (rows, cols) in [(1, 576), (224, 576), (37, 64), (5, 4096), (3, 1000)] {
            let x = mk(&mut rng, &[rows, 1, cols], 3.0);
            let r = mk(&mut rng, &[rows, 1, cols], 3.0);
            let w = mk(&mut rng, &[cols], 1.5);
            let (s, n) = layer_ops::add_rms_norm(&x, &r, &w, 1e-5, true).unwrap();
            let (s2, n2) = layer_ops::add_rms_norm_twin(&x, &r, &w, 1e-5).unwrap();
            let (_, es) = compare(&f32s(&s), &f32s(&s2), 0.0, 0.0);
            let (en, an) = compare(&f32s(&n), &f32s(&n2), ulp(dt), 2.0 * ulp(dt));
            eprintln!("SUMMARY add_rms_norm {dt:?} {rows}x{cols}: sum max abs err {es}, normed max abs err {an}");
            assert_eq!(es, 0.0, "add_rms_norm sum {dt:?} {rows}x{cols}");
            assert!(en <= 1.0, "add_rms_norm normed {dt:?} {rows}x{cols}: {an}");
        }
        for (rows, inter) in [(1, 1536), (224, 1536), (300, 14336), (2, 3)] {
            let gu = mk(&mut rng, &[rows, 1, 2 * inter], 6.0);
            let got = layer_ops::silu_mul(&gu, true).unwrap();
            let want = layer_ops::silu_mul_twin(&gu).unwrap();
            assert_eq!(got.dims(), want.dims());
            let (e, a) = compare(&f32s(&got), &f32s(&want), ulp(dt), 2.0 * ulp(dt));
            eprintln!("SUMMARY silu_mul {dt:?} {rows}x{inter}: max abs err {a}");
            assert!(e <= 1.0, "silu_mul {dt:?} {rows}x{inter}: {a}");
        }
        let max_pos = 4096;
        let half_tables = |rng: &mut StdRng, d: usize| {
            (
                mk(rng, &[max_pos, d / 2], 1.0),
                mk(rng, &[max_pos, d / 2], 1.0),
            )
        };
        for (heads, b, t) in [
            (
                QkvHeads {
                    q: 9,
                    kv: 3,
                    dim: 64,
                },
                224,
                1,
            ),
            (
                QkvHeads {
                    q: 9,
                    kv: 3,
                    dim: 64,
                },
                1,
                300,
            ),
            (
                QkvHeads {
                    q: 32,
                    kv: 8,
                    dim: 128,
                },
                5,
                1,
            ),
            (
                QkvHeads {
                    q: 32,
                    kv: 8,
                    dim: 128,
                },
                3,
                17,
            ),
            (
                QkvHeads {
                    q: 4,
                    kv: 4,
                    dim: 64,
                },
                2,
                9,
            ),
        ] {
            let (cos, sin) = half_tables(&mut rng, heads.dim);
            let width = (heads.q + 2 * heads.kv) * heads.dim;
            let qkv = mk(&mut rng, &[b, t, width], 4.0);
            let pos: Vec<u32> = (0..b)
                .map(|_| rng.random_range(0..(max_pos - t) as u32))
                .collect();
            let pos0 = Tensor::new(pos.as_slice(), &dev).unwrap();
            let got = layer_ops::rope_split_qkv(&qkv, &pos0, &cos, &sin, heads, true).unwrap();
            let want = layer_ops::rope_split_qkv_twin(&qkv, &pos0, &cos, &sin, heads).unwrap();
            let mut errs = Vec::new();
            for (g, w, what) in [
                (&got.0, &want.0, "q"),
                (&got.1, &want.1, "k"),
                (&got.2, &want.2, "v"),
            ] {
                assert_eq!(g.dims(), w.dims(), "{what} shape");
                // v is copied; q and k differ by a unit or two of the last place where the
                // compiler fused a product into the subtraction differently.
                let (e, a) = if what == "v" {
                    let (_, a) = compare(&f32s(g), &f32s(w), 0.0, 0.0);
                    (if a == 0.0 { 0.0 } else { f32::INFINITY }, a)
                } else {
                    compare(&f32s(g), &f32s(w), 2.0 * ulp(dt), 4.0 * ulp(dt))
                };
                assert!(
                    e <= 1.0,
                    "rope_split_qkv {what} {dt:?} {heads:?} b={b} t={t}: {a}"
                );
                errs.push(a);
            }
            eprintln!(
                "SUMMARY rope_split_qkv {dt:?} {heads:?} b={b} t={t}: max abs err q {} k {} v {}",
                errs[0], errs[1], errs[2]
            );
        }
    }
}

#[test]
fn bad_tables_are_refused_before_launch() {
    let dev = gpu();
    let shape = DecodeShape {
        batch: 1,
        num_kv_heads: 1,
        group: 1,
        head_dim: 64,
        max_blocks: 2,
        block_size: 16,
        probs_stride: 32,
        num_slots: 64,
    };
    // block 9 does not exist (4 blocks)
    assert!(DeviceTables::upload(shape, &[0, 9], &[20], &dev).is_err());
    // context longer than the table
    assert!(DeviceTables::upload(shape, &[0, 1], &[33], &dev).is_err());
    let k = Tensor::zeros((64, 64), DType::F32, &dev).unwrap();
    // repeated destination
    assert!(kvc::cuda::kv_cache::move_slots(&k, &k.clone(), None, None, &[1, 2], &[3, 3]).is_err());
    eprintln!("SUMMARY bad_tables: refused");
}

/// Device eviction step (sort + candidates + selection + compaction) against its twin, with
/// tied metrics (quantised to eighths), a protected window, empty heads, several block sizes;
/// the heads split into several sequences (one batched step: each sequence selects over its
/// own heads, with its own protected window and block count) or all in one. The cases with
/// KVCrush (`kvc_crush_pick` between selection and compaction; layers of `kv_heads`, groups
/// kept per head, anchor, and whether only every other sequence asks for it) check its picks
/// against `kvcrush::block_picks` through the twin: ties in the median and in distances, layers
/// with more groups than a block has threads, all groups kept, block size 64, 64 kv-heads.
/// Cases evicting a few blocks per sequence take the prefix sort (`kvc_sort_prefix`); odd
/// seeds pass the tables as device-resident rows (`kvcompress_evict_on_tables`), even ones
/// uploaded back to back.
#[test]
fn device_eviction_step_matches_twin() {
    use kvc::compress::kvcrush::{Anchor, BlockPicks};
    let dev = gpu();
    let mut n_cases = 0;
    let mut n_crush = 0;
    type Crush = Option<(usize, usize, Anchor, bool)>;
    let plain: Crush = None;
    // (block size, head dim, heads, longest head, share of blocks evicted, seed, heads per
    // sequence, KVCrush: kv-heads per layer, groups kept per head, anchor, every other
    // sequence only)
    #[rustfmt::skip]
    let cases = [
        (16usize, 64usize, 24usize, 600usize, 0.5f32, 1u64, vec![24usize], plain),
        (32, 128, 16, 1000, 0.3, 2, vec![16], None),
        (16, 128, 64, 300, 0.9, 3, vec![64], None),
        (16, 64, 8, 5000, 0.5, 4, vec![8], None),
        (16, 64, 12, 200, 2.0, 5, vec![12], None), // more blocks asked than finite candidates
        (16, 64, 24, 600, 0.5, 6, vec![6, 6, 6, 6], None),
        (16, 128, 30, 900, 0.4, 7, vec![5, 17, 8], None),
        (32, 64, 40, 400, 1.5, 8, vec![10, 10, 10, 10], None),
        (16, 64, 90, 2500, 0.05, 9, vec![9; 10], None), // continual-compression shape
        (16, 64, 20, 16384, 0.3, 10, vec![4; 5], None), // the longest head sorted in shared memory
        (16, 64, 24, 600, 0.5, 11, vec![24], Some((3, 1, Anchor::Mean, false))),
        (16, 128, 30, 900, 0.4, 12, vec![6, 12, 12], Some((3, 2, Anchor::Ones, false))),
        (32, 64, 40, 400, 0.6, 13, vec![8; 5], Some((8, 1, Anchor::Random, false))),
        (64, 64, 16, 2000, 0.5, 14, vec![16], Some((2, 3, Anchor::Mean, false))),
        (16, 64, 90, 4000, 0.3, 15, vec![9; 10], Some((3, 1, Anchor::Mean, true))),
        (16, 64, 8, 16384, 0.5, 16, vec![8], Some((8, 1, Anchor::Mean, false))), // > 1024 groups
        (16, 64, 64, 300, 0.9, 17, vec![64], Some((64, 1, Anchor::Alternate, false))),
        (8, 64, 12, 100, 0.5, 18, vec![12], Some((4, 5, Anchor::Zeros, false))), // all kept
        (16, 64, 30, 3000, 1.5, 19, vec![30], Some((3, 1, Anchor::Mean, false))),
        // A decode step's continual compression: a few blocks per sequence, so heads sort
        // only the prefix they can give (kvc_sort_prefix; metrics full of ties).
        (16, 64, 90, 2500, 0.004, 20, vec![9; 10], None),
        (16, 128, 30, 3000, 0.005, 21, vec![30], None),
        (32, 64, 24, 4000, 0.01, 22, vec![6, 6, 6, 6], None),
        (16, 64, 45, 1200, 0.01, 23, vec![9; 5], None),
        // Heads past the shared-memory sort (16384): the global-memory sort (kvc_long_*) and
        // the compaction's device scratch, mixed with short heads in one launch.
        (16, 64, 8, 40000, 0.5, 24, vec![8], None),
        (32, 64, 10, 70000, 0.3, 25, vec![5, 5], None),
        (16, 128, 8, 70000, 0.003, 26, vec![4, 4], None), // long heads' prefix sort
        (16, 64, 8, 40000, 0.4, 27, vec![8], Some((4, 1, Anchor::Mean, false))),
    ];
    for (bs, d, heads, max_ctx, share, seed, segments, crush) in cases {
        let mut rng = StdRng::seed_from_u64(seed);
        let per_head = max_ctx.div_ceil(bs);
        let num_blocks = heads * per_head + 3;
        let num_slots = num_blocks * bs;
        let mut pool = BlockPool::new(1, heads, bs, num_blocks).unwrap();
        pool.add_seq(0).unwrap();
        let lens: Vec<usize> = (0..heads)
            .map(|h| {
                if h % 5 == 2 {
                    0
                } else {
                    rng.random_range(1..=max_ctx)
                }
            })
            .collect();
        let long_heads = lens.iter().filter(|&&l| l > 16384).count();
        if max_ctx > 16384 {
            assert!(long_heads > 0, "case {seed} has no head past 16384 tokens");
        }
        // Interleaved appends: blocks scattered over the pool.
        let mut done = vec![0usize; heads];
        loop {
            let mut any = false;
            for h in 0..heads {
                let n = (lens[h] - done[h]).min(40);
                if n > 0 {
                    let p: Vec<u32> = (done[h] as u32..(done[h] + n) as u32).collect();
                    pool.append(0, 0, h, &p).unwrap();
                    done[h] += n;
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        let mut metric: Vec<f32> = (0..num_slots)
            .map(|_| (rng.random::<f32>() * 8.0).floor() / 8.0)
            .collect();
        let mut position: Vec<u32> = vec![u32::MAX; num_slots];
        for h in 0..heads {
            for (i, s) in pool.slots(0, 0, h).unwrap().into_iter().enumerate() {
                position[s] = i as u32;
            }
        }
        let kf = rnd(&mut rng, num_slots * d, 1.0);
        let vf = rnd(&mut rng, num_slots * d, 1.0);
        let mut k: Vec<bf16> = kf.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut v: Vec<bf16> = vf.iter().map(|&x| bf16::from_f32(x)).collect();
        let k_dev = Tensor::from_slice(&k, (num_slots, d), &dev).unwrap();
        let v_dev = Tensor::from_slice(&v, (num_slots, d), &dev).unwrap();
        let m_dev = Tensor::from_slice(&metric, num_slots, &dev).unwrap();
        let p_dev = Tensor::from_slice(&position, num_slots, &dev).unwrap();
        let t = pool.table(0).unwrap();
        let mut tables = vec![0u32; heads * per_head];
        for h in 0..heads {
            tables[h * per_head..][..t.blocks[0][h].len()].copy_from_slice(&t.blocks[0][h]);
        }
        let lens_u: Vec<u32> = lens.iter().map(|&x| x as u32).collect();
        // Per sequence: its protected window and a share of its blocks.
        let mut seqs = Vec::new();
        let mut first = 0;
        for (i, &n) in segments.iter().enumerate() {
            let rows = first..first + n;
            first = rows.end;
            let seq_len = rows.clone().map(|h| lens[h]).max().unwrap_or(0) as u32;
            let held: usize = rows.map(|h| lens[h].div_ceil(bs)).sum();
            let (kv_heads, picks) = match crush {
                Some((kvh, groups_per_head, anchor, alternate)) => (
                    kvh,
                    (!alternate || i % 2 == 0).then_some(BlockPicks {
                        groups_per_head,
                        anchor,
                        seed: seed + i as u64,
                    }),
                ),
                None => (n, None),
            };
            seqs.push(kvc::cuda::evict::EvictSeq {
                heads: n,
                kv_heads,
                first_protected: seq_len.saturating_sub(rng.random_range(0..16)),
                n_evict: (held as f32 * share) as usize,
                crush: picks,
            });
        }
        let blocks = pool.used_blocks();
        let n_evict: usize = seqs.iter().map(|s| s.n_evict).sum();
        let got = if let ([one], None) = (&seqs[..], crush) {
            vec![kvc::cuda::evict::kvcompress_evict(
                &k_dev,
                &v_dev,
                &m_dev,
                &p_dev,
                &tables,
                &lens_u,
                bs,
                one.first_protected,
                one.n_evict,
            )
            .unwrap()]
        } else if seed % 2 == 0 {
            let ht = kvc::cuda::evict::HeadTables::from_padded(&tables, &lens_u, per_head, bs);
            kvc::cuda::evict::kvcompress_evict_batch(&k_dev, &v_dev, &m_dev, &p_dev, &ht, &seqs, bs)
                .unwrap()
        } else {
            // Tables already on the device, rows apart with room and a gap in front (as a
            // decode batch's StepTables): only the offsets and lengths go up.
            let (gap, stride) = (5usize, per_head + 2);
            let mut flat = vec![u32::MAX; gap + heads * stride];
            for h in 0..heads {
                flat[gap + h * stride..][..per_head]
                    .copy_from_slice(&tables[h * per_head..][..per_head]);
            }
            let tab: Vec<u32> = (0..heads).map(|h| (gap + h * stride) as u32).collect();
            let flat_dev = Tensor::from_vec(flat, gap + heads * stride, &dev).unwrap();
            let short = vec![0u32; heads - 1];
            assert!(kvc::cuda::evict::kvcompress_evict_on_tables(
                &k_dev,
                &v_dev,
                &m_dev,
                &p_dev,
                &flat_dev,
                &short,
                &lens_u[1..],
                &seqs,
                bs
            )
            .is_err());
            let mut past = tab.clone();
            past[heads - 1] = (gap + heads * stride) as u32;
            if lens_u[heads - 1] > 0 {
                assert!(
                    kvc::cuda::evict::kvcompress_evict_on_tables(
                        &k_dev, &v_dev, &m_dev, &p_dev, &flat_dev, &past, &lens_u, &seqs, bs
                    )
                    .is_err(),
                    "a table past the device buffer is refused"
                );
            }
            kvc::cuda::evict::kvcompress_evict_on_tables(
                &k_dev, &v_dev, &m_dev, &p_dev, &flat_dev, &tab, &lens_u, &seqs, bs,
            )
            .unwrap()
        };
        let before = crush.map(|_| (k.clone(), v.clone(), metric.clone(), position.clone()));
        let want = kvc::cuda::evict::kvcompress_evict_batch_twin(
            &mut k,
            &mut v,
            &mut metric,
            &mut position,
            &kvc::cuda::evict::HeadTables::from_padded(&tables, &lens_u, per_head, bs),
            &seqs,
            bs,
            d,
        )
        .unwrap();
        assert_eq!(got, want, "counts and lengths per sequence (case {seed})");
        let bits = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&host::<bf16>(&k_dev)), bits(&k), "K (case {seed})");
        assert_eq!(bits(&host::<bf16>(&v_dev)), bits(&v), "V (case {seed})");
        assert_eq!(host::<f32>(&m_dev), metric, "metric (case {seed})");
        assert_eq!(host::<u32>(&p_dev), position, "position (case {seed})");
        let taken: u32 = got.iter().flat_map(|g| &g.counts).sum();
        // With KVCrush: its picks kept slots back (the new lengths exceed a run without them).
        let kept_back = match &before {
            Some((k0, v0, m0, p0)) => {
                let mut base = seqs.clone();
                for s in &mut base {
                    s.crush = None;
                }
                let (mut k0, mut v0, mut m0, mut p0) =
                    (k0.clone(), v0.clone(), m0.clone(), p0.clone());
                let plain = kvc::cuda::evict::kvcompress_evict_batch_twin(
                    &mut k0,
                    &mut v0,
                    &mut m0,
                    &mut p0,
                    &kvc::cuda::evict::HeadTables::from_padded(&tables, &lens_u, per_head, bs),
                    &base,
                    bs,
                    d,
                )
                .unwrap();
                let lens_of = |st: &[kvc::cuda::evict::EvictStep]| -> u64 {
                    st.iter().flat_map(|s| &s.new_lens).map(|&l| l as u64).sum()
                };
                let kept = lens_of(&want) - lens_of(&plain);
                assert!(kept > 0, "KVCrush kept nothing back (case {seed})");
                n_crush += 1;
                kept
            }
            None => 0,
        };
        eprintln!(
            "device eviction bs={bs} d={d} heads={heads} ({long_heads} past 16384) in {} sequences, max_ctx={max_ctx}, kvcrush {crush:?}: {blocks} blocks, asked {n_evict}, took {taken}, kvcrush kept {kept_back} slots back; identical to twin",
            segments.len()
        );
        n_cases += 1;
    }
    eprintln!(
        "SUMMARY device_eviction: {n_cases} cases ({n_crush} with KVCrush) identical to the twin"
    );
}

mod e2e {
    use super::*;
    use kvc::compress::{self, Budget, MethodOptions, MethodSpec};
    use kvc::engine::GenParams;
    use kvc::hub::{ModelSource, ResolvedModel};
    use kvc::model::tiny::{write_hf_dir, TinySpec};

    fn load(spec: &TinySpec, dev: &Device) -> (tempfile::TempDir, kvc::model::LoadedModel) {
        let tmp = tempfile::tempdir().unwrap();
        write_hf_dir(tmp.path(), spec, 1).unwrap();
        let lm = kvc::model::load(
            &ResolvedModel {
                source: ModelSource::HfDir(tmp.path().into()),
                name: "tiny".into(),
                hub_id: None,
                revision: None,
            },
            dev,
            DType::F32,
        )
        .unwrap();
        (tmp, lm)
    }

    /// Greedy decoding of `max_new` tokens, prefill in chunks of 16.
    /// Prompts prefilled whole (LongBench's protocol).
    fn whole<'a>(ps: &[&'a [u32]]) -> Vec<compress::Prompt<'a>> {
        ps.iter().map(|&p| p.into()).collect()
    }

    fn params(max_new: usize) -> GenParams {
        GenParams {
            max_new_tokens: max_new,
            stop_ids: Default::default(),
            min_new_tokens: 0,
            prefill_chunk: 16,
            max_context: 2048,
        }
    }

    /// A 3-layer model with head dim 64 and groups of 3 (6 query heads, 2 kv-heads).
    fn tiny6x2(seed: u64) -> TinySpec {
        TinySpec {
            hidden: 384,
            heads: 6,
            kv_heads: 2,
            layers: 3,
            seed,
            ..Default::default()
        }
    }

    const TEXT: &str = "the quick brown fox jumps over the lazy dog while the cat sat on the mat \
                        and then the rat ate the cheese that lay in the house that jack built";

    #[test]
    fn cuda_paged_rate_1_equals_contiguous_greedy() {
        let dev = gpu();
        let params = params(24);
        // head dim 64: groups of 2 and 3
        for spec in [
            TinySpec {
                hidden: 256,
                heads: 4,
                kv_heads: 2,
                ..Default::default()
            },
            TinySpec {
                hidden: 384,
                heads: 6,
                kv_heads: 2,
                layers: 3,
                seed: 11,
                ..Default::default()
            },
        ] {
            let (_t, mut lm) = load(&spec, &dev);
            let (_t2, mut cpu) = load(&spec, &Device::Cpu);
            let ids = lm.prompt_ids(TEXT, false).unwrap();
            let cfg = lm.config().clone();
            let run = |m: &str, b: Option<Budget>, model: &mut kvc::model::Llama| {
                compress::runner(
                    &MethodSpec::parse(m).unwrap(),
                    b,
                    &cfg,
                    &MethodOptions::default(),
                )
                .unwrap()
                .run(model, &ids, &params)
                .unwrap()
            };
            let full_gpu = run("full", None, &mut lm.model).0;
            let full_cpu = run("full", None, &mut cpu.model).0;
            let paged = run("kvcompress", Some(Budget::Rate(1.0)), &mut lm.model).0;
            assert_eq!(
                paged.output_ids, full_gpu.output_ids,
                "CUDA paged (rate 1) vs CUDA contiguous"
            );
            assert_eq!(
                paged.output_ids, full_cpu.output_ids,
                "CUDA paged (rate 1) vs CPU contiguous"
            );
            // Compressed on the GPU vs the CPU paged path (same bookkeeping): report agreement.
            let small = MethodOptions {
                block_size: 4,
                kvc_window: 4,
                protected_window: 4,
                min_cache_tokens: 8,
                ..Default::default()
            };
            let runc = |model: &mut kvc::model::Llama| {
                compress::runner(
                    &MethodSpec::parse("kvcompress").unwrap(),
                    Some(Budget::Rate(2.0)),
                    &cfg,
                    &small,
                )
                .unwrap()
                .run(model, &ids, &params)
                .unwrap()
            };
            let (gg, gs) = runc(&mut lm.model);
            let (cg, cs) = runc(&mut cpu.model);
            let same = gg
                .output_ids
                .iter()
                .zip(&cg.output_ids)
                .take_while(|(a, b)| a == b)
                .count();
            eprintln!(
                "SUMMARY e2e heads={} kv={}: rate 1 identical ({} tokens); rate 2 GPU/CPU common prefix {same}/{}, kept {} vs {}",
                spec.heads,
                spec.kv_heads,
                paged.output_ids.len(),
                gg.output_ids.len(),
                gs.kept_kvs,
                cs.kept_kvs
            );
        }
    }

    /// KV-Compress's continual compression on the GPU through the device path (decode metric
    /// added by the decode kernel, evictions chosen and made by `kernels/evict.cu` in one batch
    /// per step) against the host path (probabilities copied back, scored and planned on the
    /// host): several prompts x budgets decoded in one batch, and one sequence alone.
    #[test]
    fn cuda_device_compression_equals_host_compression() {
        use kvc::compress::CompressOn;
        let dev = gpu();
        let params = params(32);
        let spec = tiny6x2(11);
        let (_t, mut lm) = load(&spec, &dev);
        let cfg = lm.config().clone();
        let long = lm.prompt_ids(TEXT, false).unwrap();
        let short = lm
            .prompt_ids(
                "a cat sat on the mat and looked at the dog for a while",
                false,
            )
            .unwrap();
        let prompts: Vec<&[u32]> = vec![&long, &short, &long];
        let budgets = vec![
            vec![Some(Budget::Rate(2.0)), Some(Budget::Tokens(12))],
            vec![Some(Budget::Tokens(16)), Some(Budget::Rate(4.0))],
            vec![Some(Budget::Rate(8.0))],
        ];
        // KVCrush's block form (a large share, so its picks change the prefill compression)
        // runs its prefill picks through `kvc_crush_pick` and its decode steps as KV-Compress's.
        for name in ["kvcompress", "kvcompress+kvcrush"] {
            let method = MethodSpec::parse(name).unwrap();
            let run = |lm: &mut kvc::model::LoadedModel, on: CompressOn| {
                let opts = MethodOptions {
                    compress_on: on,
                    block_size: 4,
                    kvc_window: 4,
                    protected_window: 4,
                    min_cache_tokens: 4,
                    kvcrush_ratio: 0.5,
                    ..Default::default()
                };
                let mut r = compress::runner(&method, None, &cfg, &opts).unwrap();
                let mut out: Vec<_> = r
                    .run_prompts(&mut lm.model, &whole(&prompts), &params, &budgets)
                    .unwrap()
                    .into_iter()
                    .flat_map(|res| res.unwrap())
                    .map(|g| {
                        let (g, st) = g.unwrap();
                        (g.output_ids, st)
                    })
                    .collect();
                let mut alone =
                    compress::runner(&method, Some(Budget::Tokens(12)), &cfg, &opts).unwrap();
                let (g, st) = alone.run(&mut lm.model, &long, &params).unwrap();
                out.push((g.output_ids, st));
                out
            };
            let host = run(&mut lm, CompressOn::Host);
            let device = run(&mut lm, CompressOn::Auto);
            for (i, (d, h)) in device.iter().zip(&host).enumerate() {
                let same = d.0.iter().zip(&h.0).take_while(|(a, b)| a == b).count();
                eprintln!(
                    "{name}: device vs host compression, sequence {i}: common prefix {same}/{}",
                    h.0.len()
                );
            }
            assert_eq!(
                device, host,
                "{name}: device vs host compression on the GPU"
            );
            eprintln!(
                "SUMMARY {name} device compression on the GPU: {} sequences identical to the host path",
                host.len()
            );
        }
    }

    /// `full` on the GPU decodes several prompts in one batch through the paged cache (nothing
    /// evicted): token for token what each prompt gives alone on the contiguous cache, with
    /// the full run's statistics.
    #[test]
    fn cuda_full_batched_equals_alone() {
        let dev = gpu();
        let params = params(20);
        let spec = tiny6x2(3);
        let (_t, mut lm) = load(&spec, &dev);
        let cfg = lm.config().clone();
        let long = lm.prompt_ids(TEXT, false).unwrap();
        let short = lm.prompt_ids("a cat sat on the mat", false).unwrap();
        let prompts: Vec<&[u32]> = vec![&long, &short, &long[5..]];
        let full = MethodSpec::parse("full").unwrap();
        let mut r = compress::runner(&full, None, &cfg, &MethodOptions::default()).unwrap();
        let batched = r
            .run_prompts(
                &mut lm.model,
                &whole(&prompts),
                &params,
                &vec![vec![None]; 3],
            )
            .unwrap();
        for (p, res) in prompts.iter().zip(batched) {
            let (g, st) = res.unwrap().pop().unwrap().unwrap();
            let (g1, st1) = r.run(&mut lm.model, p, &params).unwrap();
            assert_eq!(g.output_ids, g1.output_ids, "prompt of {}", p.len());
            assert_eq!(st, st1);
        }
        // `kvc eval` on a GPU runs `full` as a keep-all fork (budget None, last) of the first
        // compressed method's prefill, decoding in that method's batch.
        let kvc = MethodSpec::parse("kvcompress").unwrap();
        let opts = MethodOptions {
            block_size: 4,
            min_cache_tokens: 4,
            ..Default::default()
        };
        let mut r2 = compress::runner(&kvc, None, &cfg, &opts).unwrap();
        let budgets = vec![vec![Some(Budget::Rate(2.0)), Some(Budget::Rate(8.0)), None]; 3];
        let grouped = r2
            .run_prompts(&mut lm.model, &whole(&prompts), &params, &budgets)
            .unwrap();
        for (p, res) in prompts.iter().zip(grouped) {
            let (g, _) = res.unwrap().pop().unwrap().unwrap();
            let (g1, _) = r.run(&mut lm.model, p, &params).unwrap();
            assert_eq!(
                g.output_ids,
                g1.output_ids,
                "keep-all fork, prompt of {}",
                p.len()
            );
        }
        eprintln!(
            "SUMMARY full batched on the GPU: 3 prompts identical to each alone, as full's own batch and as keep-all forks in kvcompress's"
        );
    }

    /// The benchmark scheduler on the GPU (batched decode through the paged CUDA kernels, one
    /// `write_kv` per layer for the whole batch, batched prefill, device argmax) generates what
    /// NCCL loaded (KVC_NCCL_LIB or the loader path) and a one-rank group initialised on the
    /// GPU: its collectives give back their input, and the tiny model loaded as rank 0 of 1
    /// through it decodes the plain model's greedy ids.
    #[test]
    fn nccl_one_rank_group_runs_the_model() {
        use kvc::cuda::comm::{Comm, Shard};
        use kvc::cuda::nccl::{NcclComm, UniqueId};
        use kvc::engine::NoHooks;
        use kvc::kvcache::contiguous::ContiguousCache;
        use std::sync::Arc;
        let dev = gpu();
        let version = NcclComm::version().expect("NCCL must load: set KVC_NCCL_LIB");
        let comm = Arc::new(NcclComm::join(&UniqueId::new().unwrap(), Shard::ONE, &dev).unwrap());
        let mut rng = StdRng::seed_from_u64(3);
        for dt in [DType::F32, DType::BF16] {
            let x = to_dev::<f32>(&rnd(&mut rng, 6 * 40, 1.0), &[6, 40], &dev)
                .to_dtype(dt)
                .unwrap();
            let want = f32s(&x);
            assert_eq!(f32s(&comm.all_reduce_sum(&x).unwrap()), want, "{dt:?} sum");
            let g = comm.all_gather_last(&x).unwrap();
            assert_eq!((g.dims(), f32s(&g)), (x.dims(), want), "{dt:?} gather");
        }
        let spec = tiny6x2(11);
        let (_t, mut plain) = load(&spec, &dev);
        let tmp = tempfile::tempdir().unwrap();
        write_hf_dir(tmp.path(), &spec, 1).unwrap();
        let resolved = ResolvedModel {
            source: ModelSource::HfDir(tmp.path().into()),
            name: "tiny".into(),
            hub_id: None,
            revision: None,
        };
        let mut ranked = kvc::model::load_shard(
            &resolved,
            &dev,
            DType::F32,
            Some(comm as Arc<dyn Comm>),
            kvc::model::Fp8Mode::Auto,
        )
        .unwrap();
        let layers = plain.model.cfg.num_hidden_layers;
        let prompt: Vec<u32> = (0..45u32).map(|i| (i * 37 + 11) % 250).collect();
        let run = |lm: &mut kvc::model::LoadedModel| {
            kvc::engine::generate(
                &mut lm.model,
                &mut ContiguousCache::new(layers),
                &prompt,
                &params(20),
                &mut NoHooks,
            )
            .unwrap()
            .output_ids
        };
        let want = run(&mut plain);
        assert_eq!(run(&mut ranked), want);
        // KV-Compress through the group (the exchange's u32 collectives on the GPU, the plan
        // on the host) equals the plain model's host-planned KV-Compress.
        use kvc::compress::{self, CompressOn, MethodOptions, MethodSpec};
        let opts = MethodOptions {
            block_size: 4,
            protected_window: 8,
            kvc_window: 8,
            compress_on: CompressOn::Host,
            ..MethodOptions::default()
        };
        let kc = |lm: &mut kvc::model::LoadedModel| {
            let m = MethodSpec::parse("kvcompress").unwrap();
            let budget = Some(kvc::kvcache::budget::Budget::Tokens(16));
            let mut r = compress::runner(&m, budget, lm.config(), &opts).unwrap();
            let (g, st) = r.run(&mut lm.model, &prompt, &params(20)).unwrap();
            (g.output_ids, st.kept_per_head)
        };
        let want_kc = kc(&mut plain);
        assert!(want_kc.1.iter().flatten().sum::<usize>() < 45 * 2 * layers);
        assert_eq!(kc(&mut ranked), want_kc);
        eprintln!("SUMMARY NCCL {version}: a one-rank group's collectives are the identity; the model through it decodes the plain ids ({} tokens), KV-Compress through it keeps the plain KVs per head", want.len());
    }

    /// each request alone generates on the CPU's contiguous cache, at rate 1.
    #[test]
    fn cuda_bench_scheduler_rate_1_equals_cpu_alone() {
        use kvc::bench::{scheduler, synthetic};
        use kvc::engine::NoHooks;
        use kvc::kvcache::contiguous::ContiguousCache;
        let dev = gpu();
        let spec = tiny6x2(5);
        let (_t, mut lm) = load(&spec, &dev);
        let (_t2, mut cpu) = load(&spec, &Device::Cpu);
        let cfg = lm.config().clone();
        let lens = [40, 40, 40, 23, 57, 57, 9];
        let prompts: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                synthetic::prompts(1, l, cfg.vocab_size, &Default::default(), 7 + i as u64)
                    .remove(0)
            })
            .collect();
        let out_len = 20;
        let params = params(out_len);
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                kvc::engine::generate(
                    &mut cpu.model,
                    &mut ContiguousCache::new(cfg.num_hidden_layers),
                    p,
                    &params,
                    &mut NoHooks,
                )
                .unwrap()
                .output_ids
            })
            .collect();
        let sc = scheduler::SchedConfig {
            rate: 1.0,
            schedule: scheduler::Schedule::Kvc,
            output_len: out_len,
            num_blocks: 4096,
            block_size: 16,
            min_cache_tokens: 8,
            prefill_chunk: 16,
            prefill_batch: 4,
            max_batch: 256,
            score_decode: false,
            compress_on_device: true,
            check_invariants: true,
        };
        let out = scheduler::run(&mut lm.model, None, &prompts, &sc, &mut |_| {}).unwrap();
        assert_eq!(out.stats.max_batch, lens.len());
        assert!(out.stats.prefill_batches < lens.len(), "{:?}", out.stats);
        assert_eq!(out.outputs, want, "GPU scheduler vs CPU alone");
        eprintln!(
            "SUMMARY bench scheduler on the GPU: {} requests identical to CPU alone",
            lens.len()
        );
    }
}

/// The scoring of the methods that score keys and values with candle ops on the cache's device
/// (Expected Attention, Knorm, KeyDiff, LagKV, CriticalKV's projected value norms, KVzip's
/// span scores): on the GPU equal to the same ops on the CPU, in f32 and from bf16 inputs (the
/// CPU twin reads the same bf16-rounded values in f32).
#[test]
fn key_scoring_on_cuda_equals_cpu() {
    use kvc::compress::criticalkv::projected_value_norms;
    use kvc::compress::expected_attention::ExpectedAttention;
    use kvc::compress::knorm::{KeyScore, KeyScored};
    use kvc::compress::kvzip::span_scores;
    use kvc::compress::lagkv::LagKv;
    use kvc::compress::policy::LayerKeys;
    use kvc::compress::query_stats::QueryStats;
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(29);
    let (nh, nkv, len, d, hidden) = (8, 2, 300, 64, 96);
    let rand_t = |rng: &mut StdRng, shape: &[usize], a: f32| {
        let n = shape.iter().product();
        Tensor::from_vec(rnd(rng, n, a), shape, &Device::Cpu).unwrap()
    };
    let q = rand_t(&mut rng, &[1, nh, len, d], 1.5);
    let kv: Vec<(Tensor, Tensor)> = (0..nkv)
        .map(|_| {
            (
                rand_t(&mut rng, &[len, d], 1.0),
                rand_t(&mut rng, &[len, d], 1.0),
            )
        })
        .collect();
    let w_o = rand_t(&mut rng, &[hidden, nh * d], 0.1);
    let (span_q, span_k) = (
        rand_t(&mut rng, &[4, 24, d], 1.0),
        rand_t(&mut rng, &[4 + 50 + 30, d], 1.0),
    );
    let positions = vec![(0..len as u32).collect::<Vec<u32>>(); nkv];
    let ea = ExpectedAttention::with_inv_freq(
        (0..d / 2)
            .map(|i| 10_000f32.powf(-2.0 * i as f32 / d as f32))
            .collect(),
    );
    // Every score of one device, flattened in a fixed order, each part named.
    let scores = |dt: DType, on: &Device| -> Vec<(String, Vec<f32>)> {
        let put = |t: &Tensor| t.to_dtype(dt).unwrap().to_device(on).unwrap();
        // The CPU reads the device's bf16-rounded inputs in f32.
        let put = |t: &Tensor| match on {
            Device::Cpu => put(t).to_dtype(DType::F32).unwrap(),
            _ => put(t),
        };
        let heads: Vec<(Tensor, Tensor)> = kv.iter().map(|(k, v)| (put(k), put(v))).collect();
        let mut stats = QueryStats::default();
        let qd = put(&q);
        for start in (0..len).step_by(128) {
            let n = 128.min(len - start);
            stats
                .add(&qd.narrow(2, start, n).unwrap(), ea.n_sink)
                .unwrap();
        }
        let layer = LayerKeys {
            heads: &heads,
            positions: &positions,
            seq_len: len,
            queries: Some(&stats),
            layer: 0,
            budget: None,
            metric: &[],
            out_proj: None,
        };
        let mut out = vec![];
        for (h, s) in ea.layer_scores(&layer).unwrap().into_iter().enumerate() {
            out.push((format!("expected-attention head {h}"), s));
        }
        for (name, score) in [
            ("knorm", KeyScore::Knorm),
            ("keydiff", KeyScore::KeyDiff),
            ("lagkv", KeyScore::LagKv(LagKv::default())),
        ] {
            for (h, (k, v)) in heads.iter().enumerate() {
                let s = KeyScored { score }.scores(k, v).unwrap();
                out.push((format!("{name} head {h}"), f32s(&s)));
            }
        }
        let w = put(&w_o);
        for (h, (_, v)) in heads.iter().enumerate() {
            let n = projected_value_norms(v, &w, h, nh / nkv).unwrap();
            out.push((format!("criticalkv value norms head {h}"), f32s(&n)));
        }
        let s = span_scores(
            &put(&span_q),
            &put(&span_k),
            4,
            50,
            6,
            1.0 / (d as f64).sqrt(),
        );
        out.push(("kvzip span scores".into(), f32s(&s.unwrap())));
        out
    };
    let mut summary = vec![];
    for (dt, atol, rtol) in [(DType::F32, 1e-5, 1e-3), (DType::BF16, 1e-3, 2e-2)] {
        let want = scores(dt, &Device::Cpu);
        let got = scores(dt, &dev);
        let mut worst_all = 0f32;
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            let (worst, maxabs) = compare(g, w, atol, rtol);
            assert!(
                worst <= 1.0,
                "{dt:?} {name}: worst {worst} (max abs {maxabs})"
            );
            worst_all = worst_all.max(worst);
        }
        summary.push(format!("{dt:?} {} parts, worst {worst_all:.3}", got.len()));
    }
    eprintln!(
        "SUMMARY key scoring on the GPU vs the CPU: {}",
        summary.join("; ")
    );
}

/// The FP8 linear layer (per-token e4m3 quantization, cuBLASLt's e4m3 GEMM, the scales after
/// it) against its twin in bf16, for a decode row, a few rows and a prefill chunk:
/// the same quantized products, summed in another order and rounded to the run dtype twice.
#[test]
fn fp8_linear_matches_twin() {
    use kvc::cuda::fp8_linear::{self, f32_to_e4m3, Fp8Weight};
    let dev = gpu();
    assert!(fp8_linear::supported(&dev).unwrap(), "an FP8 GPU (8.9+)");
    let mut rng = StdRng::seed_from_u64(29);
    {
        let dt = DType::BF16;
        for (rows, out, inp) in [(1, 256, 512), (7, 384, 1024), (300, 128, 2048)] {
            let bits: Vec<u8> = rnd(&mut rng, out * inp, 400.0)
                .into_iter()
                .map(f32_to_e4m3)
                .collect();
            let scale: Vec<f32> = (0..out)
                .map(|_| 1e-3 + rng.random::<f32>() * 1e-2)
                .collect();
            let host_w = Fp8Weight {
                w: Tensor::from_vec(bits, (out, inp), &Device::Cpu).unwrap(),
                scale: Tensor::from_vec(scale, out, &Device::Cpu).unwrap(),
            };
            let gpu_w = Fp8Weight {
                w: host_w.w.to_device(&dev).unwrap(),
                scale: host_w.scale.to_device(&dev).unwrap(),
            };
            let mut xs = rnd(&mut rng, rows * inp, 4.0);
            xs[rows * inp / 2] = 90.0; // an outlier sets one row's scale
            let x = Tensor::from_vec(xs, (rows, inp), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let want = f32s(&fp8_linear::fp8_linear_twin(&x, &host_w).unwrap());
            let got = fp8_linear::fp8_linear(&x.to_device(&dev).unwrap(), &gpu_w, true).unwrap();
            assert_eq!(got.dims(), [rows, out]);
            assert_eq!(got.dtype(), dt);
            let got = f32s(&got);
            let span = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (worst, maxabs) = compare(&got, &want, 1e-3 * span, 1.0 / 64.0);
            assert!(
                worst <= 1.0,
                "{dt:?} [{rows}, {inp}] x [{out}, {inp}]: worst {worst}, max abs {maxabs} of {span}"
            );
        }
    }
}
