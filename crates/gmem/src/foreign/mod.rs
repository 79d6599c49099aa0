//! A VMM this process did not start, reached by its PID: stop and resume all of its
//! threads around each batch of a migration of its guest memory.
//!
//! Its guest memory itself is taken with [`AttachedGmem`](crate::memory::AttachedGmem) and
//! moved with [`ForeignMemory`](crate::migrate::ForeignMemory); [`VmmStop`] is the
//! [`Quiesce`](crate::migrate::Quiesce) that keeps the VMM off it meanwhile.

mod procfs;
mod stop;

pub use stop::{FoundState, StopError, StopMethod, VmmStop};
