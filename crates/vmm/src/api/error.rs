//! `ApiError`: why a request was refused or failed, with the HTTP status that says so.

use std::io;

use gmem::memory::MemoryError;
use gmem::migrate::MigrateError;

use crate::error::VmError;

/// A refused or failed API request. Each variant maps to one HTTP status; the body a client
/// gets is `{"error": "<the message>"}`, the message being this error and its causes joined
/// into one sentence.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No route has this path.
    #[error("there is no resource at {path}: see the OpenAPI document for the routes")]
    UnknownRoute {
        /// The path asked for.
        path: String,
    },
    /// The route exists but not with this method.
    #[error("{method} is not allowed on {path}: use {allow}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path.
        path: String,
        /// The methods the route accepts, comma-separated (also sent as `Allow`).
        allow: &'static str,
    },
    /// The request body is over the limit.
    #[error("the request body is larger than the {limit} byte limit")]
    BodyTooLarge {
        /// Bytes allowed.
        limit: usize,
    },
    /// The request body could not be read off the connection.
    #[error("cannot read the request body: {0}")]
    ReadBody(String),
    /// The body is not the JSON this route takes (syntax, types, unknown or missing fields).
    #[error("the request body is not a valid {what}: {detail}")]
    MalformedBody {
        /// What the route expects, e.g. "migration request".
        what: &'static str,
        /// serde_json's account of what is wrong, with line and column.
        detail: String,
    },
    /// The body is well-formed but asks for something impossible or absurd.
    #[error("{0}")]
    InvalidRequest(String),
    /// The migration cannot run as asked (a node that does not exist, a mechanism that does
    /// not fit, ...), found when planning it.
    #[error("{0}")]
    RefusedMigration(#[source] MigrateError),
    /// No migration has this id (or it is too old to be kept).
    #[error(
        "there is no migration {id}: ids come from PUT /memory/migrate, and only the last {kept} are kept"
    )]
    UnknownMigration {
        /// The id asked for, as sent.
        id: String,
        /// How many finished migrations are kept.
        kept: usize,
    },
    /// A migration is already running.
    #[error(
        "migration {running} is still running: wait until it finishes, one migration runs at a time"
    )]
    MigrationRunning {
        /// Its id.
        running: u64,
    },
    /// The VM has been shut down.
    #[error("the VM has been shut down")]
    VmStopped,
    /// Planning the migration failed on the host's side.
    #[error("cannot plan the migration")]
    PlanMigration(#[source] MigrateError),
    /// The migration thread could not be started.
    #[error("cannot start the migration thread")]
    SpawnMigration(#[source] io::Error),
    /// Reading the placement of guest memory failed.
    #[error("cannot read the placement of guest memory")]
    ReadPlacement(#[source] MemoryError),
    /// Pausing the VM failed.
    #[error("cannot pause the VM")]
    PauseVm(#[source] VmError),
    /// Resuming the VM failed.
    #[error("cannot resume the VM")]
    ResumeVm(#[source] VmError),
    /// The handler of the request panicked (a bug in this crate); the VM goes on.
    #[error("the request handler failed unexpectedly: {0}")]
    HandlerPanicked(String),
}

impl ApiError {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::UnknownRoute { .. } | ApiError::UnknownMigration { .. } => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::BodyTooLarge { .. } => 413,
            ApiError::ReadBody(_)
            | ApiError::MalformedBody { .. }
            | ApiError::InvalidRequest(_)
            | ApiError::RefusedMigration(_) => 400,
            ApiError::MigrationRunning { .. } | ApiError::VmStopped => 409,
            ApiError::PlanMigration(_)
            | ApiError::SpawnMigration(_)
            | ApiError::ReadPlacement(_)
            | ApiError::PauseVm(_)
            | ApiError::ResumeVm(_)
            | ApiError::HandlerPanicked(_) => 500,
        }
    }

    /// The `Allow` header value, for 405 responses.
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            ApiError::MethodNotAllowed { allow, .. } => Some(allow),
            _ => None,
        }
    }

    /// The message and all its causes as one sentence, for the `error` field.
    pub fn sentence(&self) -> String {
        sentence(self)
    }
}

/// An error and its `source` chain as one line: "a: b: c", without repeating a cause that
/// the message already quotes.
pub(crate) fn sentence(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_sentences() {
        let e = ApiError::MethodNotAllowed {
            method: "POST".into(),
            path: "/vm".into(),
            allow: "GET",
        };
        assert_eq!(e.status(), 405);
        assert_eq!(e.allow(), Some("GET"));
        assert_eq!(e.sentence(), "POST is not allowed on /vm: use GET");
        let e = ApiError::RefusedMigration(MigrateError::InvalidRequest("x".into()));
        assert_eq!(e.status(), 400);
        assert_eq!(e.sentence(), "invalid migration request: x");
        let e = ApiError::SpawnMigration(io::Error::other("no threads"));
        assert_eq!(
            e.sentence(),
            "cannot start the migration thread: no threads"
        );
    }
}
