//! One owner per run directory and per sweep record: an OS file lock on
//! `owner.lock` in the folder, held by the process that trains the run (or
//! continues the sweep) for as long as it does. The kernel releases it when the
//! process ends however it ends, so a crash or a lost node never leaves a run
//! owned: a run that says `running` while its lock is free is stale, whatever
//! host wrote it.
//!
//! The file also says who holds it (host, pid, since) so that the loser of a race
//! can name the winner, and its modification time is a heartbeat, refreshed
//! every [`HEARTBEAT`] by the owner. Where the file system cannot lock (some
//! network file systems), that heartbeat decides instead: an owner silent for
//! [`STALE_AFTER`] is taken as gone.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::util::fsio::FileError;
use crate::util::system;

pub const LOCK_FILE: &str = "owner.lock";
/// How often the owner refreshes the lock file's modification time.
pub const HEARTBEAT: Duration = Duration::from_secs(60);
/// Where locks do not work: an owner whose lock file has not been refreshed for
/// this long is taken as gone.
pub const STALE_AFTER: Duration = Duration::from_secs(10 * 60);
/// How long a claim waits out another process's brief look at the lock (the
/// `runs` listing takes it for an instant to tell live runs from stale ones).
const PROBE_GRACE: Duration = Duration::from_millis(500);

/// Who holds a lock, as its file says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    /// When it took the lock (RFC 3339).
    pub since: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "process {} on {} (since {})",
            self.pid, self.host, self.since
        )
    }
}

/// A folder that another process owns, or whose lock cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("{} is in use by {}", dir.display(), owner.as_ref().map_or("another process".to_string(), |o| o.to_string()))]
    Held { dir: PathBuf, owner: Option<Owner> },
    #[error(
        "{} may be in use by {owner}, heard from {} s ago; this file system cannot lock, \
         so an owner counts as gone only after {} min of silence (if it is gone, add --force)",
        dir.display(), silent.as_secs(), STALE_AFTER.as_secs() / 60
    )]
    MaybeHeld {
        dir: PathBuf,
        owner: Owner,
        silent: Duration,
    },
    #[error(transparent)]
    File(#[from] FileError),
}

/// The lock on a folder, held until dropped (or the process ends).
pub struct OwnerLock {
    /// Open for as long as the lock is held: closing it releases the lock.
    file: File,
    /// `false` where the file system refused to lock: only the heartbeat guards.
    pub locked: bool,
    stop_heartbeat: Arc<AtomicBool>,
    heartbeat: Option<std::thread::Thread>,
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        self.stop_heartbeat.store(true, Ordering::Relaxed);
        if let Some(thread) = &self.heartbeat {
            thread.unpark();
        }
        // An empty file says "released", for readers that cannot lock. Done
        // while still holding the lock, which closing the file then releases.
        let _ = self.file.set_len(0);
    }
}

/// Takes the lock on `dir` (which must exist), or fails naming its owner.
/// Where the file system cannot lock, a recorded owner that is not known to be
/// gone (see [`owner_gone`]) refuses the claim unless `force`.
pub fn claim(dir: &Path, force: bool) -> Result<OwnerLock, OwnerError> {
    let path = dir.join(LOCK_FILE);
    // Read before the claim rewrites them: the evidence for unlockable systems.
    let (previous, silent) = (read_owner(dir), silent_for(dir));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(FileError::on("open", &path))?;
    let locked = match lock_waiting_out_probes(&file) {
        Ok(()) => true,
        Err(TryLockError::WouldBlock) => {
            return Err(OwnerError::Held {
                dir: dir.to_path_buf(),
                owner: read_owner(dir),
            });
        }
        Err(TryLockError::Error(error)) => {
            tracing::warn!(file = %path.display(), %error, "the file system cannot lock; \
                 ownership rests on the heartbeat (an owner silent for {} min is taken as gone)",
                 STALE_AFTER.as_secs() / 60);
            if let (Some(owner), false) = (previous, force)
                && !owner_gone(&owner, silent)
            {
                let silent = silent.unwrap_or_default();
                let dir = dir.to_path_buf();
                return Err(OwnerError::MaybeHeld { dir, owner, silent });
            }
            false
        }
    };
    let owner = Owner {
        host: system::hostname(),
        pid: std::process::id(),
        since: system::now_rfc3339(),
    };
    write_owner(&file, &owner).map_err(FileError::on("write", &path))?;
    let stop_heartbeat = Arc::new(AtomicBool::new(false));
    let heartbeat = start_heartbeat(&path, Arc::clone(&stop_heartbeat));
    Ok(OwnerLock {
        file,
        locked,
        stop_heartbeat,
        heartbeat,
    })
}

/// Without a lock to ask: whether a recorded owner is gone. On this host, by
/// its process; elsewhere, by a heartbeat silent for [`STALE_AFTER`].
pub fn owner_gone(owner: &Owner, silent: Option<Duration>) -> bool {
    if owner.host == system::hostname() {
        return !system::process_alive(owner.pid);
    }
    silent.is_none_or(|s| s > STALE_AFTER)
}

fn lock_waiting_out_probes(file: &File) -> Result<(), TryLockError> {
    let deadline = std::time::Instant::now() + PROBE_GRACE;
    loop {
        match file.try_lock() {
            Err(TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn write_owner(mut file: &File, owner: &Owner) -> std::io::Result<()> {
    let json = serde_json::to_string(owner).expect("an owner serialises");
    file.set_len(0)?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))?;
    file.write_all(json.as_bytes())?;
    file.write_all(b"\n")
}

/// Refreshes the lock file's modification time every [`HEARTBEAT`] until
/// `stop` is set; `None` where no thread could be started (the lock still holds).
/// Each beat opens the file anew: a duplicate of the locked handle would keep
/// the lock held until the thread noticed the stop.
fn start_heartbeat(path: &Path, stop: Arc<AtomicBool>) -> Option<std::thread::Thread> {
    let path = path.to_path_buf();
    let handle = std::thread::Builder::new()
        .name("owner-heartbeat".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::park_timeout(HEARTBEAT);
                if !stop.load(Ordering::Relaxed)
                    && let Ok(file) = OpenOptions::new().write(true).open(&path)
                {
                    let _ = file.set_modified(SystemTime::now());
                }
            }
        })
        .ok()?;
    Some(handle.thread().clone())
}

/// Who holds (or last held) the lock on `dir`, as its file says.
pub fn read_owner(dir: &Path) -> Option<Owner> {
    let text = std::fs::read_to_string(dir.join(LOCK_FILE)).ok()?;
    serde_json::from_str(text.trim()).ok()
}

/// What a look at a folder's lock tells, without keeping it.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// A process holds it: the run (or sweep) is live.
    Held,
    /// Nobody holds it: whatever the files say, no process is at work.
    Free,
    /// No lock file: a run from before locks (or one not yet started); the
    /// caller falls back on other evidence.
    Unknown,
}

/// Whether some process holds the lock on `dir`. Takes a shared lock for an
/// instant, which an owner's claim waits out. Where the file system cannot
/// lock, the file's owner and heartbeat decide.
pub fn probe(dir: &Path) -> Probe {
    let Ok(file) = File::open(dir.join(LOCK_FILE)) else {
        return Probe::Unknown;
    };
    match file.try_lock_shared() {
        Ok(()) => Probe::Free,
        Err(TryLockError::WouldBlock) => Probe::Held,
        Err(TryLockError::Error(_)) => match read_owner(dir) {
            Some(owner) if !owner_gone(&owner, silent_for(dir)) => Probe::Held,
            _ => Probe::Free,
        },
    }
}

/// How long since the owner of `dir` last showed life: its lock file's
/// modification time (the heartbeat). `None` without a lock file.
pub fn silent_for(dir: &Path) -> Option<Duration> {
    let modified = std::fs::metadata(dir.join(LOCK_FILE))
        .and_then(|m| m.modified())
        .ok()?;
    Some(
        SystemTime::now()
            .duration_since(modified)
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_locks_an_owner_is_gone_when_its_process_is_or_its_heartbeat_stopped() {
        let here = |pid| Owner {
            host: system::hostname(),
            pid,
            since: String::new(),
        };
        assert!(!owner_gone(&here(std::process::id()), None));
        assert!(owner_gone(&here(u32::MAX - 1), None));
        let elsewhere = Owner {
            host: "another-host".into(),
            ..here(1)
        };
        assert!(!owner_gone(&elsewhere, Some(Duration::from_secs(30))));
        assert!(owner_gone(&elsewhere, Some(STALE_AFTER * 2)));
    }

    #[test]
    fn a_second_claim_fails_naming_the_owner_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(probe(dir.path()), Probe::Unknown, "no lock file yet");
        let first = claim(dir.path(), false).unwrap();
        assert!(first.locked);
        assert_eq!(probe(dir.path()), Probe::Held);
        let err = claim(dir.path(), true).err().expect("the folder is owned");
        let OwnerError::Held {
            owner: Some(owner), ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(owner.pid, std::process::id());
        assert!(
            err.to_string()
                .contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        drop(first);
        assert_eq!(probe(dir.path()), Probe::Free);
        assert_eq!(read_owner(dir.path()), None, "a released lock names nobody");
        let again = claim(dir.path(), false).unwrap();
        assert!(silent_for(dir.path()).unwrap() < STALE_AFTER);
        drop(again);
    }

    #[test]
    fn a_probe_does_not_steal_the_lock_from_a_claim() {
        let dir = tempfile::tempdir().unwrap();
        drop(claim(dir.path(), false).unwrap());
        // A probe holding the shared lock for a moment only delays a claim.
        let file = File::open(dir.path().join(LOCK_FILE)).unwrap();
        file.try_lock_shared().unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(file);
        });
        assert!(claim(dir.path(), false).is_ok());
        release.join().unwrap();
    }
}
