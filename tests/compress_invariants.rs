//! Invariants of the paged cache and every compression method, on tiny random-weight models
//! (and a short SmolLM2 prompt when the checkpoint is present):
//! - nothing evicted (rate 1, or a budget above the sequence) => token-for-token the greedy
//!   output of the contiguous full cache, for every method;
//! - after every compression step: the pool's blocks are each owned once (free or in one table),
//!   each sequence holds at most its budget in blocks, no two slots alias, positions in a head
//!   are distinct and the protected window survives;
//! - achieved compression is reported honestly (the 128-token floor).
use candle_core::{DType, Device, Result, Tensor};
use kvc::compress::policy::{CompressHooks, Policy};
use kvc::compress::{self, Budget, MethodOptions, MethodSpec, METHODS};
use kvc::engine::{self, GenParams, Hooks};
use kvc::hub::{ModelSource, ResolvedModel};
use kvc::kvcache::budget::allowed_blocks;
use kvc::kvcache::paged::{PagedCache, PagedSpec};
use kvc::kvcache::{CacheBackend, Probe, SeqId};
use kvc::model::tiny::{write_hf_dir, TinySpec};
use kvc::model::LoadedModel;
use std::collections::HashSet;

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

fn params(max_new: usize) -> GenParams {
    GenParams {
        max_new_tokens: max_new,
        stop_ids: Default::default(),
        min_new_tokens: 0,
        prefill_chunk: 16,
        max_context: 2048,
    }
}

/// Prompts prefilled whole (LongBench's protocol).
fn whole<'a>(ps: &[&'a [u32]]) -> Vec<compress::Prompt<'a>> {
    ps.iter().map(|&p| p.into()).collect()
}

const TEXT: &str = "the quick brown fox jumps over the lazy dog while the cat sat on the mat and \
                    then the rat ate the cheese that lay in the house that jack built long ago";

/// Small windows so tiny prompts get compressed.
fn small_opts() -> MethodOptions {
    MethodOptions {
        block_size: 4,
        kvc_window: 4,
        protected_window: 4,
        snap_window: 4,
        sink_tokens: 2,
        min_cache_tokens: 8,
        ..Default::default()
    }
}

/// An f32 paged cache of 1000 blocks on the CPU for `cfg`.
fn cpu_cache(cfg: &kvc::model::Config, block_size: usize) -> PagedCache {
    PagedCache::new(
        PagedSpec {
            layers: cfg.num_hidden_layers,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            block_size,
            dtype: DType::F32,
            device: Device::Cpu,
        },
        1000,
    )
    .unwrap()
}

fn specs() -> Vec<TinySpec> {
    vec![
        TinySpec::default(), // 4 q heads / 2 kv heads
        TinySpec {
            heads: 6,
            kv_heads: 2, // groups of 3
            layers: 3,
            seed: 11,
            ..Default::default()
        },
    ]
}

#[test]
fn no_eviction_equals_full_cache_for_every_method() {
    for ts in specs() {
        let (_tmp, mut lm) = tiny(&ts);
        let ids = lm.prompt_ids(TEXT, false).unwrap();
        let cfg = lm.config().clone();
        let p = params(16);
        let full = compress::runner(
            &MethodSpec::parse("full").unwrap(),
            None,
            &cfg,
            &MethodOptions::default(),
        )
        .unwrap()
        .run(&mut lm.model, &ids, &p)
        .unwrap()
        .0;
        for m in METHODS.iter().filter(|m| **m != "full") {
            for (budget, opts) in [
                (Some(Budget::Rate(1.0)), MethodOptions::default()),
                (Some(Budget::Tokens(10_000)), MethodOptions::default()),
                (None, small_opts()),
                (Some(Budget::Tokens(ids.len() + 16)), small_opts()),
            ] {
                let mut r =
                    compress::runner(&MethodSpec::parse(m).unwrap(), budget, &cfg, &opts).unwrap();
                let (g, st) = r.run(&mut lm.model, &ids, &p).unwrap();
                assert_eq!(
                    g.output_ids, full.output_ids,
                    "{m} at {budget:?} differs from the full cache"
                );
                let (a, b) = (g.first_logits.unwrap(), full.first_logits.clone().unwrap());
                let diff = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff < 1e-4,
                    "{m} at {budget:?}: first logits differ by {diff}"
                );
                assert_eq!(st.kept_kvs, st.prompt_kvs, "{m} at {budget:?}");
                assert_eq!(st.achieved_rate(), 1.0);
            }
        }
    }
}

/// One prefill continued under several budgets (what `kvc eval` does for a method's rates)
/// gives, budget by budget, exactly what a separate run gives: the same tokens, the same first
/// logits, the same kept KVs per head. The budgets evict (checked), and decoding goes on long
/// enough for continual compression to run in every copy.
#[test]
fn shared_prefill_equals_separate_runs_for_every_method() {
    let mut methods: Vec<String> = METHODS
        .iter()
        .filter(|m| **m != "full")
        .map(|m| m.to_string())
        .collect();
    methods.extend(["kvcompress+kvcrush".into(), "snapkv+kvcrush".into()]);
    for ts in specs() {
        let (_tmp, mut lm) = tiny(&ts);
        let ids = lm.prompt_ids(TEXT, false).unwrap();
        let cfg = lm.config().clone();
        let p = params(12);
        // Without --kv-memory the budgets fork sequences in one pool and decode in one batch;
        // with it, each decodes alone in a copy of the prefilled cache.
        for opts in [
            small_opts(),
            MethodOptions {
                kv_memory: Some(8 << 20),
                ..small_opts()
            },
        ] {
            // `None` last: the keep-all fork a GPU eval gives `full` (it takes the prompt's
            // own cache).
            let budgets = [
                Some(Budget::Rate(2.0)),
                Some(Budget::Tokens(12)),
                Some(Budget::Rate(1.0)),
                Some(Budget::Rate(64.0)),
                None,
            ];
            for m in &methods {
                let spec = MethodSpec::parse(m).unwrap();
                let mut shared = compress::runner(&spec, budgets[0], &cfg, &opts).unwrap();
                let forks = shared
                    .run_budgets(&mut lm.model, (&ids).into(), &p, &budgets)
                    .unwrap();
                assert_eq!(forks.len(), budgets.len());
                let mut evicted_somewhere = false;
                for (b, fork) in budgets.iter().zip(forks) {
                    let (g, st) = fork.unwrap();
                    let mut alone = compress::runner(&spec, *b, &cfg, &opts).unwrap();
                    let (g1, st1) = alone.run(&mut lm.model, &ids, &p).unwrap();
                    assert_eq!(
                        g.output_ids, g1.output_ids,
                        "{m} at {b:?} (kv_memory {:?}): tokens differ",
                        opts.kv_memory
                    );
                    assert_eq!(
                        g.first_logits, g1.first_logits,
                        "{m} at {b:?}: logits differ"
                    );
                    assert_eq!(st, st1, "{m} at {b:?}: kept KVs differ");
                    evicted_somewhere |= st.kept_kvs < st.prompt_kvs;
                }
                assert!(evicted_somewhere, "{m}: no budget evicted anything");
            }
        }
    }
}

/// Several prompts of different lengths, each under its own list of budgets, prefilled one by
/// one and decoded in one batch (`kvc eval --batch-samples`): each (prompt, budget) gives what
/// a separate run gives, token for token, with the same kept KVs.
#[test]
fn batched_prompts_equal_separate_runs() {
    let ts = &specs()[1];
    let (_tmp, mut lm) = tiny(ts);
    let cfg = lm.config().clone();
    let long = lm.prompt_ids(TEXT, false).unwrap();
    let short = lm
        .prompt_ids(
            "a cat sat on the mat and looked at the dog for a long while",
            false,
        )
        .unwrap();
    assert!(short.len() < long.len());
    let p = params(10);
    let opts = small_opts();
    let budgets = vec![
        vec![Some(Budget::Rate(2.0)), Some(Budget::Rate(8.0))],
        vec![Some(Budget::Tokens(12))],
        vec![
            Some(Budget::Rate(4.0)),
            Some(Budget::Rate(1.0)),
            Some(Budget::Rate(64.0)),
        ],
    ];
    let prompts: Vec<&[u32]> = vec![&long, &short, &long];
    for m in [
        "kvcompress",
        "snapkv",
        "h2o",
        "streamingllm",
        "kvcompress+kvcrush",
        "expected-attention",
    ] {
        let spec = MethodSpec::parse(m).unwrap();
        let mut r = compress::runner(&spec, None, &cfg, &opts).unwrap();
        let out = r
            .run_prompts(&mut lm.model, &whole(&prompts), &p, &budgets)
            .unwrap();
        assert_eq!(out.len(), prompts.len());
        for ((prompt, bs), res) in prompts.iter().zip(&budgets).zip(out) {
            let res = res.unwrap();
            assert_eq!(res.len(), bs.len());
            for (b, got) in bs.iter().zip(res) {
                let (g, st) = got.unwrap();
                let mut alone = compress::runner(&spec, *b, &cfg, &opts).unwrap();
                let (g1, st1) = alone.run(&mut lm.model, prompt, &p).unwrap();
                assert_eq!(
                    g.output_ids,
                    g1.output_ids,
                    "{m} at {b:?}, prompt of {}",
                    prompt.len()
                );
                assert_eq!(st, st1, "{m} at {b:?}, prompt of {}", prompt.len());
                // Step accounting: a batch's steps up to this sequence's end, and its own.
                for gen in [&g, &g1] {
                    let t = gen.decode_times;
                    assert_eq!(t.steps, gen.output_ids.len() - 1, "{m} at {b:?}");
                    let parts =
                        t.forward_ms + t.sync_ms + t.observe_ms + t.compress_ms + t.sample_ms;
                    assert!(parts <= gen.decode_ms + 1e-6, "{m} at {b:?}: {t:?}");
                    assert!(t.forward_ms > 0.0, "{m} at {b:?}: {t:?}");
                }
            }
        }
    }
}

/// K, V rows `[L, d]` and metrics of every head right after prefill, nothing evicted (slot
/// order = position order).
struct Snapshot {
    k: Vec<Vec<Tensor>>,
    v: Vec<Vec<Tensor>>,
    metric: Vec<Vec<Vec<f32>>>,
}

fn snapshot(c: &PagedCache, seq: SeqId) -> Snapshot {
    let pool = c.pool();
    let heads = |f: &dyn Fn(usize, usize) -> Tensor| {
        (0..pool.layers())
            .map(|l| (0..pool.kv_heads()).map(|h| f(l, h)).collect())
            .collect()
    };
    Snapshot {
        k: heads(&|l, h| c.head_k(l, seq, h).unwrap()),
        v: heads(&|l, h| c.head_v(l, seq, h).unwrap()),
        metric: (0..pool.layers())
            .map(|l| {
                (0..pool.kv_heads())
                    .map(|h| pool.metrics(l, seq, h).unwrap())
                    .collect()
            })
            .collect(),
    }
}

/// Delegates to the method's hooks and checks the cache after every compression step.
struct Checked<'a> {
    /// Uncompressed prefill of the same prompt (recorded when `None` and `record`).
    reference: Option<Snapshot>,
    record: bool,
    inner: CompressHooks<'a>,
    budget: usize,
    kvcompress: bool,
    protected: usize,
    uniform: bool,
    /// The method compresses after decode steps too (otherwise budgets hold after prefill only).
    continual: bool,
    /// The metric after prefill depends on the budget (CriticalKV's stage 1), so it is not the
    /// uncompressed run's.
    budget_metric: bool,
    steps: usize,
}

impl Checked<'_> {
    fn check(&mut self, cache: &dyn CacheBackend, seq: SeqId) {
        self.steps += 1;
        let c = cache.as_paged().unwrap();
        if self.record {
            if self.steps == 1 {
                self.reference = Some(snapshot(c, seq));
            }
            return;
        }
        // Prompt K/V rows (and, right after prefill, metrics) moved with their positions.
        if let Some(r) = &self.reference {
            let pool = c.pool();
            for l in 0..pool.layers() {
                for h in 0..pool.kv_heads() {
                    let pos = pool.positions(l, seq, h).unwrap();
                    let prompt_len = r.metric[l][h].len() as u32;
                    let keep: Vec<u32> = (0..pos.len() as u32)
                        .filter(|&i| pos[i as usize] < prompt_len)
                        .collect();
                    let at: Vec<u32> = keep.iter().map(|&i| pos[i as usize]).collect();
                    let n = keep.len();
                    let keep = Tensor::from_vec(keep, n, &Device::Cpu).unwrap();
                    let at = Tensor::from_vec(at, n, &Device::Cpu).unwrap();
                    for (got, want) in [
                        (c.head_k(l, seq, h).unwrap(), &r.k[l][h]),
                        (c.head_v(l, seq, h).unwrap(), &r.v[l][h]),
                    ] {
                        let got = got.index_select(&keep, 0).unwrap();
                        let want = want.index_select(&at, 0).unwrap();
                        let d = (got - want)
                            .unwrap()
                            .abs()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap();
                        assert_eq!(d, 0.0, "K/V rows did not move with their positions");
                    }
                    if self.steps == 1 && !self.budget_metric {
                        let m = pool.metrics(l, seq, h).unwrap();
                        for (i, &p) in pos.iter().enumerate() {
                            assert_eq!(m[i], r.metric[l][h][p as usize], "metric of position {p}");
                        }
                    }
                }
            }
        }
        let pool = c.pool();
        pool.check().unwrap();
        let bs = pool.block_size();
        let mut slots = HashSet::new();
        for l in 0..pool.layers() {
            for h in 0..pool.kv_heads() {
                for s in pool.slots(l, seq, h).unwrap() {
                    assert!(slots.insert(s), "slot {s} aliased");
                }
                let pos = pool.positions(l, seq, h).unwrap();
                let uniq: HashSet<_> = pos.iter().collect();
                assert_eq!(uniq.len(), pos.len(), "repeated position in a head");
                // protected window (last positions) survives
                let n = cache.seq_len(seq);
                for p in n.saturating_sub(self.protected)..n {
                    assert!(uniq.contains(&(p as u32)), "protected position {p} evicted");
                }
                if self.uniform && (self.steps == 1 || self.continual) {
                    assert!(
                        pos.len() <= self.budget,
                        "head holds {} > {}",
                        pos.len(),
                        self.budget
                    );
                }
            }
        }
        if self.kvcompress {
            let allowed = allowed_blocks(self.budget, pool.layers(), pool.kv_heads(), bs);
            assert!(pool.seq_blocks(seq).unwrap() <= allowed);
        }
        let mem = c.memory();
        assert_eq!(mem.used_blocks + mem.free_blocks, mem.total_blocks);
        assert_eq!(mem.used_blocks, pool.seq_blocks(seq).unwrap());
    }
}

impl Hooks for Checked<'_> {
    fn prefill_probe(&self) -> Probe {
        self.inner.prefill_probe()
    }
    fn decode_probe(&self) -> Probe {
        self.inner.decode_probe()
    }
    fn observe(
        &mut self,
        layer: usize,
        probs: &Tensor,
        cache: &dyn CacheBackend,
        seq: SeqId,
    ) -> Result<()> {
        self.inner.observe(layer, probs, cache, seq)
    }
    fn after_prefill(&mut self, cache: &mut dyn CacheBackend, seq: SeqId) -> Result<()> {
        self.inner.after_prefill(cache, seq)?;
        self.check(cache, seq);
        Ok(())
    }
    fn after_step(&mut self, cache: &mut dyn CacheBackend, seq: SeqId) -> Result<()> {
        self.inner.after_step(cache, seq)?;
        self.check(cache, seq);
        Ok(())
    }
}

#[test]
fn compression_holds_budgets_and_keeps_the_pool_consistent() {
    for ts in specs() {
        let (_tmp, mut lm) = tiny(&ts);
        let ids = lm.prompt_ids(TEXT, false).unwrap();
        let cfg = lm.config().clone();
        let opts = small_opts();
        let mut totals = std::collections::HashMap::new();
        for m in METHODS.iter().filter(|m| **m != "full") {
            let spec = MethodSpec::parse(m).unwrap();
            let policy: Box<dyn Policy> = compress::build_policy(&spec, &cfg, &opts).unwrap();
            let budget = 12;
            let out_proj = lm.model.out_proj().unwrap();
            let budget_of = move |_: usize| Some(budget);
            let no_budget = |_: usize| None;
            let new_cache = || cpu_cache(&cfg, opts.block_size);
            let base = spec.base();
            let mut rec = Checked {
                reference: None,
                record: true,
                inner: CompressHooks::new(policy.as_ref(), cfg.num_hidden_layers, &no_budget)
                    .with_out_proj(out_proj.clone()),
                budget,
                kvcompress: false,
                protected: 0,
                uniform: false,
                continual: false,
                budget_metric: false,
                steps: 0,
            };
            engine::generate(&mut lm.model, &mut new_cache(), &ids, &params(1), &mut rec).unwrap();
            let mut cache = new_cache();
            let protected = match base {
                "kvcompress" => opts.protected_window,
                "streamingllm" | "tova" => 1, // the newest token is always kept
                // Nothing is protected (Expected Attention's sinks are the first positions).
                "random" | "knorm" | "keydiff" | "expected-attention" | "kvzip" => 0,
                "h2o" => 6, // recent half of the budget
                _ => opts.snap_window,
            };
            let mut hooks = Checked {
                reference: rec.reference.take(),
                record: false,
                inner: CompressHooks::new(policy.as_ref(), cfg.num_hidden_layers, &budget_of)
                    .with_out_proj(out_proj.clone()),
                budget,
                kvcompress: base == "kvcompress",
                protected,
                uniform: matches!(
                    base,
                    "snapkv"
                        | "streamingllm"
                        | "h2o"
                        | "tova"
                        | "random"
                        | "knorm"
                        | "keydiff"
                        | "expected-attention"
                ),
                continual: policy.continual(),
                budget_metric: policy.reweights(),
                steps: 0,
            };
            let g =
                engine::generate(&mut lm.model, &mut cache, &ids, &params(10), &mut hooks).unwrap();
            assert_eq!(g.output_ids.len(), 10);
            assert_eq!(hooks.steps, 10, "{m}"); // prefill + 9 decode steps
            let kept = &hooks.inner.kept;
            let total: usize = kept.per_head.iter().flatten().sum();
            assert!(
                total < ids.len() * cfg.num_hidden_layers * cfg.num_key_value_heads,
                "{m}"
            );
            // everything is back in the pool once the sequence is gone
            assert_eq!(cache.memory().used_blocks, 0, "{m}");
            totals.insert(m.to_string(), total);
        }
        // KVCrush spends the same memory as its base (token form: per-head budgets).
        for b in ["snapkv", "h2o", "ada-snapkv"] {
            assert_eq!(totals[b], totals[&format!("{b}+kvcrush")], "{b}+kvcrush");
        }
    }
}

#[test]
fn kvcompress_rate_budget_uses_the_floor_and_reports_achieved_rate() {
    let (_tmp, mut lm) = tiny(&TinySpec::default());
    let text = TEXT.repeat(3);
    let ids = lm.prompt_ids(&text, false).unwrap();
    assert!(ids.len() > 128, "{}", ids.len());
    let cfg = lm.config().clone();
    let mut r = compress::runner(
        &MethodSpec::parse("kvcompress").unwrap(),
        Some(Budget::Rate(8.0)),
        &cfg,
        &MethodOptions::default(),
    )
    .unwrap();
    let (_, st) = r.run(&mut lm.model, &ids, &params(4)).unwrap();
    assert_eq!(st.budget_tokens, Some(128));
    let allowed = allowed_blocks(128, 2, 2, 16) * 16;
    assert!(st.kept_kvs as usize <= allowed);
    assert!(st.achieved_rate() > 1.0 && st.achieved_rate() < 8.0);
    assert_eq!(st.kept_per_head.len(), 2);
    assert_eq!(
        st.kept_per_head.iter().flatten().sum::<usize>() as u64,
        st.kept_kvs
    );
}

#[test]
fn tiny_token_budgets_are_clamped_to_the_protected_window() {
    let (_tmp, mut lm) = tiny(&TinySpec::default());
    let ids = lm.prompt_ids(TEXT, false).unwrap();
    let cfg = lm.config().clone();
    for m in ["kvcompress", "snapkv", "snapkv+kvcrush"] {
        let mut r = compress::runner(
            &MethodSpec::parse(m).unwrap(),
            Some(Budget::Tokens(1)),
            &cfg,
            &small_opts(),
        )
        .unwrap();
        let (_, st) = r.run(&mut lm.model, &ids, &params(3)).unwrap();
        assert_eq!(st.budget_tokens, Some(4), "{m}");
    }
}

/// SmolLM2-135M (GQA 9/3, 30 layers) on a short prompt: with a budget above the sequence every
/// method reproduces the full cache; kvcompress at a small budget still runs.
/// The SmolLM2 GGUF of this checkout (`scripts/fetch-model.sh`, which scripts/test.sh runs);
/// `None`, with a note, where it was not fetched.
fn smollm2() -> Option<String> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.is_file() {
        eprintln!(
            "skipped: {} not present (scripts/fetch-model.sh)",
            p.display()
        );
        return None;
    }
    Some(p.to_string_lossy().into_owned())
}

#[test]
fn smollm2_short_prompt_matches_full_cache() {
    let Some(path) = smollm2() else {
        return;
    };
    let resolved = kvc::hub::resolve_model(&path, &kvc::hub::HubEnv::from_env()).unwrap();
    let mut lm = kvc::model::load(&resolved, &Device::Cpu, DType::F32).unwrap();
    let ids = lm
        .prompt_ids(
            "Name three colours of the rainbow and say why the sky is blue.",
            true,
        )
        .unwrap();
    let cfg = lm.config().clone();
    let p = params(12);
    let full = compress::runner(
        &MethodSpec::parse("full").unwrap(),
        None,
        &cfg,
        &Default::default(),
    )
    .unwrap()
    .run(&mut lm.model, &ids, &p)
    .unwrap()
    .0;
    for m in ["kvcompress", "snapkv", "h2o", "kvcompress+kvcrush"] {
        let (g, _) = compress::runner(
            &MethodSpec::parse(m).unwrap(),
            Some(Budget::Tokens(4096)),
            &cfg,
            &MethodOptions::default(),
        )
        .unwrap()
        .run(&mut lm.model, &ids, &p)
        .unwrap();
        assert_eq!(g.output_ids, full.output_ids, "{m}");
    }
    let (g, st) = compress::runner(
        &MethodSpec::parse("kvcompress").unwrap(),
        Some(Budget::Tokens(16)),
        &cfg,
        &small_opts(),
    )
    .unwrap()
    .run(&mut lm.model, &ids, &p)
    .unwrap();
    assert_eq!(g.output_ids.len(), 12);
    assert!(st.achieved_rate() > 1.5, "{st:?}");
}

/// KV-Compress's continual compression through the device path (`--compress-on device`: the
/// decode metric added where attention is computed, evictions chosen and made from the cache's
/// own metric tensors by the eviction kernels' twins on the CPU) gives token for token what the
/// host path gives (probabilities to the host, scored, planned, evicted), alone and batched,
/// with the same evictions counted; and a sequence really runs on that path.
#[test]
fn device_compression_equals_host_compression() {
    use kvc::compress::CompressOn;
    for ts in specs() {
        let (_tmp, mut lm) = tiny(&ts);
        let cfg = lm.config().clone();
        let long = lm.prompt_ids(TEXT, false).unwrap();
        let short = lm
            .prompt_ids(
                "a cat sat on the mat and looked at the dog for a while",
                false,
            )
            .unwrap();
        let p = params(24);
        let budgets = vec![
            vec![Some(Budget::Rate(2.0)), Some(Budget::Tokens(12))],
            vec![Some(Budget::Tokens(16)), Some(Budget::Rate(4.0))],
        ];
        let prompts: Vec<&[u32]> = vec![&long, &short];
        // KVCrush (a large share, so its picks change the prefill compression): its prefill
        // compression is planned on the host either way, its decode steps are KV-Compress's.
        for name in ["kvcompress", "kvcompress+kvcrush"] {
            let spec = MethodSpec::parse(name).unwrap();
            let run = |lm: &mut LoadedModel, on: CompressOn| {
                let opts = MethodOptions {
                    compress_on: on,
                    min_cache_tokens: 4,
                    kvcrush_ratio: 0.5,
                    ..small_opts()
                };
                let mut r = compress::runner(&spec, None, &cfg, &opts).unwrap();
                let batched: Vec<_> = r
                    .run_prompts(&mut lm.model, &whole(&prompts), &p, &budgets)
                    .unwrap()
                    .into_iter()
                    .flat_map(|res| res.unwrap())
                    .map(|g| {
                        let (g, st) = g.unwrap();
                        (g.output_ids, st)
                    })
                    .collect();
                let mut alone =
                    compress::runner(&spec, Some(Budget::Tokens(12)), &cfg, &opts).unwrap();
                let (g, st) = alone.run(&mut lm.model, &long, &p).unwrap();
                (batched, (g.output_ids, st))
            };
            let host = run(&mut lm, CompressOn::Host);
            let device = run(&mut lm, CompressOn::Device);
            assert_eq!(device, host, "{name}, layers {}", ts.layers);
            assert!(host.1 .0.len() > 8, "decoding ran: {:?}", host.1 .0);

            // The path is really taken: after prefill the sequence's metric lives in the cache's
            // tensors, decode probes nothing, and steps evict through evict_on_device.
            let opts = MethodOptions {
                kvcrush_ratio: 0.5,
                ..small_opts()
            };
            let policy = compress::build_policy(&spec, &cfg, &opts).unwrap();
            let budget_of = |_: usize| Some(12);
            let mut hooks = CompressHooks::new(policy.as_ref(), cfg.num_hidden_layers, &budget_of);
            let mut cache = cpu_cache(&cfg, opts.block_size);
            assert!(!cache.device_compression(), "host by default on the CPU");
            cache.set_device_compression(true);
            let seq = cache.add_sequence().unwrap();
            let pre = engine::prefill(
                &mut lm.model,
                &mut cache,
                seq,
                &long,
                &params(12),
                &mut hooks,
            )
            .unwrap();
            assert!(!cache.metric_on_device(seq), "prefill scores on the host");
            let g = engine::decode(
                &mut lm.model,
                &mut cache,
                seq,
                &pre,
                &[],
                &params(12),
                &mut hooks,
            )
            .unwrap();
            assert!(cache.metric_on_device(seq));
            assert_eq!(hooks.decode_probe(), Probe::None);
            assert!(hooks.kept.evicted > long.len() - 12, "{:?}", hooks.kept);
            assert_eq!(g.output_ids.len(), 12);
        }
    }
}

/// KV-Compress with a window longer than a prefill chunk and a summed metric without pooling
/// (the paper's KVC-full: the whole prompt, a buffer): the window is observed chunk by chunk
/// (`Hooks::prefill_probe_splits`), which must evict what one whole-window observation evicts:
/// the same kept KVs per head and the same greedy tokens.
#[test]
fn long_window_observed_in_query_blocks_equals_one_block() {
    let (_tmp, mut lm) = tiny(&TinySpec::default());
    let ids = lm.prompt_ids(&TEXT.repeat(3), false).unwrap();
    assert!(ids.len() > 64, "{}", ids.len());
    let cfg = lm.config().clone();
    let opts = MethodOptions {
        kvc_window: 4096,
        kvc_buffer: 3,
        max_pool: 0,
        compress_once: true,
        ..small_opts()
    };
    let run = |lm: &mut LoadedModel, chunk: usize| {
        let mut r = compress::runner(
            &MethodSpec::parse("kvcompress").unwrap(),
            Some(Budget::Rate(4.0)),
            &cfg,
            &opts,
        )
        .unwrap();
        let p = GenParams {
            prefill_chunk: chunk,
            ..params(12)
        };
        r.run(&mut lm.model, &ids, &p).unwrap()
    };
    let (whole, whole_st) = run(&mut lm, 4096);
    let (split, split_st) = run(&mut lm, 16);
    assert!(whole_st.kept_kvs < whole_st.prompt_kvs, "the budget evicts");
    assert_eq!(split_st.kept_per_head, whole_st.kept_per_head);
    assert_eq!(split.output_ids, whole.output_ids);
}

/// The question-agnostic protocol (`<method>@context-only`): the context alone is prefilled and
/// compressed, then the question is read (prefilled, or stepped by methods that work at decode
/// steps: `question_prefill_equals_its_decode_steps`). With nothing evicted it is the
/// full cache's generation of the whole prompt, token for token; a method keeps exactly what it
/// keeps when run on the context alone (the question never reaches its scores); one batch
/// (shared prefill, forks, `decode_batch`) equals each budget alone in its own copy
/// (`--kv-memory`, single-sequence `decode`); the question's steps are prefill time, not
/// decode steps.
#[test]
fn question_read_after_compression() {
    let ts = &specs()[1];
    let (_tmp, mut lm) = tiny(ts);
    let cfg = lm.config().clone();
    let ids = lm.prompt_ids(TEXT, false).unwrap();
    let q = 9;
    let context = &ids[..ids.len() - q];
    let split = compress::Prompt {
        ids: &ids,
        question: q,
    };
    let p = params(10);
    let full_spec = MethodSpec::parse("full").unwrap();
    let mut full = compress::runner(&full_spec, None, &cfg, &small_opts()).unwrap();
    let (whole, _) = full.run(&mut lm.model, &ids, &p).unwrap();
    let (after, st) = full
        .run_budgets(&mut lm.model, split, &p, &[None])
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(after.output_ids, whole.output_ids);
    let (a, b) = (after.first_logits.unwrap(), whole.first_logits.unwrap());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "first logits differ by {diff}");
    assert_eq!(st.prompt_tokens, context.len());
    assert!(after.prefill_times.question_ms > 0.0);

    let budgets = [
        Some(Budget::Rate(1.0)),
        Some(Budget::Rate(2.0)),
        Some(Budget::Tokens(12)),
    ];
    for m in [
        "snapkv",
        "kvcompress",
        "tova",
        "h2o",
        "streamingllm",
        "snapkv+kvcrush",
        "expected-attention",
    ] {
        let spec = MethodSpec::parse(m).unwrap();
        let mut r = compress::runner(&spec, None, &cfg, &small_opts()).unwrap();
        let batched = r
            .run_prompts(&mut lm.model, &[split], &p, &[budgets.to_vec()])
            .unwrap()
            .remove(0)
            .unwrap();
        let copies_opts = MethodOptions {
            kv_memory: Some(8 << 20),
            ..small_opts()
        };
        let mut r = compress::runner(&spec, None, &cfg, &copies_opts).unwrap();
        let copies = r.run_budgets(&mut lm.model, split, &p, &budgets).unwrap();
        for ((b, x), y) in budgets.iter().zip(batched).zip(copies) {
            let ((g, st), (g1, st1)) = (x.unwrap(), y.unwrap());
            assert_eq!(g.output_ids, g1.output_ids, "{m} at {b:?}: batch vs copy");
            assert_eq!(st, st1, "{m} at {b:?}: batch vs copy");
            assert_eq!(g.decode_times.steps, g.output_ids.len() - 1, "{m} at {b:?}");
            assert_eq!(
                g1.decode_times.steps,
                g1.output_ids.len() - 1,
                "{m} at {b:?}"
            );
            assert!(g.prefill_times.question_ms > 0.0, "{m} at {b:?}");
            if *b == Some(Budget::Rate(1.0)) {
                assert_eq!(g.output_ids, whole.output_ids, "{m}: nothing evicted");
                continue;
            }
            // What the prefill compression kept is what it keeps of the context alone.
            let mut alone = compress::runner(&spec, *b, &cfg, &small_opts()).unwrap();
            let (_, st_ctx) = alone.run(&mut lm.model, context, &params(1)).unwrap();
            assert!(st.kept_kvs < st.prompt_kvs, "{m} at {b:?}: nothing evicted");
            assert_eq!(
                st, st_ctx,
                "{m} at {b:?}: kept differs from the context's own"
            );
        }
    }
}

/// [`CompressHooks`] that read a question one decode step per token when `step` is set.
struct Stepped<'a> {
    inner: CompressHooks<'a>,
    step: bool,
}

impl Hooks for Stepped<'_> {
    fn prefill_probe(&self) -> Probe {
        self.inner.prefill_probe()
    }
    fn prefill_probe_splits(&self) -> bool {
        self.inner.prefill_probe_splits()
    }
    fn decode_probe(&self) -> Probe {
        self.inner.decode_probe()
    }
    fn observe(
        &mut self,
        layer: usize,
        probs: &Tensor,
        cache: &dyn CacheBackend,
        seq: SeqId,
    ) -> Result<()> {
        self.inner.observe(layer, probs, cache, seq)
    }
    fn after_prefill(&mut self, cache: &mut dyn CacheBackend, seq: SeqId) -> Result<()> {
        self.inner.after_prefill(cache, seq)
    }
    fn after_step(&mut self, cache: &mut dyn CacheBackend, seq: SeqId) -> Result<()> {
        self.inner.after_step(cache, seq)
    }
    fn steps_question(&self) -> bool {
        self.step || self.inner.steps_question()
    }
}

/// A question prefilled into the compressed cache (`engine::read_question`, for hooks that do
/// no work at decode steps) caches what one decode step per token caches: the same
/// generation and kept KVs, first logits equal up to rounding, whether it fits one prefill
/// chunk or takes three. Methods that observe or compress at decode steps keep stepping.
#[test]
fn question_prefill_equals_its_decode_steps() {
    let (_tmp, mut lm) = tiny(&specs()[1]);
    let cfg = lm.config().clone();
    let ids = lm.prompt_ids(TEXT, false).unwrap();
    let (context, question) = ids.split_at(ids.len() - 9);
    let budget_of = |_: usize| Some(12);
    let mut stepping = Vec::new();
    for m in [
        "snapkv",
        "knorm",
        "keydiff",
        "expected-attention",
        "kvcompress",
        "h2o",
    ] {
        let spec = MethodSpec::parse(m).unwrap();
        let policy = compress::build_policy(&spec, &cfg, &small_opts()).unwrap();
        for chunk in [4, 512] {
            let mut run = |step: bool| {
                let mut cache = cpu_cache(&cfg, 4);
                let seq = cache.add_sequence().unwrap();
                let inner = CompressHooks::new(policy.as_ref(), cfg.num_hidden_layers, &budget_of);
                let mut h = Stepped { inner, step };
                let p = GenParams {
                    prefill_chunk: chunk,
                    ..params(8)
                };
                let m = &mut lm.model;
                let pre = engine::prefill(m, &mut cache, seq, context, &p, &mut h).unwrap();
                let g = engine::decode(m, &mut cache, seq, &pre, question, &p, &mut h).unwrap();
                let kept: usize = (0..cfg.num_hidden_layers)
                    .flat_map(|l| (0..cfg.num_key_value_heads).map(move |kv| (l, kv)))
                    .map(|(l, kv)| cache.kv_len(l, seq, kv))
                    .sum();
                (g, kept, h.inner.steps_question())
            };
            let (read, kept, steps) = run(false);
            let (stepped, kept1, _) = run(true);
            assert_eq!(read.output_ids, stepped.output_ids, "{m}, chunk {chunk}");
            assert_eq!(kept, kept1, "{m}, chunk {chunk}");
            let (a, b) = (read.first_logits.unwrap(), stepped.first_logits.unwrap());
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(
                diff < 1e-4,
                "{m}, chunk {chunk}: first logits differ by {diff}"
            );
            if chunk == 4 && steps {
                stepping.push(m);
            }
        }
    }
    assert_eq!(stepping, ["kvcompress", "h2o"]);
}

/// Expected Attention's query statistics cover every prefill chunk: a prompt prefilled in
/// chunks of 5 or 16 tokens scores its keys as one chunk does (metrics equal up to rounding),
/// the scores are not flat, and the 4 sinks score the layer's maximum.
#[test]
fn expected_attention_chunked_prefill_equals_one_chunk() {
    let (_tmp, mut lm) = tiny(&specs()[1]);
    let ids = lm.prompt_ids(TEXT, false).unwrap();
    let cfg = lm.config().clone();
    let spec = MethodSpec::parse("expected-attention").unwrap();
    let policy = compress::build_policy(&spec, &cfg, &small_opts()).unwrap();
    let no_budget = |_: usize| None;
    let mut metrics = |chunk: usize| {
        let mut cache = cpu_cache(&cfg, 4);
        let seq = cache.add_sequence().unwrap();
        let mut h = CompressHooks::new(policy.as_ref(), cfg.num_hidden_layers, &no_budget);
        let p = GenParams {
            prefill_chunk: chunk,
            ..params(1)
        };
        engine::prefill(&mut lm.model, &mut cache, seq, &ids, &p, &mut h).unwrap();
        h.after_prefill(&mut cache, seq).unwrap();
        snapshot(&cache, seq).metric
    };
    let one = metrics(4096);
    for layer in &one {
        for head in layer {
            assert_eq!(head.len(), ids.len());
            let max = head.iter().copied().fold(f32::MIN, f32::max);
            let min = head.iter().copied().fold(f32::MAX, f32::min);
            assert!(max > min + 0.5, "flat scores {head:?}");
            assert!(head[..4].iter().all(|&s| s == max), "{head:?}");
        }
    }
    for chunk in [5, 16] {
        let split = metrics(chunk);
        for (a, b) in split
            .iter()
            .flatten()
            .flatten()
            .zip(one.iter().flatten().flatten())
        {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1e-2),
                "chunk {chunk}: {a} vs {b}"
            );
        }
    }
}

/// KVzip's texts from SmolLM2's own tokenizer and chat template: a chat prompt starts with the
/// template's prefix (so it is repeated behind the template's suffix and its prefix is not
/// scored), a raw one does not; the suffix closes the user turn and opens the answer.
#[test]
fn kvzip_texts_follow_smollm2s_template() {
    let Some(path) = smollm2() else {
        return;
    };
    let resolved = kvc::hub::resolve_model(&path, &kvc::hub::HubEnv::from_env()).unwrap();
    let lm = kvc::model::load(&resolved, &Device::Cpu, DType::F32).unwrap();
    let texts = compress::kvzip::RepeatTexts::new(&lm.tokenizer).unwrap();
    let chat = texts.chat.clone().unwrap();
    let tok = &lm.tokenizer;
    assert_eq!(
        tok.decode(&chat.suffix, false).unwrap(),
        "<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(tok
        .decode(&chat.prefix, false)
        .unwrap()
        .ends_with("<|im_end|>\n<|im_start|>user\n"));
    for text in [
        "Some special magic numbers are hidden",
        " leading space",
        "\nnewline",
    ] {
        let ids = lm.prompt_ids(text, true).unwrap();
        assert_eq!(texts.of(&ids), &chat, "{text:?}");
        let raw = lm.prompt_ids(text, false).unwrap();
        assert_eq!(texts.of(&raw), &texts.plain, "{text:?}");
    }
}
