//! Files written whole or not at all, and folders with names of their own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file-system operation that failed, with the path it was on.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {cause}", path.display())]
pub struct FileError {
    /// What was being done: `read`, `write`, `create`, ...
    pub action: &'static str,
    pub path: PathBuf,
    /// Kept out of `source()`, so the OS's text is printed once.
    pub cause: std::io::Error,
}

impl FileError {
    pub fn new(action: &'static str, path: &Path, cause: std::io::Error) -> FileError {
        FileError {
            action,
            path: path.to_path_buf(),
            cause,
        }
    }

    /// A closure for `map_err`: `fs::read(p).map_err(FileError::on("read", p))`.
    pub fn on(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
        move |cause| FileError::new(action, path, cause)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, so a
/// process killed at any moment leaves the file either old or new, never half-written.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else {
        let cause = std::io::Error::other("the path has no file name");
        return Err(FileError::new("write", path, cause));
    };
    // A name of its own per write, so two writers of one file (a run and the
    // signal thread marking it interrupted) never share a temporary file.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let serial = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.{}-{serial}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(FileError::on("write", path))
}

/// Whether `file_name` is a temporary file of [`write_atomic`]'s
/// (`.<name>.<pid>-<n>.tmp`), which a killed write leaves behind.
pub fn is_atomic_temporary(file_name: &str) -> bool {
    file_name.starts_with('.') && file_name.ends_with(".tmp")
}

/// Creates `<parent>/<label>-<UTC yyyymmdd-hhmmss>`; a suffix `-2`, `-3`, ... keeps
/// two created in the same second apart. Creation is atomic, so concurrent
/// processes never share a folder.
pub fn create_unique_dir(parent: &Path, label: &str) -> Result<PathBuf, FileError> {
    check_can_hold_dirs(parent)?;
    std::fs::create_dir_all(parent).map_err(FileError::on("create", parent))?;
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S");
    let mut attempt = 1;
    loop {
        let suffix = match attempt {
            1 => String::new(),
            n => format!("-{n}"),
        };
        let path = parent.join(format!("{label}-{stamp}{suffix}"));
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => attempt += 1,
            Err(e) => return Err(FileError::new("create", &path, e)),
        }
    }
}

/// Fails when `parent` exists but is not a directory, so that a run learns it
/// cannot be written before it loads data and trains.
pub fn check_can_hold_dirs(parent: &Path) -> Result<(), FileError> {
    if parent.exists() && !parent.is_dir() {
        let cause = std::io::Error::other("it is a file, not a directory");
        return Err(FileError::new("create folders in", parent, cause));
    }
    Ok(())
}

/// Reads a whole file as text.
pub fn read_text(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(FileError::on("read", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.txt")]);
    }

    #[test]
    fn errors_name_the_path_and_the_cause_once() {
        let err = read_text(Path::new("/no/such/file.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot read /no/such/file.toml: "), "{err}");
        assert_eq!(err.matches("os error").count(), 1, "{err}");
    }
}
