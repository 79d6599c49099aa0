//! Support for tests that need the real /dev/kvm: skip loudly, or fail when
//! `GMEM_REQUIRE_KVM=1` says this machine must have it.

use std::path::Path;
use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};

/// A usable KVM and a fresh default-type VM, or `None` (after a loud SKIP line) where the
/// host has no usable /dev/kvm. Panics instead of skipping when `GMEM_REQUIRE_KVM=1`.
pub fn kvm_or_skip(test: &str) -> Option<(Kvm, Arc<VmFd>)> {
    let required = std::env::var("GMEM_REQUIRE_KVM").is_ok_and(|v| v == "1");
    let kvm = match crate::kvm::open(Path::new(crate::kvm::DEFAULT_KVM_DEVICE)) {
        Ok(kvm) => kvm,
        Err(e) if required => panic!("{test}: GMEM_REQUIRE_KVM=1 but KVM is unusable: {e}"),
        Err(e) => {
            eprintln!("SKIP {test}: {e}");
            return None;
        }
    };
    let vm = crate::kvm::create_vm(&kvm).unwrap_or_else(|e| panic!("{test}: {e}"));
    Some((kvm, Arc::new(vm)))
}

/// Whether this process may read PFNs from pagemap (root); tests that prove relocation by
/// PFN need it, and say so when it is missing.
pub fn can_read_pfns() -> bool {
    // The effective uid from /proc: no syscall wrapper needed.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
