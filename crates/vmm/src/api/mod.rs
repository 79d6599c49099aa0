//! The VMM's control API: HTTP/1.1 with JSON over a Unix socket (see `api/openapi.yaml`).
//!
//! Layers, each testable on its own: [`parse_request`] turns `(method, path, body)` into an
//! [`ApiRequest`] without touching anything (and is fuzzed); [`Api`] executes requests
//! against a [`Vm`](crate::Vm), running migrations on their own threads, one at a time;
//! [`ApiServer`] serves it with hyper on a single-threaded tokio runtime; [`ApiClient`] is
//! the blocking client that `gmemctl` and the tests use.

mod client;
mod error;
mod jobs;
pub mod model;
mod request;
mod router;
mod server;
mod socket;

pub use client::{ApiClient, ApiClientError, ApiReply};
pub use error::ApiError;
pub use jobs::KEPT_JOBS;
pub use request::{
    ApiRequest, CPU_LIMIT, MAX_BODY_BYTES, MAX_STOP_US_LIMIT, MigrateBody, RequestedState,
    VmStateBody, parse_request,
};
pub use router::{Api, ApiResponse};
pub use server::{ApiServer, ApiServerError};
