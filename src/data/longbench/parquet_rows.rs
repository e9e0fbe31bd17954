//! Parquet files (the hub mirror or a conversion of the official files) as LongBench JSON lines.
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::official_checksums;

/// Every `*.parquet` under `dir`, `depth` levels deep at most.
pub(super) fn walk_parquet(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "parquet") && p.is_file() {
            out.push(p);
        } else if depth > 0 && p.is_dir() {
            walk_parquet(&p, depth - 1, out);
        }
    }
}

/// The LongBench subset a parquet file holds: its stem, else the nearest of its two parent
/// directories, that is a known subset name.
pub(super) fn parquet_subset(f: &Path) -> Option<String> {
    let known = |s: &str| official_checksums().contains_key(s);
    let stem = f.file_stem()?.to_string_lossy();
    if known(&stem) {
        return Some(stem.into_owned());
    }
    f.ancestors()
        .skip(1)
        .take(2)
        .filter_map(|a| a.file_name().map(|n| n.to_string_lossy().into_owned()))
        .find(|n| known(n))
}

/// The rows of parquet files as LongBench JSON lines (what [`super::RowIter`] reads), one row at a
/// time. Written by hand because the `parquet` crate yields records, not bytes: this adapter
/// lets the JSONL path (row errors with line numbers, `--samples`, checksums of what was read)
/// stay the only row reader. A read error surfaces as an `io::Error` naming the file.
pub(super) struct ParquetJsonl {
    files: std::vec::IntoIter<PathBuf>,
    rows: Option<(PathBuf, parquet::record::reader::RowIter<'static>)>,
    buf: Vec<u8>,
    pos: usize,
}

impl ParquetJsonl {
    pub(super) fn new(files: Vec<PathBuf>) -> Self {
        ParquetJsonl {
            files: files.into_iter(),
            rows: None,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// The next row as one JSON line into `buf`; false at the end of the last file.
    fn fill(&mut self) -> std::io::Result<bool> {
        let err = |f: &Path, e: &dyn std::fmt::Display| {
            std::io::Error::other(format!("{}: parquet: {e}", f.display()))
        };
        loop {
            if let Some((f, it)) = &mut self.rows {
                match it.next() {
                    Some(Ok(row)) => {
                        self.buf.clear();
                        serde_json::to_writer(&mut self.buf, &row.to_json_value())
                            .map_err(|e| err(f, &e))?;
                        self.buf.push(b'\n');
                        self.pos = 0;
                        return Ok(true);
                    }
                    Some(Err(e)) => return Err(err(f, &e)),
                    None => self.rows = None,
                }
            }
            let Some(f) = self.files.next() else {
                return Ok(false);
            };
            let file = File::open(&f).map_err(|e| err(&f, &e))?;
            let reader = parquet::file::serialized_reader::SerializedFileReader::new(file)
                .map_err(|e| err(&f, &e))?;
            self.rows = Some((f, reader.into_iter()));
        }
    }
}

impl Read for ParquetJsonl {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.buf.len() && !self.fill()? {
            return Ok(0);
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
