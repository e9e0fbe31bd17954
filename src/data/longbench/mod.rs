//! LongBench v1 data: where the rows come from and how they are streamed.
//!
//! Sources ([`Dataset::open`]):
//! - a directory of `<subset>.jsonl` files (the official files, CRLF line endings, one JSON object
//!   per line; a `data/` sub-directory as in the unpacked `data.zip` is also looked in);
//! - the official `data.zip` (members `data/<subset>.jsonl`), read member by member straight from
//!   the archive (deflate stream, nothing unpacked to disk);
//! - the hub: dataset `THUDM/LongBench`, file `data.zip`, fetched through [`crate::hub`] into the
//!   standard hub cache (`datasets--THUDM--LongBench/snapshots/<commit>/data.zip`), offline aware.
//!
//! - parquet files (the hub mirror `Xnhyacinth/LongBench`, or any conversion of the official
//!   files with LongBench's field names): a `.parquet` file, or a directory holding
//!   `<subset>.parquet`, `<subset>/*.parquet` or `data/<subset>/*.parquet`. Rows are read with
//!   the `parquet` crate's record API (no arrow) and turned into the same JSON rows, streamed.
//!   The official sha256 cannot be checked on converted files ([`Verdict::Mirror`]). From the
//!   hub the mirror is the fallback when `data.zip` cannot be had ([`Dataset::from_hub`]).
//!
//! Rows are streamed ([`RowIter`]): one subset is open at a time and only the current line is in
//! memory. A row that is not valid JSON or lacks a field is an error naming the file and line.
//! Files are checked against the sha256 table of the official files
//! (`datasets/longbench/official_checksums.tsv`, embedded); a differing file is a warning the
//! caller records (run.json), not an error.
//!
//! Files: this one holds the rows, the sources and the streaming; `archive.rs` reads members of
//! a zip, `parquet_rows.rs` turns parquet files into the same JSON lines.
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::hub::{self, HubEnv, HubError, RepoKind};

mod archive;
mod parquet_rows;

use archive::{open_member, zip_members};
use parquet_rows::{parquet_subset, walk_parquet, ParquetJsonl};

/// The official dataset repository on the hub and the file fetched from it.
pub const HUB_REPO: &str = "THUDM/LongBench";
pub const HUB_FILE: &str = "data.zip";
/// The parquet mirror: the fallback when `data.zip` cannot be fetched.
pub const PARQUET_MIRROR: &str = "Xnhyacinth/LongBench";

const CHECKSUMS_TSV: &str = include_str!("../../../datasets/longbench/official_checksums.tsv");

/// Errors of the data layer; each names the file (and line) or the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a LongBench row: {msg}")]
    BadRow {
        path: String,
        line: usize,
        msg: String,
    },
    #[error("{source_desc} has no `{subset}` subset (no {subset}.jsonl; found: {found}): pass --tasks with the subsets it has, or point --data-dir at the full LongBench data (a directory of <subset>.jsonl, data.zip, or `hub`)")]
    MissingSubset {
        source_desc: String,
        subset: String,
        found: String,
    },
    #[error("{path}: {msg}")]
    Zip { path: String, msg: String },
    #[error("{path}: not LongBench data: give a directory of <subset>.jsonl files, the official data.zip, or `hub` (download THUDM/LongBench data.zip into the Hugging Face cache)")]
    NotData { path: PathBuf },
    #[error("{path}: {msg} (parquet files must hold LongBench's fields: input, context, answers, length, dataset, language, all_classes, _id; snappy or uncompressed; otherwise use the official data.zip)")]
    Parquet { path: String, msg: String },
    #[error("LongBench data from the hub: {source}; the parquet mirror {PARQUET_MIRROR} did not help either: {mirror}. Get data.zip into the cache, or pass --data-dir with a local copy")]
    Hub {
        #[source]
        source: Box<HubError>,
        mirror: String,
    },
}

fn io_err(path: impl std::fmt::Display, source: std::io::Error) -> DataError {
    DataError::Io {
        path: path.to_string(),
        source,
    }
}

/// One LongBench row (`input, context, answers, length, dataset, language, all_classes, _id`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Row {
    pub input: String,
    pub context: String,
    /// Reference answers (numbers are read as their Python `str()`).
    #[serde(deserialize_with = "de_answers")]
    pub answers: Vec<String>,
    /// Words (characters for zh); LongBench-E buckets on it.
    #[serde(default)]
    pub length: Option<u64>,
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub all_classes: Option<Vec<String>>,
    #[serde(rename = "_id")]
    pub id: String,
    /// Text appended after the chat template's generation prompt (RULER rows; never in
    /// LongBench files).
    #[serde(default)]
    pub answer_prefix: Option<String>,
    /// Depth (percent of the context) of the queried needle (RULER NIAH rows).
    #[serde(default)]
    pub depth: Option<f64>,
}

/// Only the id of a row (cheap pass for counting and `--samples`).
#[derive(Debug, Clone, Deserialize)]
pub struct RowId {
    #[serde(rename = "_id")]
    pub id: String,
}

fn de_answers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let values: Vec<serde_json::Value> = Vec::deserialize(d)?;
    values
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            serde_json::Value::Number(n) => Ok(n.to_string()),
            other => Err(serde::de::Error::custom(format!(
                "answers must be strings (or numbers), found {other}"
            ))),
        })
        .collect()
}

/// Where the rows are.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// A directory holding `<subset>.jsonl`.
    Dir(PathBuf),
    /// A `data.zip` holding `data/<subset>.jsonl` (or `<subset>.jsonl`).
    Zip(PathBuf),
    /// Parquet files per subset (several when a subset is split into shards), in name order.
    Parquet(BTreeMap<String, Vec<PathBuf>>),
    /// JSON lines compiled into the binary: (subset, file text) in name order.
    Embedded(&'static [(&'static str, &'static str)]),
}

/// The bundled sample (`datasets/longbench/sample/`: official rows copied byte for byte),
/// compiled into the binary so that an installed kvc needs no checkout.
const BUNDLED_SAMPLE: &[(&str, &str)] = &[
    (
        "multi_news",
        include_str!("../../../datasets/longbench/sample/multi_news.jsonl"),
    ),
    (
        "multifieldqa_zh",
        include_str!("../../../datasets/longbench/sample/multifieldqa_zh.jsonl"),
    ),
    (
        "passage_retrieval_zh",
        include_str!("../../../datasets/longbench/sample/passage_retrieval_zh.jsonl"),
    ),
];

/// An opened LongBench source.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub source: DataSource,
    /// Human description (`/data/LongBench`, `data.zip from THUDM/LongBench@<commit>`).
    pub description: String,
    /// Hub commit when the data came from the hub cache.
    pub revision: Option<String>,
    /// Hub repo id when the data came from the hub.
    pub hub_repo: Option<String>,
}

/// Whether a file equals the official one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Verdict {
    /// sha256 equals the official file's.
    Official { sha256: String },
    /// The subset is in the table but the bytes differ.
    Differs { sha256: String, official: String },
    /// The subset is not in the table.
    Unknown { sha256: String },
    /// Read from parquet (a mirror): the official bytes cannot be compared. `sha256` is of the
    /// rows as kvc reads them (JSON lines), stable for the same files.
    Mirror { sha256: String },
}

/// The official sha256 table: subset -> (bytes, sha256).
pub fn official_checksums() -> &'static BTreeMap<String, (u64, String)> {
    static T: OnceLock<BTreeMap<String, (u64, String)>> = OnceLock::new();
    T.get_or_init(|| {
        CHECKSUMS_TSV
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some((
                    f.first()?.to_string(),
                    (f.get(1)?.parse().ok()?, f.get(2)?.to_string()),
                ))
            })
            .collect()
    })
}

/// Compare a subset's sha256 with the official table.
pub fn verdict(subset: &str, sha256: &str) -> Verdict {
    match official_checksums().get(subset) {
        Some((_, off)) if off == sha256 => Verdict::Official {
            sha256: sha256.into(),
        },
        Some((_, off)) => Verdict::Differs {
            sha256: sha256.into(),
            official: off.clone(),
        },
        None => Verdict::Unknown {
            sha256: sha256.into(),
        },
    }
}

impl Dataset {
    /// Open `arg`: `hub` / `hub:org/name[@rev]`, a `.zip` file, a directory of `<subset>.jsonl`
    /// (or holding `data.zip`, or `data/<subset>.jsonl`).
    pub fn open(arg: &str, env: &HubEnv) -> Result<Dataset, DataError> {
        if arg == "hub" || arg.starts_with("hub:") {
            let spec = arg.strip_prefix("hub:").unwrap_or(HUB_REPO);
            let (repo, rev) = spec.split_once('@').unwrap_or((spec, "main"));
            return Self::from_hub(repo, rev, env);
        }
        Self::open_path(Path::new(arg))
    }

    /// The bundled LongBench sample (2 official rows of each of 3 subsets), from the binary.
    pub fn bundled() -> Dataset {
        Dataset {
            source: DataSource::Embedded(BUNDLED_SAMPLE),
            description: "the bundled LongBench sample (embedded)".into(),
            revision: None,
            hub_repo: None,
        }
    }

    /// Open a local path (see [`Dataset::open`]).
    pub fn open_path(path: &Path) -> Result<Dataset, DataError> {
        let desc = path.display().to_string();
        if path.is_file() {
            return match path.extension().and_then(|e| e.to_str()) {
                Some("zip") => Ok(Dataset {
                    source: DataSource::Zip(path.into()),
                    description: desc,
                    revision: None,
                    hub_repo: None,
                }),
                Some("parquet") => Self::from_parquet(path, &[path.to_path_buf()]),
                _ => Err(DataError::NotData { path: path.into() }),
            };
        }
        if !path.is_dir() {
            return Err(io_err(
                &desc,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        let has_jsonl = |d: &Path| {
            std::fs::read_dir(d).is_ok_and(|rd| {
                rd.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
            })
        };
        if has_jsonl(path) {
            return Ok(Dataset {
                source: DataSource::Dir(path.into()),
                description: desc,
                revision: None,
                hub_repo: None,
            });
        }
        if has_jsonl(&path.join("data")) {
            return Ok(Dataset {
                source: DataSource::Dir(path.join("data")),
                description: path.join("data").display().to_string(),
                revision: None,
                hub_repo: None,
            });
        }
        if path.join(HUB_FILE).is_file() {
            return Self::open_path(&path.join(HUB_FILE));
        }
        let mut files = Vec::new();
        walk_parquet(path, 3, &mut files);
        if !files.is_empty() {
            // A directory of parquet files or per-subset folders (the mirror's layout).
            return Self::from_parquet(path, &files);
        }
        Err(DataError::NotData { path: path.into() })
    }

    /// A parquet source from `files` under `root`: each file belongs to the subset named by its
    /// stem or by the nearest parent directory that is a LongBench subset name
    /// (`multi_news.parquet`, `multi_news/test-00000-of-00001.parquet`,
    /// `data/multi_news/train.parquet`). Files naming no subset are an error listing them.
    fn from_parquet(root: &Path, files: &[PathBuf]) -> Result<Dataset, DataError> {
        let mut map: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        let mut stray = Vec::new();
        for f in files {
            match parquet_subset(f) {
                Some(s) => map.entry(s).or_default().push(f.clone()),
                None => stray.push(f.display().to_string()),
            }
        }
        if map.is_empty() {
            return Err(DataError::Parquet {
                path: root.display().to_string(),
                msg: format!(
                    "no parquet file is named after a LongBench subset ({})",
                    stray.join(", ")
                ),
            });
        }
        for v in map.values_mut() {
            v.sort();
        }
        Ok(Dataset {
            source: DataSource::Parquet(map),
            description: format!("{} (parquet)", root.display()),
            revision: None,
            hub_repo: None,
        })
    }

    /// Whether rows come from a converted copy (parquet) rather than the official files.
    pub fn is_mirror(&self) -> bool {
        matches!(self.source, DataSource::Parquet(_))
    }

    /// How a subset's data compares with the official file.
    pub fn verdict(&self, subset: &str) -> Result<Verdict, DataError> {
        let sha256 = self.sha256(subset)?;
        Ok(if self.is_mirror() {
            Verdict::Mirror { sha256 }
        } else {
            verdict(subset, &sha256)
        })
    }

    /// `data.zip` of `repo@rev` from the hub cache (downloading it unless offline). When that
    /// fails for the official repo, the parquet mirror ([`PARQUET_MIRROR`]@main) is used: its
    /// snapshot in the cache (offline), or every `*.parquet` file of it downloaded there.
    pub fn from_hub(repo: &str, rev: &str, env: &HubEnv) -> Result<Dataset, DataError> {
        let p = match hub::fetch_file(env, RepoKind::Dataset, repo, rev, HUB_FILE) {
            Ok(p) => p,
            Err(source) if repo == HUB_REPO => {
                return match hub::fetch_matching(
                    env,
                    RepoKind::Dataset,
                    PARQUET_MIRROR,
                    "main",
                    ".parquet",
                ) {
                    Ok((snapshot, commit)) => {
                        eprintln!(
                            "warning: {repo}: {source}; using the parquet mirror {PARQUET_MIRROR}@{commit}"
                        );
                        let mut d = Self::open_path(&snapshot)?;
                        d.description = format!(
                            "parquet mirror {PARQUET_MIRROR}@{commit} ({})",
                            snapshot.display()
                        );
                        d.revision = Some(commit);
                        d.hub_repo = Some(PARQUET_MIRROR.into());
                        Ok(d)
                    }
                    Err(e) => Err(DataError::Hub {
                        source: Box::new(source),
                        mirror: e.to_string(),
                    }),
                };
            }
            Err(source) => {
                return Err(DataError::Hub {
                    source: Box::new(source),
                    mirror: "not tried (only for THUDM/LongBench)".into(),
                })
            }
        };
        let commit = p
            .parent()
            .and_then(|d| d.file_name())
            .map(|s| s.to_string_lossy().into_owned());
        Ok(Dataset {
            description: format!(
                "{HUB_FILE} of {repo}@{} ({})",
                commit.as_deref().unwrap_or(rev),
                p.display()
            ),
            source: DataSource::Zip(p),
            revision: commit,
            hub_repo: Some(repo.into()),
        })
    }

    /// Subset names present (file stems), sorted.
    pub fn subsets(&self) -> Result<Vec<String>, DataError> {
        let mut v = match &self.source {
            DataSource::Dir(d) => std::fs::read_dir(d)
                .map_err(|e| io_err(d.display(), e))?
                .flatten()
                .filter_map(|e| {
                    let p = e.path();
                    (p.extension()? == "jsonl")
                        .then(|| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                        .flatten()
                })
                .collect::<Vec<_>>(),
            DataSource::Zip(z) => zip_members(z)?.into_keys().collect(),
            DataSource::Parquet(m) => m.keys().cloned().collect(),
            DataSource::Embedded(files) => files.iter().map(|(s, _)| s.to_string()).collect(),
        };
        v.sort();
        Ok(v)
    }

    /// Error unless `subset` is present.
    pub fn require(&self, subset: &str) -> Result<(), DataError> {
        let have = self.subsets()?;
        if have.iter().any(|s| s == subset) {
            return Ok(());
        }
        Err(DataError::MissingSubset {
            source_desc: self.description.clone(),
            subset: subset.into(),
            found: if have.is_empty() {
                "nothing".into()
            } else {
                have.join(", ")
            },
        })
    }

    /// The label used in error messages for a subset's file.
    pub fn label(&self, subset: &str) -> String {
        match &self.source {
            DataSource::Dir(d) => d.join(format!("{subset}.jsonl")).display().to_string(),
            DataSource::Zip(z) => format!("{}!{subset}.jsonl", z.display()),
            DataSource::Parquet(m) => match m.get(subset).and_then(|v| v.first()) {
                Some(f) if m[subset].len() > 1 => {
                    format!(
                        "{} (+{} shards, parquet rows)",
                        f.display(),
                        m[subset].len() - 1
                    )
                }
                Some(f) => format!("{} (parquet rows)", f.display()),
                None => format!("{subset}.parquet"),
            },
            DataSource::Embedded(_) => format!("<bundled sample>/{subset}.jsonl"),
        }
    }

    /// A raw byte stream of a subset's file.
    pub fn reader(&self, subset: &str) -> Result<Box<dyn Read + Send>, DataError> {
        match &self.source {
            DataSource::Dir(d) => {
                let p = d.join(format!("{subset}.jsonl"));
                if !p.is_file() {
                    self.require(subset)?;
                }
                Ok(Box::new(
                    File::open(&p).map_err(|e| io_err(p.display(), e))?,
                ))
            }
            DataSource::Zip(z) => {
                let members = zip_members(z)?;
                let Some(m) = members.get(subset) else {
                    self.require(subset)?;
                    unreachable!("require fails for a missing member");
                };
                open_member(z, m)
            }
            DataSource::Parquet(m) => {
                let Some(files) = m.get(subset) else {
                    self.require(subset)?;
                    unreachable!("require fails for a missing subset");
                };
                Ok(Box::new(ParquetJsonl::new(files.clone())))
            }
            DataSource::Embedded(files) => match files.iter().find(|(s, _)| *s == subset) {
                Some((_, text)) => Ok(Box::new(text.as_bytes())),
                None => {
                    self.require(subset)?;
                    unreachable!("require fails for a missing subset");
                }
            },
        }
    }

    /// Stream a subset's rows.
    pub fn rows(&self, subset: &str) -> Result<RowIter<Row>, DataError> {
        Ok(RowIter::new(self.reader(subset)?, self.label(subset)))
    }

    /// Stream only the ids.
    pub fn row_ids(&self, subset: &str) -> Result<RowIter<RowId>, DataError> {
        Ok(RowIter::new(self.reader(subset)?, self.label(subset)))
    }

    /// sha256 (hex) of a subset's file bytes.
    pub fn sha256(&self, subset: &str) -> Result<String, DataError> {
        let mut r = self.reader(subset)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = r
                .read(&mut buf)
                .map_err(|e| io_err(self.label(subset), e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex(&h.finalize()))
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streaming JSON-lines iterator: yields `(line number, row)`; blank lines are skipped; a bad
/// line is an error naming the file and line (and ends the iteration).
pub struct RowIter<T> {
    reader: Box<dyn BufRead + Send>,
    label: String,
    line: usize,
    buf: String,
    done: bool,
    _t: PhantomData<T>,
}

impl<T> RowIter<T> {
    pub fn new(r: Box<dyn Read + Send>, label: String) -> Self {
        RowIter {
            reader: Box::new(BufReader::with_capacity(1 << 16, r)),
            label,
            line: 0,
            buf: String::new(),
            done: false,
            _t: PhantomData,
        }
    }
}

impl<T: DeserializeOwned> Iterator for RowIter<T> {
    type Item = Result<(usize, T), DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            self.buf.clear();
            self.line += 1;
            match self.reader.read_line(&mut self.buf) {
                Ok(0) => {
                    self.done = true;
                    return None;
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    let msg = if e.kind() == std::io::ErrorKind::InvalidData {
                        "not valid UTF-8".to_string()
                    } else {
                        e.to_string()
                    };
                    return Some(Err(DataError::BadRow {
                        path: self.label.clone(),
                        line: self.line,
                        msg,
                    }));
                }
            }
            if self.buf.trim().is_empty() {
                continue;
            }
            return Some(match serde_json::from_str::<T>(&self.buf) {
                Ok(v) => Ok((self.line, v)),
                Err(e) => {
                    self.done = true;
                    Err(DataError::BadRow {
                        path: self.label.clone(),
                        line: self.line,
                        msg: e.to_string(),
                    })
                }
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW: &str = r#"{"input": "q?", "context": "ctx", "answers": ["a", 5], "length": 3, "dataset": "hotpotqa", "language": "en", "all_classes": null, "_id": "x1"}"#;

    #[test]
    fn dir_rows_stream_with_crlf_and_blank_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let body = format!("{ROW}\r\n\r\n{}\r\n", ROW.replace("x1", "x2"));
        std::fs::write(tmp.path().join("hotpotqa.jsonl"), body).unwrap();
        let ds = Dataset::open_path(tmp.path()).unwrap();
        assert_eq!(ds.subsets().unwrap(), ["hotpotqa"]);
        let rows: Vec<_> = ds.rows("hotpotqa").unwrap().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].1.answers, ["a", "5"]);
        assert_eq!((rows[1].0, rows[1].1.id.as_str()), (3, "x2"));
    }

    #[test]
    fn malformed_row_names_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let body = format!("{ROW}\n{}\n", ROW.replace(r#""context": "ctx", "#, ""));
        std::fs::write(tmp.path().join("trec.jsonl"), body).unwrap();
        let ds = Dataset::open_path(tmp.path()).unwrap();
        let e = ds
            .rows("trec")
            .unwrap()
            .find_map(Result::err)
            .unwrap()
            .to_string();
        assert!(e.contains("trec.jsonl:2") && e.contains("context"), "{e}");
    }

    #[test]
    fn missing_subset_lists_what_is_there() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("trec.jsonl"), ROW).unwrap();
        let ds = Dataset::open_path(tmp.path()).unwrap();
        let e = ds.require("lcc").unwrap_err().to_string();
        assert!(e.contains("`lcc`") && e.contains("found: trec"), "{e}");
    }

    #[test]
    fn checksum_table_is_complete() {
        let t = official_checksums();
        assert_eq!(t.len(), 34);
        let (bytes, sha) = &t["multi_news"];
        assert_eq!(*bytes, 2_741_531);
        assert_eq!(
            verdict("multi_news", sha),
            Verdict::Official {
                sha256: sha.clone()
            }
        );
        assert!(matches!(
            verdict("multi_news", "00"),
            Verdict::Differs { .. }
        ));
        assert!(matches!(verdict("nope", "00"), Verdict::Unknown { .. }));
    }
}
