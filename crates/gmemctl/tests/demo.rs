//! `gmemctl demo` end to end on the real /dev/kvm: every page moves, no byte is lost, the map is drawn, and bad requests exit 2.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use gmem::numa::Topology;
use gmem::testing::{can_read_pfns, kvm_or_skip};
use serde_json::Value;

mod common;

use common::stderr;

/// One demo at a time: each boots a VM whose vCPUs want both cores.
fn one_demo_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn svg_path(test: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}.svg"))
}

fn demo(test: &str, args: &[&str]) -> Output {
    let svg = svg_path(test);
    let _ = std::fs::remove_file(&svg);
    Command::new(env!("CARGO_BIN_EXE_gmemctl"))
        .arg("demo")
        .args(args)
        .arg("--svg")
        .arg(&svg)
        .output()
        .expect("gmemctl runs")
}

fn one_node() -> bool {
    Topology::read()
        .unwrap()
        .nodes
        .iter()
        .filter(|n| n.total_bytes > 0)
        .count()
        == 1
}

/// A user error ([`common::assert_user_error`]) on exactly one line.
fn assert_one_line_user_error(out: &Output, needle: &str) {
    common::assert_user_error(out, needle);
    let err = stderr(out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// Checks that the SVG is one well-nested <svg> element and counts its chunk cells.
fn svg_cells(svg: &str) -> usize {
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    let mut open: Vec<&str> = Vec::new();
    for tag in svg.split('<').skip(1) {
        let tag = &tag[..tag.find('>').expect("every tag is closed")];
        let name = tag
            .trim_start_matches('/')
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap();
        if tag.starts_with('/') {
            assert_eq!(open.pop(), Some(name), "</{name}> closes nothing open");
        } else if !tag.ends_with('/') {
            open.push(name);
        }
    }
    assert!(open.is_empty(), "unclosed: {open:?}");
    svg.matches(r#"<rect class="cell""#).count()
}

#[test]
fn the_demo_moves_every_page_and_loses_nothing() {
    if kvm_or_skip("the_demo_moves_every_page_and_loses_nothing").is_none() {
        return;
    }
    let _one = one_demo_at_a_time();
    let out = demo("demo_json", &["--json", "--mem", "64M"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");

    assert_eq!(report["verdict"]["ok"], true, "{}", report["verdict"]);
    assert_eq!(report["guest_check"]["mismatches"], 0);
    assert_eq!(report["totals"]["content_mismatches"], 0);
    assert!(report["totals"]["content_checks"].as_u64().unwrap() > 0);
    let moves = report["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 2, "one round: there and back");
    let pages = report["guest"]["pages"].as_u64().unwrap();
    assert_eq!(pages, (64 << 20) / 4096);
    let moved = report["totals"]["pages_moved"].as_u64().unwrap();
    if one_node() {
        assert_eq!(report["scope"], "same_node_relocation");
        assert_eq!(moved, pages * moves.len() as u64);
    } else {
        assert_eq!(report["scope"], "cross_node");
        assert!(moved > 0 && moved <= pages * moves.len() as u64);
    }
    if can_read_pfns() {
        let changed = report["totals"]["pfns_changed"].as_u64().unwrap();
        assert_eq!(changed, report["totals"]["pfns_checked"].as_u64().unwrap());
        assert!(changed > 0);
    }
    let numa_maps = report["placement"][0]["numa_maps"].as_array().unwrap();
    assert!(!numa_maps.is_empty(), "the gmem mapping is in numa_maps");

    let path = report["placement_map"].as_str().unwrap();
    assert_eq!(PathBuf::from(path), svg_path("demo_json"));
    let svg = std::fs::read_to_string(path).unwrap();
    let chunks = report["guest"]["chunks"].as_u64().unwrap() as usize;
    assert_eq!(
        svg_cells(&svg),
        chunks * (moves.len() + 1),
        "a panel per snapshot"
    );
}

#[test]
fn refault_moves_the_memory_too_and_the_report_reads_as_text() {
    if kvm_or_skip("refault_moves_the_memory_too").is_none() {
        return;
    }
    let _one = one_demo_at_a_time();
    let out = demo("demo_refault", &["--mem", "64M", "--mechanism", "refault"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(text.contains("refault"), "{text}");
    assert!(text.contains("result: no byte lost"), "{text}");
    assert!(text.contains("numa_maps before"), "{text}");
    let svg = svg_path("demo_refault");
    assert!(
        text.contains(&format!("placement map: {}", svg.display())),
        "{text}"
    );
    assert!(svg_cells(&std::fs::read_to_string(svg).unwrap()) > 0);
}

#[test]
fn native_cannot_relocate_within_a_node() {
    if kvm_or_skip("native_cannot_relocate_within_a_node").is_none() || !one_node() {
        return;
    }
    let _one = one_demo_at_a_time();
    let out = demo("demo_native", &["--mem", "64M", "--mechanism", "native"]);
    assert_one_line_user_error(&out, "cannot relocate within a node");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_flag_values_are_user_errors() {
    let out = demo("demo_bad_mem", &["--mem", "3000"]);
    assert_one_line_user_error(&out, "--mem 3000");
    let out = demo("demo_odd_mem", &["--mem", "5M"]);
    assert_one_line_user_error(&out, "whole number of 2 MiB");
    let out = Command::new(env!("CARGO_BIN_EXE_gmemctl"))
        .args(["--kvm-device", "/nonexistent/kvm", "demo"])
        .output()
        .unwrap();
    assert_one_line_user_error(&out, "/nonexistent/kvm does not exist");
    let out = demo("demo_bad_stop", &["--max-stop", "0ms"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = demo("demo_bad_mechanism", &["--mechanism", "teleport"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("[possible values: auto, native, remap, refault]"));
}
