//! Shared by the API tests: a VM served on a temporary socket, and polling helpers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm::api::{ApiClient, ApiReply, ApiServer};
use vmm::{Vm, VmConfig};

/// One VM at a time per test binary: two cores, and timing-sensitive guests.
fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A private temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running VM and its API server.
pub struct Served {
    pub client: ApiClient,
    pub server: ApiServer,
    pub vm: Arc<Vm>,
    pub dir: TempDir,
    _guard: MutexGuard<'static, ()>,
}

impl Served {
    pub fn get(&self, path: &str) -> ApiReply {
        self.client.get(path).unwrap()
    }

    pub fn get_json(&self, path: &str) -> Value {
        let reply = self.get(path);
        assert_eq!(reply.status, 200, "GET {path}: {}", text(&reply));
        reply.json().unwrap()
    }

    pub fn put(&self, path: &str, body: &str) -> ApiReply {
        self.client
            .request("PUT", path, Some(body.as_bytes()))
            .unwrap()
    }

    /// Submits a migration and returns its id.
    pub fn submit(&self, body: &str) -> u64 {
        let reply = self.put("/memory/migrate", body);
        assert_eq!(reply.status, 202, "{body}: {}", text(&reply));
        let id = reply.json::<Value>().unwrap()["id"].as_u64().unwrap();
        assert_eq!(
            reply.header("location"),
            Some(format!("/memory/migrations/{id}").as_str())
        );
        id
    }

    /// Polls a migration until it is no longer running.
    pub fn wait_for_job(&self, id: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let job = self.get_json(&format!("/memory/migrations/{id}"));
            if job["state"] != "running" {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "migration {id} never ended: {job}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Per-vCPU sweeps from `GET /metrics`.
    pub fn sweeps(&self) -> Vec<u64> {
        let metrics = self.get_json("/metrics");
        metrics["guest"]["vcpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["sweeps"].as_u64().unwrap())
            .collect()
    }

    /// Waits until every vCPU finished `more` sweeps beyond `from`; returns `/metrics`.
    pub fn wait_for_sweeps(&self, from: &[u64], more: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let metrics = self.get_json("/metrics");
            let vcpus = metrics["guest"]["vcpus"].as_array().unwrap();
            for v in vcpus {
                assert!(v["failure"].is_null(), "a vCPU failed: {metrics}");
            }
            if vcpus
                .iter()
                .zip(from)
                .all(|(v, before)| v["sweeps"].as_u64().unwrap() >= before + more)
            {
                return metrics;
            }
            assert!(
                Instant::now() < deadline,
                "the guest made no progress: {metrics}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Starts a VM with `config` and serves its API at a temporary socket; `None` (after a SKIP
/// line) without KVM.
pub fn serve(test: &str, config: VmConfig) -> Option<Served> {
    gmem::testing::kvm_or_skip(test)?;
    let guard = one_vm_at_a_time();
    let vm = Arc::new(Vm::start(config).unwrap_or_else(|e| panic!("{test}: {e}")));
    let dir = TempDir::new(test);
    let path = dir.path().join("api.sock");
    let server = ApiServer::start(Arc::clone(&vm), &path).unwrap();
    Some(Served {
        client: ApiClient::new(&path),
        server,
        vm,
        dir,
        _guard: guard,
    })
}

/// A small VM: 64 MiB, 2 vCPUs, 2 MiB chunks, 4 spare.
pub fn small() -> VmConfig {
    VmConfig {
        mem_size: 64 << 20,
        vcpus: 2,
        chunk_size: 2 << 20,
        spare_chunks: 4,
        linux: None,
    }
}

pub fn text(reply: &ApiReply) -> String {
    format!("{} {}", reply.status, String::from_utf8_lossy(&reply.body))
}

/// Whether the host has a second NUMA node with memory.
pub fn nodes_with_memory() -> Vec<u32> {
    gmem::numa::Topology::read()
        .unwrap()
        .nodes
        .iter()
        .filter(|n| n.total_bytes > 0)
        .map(|n| n.id.0)
        .collect()
}

/// Checks a finished job: succeeded, complete, verified, no guest mismatch.
pub fn assert_succeeded(job: &Value) {
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let report = &job["report"];
    assert_eq!(report["complete"], true, "{job:#}");
    assert_eq!(report["content_mismatches"], 0, "{job:#}");
    assert_eq!(report["pages_moved"], report["pages_planned"], "{job:#}");
    assert!(report["failures"].as_array().unwrap().is_empty(), "{job:#}");
    assert_eq!(job["guest"]["mismatches"], 0, "{job:#}");
    assert!(job["error"].is_null());
}
