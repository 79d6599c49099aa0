//! A bounded soak through the API: migrations back and forth, round after round, while the
//! guest writes and verifies its memory; every report complete, and the guest never sees
//! a wrong word.

mod api_support;

use api_support::{assert_succeeded, nodes_with_memory, serve, small};

/// Rounds of the soak.
const ROUNDS: usize = 10;

#[test]
fn repeated_migrations_under_guest_load_lose_nothing() {
    let Some(s) = serve("api_soak", small()) else {
        return;
    };
    let nodes = nodes_with_memory();
    let start = s.wait_for_sweeps(&[0, 0], 1);
    let mut moved = [0u64; 2]; // remap, refault
    for round in 0..ROUNDS {
        // Alternate mechanisms and, where there are two nodes, targets; on one node every
        // round relocates all memory within the node (new frames, same node).
        let mechanism = if round % 2 == 0 { "remap" } else { "refault" };
        let (target, relocate) = if nodes.len() >= 2 {
            (nodes[round % 2], false)
        } else {
            (nodes[0], true)
        };
        let body = format!(
            r#"{{"policy":"bind","nodes":[{target}],"mechanism":"{mechanism}",
                "relocate_in_place":{relocate},"max_stop_us":1000}}"#
        );
        let before = s.sweeps();
        let id = s.submit(&body);
        let job = s.wait_for_job(id);
        assert_succeeded(&job);
        let report = &job["report"];
        assert_eq!(report["mechanism"], mechanism);
        let pages = report["pages_moved"].as_u64().unwrap();
        assert!(pages > 0, "round {round} moved nothing: {job:#}");
        if gmem::testing::can_read_pfns() {
            assert!(report["pfns_changed"].as_u64().unwrap() > 0, "{job:#}");
        }
        moved[round % 2] += pages;
        // The guest kept running: it finished sweeps since the round began (waited for,
        // not timed), and found nothing wrong.
        let metrics = s.wait_for_sweeps(&before, 1);
        assert_eq!(
            metrics["guest"]["mismatches"], 0,
            "round {round}: {metrics:#}"
        );
        println!(
            "round {round}: {mechanism} -> node {target}: {pages} pages, {} steps, stops \
             p50 {} / max {} us, {} ms, guest sweeps during the job: {}",
            report["steps"],
            report["stops"]["p50_us"],
            report["stops"]["max_us"],
            job["elapsed_ms"],
            job["guest"]["sweeps"]
        );
    }
    // Two more sweeps: every word moved in the last round was verified again.
    let end = s.wait_for_sweeps(&s.sweeps(), 2);
    assert_eq!(end["guest"]["mismatches"], 0, "{end:#}");
    assert!(
        end["guest"]["mismatch_reports"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let totals = &end["migrations"];
    assert_eq!(totals["started"], ROUNDS as u64);
    assert_eq!(totals["succeeded"], ROUNDS as u64);
    assert_eq!(totals["incomplete"], 0);
    assert_eq!(totals["failed"], 0);
    assert_eq!(totals["guest_mismatches"], 0);
    assert_eq!(totals["pages_moved"]["remap"], moved[0]);
    assert_eq!(totals["pages_moved"]["refault"], moved[1]);
    assert_eq!(s.get_json("/vm")["memory"]["spare_chunks_free"], 4);
    println!(
        "soak: {ROUNDS} rounds, {} remap + {} refault pages moved, guest {} -> {} sweeps, 0 \
         mismatches, quiesce hold p99 {} us",
        moved[0],
        moved[1],
        start["guest"]["sweeps"],
        end["guest"]["sweeps"],
        end["guest"]["quiesce_hold"]["p99_us"]
    );
}
