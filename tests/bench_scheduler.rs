//! The `kvc bench` scheduler on tiny random-weight models:
//! - batched continuous decoding at rate 1 gives token for token what each request gives alone
//!   with the contiguous cache (the oracle), with an ample pool and with a pool so small that
//!   sequences are preempted and recomputed;
//! - over random small configurations the pool is never exceeded (its invariants hold after
//!   every step) and every request generates exactly `output_len` tokens;
//! - under memory pressure compression runs on demand and the decode batch grows with the rate;
//! - the reference's schedule compresses at 1x (budget L - block) and compresses the running
//!   sequences after later admissions, where kvc's compresses only on pressure.
use candle_core::{DType, Device};
use kvc::bench::scheduler::{self, min_blocks, SchedConfig, Schedule};
use kvc::bench::synthetic::{self, SplitMix64};
use kvc::compress::policy::Policy;
use kvc::compress::{build_policy, MethodOptions, MethodSpec};
use kvc::engine::{self, GenParams, NoHooks};
use kvc::hub::{ModelSource, ResolvedModel};
use kvc::kvcache::contiguous::ContiguousCache;
use kvc::kvcache::paged::PagedSpec;
use kvc::model::tiny::{write_hf_dir, TinySpec};
use kvc::model::LoadedModel;

fn tiny(spec: &TinySpec) -> (tempfile::TempDir, LoadedModel) {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), spec, 1).unwrap();
    let lm = kvc::model::load(
        &ResolvedModel {
            source: ModelSource::HfDir(tmp.path().into()),
            name: "tiny".into(),
            hub_id: None,
            revision: None,
        },
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    (tmp, lm)
}

const BS: usize = 4;

fn opts() -> MethodOptions {
    MethodOptions {
        block_size: BS,
        kvc_window: 4,
        protected_window: 4,
        min_cache_tokens: 8,
        ..Default::default()
    }
}

fn policy(lm: &LoadedModel) -> Box<dyn Policy> {
    build_policy(
        &MethodSpec::parse("kvcompress").unwrap(),
        lm.config(),
        &opts(),
    )
    .unwrap()
}

fn spec(lm: &LoadedModel) -> PagedSpec {
    let c = lm.config();
    PagedSpec {
        layers: c.num_hidden_layers,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        block_size: BS,
        dtype: DType::F32,
        device: Device::Cpu,
    }
}

fn sched(rate: f64, output_len: usize, num_blocks: usize) -> SchedConfig {
    SchedConfig {
        rate,
        schedule: Schedule::Kvc,
        output_len,
        num_blocks,
        block_size: BS,
        min_cache_tokens: 8,
        prefill_chunk: 16,
        prefill_batch: 4,
        max_batch: 256,
        score_decode: true,
        compress_on_device: false,
        check_invariants: true,
    }
}

fn prompts_of(lens: &[usize], lm: &LoadedModel, seed: u64) -> Vec<Vec<u32>> {
    lens.iter()
        .enumerate()
        .map(|(i, &l)| {
            synthetic::prompts(
                1,
                l,
                lm.config().vocab_size,
                &Default::default(),
                seed + i as u64,
            )
            .remove(0)
        })
        .collect()
}

fn alone(lm: &mut LoadedModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let params = GenParams {
        max_new_tokens: n,
        stop_ids: Default::default(),
        min_new_tokens: 0,
        prefill_chunk: 16,
        max_context: 2048,
    };
    let layers = lm.config().num_hidden_layers;
    engine::generate(
        &mut lm.model,
        &mut ContiguousCache::new(layers),
        prompt,
        &params,
        &mut NoHooks,
    )
    .unwrap()
    .output_ids
}

#[test]
fn batched_rate1_equals_each_request_alone_on_the_contiguous_cache() {
    let (_t, mut lm) = tiny(&TinySpec::default());
    let p = policy(&lm);
    // Two runs of equal lengths: those are prefilled together (prefill_batch 4).
    let lens = [23, 40, 40, 9, 31, 31, 31, 17];
    let prompts = prompts_of(&lens, &lm, 5);
    let out_len = 12;
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|pr| alone(&mut lm, pr, out_len))
        .collect();
    let sp = spec(&lm);
    let need = min_blocks(&sp, 40, out_len, 1.0, 8, 4);
    // Ample (all decode together) and tight (preemption + recomputation).
    for (blocks, tight) in [(need * 10, false), (need + 6, true)] {
        let out = scheduler::run(
            &mut lm.model,
            Some(p.as_ref()),
            &prompts,
            &sched(1.0, out_len, blocks),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(out.outputs, want, "pool of {blocks} blocks");
        let st = &out.stats;
        assert_eq!(st.requests, lens.len());
        assert_eq!(st.output_tokens, (lens.len() * out_len) as u64);
        assert_eq!(st.evicted_slots, 0);
        assert!(st.peak_blocks <= blocks);
        if tight {
            assert!(st.preemptions > 0, "{st:?}");
            assert!(st.max_batch < lens.len(), "{st:?}");
        } else {
            assert_eq!(st.max_batch, lens.len(), "{st:?}");
            assert_eq!(st.preemptions, 0);
        }
    }
}

#[test]
fn batched_prefill_equals_one_at_a_time_with_and_without_compression() {
    let (_t, mut lm) = tiny(&TinySpec::default());
    let p = policy(&lm);
    let prompts = prompts_of(&[37; 7], &lm, 9);
    let out_len = 10;
    let sp = spec(&lm);
    for rate in [1.0, 4.0] {
        let blocks = 10 * min_blocks(&sp, 37, out_len, 1.0, 8, 4);
        let run = |lm: &mut LoadedModel, prefill_batch: usize| {
            let cfg = SchedConfig {
                prefill_batch,
                ..sched(rate, out_len, blocks)
            };
            scheduler::run(&mut lm.model, Some(p.as_ref()), &prompts, &cfg, &mut |_| {}).unwrap()
        };
        let one = run(&mut lm, 1);
        let four = run(&mut lm, 4);
        assert_eq!(one.stats.prefill_batches, 7, "rate {rate}");
        assert_eq!(
            four.stats.prefill_batches, 2,
            "rate {rate}: groups of 4 + 3"
        );
        assert_eq!(four.outputs, one.outputs, "rate {rate}");
        assert_eq!(
            four.stats.evicted_slots, one.stats.evicted_slots,
            "rate {rate}"
        );
        if rate > 1.0 {
            assert!(one.stats.evicted_slots > 0);
        } else {
            let want: Vec<Vec<u32>> = prompts
                .iter()
                .map(|pr| alone(&mut lm, pr, out_len))
                .collect();
            assert_eq!(one.outputs, want);
        }
    }
}

#[test]
fn random_configs_never_exceed_the_pool_and_generate_exactly_output_len() {
    let specs = [
        TinySpec::default(),
        TinySpec {
            heads: 6,
            kv_heads: 2,
            layers: 3,
            seed: 11,
            ..Default::default()
        },
    ];
    let mut rng = SplitMix64(2024);
    for (si, ts) in specs.iter().enumerate() {
        let (_t, mut lm) = tiny(ts);
        let p = policy(&lm);
        let sp = spec(&lm);
        for case in 0..5 {
            let rate = [1.0, 2.0, 4.0, 8.0, 64.0][rng.below(5) as usize];
            let n = 2 + rng.below(6) as usize;
            let lens: Vec<usize> = (0..n).map(|_| 8 + rng.below(50) as usize).collect();
            let out_len = 1 + rng.below(14) as usize;
            let longest = *lens.iter().max().unwrap();
            let need = min_blocks(&sp, longest, out_len, rate, 8, 4);
            let blocks = need + rng.below(2 * need as u64) as usize;
            let prompts = prompts_of(&lens, &lm, 100 * si as u64 + case);
            let schedule = [Schedule::Kvc, Schedule::Paper][rng.below(2) as usize];
            let cfg = SchedConfig {
                schedule,
                compress_on_device: rng.below(2) == 0,
                ..sched(rate, out_len, blocks)
            };
            let out = scheduler::run(&mut lm.model, Some(p.as_ref()), &prompts, &cfg, &mut |_| {})
                .unwrap_or_else(|e| panic!("spec {si} case {case} {cfg:?} lens {lens:?}: {e}"));
            assert_eq!(out.outputs.len(), n);
            for o in &out.outputs {
                assert_eq!(o.len(), out_len, "spec {si} case {case}");
            }
            let st = &out.stats;
            assert!(st.peak_blocks <= blocks, "{st:?}");
            assert_eq!(st.requests, n);
            assert!(st.max_batch >= 1 || out_len == 1);
        }
    }
}

#[test]
fn pressure_triggers_compression_and_batch_grows_with_rate() {
    let (_t, mut lm) = tiny(&TinySpec::default());
    let p = policy(&lm);
    let sp = spec(&lm);
    let (len, out_len, n) = (64, 24, 12);
    let prompts = prompts_of(&vec![len; n], &lm, 77);
    // Room for about two full-cache sequences.
    let blocks = 2 * sp.blocks_for_tokens(len + out_len) + 8;
    let mut batches = Vec::new();
    for rate in [1.0, 2.0, 8.0] {
        let out = scheduler::run(
            &mut lm.model,
            Some(p.as_ref()),
            &prompts,
            &sched(rate, out_len, blocks),
            &mut |_| {},
        )
        .unwrap();
        let st = out.stats;
        assert!(out.outputs.iter().all(|o| o.len() == out_len));
        if rate > 1.0 {
            assert!(st.evicted_slots > 0, "rate {rate}: {st:?}");
        }
        if rate == 8.0 {
            assert!(st.compress_rounds > 0, "no on-demand compression: {st:?}");
        }
        batches.push((rate, st.max_batch, st.mean_batch));
    }
    let max: Vec<usize> = batches.iter().map(|b| b.1).collect();
    assert!(max[0] <= 2, "{batches:?}");
    assert!(max[1] > max[0] && max[2] > max[1], "{batches:?}");
}

#[test]
fn paper_schedule_compresses_at_1x_where_kvc_keeps_the_full_cache() {
    let (_t, mut lm) = tiny(&TinySpec::default());
    let p = policy(&lm);
    let sp = spec(&lm);
    let (len, out_len, n) = (40, 24, 8);
    let prompts = prompts_of(&vec![len; n], &lm, 5);
    // Room for about two full-cache sequences: decoding runs short of blocks.
    let blocks = 2 * sp.blocks_for_tokens(len + out_len) + 8;
    let mut run = |rate: f64, schedule: Schedule| {
        let cfg = SchedConfig {
            schedule,
            ..sched(rate, out_len, blocks)
        };
        let out =
            scheduler::run(&mut lm.model, Some(p.as_ref()), &prompts, &cfg, &mut |_| {}).unwrap();
        assert!(out.outputs.iter().all(|o| o.len() == out_len));
        out.stats
    };
    let vanilla = run(1.0, Schedule::Kvc);
    assert_eq!(vanilla.evicted_slots, 0, "{vanilla:?}");
    assert_eq!(vanilla.compress_rounds, 0, "{vanilla:?}");
    let paper = run(1.0, Schedule::Paper);
    // Budget (40 - 1) // 4 * 4 = 36 tokens per head: 4 of the 40 prompt tokens of every head
    // go right after prefill, and decoding past the budget is compressed when blocks run short.
    let heads = (sp.layers * sp.kv_heads) as u64;
    assert!(paper.evicted_slots >= n as u64 * 4 * heads, "{paper:?}");
    assert!(paper.compress_rounds > 0, "{paper:?}");
    assert!(
        paper.max_batch >= vanilla.max_batch,
        "{paper:?} {vanilla:?}"
    );
}

/// The evictor the scheduler runs on a GPU (the metric kept on the device, added by the decode
/// step; one batched eviction per compression round), here through its CPU twin: the same
/// tokens and evictions as the host-planned compression, under both schedules and memory
/// pressure.
#[test]
fn device_compression_equals_host_planning() {
    let (_t, mut lm) = tiny(&TinySpec::default());
    let p = policy(&lm);
    let sp = spec(&lm);
    let (len, out_len, n) = (48, 20, 8);
    let prompts = prompts_of(&vec![len; n], &lm, 9);
    let blocks = 2 * sp.blocks_for_tokens(len + out_len) + 8;
    for (rate, schedule) in [
        (4.0, Schedule::Kvc),
        (1.0, Schedule::Paper),
        (4.0, Schedule::Paper),
    ] {
        let mut run = |on_device: bool| {
            let cfg = SchedConfig {
                schedule,
                compress_on_device: on_device,
                ..sched(rate, out_len, blocks)
            };
            scheduler::run(&mut lm.model, Some(p.as_ref()), &prompts, &cfg, &mut |_| {}).unwrap()
        };
        let (host, device) = (run(false), run(true));
        assert!(device.stats.evicted_slots > 0, "{:?}", device.stats);
        assert_eq!(device.outputs, host.outputs, "{rate}x {schedule:?}");
        assert_eq!(
            device.stats.evicted_slots, host.stats.evicted_slots,
            "{rate}x {schedule:?}: {:?} vs {:?}",
            device.stats, host.stats
        );
    }
}
