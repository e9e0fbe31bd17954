//! The scale-out recipes kvc ships, checked without a cluster: the Kubernetes Indexed Job's pods
//! receive, through their shell, a `kvc eval` command line that kvc's own parser accepts, with
//! shard i of N for every index and N equal to the Job's completions and parallelism; the merge
//! Job reads the same results directory. The Slurm array script does the same with Slurm's
//! variables (its real run: scripts/slurm/test-local.sh).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use kvc::cli::{Cli, Command as Sub};
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(rel: &str) -> Yaml {
    let text = std::fs::read_to_string(root().join(rel)).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

/// The first container of a Job and its environment (`value` entries).
fn container(job: &Yaml) -> (&Yaml, BTreeMap<String, String>) {
    let c = &job["spec"]["template"]["spec"]["containers"][0];
    let env = c["env"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    (c, env)
}

/// What a POSIX shell makes of `script` (`exec kvc ...`) with `env`: the argv kvc receives.
fn shell_argv(script: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let probe = script.replacen("exec kvc", "printf '%s\\n' kvc", 1);
    assert_ne!(probe, script, "the pod must exec kvc: {script}");
    let out = Command::new("/bin/sh")
        .args(["-c", &probe])
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn eval_args(argv: &[String]) -> Box<kvc::cli::eval::EvalArgs> {
    match Cli::try_parse_from(argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .command
    {
        Sub::Eval(a) => a,
        other => panic!("not kvc eval: {other:?}"),
    }
}

#[test]
fn kubernetes_indexed_job_gives_each_pod_its_shard() {
    let job = load("deploy/kubernetes/kvc-sweep-job.yaml");
    assert_eq!(job["kind"].as_str(), Some("Job"));
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let (c, env) = container(&job);
    let n: i64 = env["KVC_SHARDS"].parse().unwrap();
    assert_eq!(
        spec["completions"].as_i64(),
        Some(n),
        "completions = KVC_SHARDS"
    );
    assert_eq!(
        spec["parallelism"].as_i64(),
        Some(n),
        "parallelism = KVC_SHARDS"
    );
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"].as_i64(), Some(1));
    let secret = c["env"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("HF_TOKEN"))
        .expect("HF_TOKEN");
    assert!(secret["valueFrom"]["secretKeyRef"]["name"]
        .as_str()
        .is_some());
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounts.contains(&"/results") && mounts.contains(&env["HF_HOME"].as_str()));
    let script = c["args"][0].as_str().unwrap();
    for i in 0..n {
        let mut env = env.clone();
        env.insert("JOB_COMPLETION_INDEX".into(), i.to_string());
        let argv = shell_argv(script, &env);
        let a = eval_args(&argv);
        let shard = a.output.shard.expect("--shard");
        assert_eq!(
            (shard.index, shard.count),
            (i as usize, n as usize),
            "{argv:?}"
        );
        assert_eq!(a.output.out, Path::new("/results").join(&env["SWEEP"]));
        assert_eq!(a.model.model, "llama-3.1-8b", "{argv:?}");
        assert!(a.output.no_progress);
    }
    // The merge Job merges the directory the shards wrote.
    let merge = load("deploy/kubernetes/kvc-merge-job.yaml");
    let (mc, menv) = container(&merge);
    assert_eq!(menv["SWEEP"], env["SWEEP"], "the two Jobs name one sweep");
    let argv = shell_argv(mc["args"][0].as_str().unwrap(), &menv);
    match Cli::try_parse_from(&argv).unwrap().command {
        Sub::Merge(m) => assert_eq!(m.out, Path::new("/results").join(&env["SWEEP"])),
        other => panic!("not kvc merge: {other:?}"),
    }
}

#[test]
fn slurm_array_task_runs_its_shard() {
    let script = std::fs::read_to_string(root().join("scripts/slurm/kvc-array.sbatch")).unwrap();
    let exec: String = script
        .lines()
        .skip_while(|l| !l.starts_with("exec "))
        .map(|l| l.trim_end_matches('\\').trim().to_string())
        .collect::<Vec<_>>()
        .join(" ")
        .replacen("exec \"${KVC_BIN:-kvc}\"", "exec kvc", 1);
    let env: BTreeMap<String, String> = [
        ("KVC_OUT", "/shared/run"),
        ("KVC_ARGS", "-m mistral-7b --rates 1,8"),
        ("SLURM_ARRAY_TASK_ID", "2"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into();
    let a = eval_args(&shell_argv(&exec, &env));
    let shard = a.output.shard.unwrap();
    assert_eq!(
        (shard.index, shard.count, a.model.model.as_str()),
        (2, 3, "mistral-7b")
    );
    assert_eq!(a.output.out, Path::new("/shared/run"));
}

#[test]
fn nightly_workflow_matrix_covers_every_shard_of_the_nightly_sweep() {
    let wf = load("deploy/github-actions/nightly-sharded.yml");
    let n: usize = wf["env"]["SHARDS"].as_str().unwrap().parse().unwrap();
    let matrix: Vec<i64> = wf["jobs"]["shard"]["strategy"]["matrix"]["shard"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(
        matrix,
        (0..n as i64).collect::<Vec<_>>(),
        "one job per shard"
    );
    let step = wf["jobs"]["shard"]["steps"]
        .as_vec()
        .unwrap()
        .iter()
        .find_map(|s| s["run"].as_str().filter(|r| r.contains("--shard")))
        .unwrap();
    for i in 0..n {
        let script = format!(
            "exec {}",
            step.replace("target/release/kvc", "kvc")
                .replace("${{ matrix.shard }}", &i.to_string())
        );
        let env: BTreeMap<String, String> = [
            (
                "NIGHTLY_ARGS".to_string(),
                wf["env"]["NIGHTLY_ARGS"].as_str().unwrap().to_string(),
            ),
            ("SHARDS".to_string(), n.to_string()),
        ]
        .into();
        let a = eval_args(&shell_argv(&script, &env));
        assert_eq!(a.output.shard.map(|s| (s.index, s.count)), Some((i, n)));
        assert_eq!(a.output.out, Path::new("results/nightly"));
    }
    // The same sweep as scripts/nightly.sh, so the committed baseline applies.
    let nightly = std::fs::read_to_string(root().join("scripts/nightly.sh")).unwrap();
    assert!(nightly.contains(wf["env"]["NIGHTLY_ARGS"].as_str().unwrap()));
}
