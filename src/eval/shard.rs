//! Sharded sweeps: `kvc eval --shard I/N` runs the samples a stable hash gives shard I of N
//! (every method and budget of a sample stay in one shard, so a shared prefill still pays once),
//! into its own tree `<out>/shards/I-of-N/` (no two shards write one file: safe on shared
//! storage without locks; each resumes on its own), beside a manifest (`shard.json`: the shard
//! and every selected sample of every subset, in file order). [`merge`] checks the shards
//! against each other and writes the unsharded layout under `<out>`: the same run directories,
//! prediction rows in the unsharded order, so the same `result.json` and `scores.csv`.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::eval::record::RunMeta;
use crate::util::write_atomic;

/// Shard `index` (0-based, as Slurm's and Kubernetes' array indices) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `I/N` with 0 <= I < N.
    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || {
            format!("--shard {s}: expected I/N with 0 <= I < N, e.g. 0/4 (Slurm: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-N)")
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// Whether sample `id` of `subset` is this shard's: the first 8 bytes of
    /// sha256(`subset` `\n` `id`) modulo the count (the same on every machine).
    pub fn owns(&self, subset: &str, id: &str) -> bool {
        shard_of(subset, id, self.count) == self.index
    }

    /// `<out>/shards/I-of-N`: the shard's own results tree.
    pub fn tree(&self, out: &Path) -> PathBuf {
        out.join("shards")
            .join(format!("{}-of-{}", self.index, self.count))
    }
}

/// The shard of `count` that sample `id` of `subset` belongs to.
pub fn shard_of(subset: &str, id: &str, count: usize) -> usize {
    let h = Sha256::digest(format!("{subset}\n{id}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    (u64::from_be_bytes(b) % count.max(1) as u64) as usize
}

/// `shard.json` at the root of a shard's tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub shard: Shard,
    /// Every selected sample of every subset (all shards'), in the unsharded order.
    pub subsets: BTreeMap<String, Vec<String>>,
    /// Prediction rows this shard's tree holds when it is complete (its samples x the runs):
    /// the total of `kvc eval --devices`' progress bar. Absent in manifests of older kvc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
}

pub const MANIFEST: &str = "shard.json";

impl Manifest {
    /// The manifest of the shard tree `tree` (its `shard.json`).
    pub fn read(tree: &Path) -> std::io::Result<Manifest> {
        let text = std::fs::read_to_string(tree.join(MANIFEST))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    pub fn write(&self, tree: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(tree)?;
        let json = serde_json::to_string_pretty(self).unwrap_or_default();
        write_atomic(&tree.join(MANIFEST), json.as_bytes())
    }
}

/// Why shards cannot be merged; every problem found is named.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{0}")]
    Io(String),
    #[error("cannot merge {root}:\n  {}", .problems.join("\n  "))]
    Inconsistent {
        root: PathBuf,
        problems: Vec<String>,
    },
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> MergeError {
    MergeError::Io(format!("{}: {e}", path.display()))
}

/// What [`merge`] wrote.
#[derive(Debug, Default)]
pub struct Merged {
    pub shards: usize,
    /// The merged run directories under the root.
    pub runs: Vec<PathBuf>,
    pub rows: usize,
}

/// One shard as found on disk.
struct Found {
    manifest: Manifest,
    tree: PathBuf,
    /// Run directories relative to the tree (`<model>/<method>/<budget>`).
    runs: BTreeSet<PathBuf>,
}

/// Merge the shards under `<root>/shards/` into `<root>`: all N shards present and of one
/// selection, every run present in every shard with one configuration hash, every sample's row
/// present exactly once per run. Writes each run's `run.json` (shard 0's, its `shard` field
/// replaced by `merged_from`) and `preds/<subset>.jsonl` with the rows as the shards wrote them,
/// in the manifest's order; nothing is written when a check fails.
pub fn merge(root: &Path) -> Result<Merged, MergeError> {
    let shards = find_shards(root)?;
    let mut problems = check_shards(&shards);
    let runs: BTreeSet<PathBuf> = shards.iter().flat_map(|s| s.runs.clone()).collect();
    let mut planned = Vec::new();
    for run in &runs {
        match merge_run(&shards, run) {
            Ok(p) => planned.push((run.clone(), p)),
            Err(mut p) => problems.append(&mut p),
        }
    }
    if !problems.is_empty() {
        return Err(MergeError::Inconsistent {
            root: root.to_path_buf(),
            problems,
        });
    }
    let mut merged = Merged {
        shards: shards.len(),
        ..Merged::default()
    };
    for (run, p) in planned {
        let dir = root.join(&run);
        write_run(&dir, &p).map_err(|e| io_err(&dir, e))?;
        merged.rows += p.files.values().map(Vec::len).sum::<usize>();
        merged.runs.push(dir);
    }
    Ok(merged)
}

/// Every `<root>/shards/*/shard.json` with its runs.
fn find_shards(root: &Path) -> Result<Vec<Found>, MergeError> {
    let dir = root.join("shards");
    let rd = std::fs::read_dir(&dir).map_err(|e| {
        io_err(
            &dir,
            format!(
                "{e} (run `kvc eval ... --shard I/N --out {}` first)",
                root.display()
            ),
        )
    })?;
    let mut out = Vec::new();
    for e in rd.flatten() {
        let tree = e.path();
        let path = tree.join(MANIFEST);
        if !path.is_file() {
            continue;
        }
        let manifest = Manifest::read(&tree).map_err(|e| io_err(&path, e))?;
        let runs = run_dirs(&tree).map_err(|e| io_err(&tree, e))?;
        out.push(Found {
            manifest,
            tree,
            runs,
        });
    }
    out.sort_by_key(|f| f.manifest.shard.index);
    if out.is_empty() {
        return Err(io_err(&dir, "no shard.json in any subdirectory"));
    }
    Ok(out)
}

/// `<model>/<method>/<budget>` directories (those holding `run.json`) under `tree`.
fn run_dirs(tree: &Path) -> std::io::Result<BTreeSet<PathBuf>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![(tree.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        if d.join("run.json").is_file() {
            out.insert(d.strip_prefix(tree).unwrap_or(&d).to_path_buf());
            continue;
        }
        if depth < 3 {
            for e in std::fs::read_dir(&d)?.flatten() {
                if e.path().is_dir() {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    Ok(out)
}

/// One count, every index once, one selection.
fn check_shards(shards: &[Found]) -> Vec<String> {
    let mut problems = Vec::new();
    let first = &shards[0].manifest;
    let n = first.shard.count;
    for s in shards {
        if s.manifest.shard.count != n {
            problems.push(format!(
                "{}: a shard of {} where {} is a shard of {n}: remove one sweep's shards",
                s.tree.display(),
                s.manifest.shard.count,
                shards[0].tree.display()
            ));
        } else if s.manifest.subsets != first.subsets {
            problems.push(format!(
                "{}: selects other samples than {} (different --tasks, --limit, --samples or data)",
                s.tree.display(),
                shards[0].tree.display()
            ));
        }
    }
    let have: BTreeSet<usize> = shards.iter().map(|s| s.manifest.shard.index).collect();
    for i in (0..n).filter(|i| !have.contains(i)) {
        problems.push(format!(
            "shard {i}/{n} is missing (its tree has no shard.json): run it"
        ));
    }
    if have.len() < shards.len() {
        problems.push("two shard trees carry the same index".into());
    }
    problems
}

/// What one merged run will be: its run.json and rows per prediction file.
struct PlannedRun {
    meta: RunMeta,
    /// File name -> rows (raw lines) in order.
    files: BTreeMap<String, Vec<String>>,
}

/// A run's rows from every shard, checked: present in each shard with one configuration hash,
/// each selected sample exactly once.
fn merge_run(shards: &[Found], run: &Path) -> Result<PlannedRun, Vec<String>> {
    let mut problems = Vec::new();
    let mut metas = Vec::new();
    for s in shards {
        if !s.runs.contains(run) {
            problems.push(format!(
                "{}: shard {} has no run {} (unfinished, or another sweep)",
                s.tree.display(),
                s.manifest.shard.index,
                run.display()
            ));
            continue;
        }
        match read_meta(&s.tree.join(run).join("run.json")) {
            Ok(m) => metas.push(m),
            Err(e) => problems.push(e),
        }
    }
    let hashes: BTreeSet<String> = metas
        .iter()
        .map(|m| {
            m.extra
                .get("config_hash")
                .map_or("-".into(), |h| h.to_string())
        })
        .collect();
    if hashes.len() > 1 {
        problems.push(format!(
            "{}: the shards ran different configurations (config_hash {}): rerun the odd shard with the same flags",
            run.display(),
            hashes.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    let mut files = BTreeMap::new();
    for (subset, ids) in &shards[0].manifest.subsets {
        match subset_rows(shards, run, subset, ids) {
            Ok(rows) if !rows.is_empty() => {
                files.insert(format!("{subset}.jsonl"), rows);
            }
            Ok(_) => {}
            Err(mut p) => problems.append(&mut p),
        }
    }
    match (problems.is_empty(), metas.into_iter().next()) {
        (true, Some(mut meta)) => {
            meta.extra.remove("shard");
            meta.extra
                .insert("merged_from".into(), serde_json::json!(shards.len()));
            Ok(PlannedRun { meta, files })
        }
        _ => Err(problems),
    }
}

fn read_meta(path: &Path) -> Result<RunMeta, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// One subset's rows of `run` from every shard, in `ids` order; a missing or doubled sample is
/// named. A subset no shard has rows for is left out (the run did not cover it).
fn subset_rows(
    shards: &[Found],
    run: &Path,
    subset: &str,
    ids: &[String],
) -> Result<Vec<String>, Vec<String>> {
    let mut by_id: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    let mut problems = Vec::new();
    for s in shards {
        let path = s
            .tree
            .join(run)
            .join("preds")
            .join(format!("{subset}.jsonl"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let id = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["_id"].as_str().map(str::to_string));
            match id {
                Some(id) => by_id
                    .entry(id)
                    .or_default()
                    .push((s.manifest.shard.index, line.to_string())),
                None => problems.push(format!(
                    "{}:{}: not a prediction row",
                    path.display(),
                    n + 1
                )),
            }
        }
    }
    if by_id.is_empty() {
        return Ok(Vec::new());
    }
    let mut rows = Vec::with_capacity(ids.len());
    for id in ids {
        match by_id.remove(id).as_deref() {
            None | Some([]) => problems.push(format!(
                "{}: {subset} {id} (shard {}) has no row: that shard is unfinished",
                run.display(),
                shard_of(subset, id, shards[0].manifest.shard.count)
            )),
            Some([(_, line)]) => rows.push(line.clone()),
            Some(more) => problems.push(format!(
                "{}: {subset} {id} has {} rows (shards {:?})",
                run.display(),
                more.len(),
                more.iter().map(|m| m.0).collect::<Vec<_>>()
            )),
        }
    }
    for id in by_id.keys() {
        problems.push(format!(
            "{}: {subset} {id} is not a selected sample (a shard of another selection)",
            run.display()
        ));
    }
    if problems.is_empty() {
        Ok(rows)
    } else {
        Err(problems)
    }
}

/// Write a merged run: its prediction files replaced whole, then run.json.
fn write_run(dir: &Path, p: &PlannedRun) -> std::io::Result<()> {
    let preds = dir.join("preds");
    if preds.exists() {
        std::fs::remove_dir_all(&preds)?;
    }
    std::fs::create_dir_all(&preds)?;
    for (name, rows) in &p.files {
        let mut text = rows.join("\n");
        text.push('\n');
        write_atomic(&preds.join(name), text.as_bytes())?;
    }
    let json = serde_json::to_string_pretty(&p.meta).unwrap_or_default();
    write_atomic(&dir.join("run.json"), json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_samples_stably() {
        let ids: Vec<String> = (0..300).map(|i| format!("id{i}")).collect();
        for n in [1, 2, 3, 7] {
            let mut counts = vec![0; n];
            for id in &ids {
                let owners: Vec<usize> = (0..n)
                    .filter(|&i| Shard { index: i, count: n }.owns("hotpotqa", id))
                    .collect();
                assert_eq!(owners.len(), 1, "{id} of {n}");
                counts[owners[0]] += 1;
            }
            // Roughly balanced: every shard within half of the mean.
            assert!(counts.iter().all(|&c| c * 2 * n >= 300), "{counts:?}");
        }
        // The rule is a fixed function of subset and id (computed once, kept here).
        assert_eq!(
            shard_of("hotpotqa", "id0", 1000),
            shard_of("hotpotqa", "id0", 1000)
        );
        assert_ne!(
            (0..20)
                .map(|i| shard_of("a", &i.to_string(), 3))
                .collect::<Vec<_>>(),
            (0..20)
                .map(|i| shard_of("b", &i.to_string(), 3))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn shard_flag_parses_and_refuses_nonsense() {
        assert_eq!("2/3".parse::<Shard>(), Ok(Shard { index: 2, count: 3 }));
        for bad in ["3/3", "1/0", "a/2", "2", "-1/2"] {
            let e = bad.parse::<Shard>().unwrap_err();
            assert!(e.contains("expected I/N"), "{bad}: {e}");
        }
    }
}
