//! Run directories: the configuration a run is made with (run.json), resuming a run from its
//! prediction files, and appending rows to them.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{io, ChatMode, EvalError};
use crate::data::longbench::hex;
use crate::eval::record::{PredRecord, RunMeta};
use crate::util::write_atomic;

/// The settings that decide a run's predictions; hashed into run.json. Two invocations with
/// equal configurations may share (resume) a run directory; the task selection, `--limit` and
/// the device are not part of it (they choose which samples, not how each is made).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub model: String,
    /// The checkpoint path or hub id.
    pub model_source: String,
    pub model_revision: Option<String>,
    pub dtype: String,
    pub method: String,
    pub rate: Option<f64>,
    pub budget_tokens: Option<usize>,
    pub method_options: serde_json::Value,
    /// Middle-truncation length in tokens (LongBench's per-model max input length).
    pub max_input_tokens: usize,
    /// `--max-new-tokens` (None = each subset's own).
    pub max_new_tokens: Option<usize>,
    pub chat: ChatMode,
    /// The prompt recipe (bumped if kvc's prompt building ever changes).
    pub prompt: String,
}

/// The prompt recipe recorded in [`RunConfig::prompt`].
pub const PROMPT_RECIPE: &str = "longbench-v1-pred.py";

impl RunConfig {
    /// sha256 of the JSON form, first 16 hex digits.
    pub fn hash(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        hex(&Sha256::digest(json.as_bytes()))[..16].to_string()
    }
}

/// Field-by-field differences between two JSON objects (`field: old -> new`).
fn json_diffs(old: &serde_json::Value, new: &serde_json::Value) -> String {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return "unreadable old configuration".into();
    };
    let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
    let d: Vec<String> = keys
        .into_iter()
        .filter(|k| o.get(*k) != n.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("-".into(), |v| v.to_string());
            format!("{k}: {} -> {}", show(o.get(k)), show(n.get(k)))
        })
        .collect();
    if d.is_empty() {
        "same settings, different hash".into()
    } else {
        d.join(", ")
    }
}

/// Make `dir` ready for a run with `meta` (whose `extra.config` / `extra.config_hash` are
/// set): resume when the existing run.json has the same hash, start over when `overwrite`,
/// refuse otherwise. Writes run.json.
pub fn prepare_run_dir(dir: &Path, meta: &RunMeta, overwrite: bool) -> Result<(), EvalError> {
    let run_json = dir.join("run.json");
    let preds = dir.join("preds");
    let has_preds = std::fs::read_dir(&preds).is_ok_and(|mut rd| rd.next().is_some());
    let new_hash = meta.extra.get("config_hash");
    let mut discard = overwrite;
    if !overwrite {
        if run_json.is_file() {
            let text = std::fs::read_to_string(&run_json).map_err(|e| io(&run_json, e))?;
            let old: RunMeta = serde_json::from_str(&text).map_err(|e| EvalError::BadPredLine {
                path: run_json.clone(),
                line: e.line(),
                msg: e.to_string(),
            })?;
            if old.extra.get("config_hash") != new_hash {
                if has_preds {
                    return Err(EvalError::ConfigMismatch {
                        path: dir.to_path_buf(),
                        diffs: json_diffs(
                            old.extra.get("config").unwrap_or(&serde_json::Value::Null),
                            meta.extra.get("config").unwrap_or(&serde_json::Value::Null),
                        ),
                    });
                }
                discard = true;
            }
        } else if has_preds {
            return Err(EvalError::Foreign {
                path: dir.to_path_buf(),
            });
        }
    }
    if discard {
        if preds.exists() {
            std::fs::remove_dir_all(&preds).map_err(|e| io(&preds, e))?;
        }
        let _ = std::fs::remove_file(dir.join("result.json"));
    }
    std::fs::create_dir_all(&preds).map_err(|e| io(&preds, e))?;
    let json = serde_json::to_string_pretty(meta).unwrap_or_default();
    write_atomic(&run_json, json.as_bytes()).map_err(|e| io(&run_json, e))
}

/// What an existing prediction file holds.
#[derive(Debug, Default)]
pub struct Existing {
    /// `_id`s with a row (failed ones included).
    pub done: HashSet<String>,
    /// Rows with `error`.
    pub n_failed: usize,
    /// Bytes of a torn (unterminated) last line that were cut off.
    pub torn_bytes: usize,
}

/// Read a prediction file for resuming: collect the finished ids; cut off an unterminated last
/// line (a write interrupted by a kill); any other bad line is an error naming it.
pub fn load_existing(path: &Path) -> Result<Existing, EvalError> {
    let mut ex = Existing::default();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ex),
        Err(e) => return Err(io(path, e)),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    if complete < bytes.len() {
        ex.torn_bytes = bytes.len() - complete;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        f.set_len(complete as u64).map_err(|e| io(path, e))?;
        f.sync_all().map_err(|e| io(path, e))?;
    }
    let body = &bytes[..complete];
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        if complete == 0 {
            break;
        }
        let bad = |msg: String| EvalError::BadPredLine {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let text = std::str::from_utf8(line).map_err(|_| bad("not valid UTF-8".into()))?;
        let rec = PredRecord::from_json_line(text).map_err(|e| bad(e.to_string()))?;
        let id = rec.id.ok_or_else(|| bad("no `_id`".into()))?;
        if rec.error.is_some() {
            ex.n_failed += 1;
        }
        ex.done.insert(id);
    }
    Ok(ex)
}

/// Remove the rows with `error` whose `_id` is in `ids` from a prediction file (for
/// `--retry-failed`): the kept lines, byte for byte, go to a temporary file that replaces the
/// original once synced, so an interruption leaves either file whole. Returns the rows removed.
pub fn drop_failed_rows(path: &Path, ids: &HashSet<String>) -> Result<usize, EvalError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    let mut removed = 0;
    for line in text.split_inclusive('\n') {
        let failed = PredRecord::from_json_line(line.trim_end())
            .ok()
            .filter(|r| r.error.is_some())
            .and_then(|r| r.id)
            .is_some_and(|id| ids.contains(&id));
        if failed {
            removed += 1;
        } else {
            kept.push_str(line);
        }
    }
    if removed > 0 {
        let tmp = path.with_extension("jsonl.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(kept.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| io(path, e))?;
    }
    Ok(removed)
}

/// Appends rows to a prediction file, each synced before returning. The file is created with
/// its first row, so a run interrupted before a subset's first sample leaves no empty file
/// (which `kvc score`, like eval.py, refuses).
pub struct PredWriter {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl PredWriter {
    /// A writer appending to `path` (created at the first row; parent directories must exist).
    pub fn new(path: &Path) -> PredWriter {
        PredWriter {
            path: path.to_path_buf(),
            file: None,
        }
    }

    /// One line, written with a single `write_all` and synced.
    pub fn append(&mut self, rec: &PredRecord) -> Result<(), EvalError> {
        let mut line = rec.to_json_line();
        line.push('\n');
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .map_err(|e| io(&self.path, e))?,
            ),
        };
        file.write_all(line.as_bytes())
            .and_then(|_| file.sync_data())
            .map_err(|e| io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer creates its file with the first row, not before (an interrupted run leaves no
    /// empty prediction file), then appends whole lines that resume reads back.
    #[test]
    fn pred_writer_creates_its_file_with_the_first_row() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ruler_vt_1024.jsonl");
        let mut w = PredWriter::new(&path);
        assert!(!path.exists());
        for id in ["a", "b"] {
            w.append(&PredRecord {
                id: Some(id.into()),
                ..Default::default()
            })
            .unwrap();
        }
        let ex = load_existing(&path).unwrap();
        assert_eq!(ex.done, HashSet::from(["a".to_string(), "b".to_string()]));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }
}
