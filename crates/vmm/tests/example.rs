//! The `tiny_vmm` example, run as an adopter would run it, on the real /dev/kvm.

use std::path::PathBuf;
use std::process::Command;

/// The example binary cargo built beside this test (`cargo test` builds examples).
fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().expect("test binary path");
    let profile_dir = deps
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run the whole `cargo test -p vmm`, which builds the examples",
        path.display()
    );
    path
}

#[test]
fn tiny_vmm_moves_its_guest_memory_without_a_lost_word() {
    if gmem::testing::kvm_or_skip("tiny_vmm_moves_its_guest_memory_without_a_lost_word").is_none() {
        return;
    }
    let output = Command::new(example("tiny_vmm")).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tiny_vmm failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    eprintln!("{stdout}");
    // The example's own line, read back: every page moved, onto new frames, nothing lost.
    let field = |name: &str| -> String {
        let at = stdout
            .find(name)
            .unwrap_or_else(|| panic!("no {name:?} in {stdout}"));
        let rest = &stdout[at + name.len()..];
        rest.split([' ', ';', ',', '\n'])
            .next()
            .unwrap()
            .to_string()
    };
    let moved = field("moved ");
    assert_eq!(moved, field("of "), "not every page moved");
    // At least every page of the checker's slice (all guest RAM past the first 2 MiB).
    assert!(
        moved.parse::<u64>().unwrap() >= (62 << 20) / 4096,
        "{stdout}"
    );
    assert_eq!(field("mismatches "), "0");
    if gmem::testing::can_read_pfns() {
        let frames = field("new frames ");
        let (changed, checked) = frames.split_once('/').unwrap();
        assert_eq!(changed, checked, "a page kept its frame");
        assert!(changed.parse::<u64>().unwrap() > 0);
    }
}
