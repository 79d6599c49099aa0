//! Opening /dev/kvm and creating VMs, with errors that say what to do.

use std::io;
use std::path::{Path, PathBuf};

use kvm_ioctls::{Kvm, VmFd};

/// The KVM device every host has when virtualization is available.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Why KVM could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node is absent.
    #[error(
        "{path} does not exist: this host has no KVM; load kvm-intel or kvm-amd, or run on a \
         host or VM with virtualization enabled"
    )]
    Missing {
        /// The device path tried.
        path: PathBuf,
    },
    /// The device exists but this user may not open it.
    #[error(
        "permission denied opening {path}: run as root or add this user to the group that \
         owns {path} (usually 'kvm')"
    )]
    PermissionDenied {
        /// The device path tried.
        path: PathBuf,
    },
    /// Opening failed for another reason.
    #[error("cannot open {path}")]
    Open {
        /// The device path tried.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
}

impl KvmError {
    /// Whether the user can fix this (missing device, permissions), as opposed to a fault.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            KvmError::Missing { .. } | KvmError::PermissionDenied { .. }
        )
    }
}

/// Opens the KVM device at `path`.
pub fn open(path: &Path) -> Result<Kvm, KvmError> {
    let path_buf = path.to_owned();
    Kvm::new_with_path(path_as_cstring(path)?).map_err(|e| {
        let source = io::Error::from_raw_os_error(e.errno());
        match source.kind() {
            io::ErrorKind::NotFound => KvmError::Missing { path: path_buf },
            io::ErrorKind::PermissionDenied => KvmError::PermissionDenied { path: path_buf },
            _ => KvmError::Open {
                path: path_buf,
                source,
            },
        }
    })
}

fn path_as_cstring(path: &Path) -> Result<std::ffi::CString, KvmError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| KvmError::Open {
        path: path.to_owned(),
        source: io::ErrorKind::InvalidInput.into(),
    })
}

/// Creates a default-type VM (type 0: no private memory, so gmem may be host-mapped).
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    kvm.create_vm().map_err(KvmError::CreateVm)
}
