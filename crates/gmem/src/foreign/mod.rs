//! A VMM this process did not start, reached by its PID: stop and resume all of its
//! threads around each batch of a migration of its guest memory, journal each batch so
//! that nothing is lost if this process dies in the middle of one, and find what a stop
//! cannot make safe ([`hazards`]).
//!
//! Its guest memory itself is taken with [`AttachedGmem`](crate::memory::AttachedGmem) and
//! moved with [`ForeignMemory`](crate::migrate::ForeignMemory); [`VmmStop`] is the
//! [`Quiesce`](crate::migrate::Quiesce) that keeps the VMM off it meanwhile, and
//! [`Journal`] the [`BatchJournal`](crate::migrate::BatchJournal) that [`recover`] reads.

mod hazards;
mod journal;
mod procfs;
mod stop;

pub use hazards::{Hazard, Reach, hazards};
pub use journal::{
    DEFAULT_JOURNAL_DIR, GmemJournal, Journal, JournalSync, RecoverError, Recovered, RestoredBatch,
    journalled_pids, recover,
};
pub use stop::{FoundState, StopError, StopMethod, VmmStop};
