//! `gmemctl status PID` end to end on the real /dev/kvm: foreign VMMs reached only through
//! their PID and /proc. Counts agree page for page with the VMM's own API and with what a
//! guest wrote, pages only the guest touched included, where numa_maps sees none of them;
//! and each user error is one sentence with exit code 2.

use std::process::Command;
use std::time::{Duration, Instant};

use gmem::memory::page_size;
use gmem::numa::NumaMaps;
use gmem::testing::kvm_or_skip;
use serde_json::{Value, json};
use vmm::api::ApiClient;

mod common;

use common::{Holder, RunningVm, TempDir, assert_user_error, gmemctl, json, stderr};

/// Every page's location as `Placement` JSON lists it ("not_present", {"node": 0}, ...).
fn pages_of(placement: &Value) -> Vec<Value> {
    placement["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            std::iter::repeat_n(r["location"].clone(), r["pages"].as_u64().unwrap() as usize)
        })
        .collect()
}

/// The one entry of `status --json` for the VMM's descriptor `fd`.
fn gmem_with_fd<'a>(status: &'a Value, fd: &Value) -> &'a Value {
    status["guest_memfds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["fds"].as_array().unwrap().contains(fd))
        .unwrap_or_else(|| panic!("no guest_memfd with fd {fd}: {status:#}"))
}

fn api_get(client: &ApiClient, path: &str) -> Value {
    let reply = client.get(path).unwrap();
    assert_eq!(reply.status, 200, "GET {path}");
    reply.json().unwrap()
}

#[test]
fn status_agrees_page_for_page_with_the_vms_own_placement() {
    if kvm_or_skip("status_agrees_page_for_page_with_the_vms_own_placement").is_none() {
        return;
    }
    let dir = TempDir::new("status-pid");
    let sock = dir.0.join("api.sock");
    let vm = RunningVm::start(&sock, &["--mem", "64M"]);
    let client = ApiClient::new(&sock);

    // Let the guest write and verify all of its memory at least once on every vCPU.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = api_get(&client, "/metrics");
        let vcpus = metrics["guest"]["vcpus"].as_array().unwrap().clone();
        if vcpus.iter().all(|v| v["sweeps"].as_u64().unwrap() >= 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest made no sweep: {metrics:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Paused, both reads see the same memory.
    let paused = client
        .put_json("/vm/state", &json!({"state": "Paused"}))
        .unwrap();
    assert_eq!(paused.status, 200);
    assert_eq!(paused.json::<Value>().unwrap()["state"], "Paused");

    // From outside first: the VMM's own placement query maps every page in the VMM, which
    // would hide numa_maps' blindness.
    let out = gmemctl(&["status", &vm.pid.to_string(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = json(&out);
    let human = gmemctl(&["status", &vm.pid.to_string()]);
    assert!(human.status.success(), "{}", stderr(&human));
    let human = String::from_utf8_lossy(&human.stdout).into_owned();

    let info = api_get(&client, "/vm");
    let placement = api_get(&client, "/memory/placement");
    let memory = &info["memory"];
    assert_eq!(status["pid"], vm.pid);
    assert_eq!(status["page_size"], placement["page_size"]);
    let gmems = status["guest_memfds"].as_array().unwrap();
    assert_eq!(gmems.len(), 1, "{status:#}");
    let gmem = &gmems[0];
    assert_eq!(gmem["size_bytes"], memory["gmem_size"]);
    assert_eq!(gmem["host_mappable"], true);
    assert_eq!(gmem["flags"]["set"], memory["gmem_flags"]);
    assert_eq!(gmem["pages_per_node"], placement["per_node"]);
    let api_resident: u64 = placement["per_node"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(gmem["resident_pages"], api_resident);
    assert!(
        human.contains(&format!("{api_resident} pages (")),
        "{human}"
    );

    // Page for page. The API lists guest RAM in guest order; status lists the gmem file.
    // A VM that never migrated keeps chunk i at gmem offset i * chunk_size, so the first
    // guest_size bytes of the file are guest RAM in order, and the spare chunks after
    // them hold nothing.
    let from_outside = pages_of(&gmem["placement"]);
    let from_api = pages_of(&placement);
    let guest_pages = memory["guest_size"].as_u64().unwrap() / page_size();
    assert_eq!(from_api.len() as u64, guest_pages);
    assert_eq!(
        from_outside.len() as u64 * page_size(),
        memory["gmem_size"].as_u64().unwrap()
    );
    for (page, (outside, api)) in from_outside.iter().zip(&from_api).enumerate() {
        assert_eq!(outside, api, "guest page {page}");
    }
    assert!(
        from_outside[guest_pages as usize..]
            .iter()
            .all(|l| l == "not_present"),
        "a spare chunk holds pages"
    );

    // numa_maps of the VMM, the old view, saw almost none of it: only what the VMM
    // itself wrote (the guest's code and tables).
    let vmm_mapped = gmem["vmm_mapped_pages"].as_u64().unwrap();
    assert!(
        vmm_mapped * 100 < api_resident,
        "numa_maps counted {vmm_mapped} of {api_resident} pages"
    );
    let mappings = gmem["vmm_mappings"].as_array().unwrap();
    assert_eq!(mappings.len(), 1, "{gmem:#}");
    assert_eq!(mappings[0]["gmem_offset"], 0);
    assert_eq!(mappings[0]["size_bytes"], memory["gmem_size"]);
    assert_eq!(mappings[0]["mapped_pages"], vmm_mapped);

    // numastat's layout: the guest_memfd row holds what the API counts, per node and in
    // total (MB, two decimals), and Private leaves the VMM-mapped gmem pages out.
    let numastat = gmemctl(&["status", &vm.pid.to_string(), "--numastat"]);
    assert!(numastat.status.success(), "{}", stderr(&numastat));
    let numastat = String::from_utf8_lossy(&numastat.stdout).into_owned();
    assert!(
        numastat.contains(&format!(
            "Per-node process memory usage (in MBs) for PID {}",
            vm.pid
        )),
        "{numastat}"
    );
    let row = |name: &str| -> Vec<String> {
        let line = numastat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} row: {numastat}"));
        line.split_whitespace().skip(1).map(str::to_owned).collect()
    };
    let mb = |pages: u64| format!("{:.2}", (pages * page_size()) as f64 / (1 << 20) as f64);
    let per_node = placement["per_node"].as_object().unwrap();
    let header: Vec<String> = numastat
        .lines()
        .find(|l| l.trim_start().starts_with("Node "))
        .unwrap()
        .split("Node ")
        .skip(1)
        .map(|c| c.split_whitespace().next().unwrap().to_owned())
        .collect();
    let gmem_row = row("guest_memfd");
    assert_eq!(gmem_row.len(), header.len() + 1, "{numastat}");
    for (node, value) in header.iter().zip(&gmem_row) {
        let pages = per_node.get(node).and_then(Value::as_u64).unwrap_or(0);
        assert_eq!(*value, mb(pages), "node {node}: {numastat}");
    }
    assert_eq!(gmem_row.last().unwrap(), &mb(api_resident), "{numastat}");
    for name in ["Huge", "Heap", "Stack", "Private", "Total"] {
        assert_eq!(row(name).len(), header.len() + 1, "{name}: {numastat}");
    }

    let resumed = client
        .put_json("/vm/state", &json!({"state": "Running"}))
        .unwrap();
    assert_eq!(resumed.json::<Value>().unwrap()["state"], "Running");
    let (code, err) = vm.terminate();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("with 0 mismatches"), "{err}");
}

#[test]
fn status_counts_exactly_the_pages_a_guest_wrote_that_its_vmm_never_mapped() {
    if kvm_or_skip("status_counts_exactly_the_pages_a_guest_wrote").is_none() {
        return;
    }
    let holder = Holder::start();
    let ready = &holder.ready;
    let out = gmemctl(&["status", &holder.pid(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = json(&out);
    assert_eq!(status["guest_memfds"].as_array().unwrap().len(), 3);
    let page = page_size();

    // The data gmem: exactly the pages the guest wrote, and where, none of them mapped in
    // the VMM.
    let data = gmem_with_fd(&status, &ready["data"]["fd"]);
    assert_eq!(data["size_bytes"], ready["data"]["size"]);
    assert_eq!(data["host_mappable"], true);
    assert_eq!(
        data["flags"]["set"]["names"],
        json!(["MMAP", "INIT_SHARED"])
    );
    let written: Vec<(u64, u64)> = ready["data"]["guest_written"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["offset"].as_u64().unwrap() / page,
                r["pages"].as_u64().unwrap(),
            )
        })
        .collect();
    let pages = pages_of(&data["placement"]);
    assert_eq!(
        pages.len() as u64 * page,
        ready["data"]["size"].as_u64().unwrap()
    );
    for (index, location) in pages.iter().enumerate() {
        let index = index as u64;
        let was_written = written
            .iter()
            .any(|&(first, count)| (first..first + count).contains(&index));
        assert_eq!(
            location != "not_present",
            was_written,
            "data page {index}: {location}"
        );
    }
    let total_written: u64 = written.iter().map(|&(_, count)| count).sum();
    assert_eq!(data["resident_pages"], total_written);
    assert_eq!(
        data["pages_per_node"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        total_written
    );
    // The VMM maps it (for the memslot) but never touched it: numa_maps counts nothing.
    assert_eq!(data["vmm_mapped_pages"], 0);
    let mappings = data["vmm_mappings"].as_array().unwrap();
    assert_eq!(mappings.len(), 1, "{data:#}");
    let data_map = ready["data"]["mapping"].as_u64().unwrap();
    assert_eq!(mappings[0]["start"], format!("{data_map:#x}"));
    assert_eq!(mappings[0]["gmem_offset"], 0);
    assert_eq!(mappings[0]["policy"], "default");
    let pid: u32 = holder.pid().parse().unwrap();
    let numa_maps = NumaMaps::read(pid).unwrap();
    let line = numa_maps
        .at(data_map)
        .expect("numa_maps lists the data mapping");
    assert!(line.is_gmem());
    assert_eq!(line.resident_pages(), 0, "{line:?}");

    // The control: pages the VMM wrote through its own mapping, which numa_maps sees too.
    let system = gmem_with_fd(&status, &ready["system"]["fd"]);
    assert_eq!(
        system["resident_pages"],
        ready["system"]["host_written_pages"]
    );
    assert_eq!(
        system["vmm_mapped_pages"],
        ready["system"]["host_written_pages"]
    );

    // The gmem without MMAP: listed, but nothing of its pages is visible to the host.
    let hidden = gmem_with_fd(&status, &ready["hidden"]["fd"]);
    assert_eq!(hidden["size_bytes"], ready["hidden"]["size"]);
    assert_eq!(hidden["host_mappable"], false);
    assert_eq!(hidden["flags"]["set"]["value"], 0);
    assert_eq!(hidden["resident_pages"], Value::Null);
    assert_eq!(hidden["pages_per_node"], Value::Null);
    assert_eq!(hidden["vmm_mappings"], json!([]));

    let human = gmemctl(&["status", &holder.pid()]);
    assert!(human.status.success(), "{}", stderr(&human));
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("3 guest_memfds"), "{human}");
    assert!(
        human.contains(&format!("{total_written} pages (1.5 MiB)")),
        "{human}"
    );
    assert!(human.contains("unknown (not host-mappable)"), "{human}");
}

#[test]
fn status_of_no_process_is_a_user_error() {
    // PIDs above pid_max (at most 2^22) never exist.
    let out = gmemctl(&["status", "99999999"]);
    assert_user_error(&out, "no process with PID 99999999");
}

#[test]
fn status_of_a_process_without_guest_memfd_is_a_user_error() {
    let mut child = Command::new("sleep").arg("30").spawn().expect("sleep runs");
    let pid = child.id();
    let out = gmemctl(&["status", &pid.to_string()]);
    child.kill().ok();
    child.wait().ok();
    assert_user_error(&out, &format!("process {pid} has no guest_memfd open"));
}

#[test]
fn status_without_ptrace_rights_is_a_user_error() {
    if kvm_or_skip("status_without_ptrace_rights_is_a_user_error").is_none() {
        return;
    }
    let holder = Holder::start();
    let pid = holder.pid();
    let needle = format!("no ptrace rights over process {pid}");
    // Another user, and root without its capabilities: neither may take a root VMM's fds.
    for setpriv in [
        &["--reuid=65534", "--regid=65534", "--clear-groups"][..],
        &["--inh-caps=-all", "--bounding-set=-all"][..],
    ] {
        let out = Command::new("setpriv")
            .args(setpriv)
            .args([env!("CARGO_BIN_EXE_gmemctl"), "status", &pid])
            .output()
            .expect("setpriv (util-linux) is needed for this test");
        assert_user_error(&out, &needle);
        assert!(stderr(&out).contains("CAP_SYS_PTRACE"), "{}", stderr(&out));
    }
    // With them, the same command works.
    let out = gmemctl(&["status", &pid]);
    assert!(out.status.success(), "{}", stderr(&out));
}
