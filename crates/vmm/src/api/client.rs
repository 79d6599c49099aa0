//! `ApiClient`: a small blocking HTTP/1.1 client for the API socket, one connection per
//! request (for gmemctl and tests; raw requests too, to test malformed input).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest response accepted, bytes.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Why a request to the API did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    /// Nothing is listening at the socket path (or it cannot be reached).
    #[error("cannot connect to the VMM API at {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The request could not be sent.
    #[error("cannot send the request to the VMM API")]
    Send(#[source] io::Error),
    /// The answer could not be read.
    #[error("cannot read the VMM API's answer")]
    Receive(#[source] io::Error),
    /// The answer is not an HTTP response this client understands.
    #[error("the VMM API sent a malformed answer: {0}")]
    MalformedResponse(String),
    /// A JSON body could not be encoded or decoded.
    #[error("the VMM API's answer (status {status}) is not the JSON expected")]
    Json {
        /// The HTTP status of the answer.
        status: u16,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

impl ApiClientError {
    /// Whether no VMM serves at the path (no such socket, or nobody listening).
    pub fn no_server(&self) -> bool {
        matches!(self, ApiClientError::Connect { source, .. }
            if matches!(source.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::PermissionDenied))
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct ApiReply {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl ApiReply {
    /// A header's value (name matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body decoded as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiClientError> {
        serde_json::from_slice(&self.body).map_err(|source| ApiClientError::Json {
            status: self.status,
            source,
        })
    }

    /// The `error` sentence of an error answer.
    pub fn error_sentence(&self) -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        value.get("error")?.as_str().map(str::to_owned)
    }
}

/// Talks to one VMM's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client for the socket at `path`. Each read or write waits at most 60 s.
    pub fn new(path: impl AsRef<Path>) -> Self {
        ApiClient {
            path: path.as_ref().to_owned(),
            timeout: Duration::from_secs(60),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<ApiReply, ApiClientError> {
        self.request("GET", path, None)
    }

    /// `PUT path` with `body` as JSON.
    pub fn put_json(&self, path: &str, body: &impl Serialize) -> Result<ApiReply, ApiClientError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|source| ApiClientError::Json { status: 0, source })?;
        self.request("PUT", path, Some(&bytes))
    }

    /// Any method and path, with an optional body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<ApiReply, ApiClientError> {
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(body) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        self.send_raw(&bytes)
    }

    /// Sends `bytes` as they are and reads one answer.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<ApiReply, ApiClientError> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ApiClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(ApiClientError::Send)?;
        // The server may answer (413) and close before reading everything: a failed write
        // is not the end if an answer is there to read.
        let sent = stream.write_all(bytes).and_then(|()| stream.flush());
        match read_reply(&mut stream) {
            Ok(reply) => Ok(reply),
            Err(e) => match sent {
                Err(send) => Err(ApiClientError::Send(send)),
                Ok(()) => Err(e),
            },
        }
    }
}

/// Reads one HTTP/1.1 answer: the head, then `Content-Length` bytes or up to EOF.
fn read_reply(stream: &mut UnixStream) -> Result<ApiReply, ApiClientError> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    let (head_len, status, headers) = loop {
        let mut parsed_headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut parsed_headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.unwrap_or(0);
                let headers: Vec<(String, String)> = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (len, status, headers);
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(ApiClientError::MalformedResponse(e.to_string())),
        }
        let n = stream.read(&mut chunk).map_err(ApiClientError::Receive)?;
        if n == 0 {
            return Err(ApiClientError::MalformedResponse(if buf.is_empty() {
                "the connection was closed without an answer".into()
            } else {
                "the connection was closed in the middle of the answer's head".into()
            }));
        }
        if buf.len() + n > MAX_RESPONSE_BYTES {
            return Err(ApiClientError::MalformedResponse(
                "the answer is too large".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    if header("transfer-encoding").is_some() {
        return Err(ApiClientError::MalformedResponse(
            "chunked answers are not supported".into(),
        ));
    }
    let length =
        match header("content-length") {
            Some(v) => Some(v.trim().parse::<usize>().map_err(|_| {
                ApiClientError::MalformedResponse(format!("bad Content-Length '{v}'"))
            })?),
            None => None,
        };
    if length.is_some_and(|l| l > MAX_RESPONSE_BYTES) {
        return Err(ApiClientError::MalformedResponse(
            "the answer is too large".into(),
        ));
    }
    let mut body = buf.split_off(head_len);
    loop {
        if length.is_some_and(|l| body.len() >= l) {
            break;
        }
        let n = stream.read(&mut chunk).map_err(ApiClientError::Receive)?;
        if n == 0 {
            if length.is_some() {
                return Err(ApiClientError::MalformedResponse(
                    "the connection was closed before the whole body arrived".into(),
                ));
            }
            break;
        }
        if body.len() + n > MAX_RESPONSE_BYTES {
            return Err(ApiClientError::MalformedResponse(
                "the answer is too large".into(),
            ));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if let Some(l) = length {
        body.truncate(l);
    }
    Ok(ApiReply {
        status,
        headers,
        body,
    })
}
