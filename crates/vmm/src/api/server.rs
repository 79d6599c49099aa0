//! `ApiServer`: HTTP/1.1 over a Unix socket (hyper), on a single-threaded tokio runtime on
//! its own thread. Handlers run on the runtime's small blocking pool.

use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, oneshot};

use super::error::ApiError;
use super::request::{MAX_BODY_BYTES, parse_request};
use super::router::{Api, ApiResponse};
use super::socket;
use crate::vm::Vm;

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Handler threads at most (placement queries and migration planning block).
const MAX_BLOCKING_THREADS: usize = 4;
/// A client must send its request head within this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the API server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Another process serves on the path.
    #[error(
        "{} is in use: another VMM is serving there (stop it, or choose another --api-sock)",
        path.display()
    )]
    SocketInUse {
        /// The path.
        path: PathBuf,
    },
    /// Something that is not a socket is at the path.
    #[error("{} exists and is not a socket: refusing to replace it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The path could not be examined.
    #[error("cannot check what is at {}", path.display())]
    InspectPath {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A stale socket could not be removed.
    #[error("cannot remove the stale socket {}", path.display())]
    RemoveStaleSocket {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket could not be created.
    #[error("cannot create the API socket {}", path.display())]
    CreateSocket {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The async runtime could not be built or take the socket.
    #[error("cannot start the API's event loop")]
    StartRuntime(#[source] io::Error),
    /// The server thread could not be started.
    #[error("cannot start the API server thread")]
    SpawnThread(#[source] io::Error),
    /// The server thread panicked.
    #[error("the API server thread panicked")]
    ThreadPanicked,
    /// The socket could not be removed at shutdown.
    #[error("cannot remove the API socket {}", path.display())]
    RemoveSocket {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl ApiServerError {
    /// Whether the user can fix it by choosing another path or stopping the other VMM.
    pub fn is_user_error(&self) -> bool {
        match self {
            ApiServerError::SocketInUse { .. } | ApiServerError::NotASocket { .. } => true,
            ApiServerError::InspectPath { source, .. }
            | ApiServerError::CreateSocket { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::NotFound
                    | io::ErrorKind::PermissionDenied
                    | io::ErrorKind::AlreadyExists
                    | io::ErrorKind::InvalidInput
            ),
            _ => false,
        }
    }
}

/// The control API of one VM, served on a Unix socket until shut down (or dropped).
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    socket_id: (u64, u64),
    api: Arc<Api>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Creates the socket at `path` (mode 0600; refuses a live one, replaces a stale one)
    /// and serves `vm`'s API on it from a new thread.
    pub fn start(vm: Arc<Vm>, path: &Path) -> Result<ApiServer, ApiServerError> {
        let bound = socket::bind(path)?;
        let socket_id = bound.id;
        let cleanup = |e| {
            let _ = socket::remove(path, socket_id);
            e
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .thread_name("vmm-api-handler")
            .build()
            .map_err(|e| cleanup(ApiServerError::StartRuntime(e)))?;
        let listener = {
            let _context = runtime.enter();
            bound
                .listener
                .set_nonblocking(true)
                .and_then(|()| UnixListener::from_std(bound.listener))
                .map_err(|e| cleanup(ApiServerError::StartRuntime(e)))?
        };
        let api = Arc::new(Api::new(vm));
        let (stop, stopped) = oneshot::channel();
        let served = Arc::clone(&api);
        let thread = std::thread::Builder::new()
            .name("vmm-api".into())
            .spawn(move || {
                runtime.block_on(serve(listener, served, stopped));
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(|e| cleanup(ApiServerError::SpawnThread(e)))?;
        Ok(ApiServer {
            path: path.to_owned(),
            socket_id,
            api,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The API served (to execute requests in-process).
    pub fn api(&self) -> &Arc<Api> {
        &self.api
    }

    /// Whether the server thread is still serving.
    pub fn is_serving(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops serving, waits for a running migration to finish, and removes the socket.
    /// Idempotent; also done on drop.
    pub fn shutdown(&mut self) -> Result<(), ApiServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let panicked = self.thread.take().is_some_and(|t| t.join().is_err());
        self.api.join_migrations();
        socket::remove(&self.path, self.socket_id).map_err(|source| {
            ApiServerError::RemoveSocket {
                path: self.path.clone(),
                source,
            }
        })?;
        if panicked {
            return Err(ApiServerError::ThreadPanicked);
        }
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Accepts connections until told to stop.
async fn serve(listener: UnixListener, api: Arc<Api>, mut stop: oneshot::Receiver<()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors or similar: wait instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue; // too many connections: this one is closed unanswered
        };
        let api = Arc::clone(&api);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request| respond(Arc::clone(&api), request));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Answers one HTTP request. Never fails: every error becomes a JSON error response.
async fn respond(
    api: Arc<Api>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = ApiError::BodyTooLarge {
        limit: MAX_BODY_BYTES,
    };
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Ok(error_response(&too_large, true));
    }
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(error_response(&too_large, true));
        }
        Err(e) => return Ok(error_response(&ApiError::ReadBody(e.to_string()), true)),
    };
    let result = match parse_request(&method, &path, &body) {
        Ok(parsed) if Api::is_quick(&parsed) => api.handle(parsed),
        Ok(parsed) => tokio::task::spawn_blocking(move || api.handle(parsed))
            .await
            .unwrap_or_else(|e| Err(ApiError::HandlerPanicked(e.to_string()))),
        Err(e) => Err(e),
    };
    Ok(match result {
        Ok(answer) => ok_response(answer),
        Err(e) => error_response(&e, false),
    })
}

fn json_response(status: u16) -> hyper::http::response::Builder {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(CONTENT_TYPE, "application/json")
}

fn finish(builder: hyper::http::response::Builder, body: Vec<u8>) -> Response<Full<Bytes>> {
    builder
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| {
            let mut fallback = Response::new(Full::new(Bytes::from_static(
                b"{\"error\":\"cannot build the response\"}\n",
            )));
            *fallback.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            fallback
        })
}

fn to_json(value: &impl serde::Serialize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"null".to_vec());
    bytes.push(b'\n');
    bytes
}

fn ok_response(answer: ApiResponse) -> Response<Full<Bytes>> {
    let body = to_json(&answer.body);
    let mut builder = json_response(answer.status);
    if let Some(location) = &answer.location {
        builder = builder.header(LOCATION, location.as_str());
    }
    finish(builder, body)
}

fn error_response(error: &ApiError, close: bool) -> Response<Full<Bytes>> {
    let body = to_json(&super::model::ErrorBody {
        error: error.sentence(),
    });
    let mut builder = json_response(error.status());
    if let Some(allow) = error.allow() {
        builder = builder.header(ALLOW, allow);
    }
    if close {
        builder = builder.header(CONNECTION, "close");
    }
    finish(builder, body)
}
