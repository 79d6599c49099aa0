//! `Api`: executes parsed requests against a running [`Vm`]; knows nothing of HTTP.

use std::sync::Arc;

use serde::Serialize;

use super::error::ApiError;
use super::jobs::Jobs;
use super::model::{
    JobAccepted, MemoryInfo, MetricsInfo, PlacementInfo, VcpuInfo, VmInfo, VmStateInfo,
};
use super::request::{ApiRequest, RequestedState};
use crate::vm::Vm;

/// A successful answer: a status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    /// HTTP status (200 or 202).
    pub status: u16,
    /// The body.
    pub body: serde_json::Value,
    /// A `Location` header, for 202 answers.
    pub location: Option<String>,
}

impl ApiResponse {
    fn ok(body: impl Serialize) -> Self {
        ApiResponse {
            status: 200,
            body: serde_json::to_value(body).unwrap_or(serde_json::Value::Null),
            location: None,
        }
    }
}

/// The API of one VM: its state and its migration jobs.
#[derive(Debug)]
pub struct Api {
    vm: Arc<Vm>,
    jobs: Arc<Jobs>,
}

impl Api {
    /// An API for `vm`.
    pub fn new(vm: Arc<Vm>) -> Self {
        Api {
            vm,
            jobs: Arc::new(Jobs::default()),
        }
    }

    /// The VM served.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Whether executing `request` only takes short locks, so it may run on the event loop
    /// itself. The others can block (a pause waits for every vCPU, a placement query waits
    /// for a running migration, planning reads every page's node) and go to a thread; this
    /// keeps polling a job answered while they wait.
    pub fn is_quick(request: &ApiRequest) -> bool {
        match request {
            ApiRequest::GetVm
            | ApiRequest::GetVmState
            | ApiRequest::ListMigrations
            | ApiRequest::GetMigration(_)
            | ApiRequest::GetMetrics => true,
            ApiRequest::SetVmState(_) | ApiRequest::GetPlacement | ApiRequest::Migrate(_) => false,
        }
    }

    /// Executes one request. May block unless [`is_quick`](Api::is_quick) says otherwise:
    /// call it off any async executor.
    pub fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        match request {
            ApiRequest::GetVm => Ok(ApiResponse::ok(self.vm_info())),
            ApiRequest::GetVmState => Ok(ApiResponse::ok(VmStateInfo {
                state: self.vm.state(),
            })),
            ApiRequest::SetVmState(state) => {
                if self.vm.state() == crate::metrics::VmState::Stopped {
                    return Err(ApiError::VmStopped);
                }
                match state {
                    RequestedState::Paused => self.vm.pause().map_err(ApiError::PauseVm)?,
                    RequestedState::Running => self.vm.resume().map_err(ApiError::ResumeVm)?,
                }
                Ok(ApiResponse::ok(VmStateInfo {
                    state: self.vm.state(),
                }))
            }
            ApiRequest::GetPlacement => {
                let placement = self
                    .jobs
                    .without_migration(|| self.vm.memory().guest_placement())
                    .map_err(ApiError::ReadPlacement)?;
                Ok(ApiResponse::ok(PlacementInfo {
                    page_size: placement.page_size,
                    pages: placement.pages(),
                    per_node: placement.per_node(),
                    not_present: placement.not_present(),
                    ranges: placement.ranges,
                }))
            }
            ApiRequest::Migrate(request) => {
                let id = self.jobs.start(&self.vm, *request)?;
                let href = format!("/memory/migrations/{id}");
                Ok(ApiResponse {
                    status: 202,
                    body: serde_json::to_value(JobAccepted {
                        id,
                        href: href.clone(),
                    })
                    .unwrap_or(serde_json::Value::Null),
                    location: Some(href),
                })
            }
            ApiRequest::ListMigrations => Ok(ApiResponse::ok(self.jobs.list())),
            ApiRequest::GetMigration(id) => {
                self.jobs
                    .view(id)
                    .map(ApiResponse::ok)
                    .ok_or(ApiError::UnknownMigration {
                        id: id.to_string(),
                        kept: super::jobs::KEPT_JOBS,
                    })
            }
            ApiRequest::GetMetrics => Ok(ApiResponse::ok(MetricsInfo {
                guest: self.vm.metrics(),
                migrations: self.jobs.totals(),
            })),
        }
    }

    fn vm_info(&self) -> VmInfo {
        let memory = self.vm.memory();
        let layout = memory.layout();
        let metrics = self.vm.metrics();
        VmInfo {
            state: metrics.state,
            pid: std::process::id(),
            uptime_ms: metrics.uptime_ms,
            config: self.vm.config().clone(),
            memory: MemoryInfo {
                guest_size: layout.guest_size,
                chunk_size: layout.chunk_size,
                chunks: layout.chunks(),
                spare_chunks: layout.spare_chunks,
                spare_chunks_free: memory.spare_chunks() as u64,
                gmem_size: layout.gmem_size(),
                gmem_flags: memory.gmem().flags(),
                page_size: gmem::memory::page_size(),
                slot_zap_all_disabled: self.vm.slot_zap_all_disabled(),
            },
            vcpus: self
                .vm
                .slices()
                .iter()
                .enumerate()
                .map(|(index, slice)| VcpuInfo {
                    index: index as u32,
                    slice_start: slice.start,
                    slice_len: slice.len,
                })
                .collect(),
        }
    }

    /// Waits for running migration threads to finish (for shutdown).
    pub fn join_migrations(&self) {
        self.jobs.join();
    }
}
