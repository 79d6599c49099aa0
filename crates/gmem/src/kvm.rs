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
    /// The path opened, but what is behind it does not answer KVM's ioctls.
    #[error("{path} is not a KVM device: KVM_GET_API_VERSION gave {version}, not 12")]
    NotKvm {
        /// The device path tried.
        path: PathBuf,
        /// What the ioctl returned (-1: the device has no such ioctl).
        version: i32,
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
            KvmError::Missing { .. } | KvmError::PermissionDenied { .. } | KvmError::NotKvm { .. }
        )
    }
}

/// KVM_GET_API_VERSION has returned 12 since Linux 2.6.22.
pub const KVM_API_VERSION: i32 = 12;

/// Opens the KVM device at `path`, and checks that it is one (KVM_GET_API_VERSION).
pub fn open(path: &Path) -> Result<Kvm, KvmError> {
    let path_buf = path.to_owned();
    let kvm = Kvm::new_with_path(path_as_cstring(path)?).map_err(|e| {
        let source = io::Error::from_raw_os_error(e.errno());
        match source.kind() {
            io::ErrorKind::NotFound => KvmError::Missing { path: path_buf },
            io::ErrorKind::PermissionDenied => KvmError::PermissionDenied { path: path_buf },
            _ => KvmError::Open {
                path: path_buf,
                source,
            },
        }
    })?;
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(kvm),
        version => Err(KvmError::NotKvm {
            path: path.to_owned(),
            version,
        }),
    }
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
