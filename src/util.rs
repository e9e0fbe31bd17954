//! Small shared helpers: atomic file writes, exit codes.
use std::io::Write;
use std::path::Path;

/// Exit status shared by every subcommand (STYLE.md habit 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Everything finished.
    Ok,
    /// Finished, but some samples failed (or a regression gate tripped).
    Failed,
}

/// Write `bytes` to `path` atomically: a temp file in the same directory, then rename, so a
/// reader never sees a half-written file, even when the process is interrupted.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}
