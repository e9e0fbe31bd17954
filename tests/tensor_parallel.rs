//! Tensor parallelism on the CPU (issue 29): ranks as threads of one process
//! ([`ThreadComm`]), each loading its part of a tiny checkpoint, against the whole model on
//! one rank. Judge: the unsharded forward. Logits agree to f32 rounding (the row-parallel
//! sums add the ranks' partial sums in another order) and greedy ids are identical, through
//! the contiguous cache and through the paged cache with each rank's kv-heads.
mod common;

use candle_core::{DType, Device, Tensor};
use kvc::cuda::comm::{Comm, ThreadComm};
use kvc::engine::{self, GenParams, NoHooks};
use kvc::hub::{ModelSource, ResolvedModel};
use kvc::kvcache::contiguous::ContiguousCache;
use kvc::kvcache::paged::{PagedCache, PagedSpec};
use kvc::kvcache::{CacheBackend, Probe};
use kvc::model::tiny::{write_hf_dir, TinySpec};
use kvc::model::{Fp8Mode, LoadedModel};
use std::sync::Arc;

fn resolved(dir: &std::path::Path) -> ResolvedModel {
    ResolvedModel {
        source: ModelSource::HfDir(dir.into()),
        name: "tiny".into(),
        hub_id: None,
        revision: None,
    }
}

fn load(dir: &std::path::Path, comm: Option<ThreadComm>) -> LoadedModel {
    let comm = comm.map(|c| Arc::new(c) as Arc<dyn Comm>);
    kvc::model::load_shard(
        &resolved(dir),
        &Device::Cpu,
        DType::F32,
        comm,
        Fp8Mode::Auto,
    )
    .unwrap()
}

/// `f(rank's model)` on one thread per rank of a `world`-rank group; results in rank order.
fn on_ranks<T: Send>(
    dir: &std::path::Path,
    world: usize,
    f: impl Fn(&mut LoadedModel) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(world)
            .into_iter()
            .map(|c| s.spawn(|| f(&mut load(dir, Some(c)))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn spec(tie: bool) -> TinySpec {
    TinySpec {
        heads: 8,
        kv_heads: 4,
        hidden: 64,
        intermediate: 96,
        layers: 3,
        tie_embeddings: tie,
        scale: 0.4,
        ..Default::default()
    }
}

fn params() -> GenParams {
    GenParams {
        max_new_tokens: 24,
        stop_ids: Default::default(),
        min_new_tokens: 0,
        prefill_chunk: 7,
        max_context: 2048,
    }
}

fn prompt(vocab: usize) -> Vec<u32> {
    (0..37u32).map(|i| (i * 61 + 5) % vocab as u32).collect()
}

/// Greedy ids of `ids` through `cache`.
fn greedy(lm: &mut LoadedModel, cache: &mut dyn CacheBackend, ids: &[u32]) -> Vec<u32> {
    engine::generate(&mut lm.model, cache, ids, &params(), &mut NoHooks)
        .unwrap()
        .output_ids
}

fn logits(lm: &mut LoadedModel, cache: &mut dyn CacheBackend, ids: &[u32]) -> Vec<f32> {
    let seq = cache.add_sequence().unwrap();
    let l: Tensor = lm
        .model
        .forward(ids, seq, cache, Probe::None, &mut |_, _, _| Ok(()))
        .unwrap();
    l.to_vec1().unwrap()
}

/// Tied and untied heads, 2 and 4 ranks (the tiny vocabulary does not divide: the last rank's
/// slice is padded): every rank's logits equal the whole model's to f32 rounding, and every
/// rank decodes the whole model's greedy ids.
#[test]
fn ranks_equal_the_whole_model_through_the_contiguous_cache() {
    for tie in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        write_hf_dir(tmp.path(), &spec(tie), 1).unwrap();
        let mut whole = load(tmp.path(), None);
        let cfg = whole.model.cfg.clone();
        let ids = prompt(cfg.vocab_size);
        assert_ne!(
            cfg.vocab_size % 4,
            0,
            "the test wants a vocabulary that does not divide"
        );
        let layers = cfg.num_hidden_layers;
        let want_logits = logits(&mut whole, &mut ContiguousCache::new(layers), &ids);
        let want = greedy(&mut whole, &mut ContiguousCache::new(layers), &ids);
        for world in [2, 4] {
            let got = on_ranks(tmp.path(), world, |lm| {
                assert_eq!(lm.model.rank_config().num_key_value_heads, 4 / world);
                let l = logits(lm, &mut ContiguousCache::new(layers), &ids);
                (l, greedy(lm, &mut ContiguousCache::new(layers), &ids))
            });
            for (rank, (l, out)) in got.iter().enumerate() {
                // Errors against the logits' scale: f32 rounding of sums over 64-96 terms.
                let scale = want_logits.iter().fold(0f32, |m, x| m.max(x.abs()));
                let worst = l
                    .iter()
                    .zip(&want_logits)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    worst <= 1e-5 * scale,
                    "tie {tie} world {world} rank {rank}: {worst} of {scale}"
                );
                assert_eq!(out, &want, "tie {tie} world {world} rank {rank}");
                assert_eq!(l, &got[0].0, "ranks hold the same bits");
            }
        }
    }
}

/// Each rank's paged cache holds only its kv-heads (built from `rank_config`) and gives the
/// contiguous cache's greedy ids.
#[test]
fn ranks_decode_through_paged_caches_of_their_heads() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &spec(true), 1).unwrap();
    let mut whole = load(tmp.path(), None);
    let layers = whole.model.cfg.num_hidden_layers;
    let ids = prompt(whole.model.cfg.vocab_size);
    let want = greedy(&mut whole, &mut ContiguousCache::new(layers), &ids);
    let got = on_ranks(tmp.path(), 2, |lm| {
        let cfg = lm.model.rank_config();
        let spec = PagedSpec {
            layers,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            block_size: 4,
            dtype: DType::F32,
            device: Device::Cpu,
        };
        greedy(lm, &mut PagedCache::new(spec, 256).unwrap(), &ids)
    });
    assert!(got.iter().all(|g| g == &want), "{got:?} vs {want:?}");
}

/// A degree that does not divide the heads is refused at load with the fix.
#[test]
fn a_degree_that_does_not_divide_the_heads_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &spec(true), 1).unwrap();
    let comm = Arc::new(ThreadComm::group(3).remove(0)) as Arc<dyn Comm>;
    let e = kvc::model::load_shard(
        &resolved(tmp.path()),
        &Device::Cpu,
        DType::F32,
        Some(comm),
        Fp8Mode::Auto,
    )
    .err()
    .expect("3 ranks cannot share 8 heads");
    let msg = e.to_string();
    assert!(
        msg.contains("attention heads (8)") && msg.contains("3 tensor-parallel"),
        "{msg}"
    );
}

/// A GGUF's q/k rows are un-permuted before a rank takes its heads' rows: 2 ranks of a GGUF
/// decode the whole GGUF model's greedy ids.
#[test]
fn ranks_of_a_gguf_equal_the_whole_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    kvc::model::tiny::write_gguf(&path, &spec(true), candle_core::quantized::GgmlDType::F32)
        .unwrap();
    let src = ResolvedModel {
        source: ModelSource::Gguf(path.clone()),
        ..resolved(tmp.path())
    };
    let load = |comm: Option<Arc<dyn Comm>>| {
        kvc::model::load_shard(&src, &Device::Cpu, DType::F32, comm, Fp8Mode::Auto).unwrap()
    };
    let mut whole = load(None);
    let layers = whole.model.cfg.num_hidden_layers;
    let ids = prompt(whole.model.cfg.vocab_size);
    let gen = |lm: &mut LoadedModel| greedy(lm, &mut ContiguousCache::new(layers), &ids);
    let want = gen(&mut whole);
    let got: Vec<Vec<u32>> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(2)
            .into_iter()
            .map(|c| s.spawn(|| gen(&mut load(Some(Arc::new(c))))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(got.iter().all(|g| g == &want), "{got:?} vs {want:?}");
}

fn kvc_generate(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kvc"))
        .args(["generate", "-m"])
        .arg(dir)
        .args([
            "--device",
            "cpu",
            "--prompt",
            "the cat sat on",
            "--max-new-tokens",
            "16",
        ])
        .args(["--json"])
        .args(extra)
        .output()
        .unwrap()
}

fn output_ids(out: &std::process::Output) -> Vec<u64> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["output_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// `kvc generate --tensor-parallel 2` and `--tp 4` (threads of the CPU) print the ids of the
/// whole model, through both caches; a degree that does not divide the kv-heads exits 2 with
/// the fix, before any generation.
#[test]
fn generate_tensor_parallel_equals_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &spec(false), 1).unwrap();
    for cache in ["contiguous", "paged"] {
        let want = output_ids(&kvc_generate(tmp.path(), &["--cache", cache]));
        assert_eq!(want.len(), 16);
        for tp in [["--tensor-parallel", "2"], ["--tp", "4"]] {
            let got = output_ids(&kvc_generate(
                tmp.path(),
                &[&["--cache", cache][..], &tp].concat(),
            ));
            assert_eq!(got, want, "{cache} {tp:?}");
        }
    }
    let bad = kvc_generate(tmp.path(), &["--tp", "3"]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("do not divide among 3 tensor-parallel ranks"),
        "{err}"
    );
}

/// `kvc bench-model --tp 2` times the group: one row per prompt length, labelled with the
/// degree, from rank 0 alone (the other rank prints nothing).
#[test]
fn bench_model_tensor_parallel_prints_rank_0s_rows() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &spec(true), 1).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvc"))
        .args(["bench-model", "-m"])
        .arg(tmp.path())
        .args([
            "--device",
            "cpu",
            "--prompt-lens",
            "20,40",
            "--decode-tokens",
            "4",
        ])
        .args(["--repeats", "1", "--json", "--tp", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for (r, n) in rows.iter().zip([20, 40]) {
        assert_eq!(
            (r["tensor_parallel"].as_u64(), r["prompt_tokens"].as_u64()),
            (Some(2), Some(n))
        );
        assert!(r["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
}

/// Compression under tensor parallelism (docs/design.md, "Tensor parallel"): KV-Compress's
/// ranks agree on the one-rank eviction through the exchange (after prefill and after every
/// decode step, continual compression), SnapKV's heads plan alone, CriticalKV reweights by
/// each rank's columns of W_o. At 2 and 4 ranks every method keeps the one-rank KVs per
/// (layer, kv-head) and decodes the one-rank greedy ids (f32).
#[test]
fn compression_over_ranks_keeps_the_one_rank_kvs_per_head() {
    use kvc::compress::{self, MethodOptions, MethodSpec};
    use kvc::kvcache::budget::Budget;
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &spec(false), 1).unwrap();
    let opts = MethodOptions {
        block_size: 4,
        protected_window: 8,
        kvc_window: 8,
        snap_window: 8,
        ..MethodOptions::default()
    };
    let ids: Vec<u32> = (0..120u32).map(|i| (i * 61 + 5) % 97).collect();
    let run = |lm: &mut LoadedModel, method: &str| {
        let m = MethodSpec::parse(method).unwrap();
        let budget = Some(Budget::Tokens(24));
        let mut r = compress::runner(&m, budget, lm.config(), &opts).unwrap();
        let (g, stats) = r.run(&mut lm.model, &ids, &params()).unwrap();
        (g.output_ids, stats.kept_per_head)
    };
    for method in ["kvcompress", "snapkv", "snapkv+criticalkv"] {
        let want = run(&mut load(tmp.path(), None), method);
        let kept: usize = want.1.iter().flatten().sum();
        assert!(kept < 12 * ids.len(), "{method}: nothing was evicted");
        if method == "kvcompress" {
            let per_head: Vec<usize> = want.1.iter().flatten().copied().collect();
            assert!(
                per_head.iter().any(|&k| k != per_head[0]),
                "KV-Compress's rates should differ by head: {per_head:?}"
            );
        }
        for world in [2, 4] {
            for (rank, got) in on_ranks(tmp.path(), world, |lm| run(lm, method))
                .into_iter()
                .enumerate()
            {
                assert_eq!(got, want, "{method} world {world} rank {rank}");
            }
        }
    }
}

fn kvc_eval(
    model: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    kvc_eval_cmd(model, out, extra).output().unwrap()
}

fn kvc_eval_cmd(
    model: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kvc"));
    c.args(["eval", "--model"])
        .arg(model)
        .arg("--data-dir")
        .arg(model.join("data"))
        .args(["--tasks", "hotpotqa", "--methods", "kvcompress,snapkv"])
        .args(["--rates", "1,2,4", "--max-new-tokens", "6"])
        .args(["--min-cache-tokens", "8", "--block-size", "4"])
        .args(["--protected-window", "8", "--kvc-window", "8"])
        .args(["--dump-allocation", "--no-progress", "--quiet", "--out"])
        .arg(out)
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("KVC_MODEL")
        .env_remove("KVC_DATA_DIR");
    c
}

/// Every prediction row under `dir` (relative path, rows without their timings).
fn pred_rows(dir: &std::path::Path) -> Vec<(String, Vec<serde_json::Value>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "jsonl") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rows = std::fs::read_to_string(&p)
                .unwrap()
                .lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    let o = v.as_object_mut().unwrap();
                    o.retain(|k, _| !k.ends_with("_ms") && !k.ends_with("_times"));
                    v
                })
                .collect();
            (p.strip_prefix(dir).unwrap().display().to_string(), rows)
        })
        .collect()
}

/// A tiny checkpoint (4 kv-heads) with three hotpotqa rows in `<dir>/tiny/data`.
fn eval_fixture() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_hf_dir(&model, &spec(false), 1).unwrap();
    std::fs::create_dir_all(model.join("data")).unwrap();
    std::fs::write(
        model.join("data/hotpotqa.jsonl"),
        common::subset_rows("hotpotqa", 3),
    )
    .unwrap();
    (tmp, model)
}

fn ok(o: std::process::Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `kvc eval --tensor-parallel 2` writes the rows of one rank (predictions, kept KVs per
/// head), resumes a run one rank began, and refuses a method with no exchange by name.
#[test]
fn eval_tensor_parallel_writes_the_one_rank_rows() {
    let (tmp, model) = eval_fixture();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(kvc_eval(&model, &one, &[]));
    // Rank count 2 resumes a tree whose first sample one rank wrote.
    ok(kvc_eval(&model, &two, &["--limit", "1"]));
    ok(kvc_eval(&model, &two, &["--tensor-parallel", "2"]));
    let want = pred_rows(&one);
    assert_eq!(want.len(), 5, "full, kvcompress x2, snapkv x2: {want:?}");
    assert!(want.iter().all(|(_, rows)| rows.len() == 3));
    assert_eq!(pred_rows(&two), want);
    let bad = kvc_eval(
        &model,
        &tmp.path().join("bad"),
        &["--tp", "2", "--methods", "ada-snapkv"],
    );
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("`ada-snapkv` does not run under --tensor-parallel")
            && err.contains("kvcompress"),
        "{err}"
    );
}

/// One rank's failed generation (out of memory, simulated on rank 1 after 4 rows) stops the
/// group with an error naming the fix, instead of a failed row or a hang; the rows finished
/// before it are kept, and a rerun completes the one-rank rows.
#[test]
fn eval_tensor_parallel_rank_failure_stops_the_group_and_resumes() {
    let (tmp, model) = eval_fixture();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(kvc_eval(&model, &one, &[]));
    let failed = kvc_eval_cmd(&model, &two, &["--tp", "2"])
        .env("KVC_EVAL_TEST_FAIL_RANK", "1:4")
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(2));
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("tensor-parallel rank 1")
            && err.contains("a failed sample stops a tensor-parallel run")
            && err.contains("rerun to resume"),
        "{err}"
    );
    let kept: usize = pred_rows(&two).iter().map(|(_, r)| r.len()).sum();
    assert!((4..15).contains(&kept), "{kept} rows kept of 15");
    assert!(pred_rows(&two)
        .iter()
        .flat_map(|(_, r)| r)
        .all(|r| r.get("error").is_none()));
    ok(kvc_eval(&model, &two, &["--tp", "2"]));
    assert_eq!(pred_rows(&two), pred_rows(&one));
}

fn kvc_bench(
    model: &std::path::Path,
    out: &std::path::Path,
    kv_memory: &str,
    tp: &str,
) -> Vec<serde_json::Value> {
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kvc"))
        .args(common::bench_args(m, o))
        .args([
            "--json",
            "--rates",
            "4",
            "--input-lens",
            "32",
            "--output-len",
            "6",
        ])
        .args(["--num-prompts", "4", "--schedule", "both"])
        .args(["--kv-memory", kv_memory, "--tp", tp])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `kvc bench --tp 2` with each rank's pool holding its half of the heads (half the bytes):
/// the ranks agree on one schedule (no rank waits in a collective the others skipped), every
/// request finishes with all its tokens, and here the schedule is the one-rank schedule
/// (batch sizes, steps, preemptions) for the full cache and both KV-Compress schedules.
#[test]
fn bench_tensor_parallel_runs_one_schedule() {
    let (tmp, model) = eval_fixture();
    let one = kvc_bench(&model, &tmp.path().join("one"), "60000", "1");
    let two = kvc_bench(&model, &tmp.path().join("two"), "30000", "2");
    assert_eq!(one.len(), two.len());
    let key = |r: &serde_json::Value| {
        (
            r["method"].as_str().unwrap().to_string(),
            r["rate"].as_f64().unwrap().to_string(),
        )
    };
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(key(a), key(b));
        for col in ["num_requests", "total_num_tokens"] {
            assert_eq!(a[col], b[col], "{col} {:?}", key(a));
        }
        for col in ["max_batch", "decode_steps", "preemptions"] {
            assert_eq!(a[col], b[col], "{col} {:?}", key(a));
        }
    }
}

/// FP8 matmuls over ranks (q/k/v and gate/up cut by rows with their rows' scales, o and down
/// by columns with every row's scale): the ranks' logits equal each other and are closer to
/// one rank's FP8 logits than those are to the dequantized weights'. Not bit for bit: a rank
/// quantizes its own part of o's and down's inputs (its own amax).
#[test]
fn fp8_ranks_track_one_rank() {
    use kvc::model::llama::{Fp8Weights, Llama};
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &spec(false), 1).unwrap();
    common::fp8_quantize(&tmp.path().join("model.safetensors"), true);
    let cfg = kvc::model::config::load_hf_config(tmp.path()).unwrap();
    let ids = prompt(cfg.vocab_size);
    let fp8_logits = |comm: Option<ThreadComm>, fp8: bool| -> Vec<f32> {
        let mut src = kvc::model::weights::WeightSource::safetensors_dir(tmp.path()).unwrap();
        let comm = comm.map(|c| Arc::new(c) as Arc<dyn Comm>);
        let mut m = Llama::load_shard(&cfg, &mut src, DType::F32, &Device::Cpu, comm, fp8).unwrap();
        assert_eq!(m.fp8 == Fp8Weights::Matmul, fp8);
        let mut cache = ContiguousCache::new(cfg.num_hidden_layers);
        let seq = cache.add_sequence().unwrap();
        m.forward(&ids, seq, &mut cache, Probe::None, &mut |_, _, _| Ok(()))
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let one = fp8_logits(None, true);
    let deq = fp8_logits(None, false);
    for world in [2, 4] {
        let ranks: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = ThreadComm::group(world)
                .into_iter()
                .map(|c| s.spawn(|| fp8_logits(Some(c), true)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            ranks.iter().all(|r| r == &ranks[0]),
            "world {world}: ranks differ"
        );
        let cos = |a: &[f32], b: &[f32]| {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            dot / norm(a) / norm(b)
        };
        // The split moves the logits less than FP8's activation rounding itself does (0.97
        // and 0.95 against 0.85 here; a scale on the wrong rows gives ~0.2).
        let (split, rounding) = (cos(&ranks[0], &one), cos(&deq, &one));
        assert!(
            split > rounding,
            "world {world}: cosine {split} to one rank, FP8 against dequantized {rounding}"
        );
    }
}
