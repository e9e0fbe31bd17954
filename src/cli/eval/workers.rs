//! `kvc eval --devices D1,D2,...`: one worker process per device, worker i running shard i of N
//! (`--shard i/N --device Di`, the rest of the command line as given) with its output in
//! `OUT/shards/worker-i-of-N.log`; one progress bar for all (rows written of the rows the
//! shards' manifests plan); then `kvc merge OUT`.
//!
//! A worker that dies (exit 2, a signal: out of memory, an Xid, a kill) loses only the samples
//! in flight: its shard is started again from its files, as long as each attempt wrote rows; an
//! attempt that wrote nothing gives the shard up (a deterministic error, e.g. a bad flag), named
//! with its log. A worker's exit 1 (some samples recorded as failed) is final, as for one run.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::eval::shard::{Manifest, Shard};
use crate::util::Status;

/// `--devices`: `all` (every visible CUDA device) or a comma-separated list of `cpu`, `cuda`,
/// `cuda:N` (a device may repeat: two workers on one GPU, or `cpu,cpu`).
pub fn parse_devices(spec: &str) -> anyhow::Result<Vec<String>> {
    if spec.trim() == "all" {
        let n = crate::cuda::device_count();
        anyhow::ensure!(
            n > 0,
            "--devices all: no CUDA device is visible (kvc built without --features cuda, or no driver); list devices instead, e.g. --devices cpu,cpu"
        );
        return Ok((0..n).map(|i| format!("cuda:{i}")).collect());
    }
    let devices: Vec<String> = spec.split(',').map(|d| d.trim().to_string()).collect();
    for d in &devices {
        let ok = d == "cpu"
            || d == "cuda"
            || d.strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        anyhow::ensure!(
            ok,
            "--devices {spec}: `{d}` is not a device (cpu, cuda, cuda:N, or all)"
        );
    }
    Ok(devices)
}

/// The command line a worker gets: this one without the flags the parent decides (`--devices`,
/// `--device`, `--shard`) or owns (`--no-progress`, `--quiet`, `--json`).
fn worker_args(argv: &[String]) -> Vec<String> {
    const WITH_VALUE: [&str; 3] = ["--devices", "--device", "--shard"];
    const ALONE: [&str; 4] = ["--no-progress", "--quiet", "-q", "--json"];
    let mut out = Vec::new();
    let mut skip = false;
    for a in argv {
        if std::mem::take(&mut skip) {
            continue;
        }
        if WITH_VALUE.contains(&a.as_str()) {
            skip = true;
        } else if !ALONE.contains(&a.as_str())
            && !WITH_VALUE.iter().any(|f| a.starts_with(&format!("{f}=")))
        {
            out.push(a.clone());
        }
    }
    out
}

/// How often the progress line recounts the rows written.
const COUNT_EVERY: Duration = Duration::from_secs(3);

struct Worker {
    shard: Shard,
    device: String,
    log: PathBuf,
    child: Option<Child>,
    /// Rows in the shard's files when the running attempt started.
    rows_at_start: usize,
    restarts: usize,
    /// Final exit code (0 or 1), or the reason it was given up.
    outcome: Option<Result<i32, String>>,
}

impl Worker {
    fn spawn(&mut self, exe: &Path, args: &[String], out: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.rows_at_start = rows_written(&self.shard.tree(out));
        let child = Command::new(exe)
            .args(args)
            .args([
                "--shard",
                &format!("{}/{}", self.shard.index, self.shard.count),
            ])
            .args(["--device", &self.device, "--no-progress"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }
}

/// Run the sweep of `argv` (the `kvc eval` command line after the program name) on `devices`
/// into `out`, then merge it. Exit status: 0, or 1 when samples failed; an error when a shard
/// was given up (named, with its log) or the merge fails.
pub fn run(
    argv: &[String],
    devices: &[String],
    out: &Path,
    quiet: bool,
    no_progress: bool,
) -> anyhow::Result<Status> {
    let exe = std::env::current_exe()?;
    let args = worker_args(argv);
    let n = devices.len();
    std::fs::create_dir_all(out.join("shards"))?;
    let mut workers: Vec<Worker> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| Worker {
            shard: Shard { index: i, count: n },
            device: d.clone(),
            log: out.join("shards").join(format!("worker-{i}-of-{n}.log")),
            child: None,
            rows_at_start: 0,
            restarts: 0,
            outcome: None,
        })
        .collect();
    if !quiet {
        eprintln!(
            "{n} workers: {} (logs in {})",
            workers
                .iter()
                .map(|w| format!("shard {}/{n} on {}", w.shard.index, w.device))
                .collect::<Vec<_>>()
                .join(", "),
            out.join("shards").display()
        );
    }
    for w in &mut workers {
        w.spawn(&exe, &args, out)?;
    }
    let (stop, _) = super::ctrl_c();
    let bar = progress_bar(quiet || no_progress);
    // Workers are polled often; the rows (a read of every prediction file) counted every
    // few seconds, and only when the line is shown.
    let mut counted = std::time::Instant::now() - COUNT_EVERY;
    while workers.iter().any(|w| w.outcome.is_none()) {
        std::thread::sleep(Duration::from_millis(300));
        for w in &mut workers {
            poll(w, &exe, &args, out, stop.load(Ordering::SeqCst), quiet)?;
        }
        if !bar.is_hidden() && counted.elapsed() >= COUNT_EVERY {
            counted = std::time::Instant::now();
            let rows: usize = workers
                .iter()
                .map(|w| rows_written(&w.shard.tree(out)))
                .sum();
            let done = workers.iter().filter(|w| w.outcome.is_some()).count();
            if bar.length().is_none() {
                if let Some(total) = planned_rows(&workers, out) {
                    show_total(&bar, total);
                }
            }
            match bar.length() {
                Some(total) => {
                    bar.set_position((rows as u64).min(total));
                    bar.set_message(format!("{done}/{n} workers finished"));
                }
                None => {
                    bar.set_message(format!("{rows} rows written, {done}/{n} workers finished"))
                }
            }
        }
        bar.tick();
    }
    bar.finish_and_clear();
    finish(&workers, out)
}

/// Check one running worker: record its end, or start its shard again after a death that
/// made progress.
fn poll(
    w: &mut Worker,
    exe: &Path,
    args: &[String],
    out: &Path,
    stopping: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    let Some(child) = w.child.as_mut() else {
        return Ok(());
    };
    let Some(status) = child.try_wait()? else {
        return Ok(());
    };
    w.child = None;
    let code = status.code();
    if let Some(c @ (0 | 1)) = code {
        w.outcome = Some(Ok(c));
        return Ok(());
    }
    let how = code.map_or("a signal".to_string(), |c| format!("exit {c}"));
    let progressed = rows_written(&w.shard.tree(out)) > w.rows_at_start;
    if stopping || !progressed {
        w.outcome = Some(Err(format!(
            "shard {}/{} on {} ended with {how}{}: see {}",
            w.shard.index,
            w.shard.count,
            w.device,
            if stopping {
                " (interrupted)"
            } else {
                " without writing a row"
            },
            w.log.display()
        )));
        return Ok(());
    }
    w.restarts += 1;
    if !quiet {
        eprintln!(
            "worker {} on {} ended with {how}; starting shard {}/{} again from its files (restart {})",
            w.shard.index, w.device, w.shard.index, w.shard.count, w.restarts
        );
    }
    w.spawn(exe, args, out)
}

/// After every worker: give-ups are the error; else merge and score.
fn finish(workers: &[Worker], out: &Path) -> anyhow::Result<Status> {
    let given_up: Vec<&String> = workers
        .iter()
        .filter_map(|w| w.outcome.as_ref().and_then(|o| o.as_ref().err()))
        .collect();
    if !given_up.is_empty() {
        anyhow::bail!(
            "{}; the other shards' files are kept: rerun the same command to finish, then it merges",
            given_up.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; ")
        );
    }
    let merged = crate::cli::merge::run(crate::cli::merge::MergeArgs {
        out: out.to_path_buf(),
        json: false,
    })?;
    let failed = workers.iter().any(|w| matches!(w.outcome, Some(Ok(1))));
    Ok(if failed { Status::Failed } else { merged })
}

/// The rows of the whole sweep, once every worker has written its shard's manifest (each
/// does after selecting its samples, before the first run).
fn planned_rows(workers: &[Worker], out: &Path) -> Option<usize> {
    workers
        .iter()
        .map(|w| Manifest::read(&w.shard.tree(out)).ok().and_then(|m| m.rows))
        .sum()
}

/// Turn the spinner into a bar of `total` rows.
fn show_total(bar: &ProgressBar, total: usize) {
    bar.set_length(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} rows {msg} eta {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.reset_eta();
}

/// A spinner until the sweep's total is known ([`show_total`]).
fn progress_bar(hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("template"),
    );
    bar
}

/// Prediction rows under a shard's tree (every `preds/*.jsonl` line).
fn rows_written(tree: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![tree.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "jsonl")
                && p.parent().is_some_and(|q| q.ends_with("preds"))
            {
                n += std::fs::read(&p).map_or(0, |b| b.iter().filter(|c| **c == b'\n').count());
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_get_the_command_without_the_parents_flags() {
        let argv: Vec<String> = [
            "eval",
            "--devices",
            "cpu,cpu",
            "--model",
            "m",
            "--device=cpu",
            "--shard",
            "0/2",
            "--json",
            "-q",
            "--rates",
            "1,2",
            "--no-progress",
            "--devices=all",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            worker_args(&argv),
            ["eval", "--model", "m", "--rates", "1,2"]
        );
    }

    #[test]
    fn devices_parse_and_refuse_unknown_names() {
        assert_eq!(
            parse_devices("cpu, cuda:1,cuda").unwrap(),
            ["cpu", "cuda:1", "cuda"]
        );
        let e = parse_devices("cpu,gpu0").unwrap_err().to_string();
        assert!(e.contains("`gpu0` is not a device"), "{e}");
    }
}
