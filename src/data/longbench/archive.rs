//! Members of a zip archive (the official `data.zip`), listed and streamed without unpacking.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use super::{io_err, DataError};

/// A member of a zip: where its data is and how it is stored.
#[derive(Debug, Clone)]
pub(super) struct Member {
    name: String,
    data_start: u64,
    compressed_size: u64,
    deflated: bool,
}

/// `<subset>` -> member, for every `*.jsonl` member of the archive (any directory).
pub(super) fn zip_members(path: &Path) -> Result<BTreeMap<String, Member>, DataError> {
    let label = path.display().to_string();
    let zerr = |msg: String| DataError::Zip {
        path: label.clone(),
        msg,
    };
    let f = File::open(path).map_err(|e| io_err(&label, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| zerr(format!("not a readable zip archive: {e}")))?;
    let mut out = BTreeMap::new();
    for i in 0..zip.len() {
        let m = zip
            .by_index_raw(i)
            .map_err(|e| zerr(format!("member {i}: {e}")))?;
        let name = m
            .name()
            .map_err(|e| zerr(format!("member {i}: {e}")))?
            .to_string();
        let Some(stem) = name
            .rsplit('/')
            .next()
            .and_then(|b| b.strip_suffix(".jsonl"))
        else {
            continue;
        };
        if name.starts_with("__MACOSX/") || stem.starts_with("._") {
            continue;
        }
        if m.encrypted() {
            return Err(zerr(format!("member {name} is encrypted")));
        }
        // Compared with the constants: zip is built without its codecs (kvc inflates itself),
        // so deflate appears as `Unsupported(8)` unless another crate enables it.
        let deflated = match m.compression() {
            c if c == zip::CompressionMethod::STORE => false,
            c if c == zip::CompressionMethod::DEFLATE => true,
            other => {
                return Err(zerr(format!(
                    "member {name} uses compression {other:?}; kvc reads stored and deflated members (re-zip it with `zip -r data.zip data`)"
                )))
            }
        };
        let data_start = m
            .data_start()
            .ok_or_else(|| zerr(format!("member {name}: no data offset")))?;
        out.insert(
            stem.to_string(),
            Member {
                name: name.clone(),
                data_start,
                compressed_size: m.compressed_size(),
                deflated,
            },
        );
    }
    Ok(out)
}

/// An owned stream of one member's decompressed bytes (the archive file is opened again and
/// read from the member's offset, so nothing borrows the archive).
pub(super) fn open_member(path: &Path, m: &Member) -> Result<Box<dyn Read + Send>, DataError> {
    let label = format!("{}!{}", path.display(), m.name);
    let mut f = File::open(path).map_err(|e| io_err(&label, e))?;
    f.seek(SeekFrom::Start(m.data_start))
        .map_err(|e| io_err(&label, e))?;
    let raw = BufReader::new(f).take(m.compressed_size);
    Ok(if m.deflated {
        Box::new(flate2::read::DeflateDecoder::new(raw))
    } else {
        Box::new(raw)
    })
}
