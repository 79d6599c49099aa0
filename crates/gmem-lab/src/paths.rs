//! Where the lab keeps its cache, and an exclusive lock that serialises users of it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors while locating or locking the lab's cache.
#[derive(Debug, Error)]
pub enum PathsError {
    #[error("cannot find a cache directory: set GMEM_LAB_CACHE, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    #[error("cannot create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open lock file {path}")]
    OpenLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The lab's cache root: `$GMEM_LAB_CACHE`, else `$XDG_CACHE_HOME/gmemctl/lab`, else
/// `~/.cache/gmemctl/lab`.
pub fn cache_root() -> Result<PathBuf, PathsError> {
    if let Some(dir) = std::env::var_os("GMEM_LAB_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|d| !d.is_empty())
                .ok_or(PathsError::NoCacheDir)?;
            PathBuf::from(home).join(".cache")
        }
    };
    Ok(base.join("gmemctl").join("lab"))
}

/// `fs::create_dir_all` with the path in the error.
pub fn ensure_dir(path: &Path) -> Result<(), PathsError> {
    fs::create_dir_all(path).map_err(|source| PathsError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

/// An exclusive `flock` on a file, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Blocks until this process holds the lock on `path` (created if missing).
    pub fn acquire(path: &Path) -> Result<Self, PathsError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| PathsError::OpenLock {
                path: path.to_owned(),
                source,
            })?;
        loop {
            match file.lock() {
                Ok(()) => return Ok(Self { _file: file }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(PathsError::Lock {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        }
    }
}
