//! The crash journal of a migration of another process's memory, and recovery from it.
//!
//! Per VMM, in one directory (`/run/gmemctl` by default):
//! - `pid-N.session`: who stopped the VMM and how, and the state it was found in; created
//!   before the first stop, removed after the last resume, locked (flock) meanwhile;
//! - `pid-N.bounce`: the refault bounce buffer, a file mapped shared, so a batch's bytes
//!   are in the page cache, not in gmemctl, from the moment they are copied out;
//! - `pid-N.batch`: the batch in flight — the gmem (pid, fd, inode), offset, length and
//!   a checksum of the bytes — written before the punch, removed after the verified copy
//!   back, both while the VMM is stopped.
//!
//! So whenever gmemctl dies, the VMM's memory and the journal together hold every byte,
//! and [`recover`] puts back a batch in flight and resumes a VMM gmemctl had stopped.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::procfs;
use super::stop::{FoundState, StopError, StopMethod, VmmStop};
use crate::memory::{AttachError, AttachedGmem, GmemOffset, page_size};
use crate::migrate::verify::{BLOCK, hash_range};
use crate::migrate::{BatchJournal, BatchPoint, JournalError, MAX_BATCH_BYTES};
use crate::sys::mman::Mmap;

/// Where journals go unless told otherwise: /run is a tmpfs on most hosts, which lives as
/// long as the host, and so as long as any VMM whose memory it could hold.
pub const DEFAULT_JOURNAL_DIR: &str = "/run/gmemctl";

/// Format version of the records.
const VERSION: u32 = 1;

/// How far the journal goes to make a record last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalSync {
    /// fsync the bytes and the record before each punch: they survive a host crash too
    /// (which no VMM survives), at the price of a disk flush inside every stop.
    Fsync,
    /// Leave them in the page cache: they survive gmemctl's death — a `kill -9`, a panic,
    /// the OOM killer — which is what the journal is for.
    PageCache,
}

/// The session record: `pid-N.session`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionRecord {
    version: u32,
    pid: u32,
    /// With the PID, names the process for as long as the host runs.
    start_time: u64,
    stop_method: StopMethod,
    found: FoundState,
    gmemctl_pid: u32,
}

/// The batch record: `pid-N.batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BatchRecord {
    version: u32,
    pid: u32,
    start_time: u64,
    /// The VMM's descriptor for the gmem, and the gmem's identity.
    fd: i32,
    dev: u64,
    inode: u64,
    /// The batch: gmem offset and length; its bytes are `0..len` of the bounce file.
    offset: GmemOffset,
    len: u64,
    /// xxh3-64 of those bytes, as 16 hex digits.
    checksum: String,
}

/// The files of one VMM's journal.
#[derive(Debug, Clone)]
struct Paths {
    session: PathBuf,
    bounce: PathBuf,
    batch: PathBuf,
}

impl Paths {
    fn new(dir: &Path, pid: u32) -> Self {
        Paths {
            session: dir.join(format!("pid-{pid}.session")),
            bounce: dir.join(format!("pid-{pid}.bounce")),
            batch: dir.join(format!("pid-{pid}.batch")),
        }
    }
}

/// The open journal of one migration of process `pid`'s memory: the session is recorded
/// and locked, and the bounce file mapped.
#[derive(Debug)]
pub struct Journal {
    pid: u32,
    start_time: u64,
    paths: Paths,
    /// The session file, held locked for the life of the journal (the lock goes with this
    /// process, so a recovery can tell a live migration from a dead one).
    _locked_session: File,
    bounce_file: File,
    bounce: Mmap,
    sync: JournalSync,
    kill_at: Option<BatchPoint>,
}

impl Journal {
    /// Opens the journal of a migration of `stop`'s process in `dir`. Fails if another
    /// gmemctl holds it, or if a batch record is left there (recover it first).
    pub fn begin(dir: &Path, stop: &VmmStop, sync: JournalSync) -> Result<Journal, JournalError> {
        let pid = stop.pid();
        let create = |path: &Path| {
            let path = path.to_owned();
            move |source| JournalError::Create { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(create(dir))?;
        let paths = Paths::new(dir, pid);
        let session = open_locked(&paths.session, pid)?;
        if paths.batch.exists() {
            return Err(JournalError::Create {
                path: paths.batch.clone(),
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a batch record of an earlier migration is left: run gmemctl recover first",
                ),
            });
        }
        let start_time = procfs::start_time(pid).map_err(create(&paths.session))?;
        let record = SessionRecord {
            version: VERSION,
            pid,
            start_time,
            stop_method: stop.method().clone(),
            found: stop.found(),
            gmemctl_pid: std::process::id(),
        };
        write_record(&paths.session, &session, &record, sync)?;
        let bounce_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&paths.bounce)
            .map_err(create(&paths.bounce))?;
        bounce_file
            .set_len(MAX_BATCH_BYTES)
            .map_err(create(&paths.bounce))?;
        let bounce = Mmap::shared(
            std::os::fd::AsFd::as_fd(&bounce_file),
            0,
            MAX_BATCH_BYTES as usize,
        )
        .map_err(create(&paths.bounce))?;
        Ok(Journal {
            pid,
            start_time,
            paths,
            _locked_session: session,
            bounce_file,
            bounce,
            sync,
            kill_at: None,
        })
    }

    /// Test hook: this process kills itself (SIGKILL) when a batch first reaches `point`.
    #[doc(hidden)]
    pub fn kill_at(&mut self, point: Option<BatchPoint>) {
        self.kill_at = point;
    }

    /// The journal for batches of one of the process's gmems.
    pub fn for_gmem<'j>(&'j self, gmem: &AttachedGmem) -> GmemJournal<'j> {
        GmemJournal {
            journal: self,
            fd: gmem.fds()[0],
            dev: gmem.dev(),
            inode: gmem.inode(),
        }
    }

    /// Ends the migration: removes the journal, unless a batch record is left (a batch
    /// that could be neither finished nor restored), which [`recover`] then needs.
    /// Returns whether the journal was removed.
    pub fn finish(self) -> Result<bool, JournalError> {
        if self.paths.batch.exists() {
            return Ok(false);
        }
        for path in [&self.paths.bounce, &self.paths.session] {
            fs::remove_file(path).map_err(|source| JournalError::Remove {
                path: path.clone(),
                source,
            })?;
        }
        Ok(true)
    }
}

/// The journal for the batches of one gmem: a [`BatchJournal`].
#[derive(Debug)]
pub struct GmemJournal<'j> {
    journal: &'j Journal,
    fd: i32,
    dev: u64,
    inode: u64,
}

impl BatchJournal for GmemJournal<'_> {
    fn buffer(&self) -> &Mmap {
        &self.journal.bounce
    }

    fn record(&self, gmem_offset: GmemOffset, len: u64) -> Result<(), JournalError> {
        let journal = self.journal;
        let mut block = vec![0u8; BLOCK];
        let record = BatchRecord {
            version: VERSION,
            pid: journal.pid,
            start_time: journal.start_time,
            fd: self.fd,
            dev: self.dev,
            inode: self.inode,
            offset: gmem_offset,
            len,
            checksum: checksum(&journal.bounce, len, &mut block),
        };
        // The bytes first, then the record that points at them: a record never names
        // bytes that are not there.
        if journal.sync == JournalSync::Fsync {
            journal
                .bounce_file
                .sync_data()
                .map_err(|source| JournalError::Sync {
                    path: journal.paths.bounce.clone(),
                    source,
                })?;
        }
        let file = File::create(&journal.paths.batch).map_err(|source| JournalError::Write {
            path: journal.paths.batch.clone(),
            source,
        })?;
        write_record(&journal.paths.batch, &file, &record, journal.sync)
    }

    fn clear(&self) -> Result<(), JournalError> {
        let path = &self.journal.paths.batch;
        fs::remove_file(path).map_err(|source| JournalError::Remove {
            path: path.clone(),
            source,
        })
    }

    fn reached(&self, point: BatchPoint) {
        if self.journal.kill_at == Some(point) {
            crate::sys::process::kill_this_process();
        }
    }
}

/// Opens (creating) and locks a session file; [`JournalError::Busy`] if another process
/// holds it.
fn open_locked(path: &Path, pid: u32) -> Result<File, JournalError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| JournalError::Create {
            path: path.to_owned(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(path)
                .ok()
                .and_then(|text| serde_json::from_str::<SessionRecord>(&text).ok())
                .map_or_else(|| "unknown".into(), |r| r.gmemctl_pid.to_string());
            Err(JournalError::Busy {
                pid,
                holder,
                path: path.to_owned(),
            })
        }
        Err(TryLockError::Error(source)) => Err(JournalError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Replaces the contents of `file` (at `path`) with `record` as one JSON line.
fn write_record(
    path: &Path,
    mut file: &File,
    record: &impl Serialize,
    sync: JournalSync,
) -> Result<(), JournalError> {
    let write = |source| JournalError::Write {
        path: path.to_owned(),
        source,
    };
    let mut line = serde_json::to_vec(record)
        .map_err(io::Error::other)
        .map_err(write)?;
    line.push(b'\n');
    file.set_len(0).map_err(write)?;
    std::io::Seek::rewind(&mut file).map_err(write)?;
    // One write of a few hundred bytes: a record is whole or, if this process dies inside
    // the call, not valid JSON, and then no punch followed it.
    file.write_all(&line).map_err(write)?;
    if sync == JournalSync::Fsync {
        file.sync_all().map_err(|source| JournalError::Sync {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(())
}

fn checksum(map: &Mmap, len: u64, block: &mut [u8]) -> String {
    format!("{:016x}", hash_range(map, 0, len, block))
}

/// What recovery did for one process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recovered {
    /// The VMM.
    pub pid: u32,
    /// The batch put back, if one was in flight.
    pub restored: Option<RestoredBatch>,
    /// Whether the VMM was resumed (a gmemctl had stopped it); false if it was found
    /// stopped or frozen by that gmemctl, and is left so.
    pub resumed: bool,
    /// The process is gone (or its PID names another process now): its journal was of
    /// no use and is removed.
    pub process_gone: bool,
    /// Anything the operator should know (the VMM ran while a batch was out).
    pub warnings: Vec<String>,
}

/// A batch put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoredBatch {
    /// The VMM's descriptor of the gmem.
    pub fd: i32,
    /// The gmem's inode.
    pub inode: u64,
    /// gmem offset of the batch.
    pub offset: GmemOffset,
    /// Its length.
    pub len: u64,
}

/// Why recovery could not finish. Whatever it could not do, it left as it was: the journal
/// on disk, the VMM stopped.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The journal directory could not be listed.
    #[error("cannot list the journal directory {}", dir.display())]
    ListDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A journal file could not be opened, read, locked or removed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A journal file could not be read.
    #[error("cannot read the journal file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A batch record is not a record gmemctl writes.
    #[error(
        "the batch record {} is unreadable; the VMM is left stopped: look at it, and at the \
         bytes in the .bounce file beside it",
        path.display()
    )]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
    /// The journalled bytes do not match their checksum.
    #[error(
        "the journalled batch of process {pid} ({len} bytes at gmem offset {offset:#x}) does \
         not match its checksum ({found} instead of {expected}); nothing was written and the \
         VMM is left stopped"
    )]
    Damaged {
        /// The VMM.
        pid: u32,
        /// gmem offset.
        offset: GmemOffset,
        /// Length.
        len: u64,
        /// The recorded checksum.
        expected: String,
        /// The checksum of the bytes found.
        found: String,
    },
    /// The gmem could not be taken from the VMM again.
    #[error("cannot take the guest_memfd at fd {fd} of process {pid} again")]
    Attach {
        /// The VMM.
        pid: u32,
        /// Its descriptor.
        fd: i32,
        /// The cause.
        #[source]
        source: AttachError,
    },
    /// The descriptor no longer names the journalled gmem.
    #[error(
        "fd {fd} of process {pid} is no longer the guest_memfd of the journal (inode {inode}); \
         nothing was written and the VMM is left stopped"
    )]
    NotTheSameGmem {
        /// The VMM.
        pid: u32,
        /// Its descriptor.
        fd: i32,
        /// The journalled inode.
        inode: u64,
    },
    /// Mapping or filling the gmem range failed.
    #[error("writing the journalled batch back into process {pid}'s guest_memfd failed")]
    Write {
        /// The VMM.
        pid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// What was written back differs from the journal.
    #[error(
        "the bytes written back to process {pid} ({len} bytes at gmem offset {offset:#x}) \
         differ from the journal; the VMM is left stopped"
    )]
    Mismatch {
        /// The VMM.
        pid: u32,
        /// gmem offset.
        offset: GmemOffset,
        /// Length.
        len: u64,
    },
    /// The VMM could not be stopped or resumed.
    #[error(transparent)]
    Stop(#[from] StopError),
}

/// The PIDs that have a journal in `dir` (none if `dir` does not exist).
pub fn journalled_pids(dir: &Path) -> Result<Vec<u32>, RecoverError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RecoverError::ListDir {
                dir: dir.to_owned(),
                source,
            });
        }
    };
    let mut pids = std::collections::BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|source| RecoverError::ListDir {
            dir: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("pid-"))
            .and_then(|n| n.split_once('.'))
            .and_then(|(pid, _)| pid.parse().ok())
        else {
            continue;
        };
        pids.insert(pid);
    }
    Ok(pids.into_iter().collect())
}

/// Recovers process `pid` from its journal in `dir`: puts back a batch in flight (re-taking
/// the gmem by descriptor and checking it is the same file, writing the bytes, comparing
/// them), resumes the VMM if a gmemctl stopped it, and removes the journal. `None` if there
/// is no journal for it.
pub fn recover(dir: &Path, pid: u32) -> Result<Option<Recovered>, RecoverError> {
    let paths = Paths::new(dir, pid);
    if !paths.session.exists() && !paths.batch.exists() {
        return Ok(None);
    }
    let session = open_locked(&paths.session, pid)?;
    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|source| RecoverError::Read {
            path: path.to_owned(),
            source,
        })
    };
    // A session record torn by a death inside its write was written before any stop.
    let record: Option<SessionRecord> = serde_json::from_str(&read(&paths.session)?).ok();
    let batch: Option<BatchRecord> = if paths.batch.exists() {
        match serde_json::from_str(&read(&paths.batch)?) {
            Ok(batch) => Some(batch),
            // Torn inside its one write: no punch followed it, memory is whole.
            Err(_) if record.is_some() => None,
            Err(source) => {
                return Err(RecoverError::BadRecord {
                    path: paths.batch.clone(),
                    source,
                });
            }
        }
    } else {
        None
    };
    let start_time = record
        .as_ref()
        .map(|r| r.start_time)
        .or(batch.as_ref().map(|b| b.start_time));
    let mut recovered = Recovered {
        pid,
        restored: None,
        resumed: false,
        process_gone: false,
        warnings: Vec::new(),
    };
    let alive = start_time.is_some_and(|t| procfs::start_time(pid).is_ok_and(|now| now == t));
    if !alive {
        recovered.process_gone = true;
        remove_all(&paths)?;
        drop(session);
        return Ok(Some(recovered));
    }
    if let Some(batch) = &batch {
        recovered.restored = Some(restore(&paths, batch, &mut recovered.warnings)?);
        fs::remove_file(&paths.batch).map_err(|source| JournalError::Remove {
            path: paths.batch.clone(),
            source,
        })?;
    }
    if let Some(record) = &record
        && record.found == FoundState::Running
    {
        VmmStop::resuming(pid, record.stop_method.clone())?.resume()?;
        recovered.resumed = true;
    }
    remove_all(&paths)?;
    drop(session);
    Ok(Some(recovered))
}

/// Writes a journalled batch back into the VMM's gmem, with the VMM stopped.
fn restore(
    paths: &Paths,
    batch: &BatchRecord,
    warnings: &mut Vec<String>,
) -> Result<RestoredBatch, RecoverError> {
    let pid = batch.pid;
    let bounce_file = File::open(&paths.bounce).map_err(|source| RecoverError::Read {
        path: paths.bounce.clone(),
        source,
    })?;
    let read_failed = |source| RecoverError::Read {
        path: paths.bounce.clone(),
        source,
    };
    let len = usize::try_from(batch.len).map_err(|_| {
        read_failed(io::Error::new(
            io::ErrorKind::InvalidData,
            "batch length overflows",
        ))
    })?;
    if len == 0 || batch.len > MAX_BATCH_BYTES || !batch.offset.is_multiple_of(page_size()) {
        return Err(read_failed(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a batch of {} bytes at {:#x} is not one gmemctl writes",
                batch.len, batch.offset
            ),
        )));
    }
    let saved = read_private(&bounce_file, len).map_err(read_failed)?;
    let mut block = vec![0u8; BLOCK];
    let found = checksum(&saved, batch.len, &mut block);
    if found != batch.checksum {
        return Err(RecoverError::Damaged {
            pid,
            offset: batch.offset,
            len: batch.len,
            expected: batch.checksum.clone(),
            found,
        });
    }
    let gmem = crate::memory::take_gmem_file(pid, batch.fd)
        .map_err(|source| RecoverError::Attach {
            pid,
            fd: batch.fd,
            source,
        })?
        .filter(|file| {
            file.metadata()
                .is_ok_and(|m| (m.dev(), m.ino()) == (batch.dev, batch.inode))
        })
        .ok_or(RecoverError::NotTheSameGmem {
            pid,
            fd: batch.fd,
            inode: batch.inode,
        })?;
    // It should still be stopped, as the dead gmemctl left it. If something resumed it, its
    // guest may have seen the punched range as zeros; stop it for the write all the same.
    let stop = VmmStop::new(pid)?;
    let stopped_here = stop.found() == FoundState::Running;
    if stopped_here {
        warnings.push(format!(
            "process {pid} was running while {len} bytes of its guest memory were out in the \
             journal (something resumed it after gmemctl died); its guest may have read zeros \
             there before they were put back"
        ));
        stop.stop()?;
    }
    let written = write_back(&gmem, batch, &saved);
    if stopped_here {
        stop.resume()?;
    }
    match written {
        Ok(true) => Ok(RestoredBatch {
            fd: batch.fd,
            inode: batch.inode,
            offset: batch.offset,
            len: batch.len,
        }),
        Ok(false) => Err(RecoverError::Mismatch {
            pid,
            offset: batch.offset,
            len: batch.len,
        }),
        Err(source) => Err(RecoverError::Write { pid, source }),
    }
}

/// The first `len` bytes of the bounce file, in memory of this process.
fn read_private(file: &File, len: usize) -> io::Result<Mmap> {
    let saved = Mmap::anonymous(len)?;
    let mut buf = vec![0u8; BLOCK];
    let mut at = 0;
    while at < len {
        let take = (len - at).min(BLOCK);
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf[..take], at as u64)?;
        saved.write(at, &buf[..take]);
        at += take;
    }
    Ok(saved)
}

/// Maps the batch's range of the gmem, fills it (allocating punched pages in one call),
/// copies the saved bytes in, and compares them.
fn write_back(gmem: &File, batch: &BatchRecord, saved: &Mmap) -> io::Result<bool> {
    let len = batch.len as usize;
    let map = Mmap::shared(std::os::fd::AsFd::as_fd(gmem), batch.offset.raw(), len)?;
    map.populate_write(0, len)?;
    saved.copy_to(0, &map, 0, len);
    Ok(map.equal(0, saved, 0, len))
}

fn remove_all(paths: &Paths) -> Result<(), JournalError> {
    for path in [&paths.batch, &paths.bounce, &paths.session] {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(JournalError::Remove {
                    path: path.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}
