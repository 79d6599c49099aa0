//! The API's Unix socket: created with mode 0600 from the first moment, never over a live
//! one, replacing a stale one.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::server::ApiServerError;

/// A listening socket at `path`, identified by device and inode so that only this very
/// socket is ever removed.
#[derive(Debug)]
pub(crate) struct BoundSocket {
    pub(crate) listener: UnixListener,
    pub(crate) id: (u64, u64),
}

/// Refuses a live socket or a non-socket at `path`, and removes a stale socket.
fn clear_stale(path: &Path) -> Result<(), ApiServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiServerError::InspectPath {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiServerError::SocketInUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(|source| ApiServerError::RemoveStaleSocket {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(ApiServerError::InspectPath {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Binds a listening socket at `path` with mode 0600.
///
/// The socket is bound inside a fresh directory of mode 0700 next to `path`, made 0600
/// there, and then hard-linked into place, so no other user can ever connect, whatever the
/// umask; the link fails rather than replace anything that appeared at `path` meanwhile.
pub(crate) fn bind(path: &Path) -> Result<BoundSocket, ApiServerError> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    clear_stale(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let private = parent.join(format!(
        ".vmm-api-{}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    let create = |source| ApiServerError::CreateSocket {
        path: path.to_owned(),
        source,
    };
    DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(create)?;
    let staged = private.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&staged)?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))?;
        fs::hard_link(&staged, path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "something else was created at the path meanwhile",
                )
            } else {
                e
            }
        })?;
        let meta = fs::symlink_metadata(path)?;
        Ok(BoundSocket {
            listener,
            id: (meta.dev(), meta.ino()),
        })
    })();
    let _ = fs::remove_file(&staged);
    let _ = fs::remove_dir(&private);
    result.map_err(create)
}

/// Removes the socket at `path` if it is still the one we bound.
pub(crate) fn remove(path: &Path, id: (u64, u64)) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == id => fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
