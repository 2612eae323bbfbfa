//! The clean-shutdown marker: `data_dir/CLEAN_SHUTDOWN`, written last on a clean
//! stop with the position it stopped at (temp file, fsync, rename), taken (read
//! and removed) at start. Its presence tells start-up it follows a clean stop.

use std::path::Path;

const CLEAN_MARKER: &str = "CLEAN_SHUTDOWN";

/// Records a clean stop at `position`, durably.
pub fn write_clean_shutdown(dir: &Path, position: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!("{CLEAN_MARKER}.tmp"));
    std::fs::write(&tmp, format!("{position}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(CLEAN_MARKER))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Removes the marker; returns the position it held if the last stop was clean.
pub fn take_clean_shutdown(dir: &Path) -> std::io::Result<Option<String>> {
    let path = dir.join(CLEAN_MARKER);
    match std::fs::read_to_string(&path) {
        Ok(position) => {
            std::fs::remove_file(&path)?;
            Ok(Some(position.trim().to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_then_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(take_clean_shutdown(dir.path()).unwrap(), None);
        write_clean_shutdown(dir.path(), "abc:42").unwrap();
        assert_eq!(
            take_clean_shutdown(dir.path()).unwrap(),
            Some("abc:42".to_string())
        );
        assert_eq!(take_clean_shutdown(dir.path()).unwrap(), None);
    }
}
