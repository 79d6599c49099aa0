//! The control API on the real /dev/kvm, over its Unix socket: every endpoint, the errors a
//! client can provoke (none of which may hurt the VM), and the socket's own rules.

mod api_support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use api_support::{Served, TempDir, assert_succeeded, nodes_with_memory, serve, small, text};
use serde_json::Value;
use vmm::VmConfig;
use vmm::api::{ApiClient, ApiServer, ApiServerError, MAX_BODY_BYTES};

#[test]
fn every_get_endpoint_answers_with_the_documented_shape() {
    let Some(s) = serve("api_gets", small()) else {
        return;
    };
    let vm = s.get_json("/vm");
    assert_eq!(vm["state"], "Running");
    assert_eq!(vm["pid"], std::process::id());
    assert_eq!(vm["config"]["mem_size"], 64 << 20);
    let memory = &vm["memory"];
    assert_eq!(memory["guest_size"], 64 << 20);
    assert_eq!(memory["chunk_size"], 2 << 20);
    assert_eq!(memory["chunks"], 32);
    assert_eq!(memory["spare_chunks"], 4);
    assert_eq!(memory["spare_chunks_free"], 4);
    assert_eq!(memory["gmem_size"], 72 << 20);
    let flags: Vec<&str> = memory["gmem_flags"]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(flags, ["MMAP", "INIT_SHARED"]);
    let vcpus = vm["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 2);
    assert_eq!(vcpus[1]["index"], 1);
    assert!(vcpus[0]["slice_len"].as_u64().unwrap() > 0);

    assert_eq!(s.get_json("/vm/state")["state"], "Running");

    s.wait_for_sweeps(&[0, 0], 1);
    let placement = s.get_json("/memory/placement");
    let page = placement["page_size"].as_u64().unwrap();
    assert_eq!(placement["pages"].as_u64().unwrap() * page, 64 << 20);
    let resident: u64 = placement["per_node"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    // The guest has written its whole slices and its code: nearly everything is resident.
    assert!(resident * page >= 60 << 20, "{placement}");
    let ranges = placement["ranges"].as_array().unwrap();
    let covered: u64 = ranges.iter().map(|r| r["pages"].as_u64().unwrap()).sum();
    assert_eq!(covered, placement["pages"].as_u64().unwrap());
    assert_eq!(ranges[0]["first_page"], 0);
    for pair in ranges.windows(2) {
        let end = pair[0]["first_page"].as_u64().unwrap() + pair[0]["pages"].as_u64().unwrap();
        assert_eq!(pair[1]["first_page"], end, "{placement}");
        assert_ne!(pair[0]["location"], pair[1]["location"], "{placement}");
    }
    // Locations are {"node": N}, "not_present" or {"error": errno}.
    assert!(
        ranges.iter().any(|r| r["location"]["node"].is_u64()),
        "{placement}"
    );

    let metrics = s.get_json("/metrics");
    assert_eq!(metrics["guest"]["state"], "Running");
    assert_eq!(metrics["guest"]["mismatches"], 0);
    assert!(metrics["guest"]["sweeps"].as_u64().unwrap() >= 2);
    assert!(metrics["guest"]["quiesce_hold"]["p99_us"].is_number());
    assert_eq!(metrics["migrations"]["started"], 0);
    assert_eq!(metrics["migrations"]["pages_moved"]["remap"], 0);

    let list = s.get_json("/memory/migrations");
    assert!(list["running"].is_null());
    assert!(list["migrations"].as_array().unwrap().is_empty());
}

#[test]
fn pause_and_resume_through_the_api() {
    let Some(s) = serve("api_pause", small()) else {
        return;
    };
    s.wait_for_sweeps(&[0, 0], 1);
    let reply = s.put("/vm/state", r#"{"state":"Paused"}"#);
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert_eq!(reply.json::<Value>().unwrap()["state"], "Paused");
    assert_eq!(s.get_json("/vm")["state"], "Paused");
    let frozen = s.sweeps();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.sweeps(), frozen, "the guest ran while paused");
    // Pausing twice is fine.
    assert_eq!(s.put("/vm/state", r#"{"state":"Paused"}"#).status, 200);

    let reply = s.put("/vm/state", r#"{"state":"Running"}"#);
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert_eq!(reply.json::<Value>().unwrap()["state"], "Running");
    let metrics = s.wait_for_sweeps(&frozen, 2);
    assert_eq!(metrics["guest"]["mismatches"], 0);
}

#[test]
fn a_relocation_job_runs_to_a_complete_verified_report() {
    let Some(s) = serve("api_migrate", small()) else {
        return;
    };
    let before = s.wait_for_sweeps(&[0, 0], 1);
    let id = s.submit(
        r#"{"policy":"bind","nodes":[0],"mechanism":"remap","relocate_in_place":true,
            "max_stop_us":2000}"#,
    );
    let job = s.wait_for_job(id);
    assert_succeeded(&job);
    assert_eq!(job["id"], id);
    assert_eq!(job["request"]["policy"], "bind");
    assert_eq!(job["request"]["nodes"], serde_json::json!([0]));
    assert_eq!(job["request"]["max_stop_us"], 2000);
    assert_eq!(job["request"]["verify"], "full");
    let report = &job["report"];
    assert_eq!(report["mechanism"], "remap");
    assert_eq!(report["relocate_in_place"], true);
    let moved = report["pages_moved"].as_u64().unwrap();
    let page = s.get_json("/memory/placement")["page_size"]
        .as_u64()
        .unwrap();
    // Every resident page of the guest moved (all chunks, relocated in place).
    assert!(moved * page >= 60 << 20, "{report:#}");
    assert!(report["content_checks"].as_u64().unwrap() > 0);
    if gmem::testing::can_read_pfns() {
        assert!(report["pfns_changed"].as_u64().unwrap() > 0, "{report:#}");
    }
    // Remap moves whole chunks, so pages the guest never touched become resident too.
    assert!(
        report["after"]["0"].as_u64() >= report["before"]["0"].as_u64(),
        "{report:#}"
    );
    assert!(report["stops"]["count"].as_u64().unwrap() > 0);
    println!(
        "API relocation: {} pages in {} us, stops p50 {} / p99 {} / max {} us, guest sweeps \
         during it: {}",
        moved,
        report["elapsed_us"],
        report["stops"]["p50_us"],
        report["stops"]["p99_us"],
        report["stops"]["max_us"],
        job["guest"]["sweeps"]
    );

    // Every moved word has been written and verified again since.
    let after = s.wait_for_sweeps(&s.sweeps(), 2);
    assert_eq!(after["guest"]["mismatches"], 0, "{after:#}");
    assert!(after["guest"]["sweeps"].as_u64() > before["guest"]["sweeps"].as_u64());
    let totals = &after["migrations"];
    assert_eq!(totals["started"], 1);
    assert_eq!(totals["succeeded"], 1);
    assert_eq!(totals["pages_moved"]["remap"], moved);
    assert_eq!(totals["pages_moved"]["refault"], 0);
    assert_eq!(totals["bytes_moved"], report["bytes_moved"]);
    // All spare chunks are free again.
    assert_eq!(s.get_json("/vm")["memory"]["spare_chunks_free"], 4);
    let list = s.get_json("/memory/migrations");
    assert_eq!(list["migrations"][0]["id"], id);
    assert_eq!(list["migrations"][0]["state"], "succeeded");
}

/// `(method, path, body, status, words the error must contain)`.
type Case = (&'static str, &'static str, &'static str, u16, &'static str);

fn check_case(s: &Served, (method, path, body, status, needle): Case) {
    let body = (!body.is_empty() || method == "PUT").then_some(body.as_bytes());
    let reply = s.client.request(method, path, body).unwrap();
    let what = format!(
        "{method} {path} {}",
        String::from_utf8_lossy(body.unwrap_or(b""))
    );
    assert_eq!(reply.status, status, "{what}: {}", text(&reply));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let sentence = reply
        .error_sentence()
        .unwrap_or_else(|| panic!("{what}: no error sentence in {}", text(&reply)));
    assert!(sentence.contains(needle), "{what}: {sentence}");
    assert!(
        !sentence.contains('\n') && !sentence.is_empty(),
        "{sentence}"
    );
}

#[test]
fn bad_requests_get_4xx_with_one_sentence_and_the_vm_runs_on() {
    let Some(s) = serve("api_errors", small()) else {
        return;
    };
    let start = s.wait_for_sweeps(&[0, 0], 1);
    let cases: &[Case] = &[
        // Unknown routes and wrong methods.
        ("GET", "/", "", 404, "there is no resource at /"),
        ("GET", "/vms", "", 404, "/vms"),
        (
            "GET",
            "/memory/migrations/12345",
            "",
            404,
            "there is no migration 12345",
        ),
        (
            "GET",
            "/memory/migrations/abc",
            "",
            404,
            "there is no migration abc",
        ),
        ("POST", "/vm", "", 405, "use GET"),
        ("DELETE", "/vm/state", "", 405, "use GET, PUT"),
        ("GET", "/memory/migrate", "", 405, "use PUT"),
        ("POST", "/memory/migrate", "{}", 405, "use PUT"),
        ("PUT", "/metrics", "{}", 405, "use GET"),
        // Malformed JSON and unknown fields.
        ("PUT", "/memory/migrate", "", 400, "empty"),
        (
            "PUT",
            "/memory/migrate",
            "{\"policy\":",
            400,
            "EOF while parsing",
        ),
        (
            "PUT",
            "/memory/migrate",
            "policy=bind",
            400,
            "expected a JSON object",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[0],"turbo":true}"#,
            400,
            "unknown field `turbo`",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[0]}{}"#,
            400,
            "trailing",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[0],"mechanism":"dma"}"#,
            400,
            "unknown variant `dma`",
        ),
        (
            "PUT",
            "/vm/state",
            r#"{"state":"Frozen"}"#,
            400,
            "unknown variant `Frozen`",
        ),
        (
            "PUT",
            "/vm/state",
            r#"{"state":"Paused","now":true}"#,
            400,
            "unknown field `now`",
        ),
        // Absurd values.
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[0],"max_stop_us":0}"#,
            400,
            "max_stop_us 0 is outside",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[0],"max_stop_us":99999999999999}"#,
            400,
            "max_stop_us 99999999999999 is outside",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[0],"max_stop_us":-5}"#,
            400,
            "invalid value",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[0],"max_stop_us":1e40}"#,
            400,
            "invalid type",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[99999]}"#,
            400,
            "node 99999 is past the kernel's limit",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[18446744073709551616]}"#,
            400,
            "invalid type",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[0,0]}"#,
            400,
            "exactly one node",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"follow","cpus":[1000000]}"#,
            400,
            "CPU 1000000 is past",
        ),
        // Nonexistent nodes and impossible requests, refused when planned.
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[7]}"#,
            400,
            "NUMA node 7 cannot be a target: it does not exist",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"interleave","nodes":[0,7]}"#,
            400,
            "NUMA node 7 cannot be a target",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"follow","cpus":[8000]}"#,
            400,
            "CPU 8000 is not online",
        ),
        (
            "PUT",
            "/memory/migrate",
            r#"{"policy":"bind","nodes":[0],"mechanism":"native","relocate_in_place":true}"#,
            400,
            "the native mechanism cannot do this",
        ),
    ];
    for case in cases {
        check_case(&s, *case);
    }
    if nodes_with_memory().len() == 1 {
        check_case(
            &s,
            (
                "PUT",
                "/memory/migrate",
                r#"{"policy":"drain","nodes":[0]}"#,
                400,
                "nowhere to drain to",
            ),
        );
    }

    // An oversized body, announced: refused before it is read.
    let big = format!(
        r#"{{"policy":"bind","nodes":[0],"pad":"{}"}}"#,
        "x".repeat(MAX_BODY_BYTES)
    );
    let reply = s
        .client
        .request("PUT", "/memory/migrate", Some(big.as_bytes()))
        .unwrap();
    assert_eq!(reply.status, 413, "{}", text(&reply));
    assert!(reply.error_sentence().unwrap().contains("65536 byte limit"));
    // The same, chunked (no Content-Length): cut off at the limit.
    let mut raw = b"PUT /memory/migrate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
        Connection: close\r\n\r\n"
        .to_vec();
    for piece in big.as_bytes().chunks(8192) {
        raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let reply = s.client.send_raw(&raw).unwrap();
    assert_eq!(reply.status, 413, "{}", text(&reply));
    // A huge announced length with no body behind it.
    let reply = s
        .client
        .send_raw(b"PUT /vm/state HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
        .unwrap();
    assert_eq!(reply.status, 413, "{}", text(&reply));

    // Not HTTP at all: hyper refuses it (400) or hangs up; either way the server lives.
    for garbage in [
        &b"\x00\x01\x02\xff\xfe\r\n\r\n"[..],
        b"GET /vm HTTP/9.9\r\n\r\n",
        b"GET /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ] {
        match s.client.send_raw(garbage) {
            Ok(reply) => assert!((400..500).contains(&reply.status), "{}", text(&reply)),
            Err(e) => println!("garbage {garbage:?}: {e}"),
        }
    }
    // A client that connects, sends half a request and leaves.
    {
        let mut stream = UnixStream::connect(s.server.path()).unwrap();
        stream
            .write_all(b"PUT /vm/state HTTP/1.1\r\nContent-Le")
            .unwrap();
    }
    // One that sends a body shorter than announced, then shuts its side.
    {
        let mut stream = UnixStream::connect(s.server.path()).unwrap();
        stream
            .write_all(b"PUT /vm/state HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"state\"")
            .unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }

    // Nothing above started a job, changed the VM or hurt the guest.
    assert!(
        s.get_json("/memory/migrations")["migrations"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.get_json("/vm")["state"], "Running");
    let metrics = s.wait_for_sweeps(
        &start["guest"]["vcpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["sweeps"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        2,
    );
    assert_eq!(metrics["guest"]["mismatches"], 0);
    assert_eq!(metrics["migrations"]["started"], 0);
    assert!(s.server.is_serving());
}

#[test]
fn a_second_migration_while_one_runs_is_refused_with_409() {
    let Some(s) = serve("api_409", small()) else {
        return;
    };
    s.wait_for_sweeps(&[0, 0], 1);
    // Refault in small batches with full hashing: long enough (hundreds of stops) that the
    // second request lands while the first runs. If the first wins the race anyway, the
    // second must have been accepted only after it ended; then try again.
    let slow = r#"{"policy":"bind","nodes":[0],"mechanism":"refault","relocate_in_place":true,
                   "max_stop_us":50}"#;
    let mut refused = false;
    for _ in 0..5 {
        let first = s.submit(slow);
        let reply = s.put("/memory/migrate", slow);
        match reply.status {
            409 => {
                let sentence = reply.error_sentence().unwrap();
                assert!(
                    sentence.contains(&format!("migration {first} is still running")),
                    "{sentence}"
                );
                // Placement queries wait for the migration (more of them than there are
                // handler threads); polling the job is answered meanwhile all the same.
                let waiting: Vec<_> = (0..6)
                    .map(|_| {
                        let client = s.client.clone();
                        std::thread::spawn(move || client.get("/memory/placement").unwrap())
                    })
                    .collect();
                std::thread::sleep(Duration::from_millis(50));
                let job = s.get_json(&format!("/memory/migrations/{first}"));
                println!(
                    "while placement queries wait, job {first} is {}",
                    job["state"]
                );
                assert_eq!(s.get_json("/vm")["state"], "Running");
                for query in waiting {
                    let reply = query.join().unwrap();
                    assert_eq!(reply.status, 200, "{}", text(&reply));
                }
                assert_succeeded(&s.wait_for_job(first));
                refused = true;
                break;
            }
            202 => {
                let second = reply.json::<Value>().unwrap()["id"].as_u64().unwrap();
                assert_ne!(
                    s.get_json(&format!("/memory/migrations/{first}"))["state"],
                    "running"
                );
                assert_succeeded(&s.wait_for_job(first));
                assert_succeeded(&s.wait_for_job(second));
            }
            _ => panic!("{}", text(&reply)),
        }
    }
    assert!(refused, "the second migration never overlapped the first");
    // Once the first has finished, the next one is accepted.
    let next = s.submit(r#"{"policy":"bind","nodes":[0],"relocate_in_place":true}"#);
    assert_succeeded(&s.wait_for_job(next));
    let metrics = s.wait_for_sweeps(&s.sweeps(), 2);
    assert_eq!(metrics["guest"]["mismatches"], 0);
}

#[test]
fn the_socket_is_private_and_never_taken_over() {
    let config = VmConfig {
        mem_size: 16 << 20,
        vcpus: 1,
        ..small()
    };
    let Some(mut s) = serve("api_socket", config) else {
        return;
    };
    let path = s.server.path().to_owned();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    // A live socket is never replaced.
    match ApiServer::start(Arc::clone(&s.vm), &path) {
        Err(e @ ApiServerError::SocketInUse { .. }) => assert!(e.is_user_error()),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.get_json("/vm/state")["state"], "Running");
    // A regular file is never replaced.
    let dir = TempDir::new("api_socket_files");
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        ApiServer::start(Arc::clone(&s.vm), &file),
        Err(ApiServerError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // A stale socket (nobody listening) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut second = ApiServer::start(Arc::clone(&s.vm), &stale).unwrap();
    assert_eq!(ApiClient::new(&stale).get("/vm/state").unwrap().status, 200);
    second.shutdown().unwrap();
    assert!(!stale.exists());
    // Shutdown removes the socket and is idempotent.
    s.server.shutdown().unwrap();
    s.server.shutdown().unwrap();
    assert!(!path.exists());
    assert!(ApiClient::new(&path).get("/vm").unwrap_err().no_server());
}

#[test]
fn the_openapi_document_covers_every_route() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml")).unwrap();
    assert!(doc.starts_with("openapi: 3."), "not an OpenAPI 3 document");
    for route in [
        "/vm:",
        "/vm/state:",
        "/memory/placement:",
        "/memory/migrate:",
        "/memory/migrations:",
        "/memory/migrations/{id}:",
        "/metrics:",
    ] {
        assert!(
            doc.contains(&format!("  {route}\n")),
            "{route} is not documented"
        );
    }
    for field in [
        "max_stop_us",
        "relocate_in_place",
        "spare_chunks_free",
        "pages_moved",
        "quiesce_hold",
        "mismatches",
    ] {
        assert!(doc.contains(field), "{field} is not documented");
    }
}
