//! Moving guest memory between NUMA nodes without losing a byte (work in progress).

mod quiesce;

pub use quiesce::{NothingToQuiesce, Paused, Quiesce, QuiesceError};
