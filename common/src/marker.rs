//! The clean-shutdown marker: `data_dir/CLEAN_SHUTDOWN`, written last on a clean
//! stop with the position it stopped at (temp file, fsync, rename), taken (read
//! and removed) at start. Start-up counts the last stop as clean only when the
//! marker is there **and** its position is the one the data on disk is at
//! ([`CleanStop::matches`]): a marker that names another position (files copied
//! or restored behind tern's back, a log cut after the stop) is a crash.

use std::path::Path;

use crate::position::{Position, ReplId};

const CLEAN_MARKER: &str = "CLEAN_SHUTDOWN";
/// What the marker holds for a node that has no history yet (a slave that never synced).
const NO_HISTORY: &str = "none";

/// What start-up found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CleanStop {
    /// No marker: the last stop was a crash (or this is the first start).
    Missing,
    /// The last stop was clean, at this position (`None`: no history yet).
    At(Option<Position>),
    /// A marker whose content is not a position (treated as a crash).
    Unreadable(String),
}

impl CleanStop {
    /// True when the last stop was clean at exactly `repl_id:index`; logs why not
    /// when a marker is there but does not match.
    pub fn matches(&self, repl_id: Option<ReplId>, index: u64) -> bool {
        let here = repl_id.map(|repl_id| Position {
            repl_id,
            index: index.into(),
        });
        match self {
            CleanStop::Missing => false,
            CleanStop::At(p) if *p == here => true,
            CleanStop::At(p) => {
                let show =
                    |p: &Option<Position>| p.map_or(NO_HISTORY.to_string(), |p| p.to_string());
                tracing::warn!(
                    marker = %show(p),
                    data = %show(&here),
                    "the clean-shutdown marker names another position than the data; treating \
                     the last stop as a crash"
                );
                false
            }
            CleanStop::Unreadable(text) => {
                tracing::warn!(marker = %text, "unreadable clean-shutdown marker; treating the last stop as a crash");
                false
            }
        }
    }
}

/// Bytes set aside at start for the marker (one filesystem block): a clean stop
/// must be able to record itself on a disk that filled up meanwhile.
const RESERVE_BYTES: usize = 4096;

fn tmp_path(dir: &Path) -> std::path::PathBuf {
    dir.join(format!("{CLEAN_MARKER}.tmp"))
}

/// Sets aside the space the marker will need: `CLEAN_SHUTDOWN.tmp`, written
/// with [`RESERVE_BYTES`] real (not sparse) bytes and fsynced. Call it at start,
/// once the previous marker is taken; [`write_clean_shutdown`] then overwrites
/// those blocks in place and renames the file, which needs no new space.
pub fn reserve_clean_shutdown(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(tmp_path(dir))?;
    f.write_all(&[0u8; RESERVE_BYTES])?;
    f.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

/// Records a clean stop at `position` (`None`: no history yet), durably: into
/// the space [`reserve_clean_shutdown`] set aside when there is one (so it works
/// on a full disk), else into a new file; then fsync and rename.
pub fn write_clean_shutdown(dir: &Path, position: Option<Position>) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let text = position.map_or(NO_HISTORY.to_string(), |p| p.to_string());
    let content = format!("{text}\n");
    let tmp = tmp_path(dir);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&tmp)?;
    f.write_all_at(content.as_bytes(), 0)?;
    f.set_len(content.len() as u64)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(CLEAN_MARKER))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Removes the marker and returns what it said.
pub fn take_clean_shutdown(dir: &Path) -> std::io::Result<CleanStop> {
    let path = dir.join(CLEAN_MARKER);
    let text = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CleanStop::Missing),
        Err(e) => return Err(e),
    };
    std::fs::remove_file(&path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(parse_clean_shutdown(&text))
}

/// What a marker's content says (only its first 256 bytes are read).
#[doc(hidden)]
pub fn parse_clean_shutdown(text: &[u8]) -> CleanStop {
    let text = String::from_utf8_lossy(&text[..text.len().min(256)])
        .trim()
        .to_string();
    if text == NO_HISTORY {
        return CleanStop::At(None);
    }
    match text.parse::<Position>() {
        Ok(p) => CleanStop::At(Some(p)),
        Err(_) => CleanStop::Unreadable(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_then_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(take_clean_shutdown(dir.path()).unwrap(), CleanStop::Missing);
        let p = Position {
            repl_id: ReplId(0xabc),
            index: 42.into(),
        };
        write_clean_shutdown(dir.path(), Some(p)).unwrap();
        let taken = take_clean_shutdown(dir.path()).unwrap();
        assert_eq!(taken, CleanStop::At(Some(p)));
        assert!(taken.matches(Some(ReplId(0xabc)), 42));
        assert!(!taken.matches(Some(ReplId(0xabc)), 41));
        assert!(!taken.matches(Some(ReplId(0xabd)), 42));
        assert!(!taken.matches(None, 42));
        assert_eq!(take_clean_shutdown(dir.path()).unwrap(), CleanStop::Missing);
    }

    #[test]
    fn a_reserved_marker_holds_only_the_position() {
        let dir = tempfile::tempdir().unwrap();
        reserve_clean_shutdown(dir.path()).unwrap();
        assert_eq!(
            std::fs::metadata(tmp_path(dir.path())).unwrap().len(),
            RESERVE_BYTES as u64
        );
        // Taking a marker that is not there leaves the reservation alone.
        assert_eq!(take_clean_shutdown(dir.path()).unwrap(), CleanStop::Missing);
        let p = Position {
            repl_id: ReplId(0xabc),
            index: 7.into(),
        };
        write_clean_shutdown(dir.path(), Some(p)).unwrap();
        assert!(!tmp_path(dir.path()).exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CLEAN_MARKER)).unwrap(),
            format!("{p}\n")
        );
        assert_eq!(
            take_clean_shutdown(dir.path()).unwrap(),
            CleanStop::At(Some(p))
        );
    }

    #[test]
    fn no_history_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        write_clean_shutdown(dir.path(), None).unwrap();
        let taken = take_clean_shutdown(dir.path()).unwrap();
        assert_eq!(taken, CleanStop::At(None));
        assert!(taken.matches(None, 0));
        std::fs::write(dir.path().join(CLEAN_MARKER), b"abc:42\n").unwrap();
        let taken = take_clean_shutdown(dir.path()).unwrap();
        assert_eq!(taken, CleanStop::Unreadable("abc:42".into()));
        assert!(!taken.matches(Some(ReplId(0xabc)), 42));
    }
}
