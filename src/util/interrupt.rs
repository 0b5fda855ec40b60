//! Stop requests from SIGINT (Ctrl-C) and SIGTERM (what `timeout`, Slurm, docker
//! and systemd send). The first asks training loops to stop after their current
//! batch, so the run's files are written and it ends `interrupted`; a second
//! exits at once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

/// The signal that asked for the stop; 0 while none has.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// A signal that stops a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: Ctrl-C.
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Signal {
    fn number(self) -> i32 {
        match self {
            Signal::Interrupt => SIGINT,
            Signal::Terminate => SIGTERM,
        }
    }

    fn from_number(number: i32) -> Option<Signal> {
        match number {
            SIGINT => Some(Signal::Interrupt),
            SIGTERM => Some(Signal::Terminate),
            _ => None,
        }
    }

    /// The shell's convention: 128 + the signal number (130, 143).
    pub fn exit_code(self) -> u8 {
        (128 + self.number()) as u8
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signal::Interrupt => "SIGINT (Ctrl-C)",
            Signal::Terminate => "SIGTERM",
        })
    }
}

/// Asks running loops to stop after their current step; returns whether a stop
/// had already been requested.
pub fn request_stop(signal: Signal) -> bool {
    STOP_SIGNAL
        .compare_exchange(0, signal.number(), Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
}

/// The signal that asked for a stop, if one has.
pub fn stop_requested() -> Option<Signal> {
    Signal::from_number(STOP_SIGNAL.load(Ordering::Relaxed))
}

type Hook = Box<dyn Fn(Signal) + Send>;

/// What must still happen when a second signal ends the process at once (a
/// run's summary marked `interrupted`), newest first.
static ABORT_HOOKS: Mutex<Vec<(u64, Hook)>> = Mutex::new(Vec::new());
static NEXT_HOOK: AtomicU64 = AtomicU64::new(0);

/// Keeps a hook registered with [`on_abort`] until dropped.
pub struct AbortHook(u64);

impl Drop for AbortHook {
    fn drop(&mut self) {
        let mut hooks = ABORT_HOOKS.lock().unwrap_or_else(|e| e.into_inner());
        hooks.retain(|(id, _)| *id != self.0);
    }
}

/// Registers `hook` to run if a second signal ends the process before the
/// returned guard is dropped.
pub fn on_abort(hook: impl Fn(Signal) + Send + 'static) -> AbortHook {
    let id = NEXT_HOOK.fetch_add(1, Ordering::Relaxed);
    let mut hooks = ABORT_HOOKS.lock().unwrap_or_else(|e| e.into_inner());
    hooks.push((id, Box::new(hook)));
    AbortHook(id)
}

/// For an abort hook: the value in `shared`, with the lock kept until the
/// process exits, so that no later write of its owner (which takes the same
/// lock) can overwrite what the hook writes.
pub fn hold_until_exit<T: Clone>(shared: &Mutex<T>) -> T {
    let guard = shared.lock().unwrap_or_else(|e| e.into_inner());
    let value = guard.clone();
    std::mem::forget(guard);
    value
}

/// Runs the registered hooks, newest first, then exits with 128 + the signal number.
fn abort(signal: Signal) -> ! {
    let hooks = ABORT_HOOKS.lock().unwrap_or_else(|e| e.into_inner());
    for (_, hook) in hooks.iter().rev() {
        hook(signal);
    }
    std::process::exit(signal.exit_code().into());
}

/// Handles SIGINT and SIGTERM on a thread of their own: the first requests a
/// stop, a second runs the abort hooks and exits with 128 + its number.
pub fn install_handlers() -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for number in signals.forever() {
                let Some(signal) = Signal::from_number(number) else {
                    continue;
                };
                if request_stop(signal) {
                    abort(signal);
                }
                eprintln!("{signal}: stopping after this batch (again to quit at once)");
            }
        })?;
    Ok(())
}
