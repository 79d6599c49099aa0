//! Attaching to a process's guest_memfd files on the real /dev/kvm: found by /proc, taken
//! by pidfd_getfd, flags learned, pages counted and placed, the owner's mappings related.
//! The owner here is this test process itself; gmemctl's tests attach to other processes.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, MutexGuard};

use gmem::memory::{
    AttachedGmem, ChunkLayout, GmemFlags, GmemOffset, GuestMemfd, GuestMemory, PageLocation,
    Residency, page_size,
};
use gmem::testing::kvm_or_skip;

const MIB: u64 = 1 << 20;

/// One test at a time: each attaches to every gmem of this process, and so maps the other
/// tests' gmems too, which would show up among their owner's mappings.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn raw(fd: &impl AsFd) -> i32 {
    fd.as_fd().as_raw_fd()
}

fn inode_of(fd: i32) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .unwrap()
        .ino()
}

/// The attached gmem whose file is the one behind our descriptor `fd`.
fn attached_for(all: Vec<AttachedGmem>, fd: i32) -> AttachedGmem {
    let inode = inode_of(fd);
    all.into_iter()
        .find(|g| g.inode() == inode)
        .unwrap_or_else(|| panic!("no attached gmem with inode {inode}"))
}

#[test]
fn attach_counts_places_and_relates_every_gmem_of_a_process() {
    let Some((kvm, vm)) = kvm_or_skip("attach_counts_places_and_relates_every_gmem") else {
        return;
    };
    let _one = one_at_a_time();
    let page = page_size();
    let owned = GuestMemory::create(
        vm.clone(),
        ChunkLayout::single_slot(8 * MIB),
        GmemFlags::HOST_MAPPABLE,
    )
    .unwrap();
    // Two runs of written pages, with a hole between and after them.
    owned.populate(GmemOffset(MIB), 300 * page).unwrap();
    owned.populate(GmemOffset(5 * MIB), 7 * page).unwrap();
    let confidential = GuestMemfd::create(&vm, 2 * MIB, GmemFlags::NONE).unwrap();
    let kernel_flags = GuestMemfd::kernel_flags(&kvm);
    assert!(
        kernel_flags.is_some_and(|f| f.contains(GmemFlags::HOST_MAPPABLE)),
        "{kernel_flags:?}"
    );

    let all = AttachedGmem::attach_all(std::process::id(), kernel_flags).unwrap();
    let owned_fd = raw(owned.gmem());
    let attached = attached_for(all, owned_fd);
    assert_eq!(attached.fds(), [owned_fd]);
    assert_eq!(attached.size(), 8 * MIB);
    assert!(attached.is_host_mappable());
    assert_eq!(attached.flags().set, GmemFlags::HOST_MAPPABLE);
    // Whatever this kernel cannot create is known clear; what it can but does not show
    // (MIGRATABLE, on our kernel series) stays unknown.
    let unknown = GmemFlags(kernel_flags.unwrap().0 & GmemFlags::MIGRATABLE.0);
    assert_eq!(attached.flags().unknown, unknown);

    let Residency::Placed(placement) = attached.residency().unwrap() else {
        panic!("a host-mappable gmem must be placed");
    };
    assert_eq!(placement.pages(), 8 * MIB / page);
    assert_eq!(placement.per_node().values().sum::<u64>(), 307);
    for index in 0..placement.pages() {
        let written = (MIB / page..MIB / page + 300).contains(&index)
            || (5 * MIB / page..5 * MIB / page + 7).contains(&index);
        let location = placement.location_of(index).unwrap();
        assert_eq!(
            matches!(location, PageLocation::Node(_)),
            written,
            "page {index}: {location:?}"
        );
    }
    // The same pages, as the owner's own placement query sees them.
    assert_eq!(
        owned.placement(GmemOffset(0), 8 * MIB).unwrap().per_node(),
        placement.per_node()
    );

    // The owner's mapping of it (taken before the attach mapped it here too).
    let owner_map = owned.mapping().unwrap();
    let mappings = attached.vmm_mappings();
    assert_eq!(mappings.len(), 1, "{mappings:?}");
    assert_eq!(mappings[0].start, owner_map.addr() as u64);
    assert_eq!(mappings[0].len(), 8 * MIB);
    assert_eq!(mappings[0].gmem_offset, GmemOffset(0));
    assert_eq!(mappings[0].perms, "rw-s");
    assert_eq!(mappings[0].policy.as_deref(), Some("default"));
    // The owner wrote these pages through its mapping, so numa_maps sees all of them.
    assert_eq!(mappings[0].mapped_pages(), 307);

    // The duplicate is the owner's file: a discard through it frees the owner's pages.
    attached
        .mapped()
        .unwrap()
        .discard(GmemOffset(MIB), 100 * page)
        .unwrap();
    assert_eq!(
        owned
            .placement(GmemOffset(MIB), 300 * page)
            .unwrap()
            .not_present(),
        100
    );
    assert_eq!(attached.layout(), ChunkLayout::single_slot(8 * MIB));

    // A gmem without MMAP: found, not host-mappable, nothing of its pages visible.
    let all = AttachedGmem::attach_all(std::process::id(), kernel_flags).unwrap();
    let hidden = attached_for(all, raw(&confidential));
    assert_eq!(hidden.size(), 2 * MIB);
    assert!(!hidden.is_host_mappable());
    assert_eq!(hidden.flags().set, GmemFlags::NONE);
    assert!(hidden.vmm_mappings().is_empty());
    assert_eq!(hidden.residency().unwrap(), Residency::NotHostMappable);
    assert!(hidden.mapped().is_err());
}

#[test]
fn two_descriptors_of_one_gmem_are_one_attached_gmem() {
    let Some((_kvm, vm)) = kvm_or_skip("two_descriptors_of_one_gmem") else {
        return;
    };
    let _one = one_at_a_time();
    let gmem = GuestMemfd::create(&vm, 2 * MIB, GmemFlags::HOST_MAPPABLE).unwrap();
    let again = std::os::fd::AsFd::as_fd(&gmem)
        .try_clone_to_owned()
        .unwrap();
    let all = AttachedGmem::attach_all(std::process::id(), None).unwrap();
    let attached = attached_for(all, raw(&gmem));
    let mut fds = vec![raw(&gmem), again.as_raw_fd()];
    fds.sort_unstable();
    assert_eq!(attached.fds(), fds);
    // No kernel flags given: MIGRATABLE cannot be ruled out; with no page resident,
    // INIT_SHARED cannot be tried without allocating one, so it stays unknown too.
    assert_eq!(attached.flags().set, GmemFlags::MMAP);
    assert_eq!(
        attached.flags().unknown,
        GmemFlags::INIT_SHARED | GmemFlags::MIGRATABLE
    );
    assert_eq!(attached.residency().unwrap(), {
        let pages = 2 * MIB / page_size();
        Residency::Placed(gmem::memory::Placement::from_pages(
            page_size(),
            (0..pages).map(|_| PageLocation::NotPresent),
        ))
    });
}

#[test]
fn attaching_to_no_process_names_the_pid() {
    // PIDs above pid_max (at most 2^22) never exist.
    let err = AttachedGmem::attach_all(99_999_999, None).unwrap_err();
    assert!(err.is_user_error(), "{err}");
    assert!(
        err.to_string().contains("no process with PID 99999999"),
        "{err}"
    );
}
