//! A batch trained as two halves, each on a thread of its own, that meet at
//! every BatchNorm to add their per-channel sums: the statistics of the whole
//! batch forward, and the whole batch's gradient sums backward, so each half
//! computes exactly its share of the whole batch's gradient.
//!
//! The halves run on two threads that do nothing else (each the one worker of
//! a pool of its own), so a half waiting at a meeting can never be handed the
//! other half's work and wait for itself. With one kernel thread the halves
//! still run on both, but take turns: one computes while the other waits, so
//! a run uses one core and gives the same numbers as with two.
//!
//! A half finds its meeting through [`current`], set on its thread for the
//! length of its pass: the layers reach it without every module's signature
//! carrying it.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use candle_core::Result;

/// Where the two halves of one batch meet.
#[derive(Default)]
struct Halves {
    state: Mutex<State>,
    changed: Condvar,
    /// `State::meetings`, readable without the lock, for a half that spins.
    completed: AtomicU64,
    /// Whether the halves take turns (one kernel thread) or run at once.
    take_turns: bool,
}

#[derive(Default)]
struct State {
    /// Each half's sums for the meeting in progress.
    deposits: [Option<Vec<f64>>; 2],
    /// The last completed meeting's total.
    total: Vec<f64>,
    /// Completed meetings.
    meetings: u64,
    /// The half whose turn it is to compute, when they take turns.
    turn: usize,
    /// Halves whose pass has ended (done, failed or panicked).
    left: [bool; 2],
}

/// One half's handle on its meeting: which half it is, and where to meet.
#[derive(Clone)]
pub struct Meeting {
    halves: Arc<Halves>,
    part: usize,
}

impl Meeting {
    /// Whether this is the batch's first half (the one that updates BatchNorm's
    /// running statistics, once per batch).
    pub fn is_first(&self) -> bool {
        self.part == 0
    }

    /// The two halves' `sums` added element by element, the first half's plus
    /// the second's whichever arrives first, so the total is the same each
    /// run. Blocks until the other half brings its sums; an error if it ended
    /// its pass without doing so.
    pub fn add(&self, sums: Vec<f64>) -> Result<Vec<f64>> {
        let (halves, part, other) = (&self.halves, self.part, 1 - self.part);
        let mut state = halves.state.lock().expect("halves lock");
        let meeting = state.meetings;
        state.deposits[part] = Some(sums);
        if state.deposits[other].is_some() {
            // Second to arrive: add, then hand the turn to the half that waited.
            let [first, second] = [0, 1].map(|p| state.deposits[p].take().unwrap_or_default());
            if first.len() != second.len() {
                candle_core::bail!("halves: {} sums met {}", first.len(), second.len());
            }
            state.total = first.iter().zip(&second).map(|(a, b)| a + b).collect();
            state.meetings += 1;
            halves.completed.store(state.meetings, Ordering::Release);
            let total = state.total.clone();
            halves.pass_turn(&mut state, other);
            drop(halves.wait_turn(state, part));
            return Ok(total);
        }
        // First to arrive: let the other half compute up to here, and wait.
        halves.pass_turn(&mut state, other);
        if !halves.take_turns {
            // The other half is computing on its own core and usually close
            // behind: spinning a while costs less than sleeping and waking.
            drop(state);
            halves.spin_until_done(meeting);
            state = halves.state.lock().expect("halves lock");
        }
        state = halves
            .changed
            .wait_while(state, |s| s.meetings == meeting && !s.left[other])
            .expect("halves lock");
        if state.meetings == meeting {
            candle_core::bail!("halves: the other half of the batch stopped before a BatchNorm");
        }
        // The total stays until the next meeting, which needs this half's sums.
        Ok(state.total.clone())
    }
}

impl Halves {
    /// Spins until meeting number `meeting` completes, for at most ~50 µs.
    fn spin_until_done(&self, meeting: u64) {
        const SPINS: usize = 1 << 14;
        for _ in 0..SPINS {
            if self.completed.load(Ordering::Acquire) != meeting {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Gives the turn to `part` and wakes the waiting half.
    fn pass_turn(&self, state: &mut State, part: usize) {
        state.turn = part;
        self.changed.notify_all();
    }

    /// Waits until it is `part`'s turn (at once when the halves do not take
    /// turns, or once the other half has left).
    fn wait_turn<'a>(
        &self,
        state: std::sync::MutexGuard<'a, State>,
        part: usize,
    ) -> std::sync::MutexGuard<'a, State> {
        if !self.take_turns {
            return state;
        }
        self.changed
            .wait_while(state, |s| s.turn != part && !s.left[1 - part])
            .expect("halves lock")
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Meeting>> = const { RefCell::new(None) };
}

/// The meeting of the half that runs on this thread, if any.
pub fn current() -> Option<Meeting> {
    CURRENT.with(|current| current.borrow().clone())
}

/// One half's stay on its thread: sets [`current`], and on leaving (however
/// the pass ends) clears it, marks the half gone and hands over the turn, so
/// the other half never waits for it in vain.
struct Stay(Meeting);

impl Stay {
    fn enter(meeting: Meeting) -> Stay {
        let halves = &meeting.halves;
        drop(halves.wait_turn(halves.state.lock().expect("halves lock"), meeting.part));
        CURRENT.with(|current| *current.borrow_mut() = Some(meeting.clone()));
        Stay(meeting)
    }
}

impl Drop for Stay {
    fn drop(&mut self) {
        CURRENT.with(|current| *current.borrow_mut() = None);
        let halves = &self.0.halves;
        // Not `expect`: this runs while unwinding too.
        if let Ok(mut state) = halves.state.lock() {
            state.left[self.0.part] = true;
            halves.pass_turn(&mut state, 1 - self.0.part);
        }
    }
}

/// The two threads the halves run on.
fn half_pool(part: usize) -> &'static rayon::ThreadPool {
    static POOLS: OnceLock<[rayon::ThreadPool; 2]> = OnceLock::new();
    &POOLS.get_or_init(|| {
        [0, 1].map(|part| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(move |_| format!("mnist-lab-half-{part}"))
                .build()
                .expect("cannot start the threads of a batch's halves")
        })
    })[part]
}

/// Runs `pass(0)` and `pass(1)`, the two halves of a batch, side by side (or
/// taking turns, when `take_turns`), each with its [`Meeting`] as [`current`],
/// on its own thread. Called from a thread of no pool (a worker waiting here
/// would take on its pool's other work, which could wait for this), and
/// `pass` must not hand work to another pool: the halves' threads are the
/// only ones sure to be free.
pub fn run<R: Send>(take_turns: bool, pass: impl Fn(usize) -> R + Sync) -> (R, R) {
    debug_assert!(
        rayon::current_thread_index().is_none(),
        "halves run from outside every thread pool"
    );
    // One batch at a time: two batches' halves queued on the same two threads
    // could each hold one thread while waiting for their other half.
    static ONE_BATCH: Mutex<()> = Mutex::new(());
    let _only = ONE_BATCH
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let halves = Arc::new(Halves {
        take_turns,
        ..Halves::default()
    });
    let run = |part: usize| {
        half_pool(part).install(|| {
            let _stay = Stay::enter(Meeting {
                halves: halves.clone(),
                part,
            });
            pass(part)
        })
    };
    let mut second = None;
    let first = half_pool(1).in_place_scope(|scope| {
        scope.spawn(|_| second = Some(run(1)));
        run(0)
    });
    (first, second.expect("the second half ran"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each half meets the other three times with its own numbers.
    fn three_meetings(part: usize) -> Result<Vec<Vec<f64>>> {
        let meeting = current().expect("a half has a meeting");
        assert_eq!(meeting.is_first(), part == 0);
        (1..=3)
            .map(|round| meeting.add(vec![round as f64, (part + 1) as f64 * 10.0]))
            .collect()
    }

    #[test]
    fn halves_add_their_sums_at_each_meeting() {
        for take_turns in [false, true] {
            let (a, b) = run(take_turns, three_meetings);
            let expected: Vec<Vec<f64>> = (1..=3).map(|r| vec![2.0 * r as f64, 30.0]).collect();
            assert_eq!(a.unwrap(), expected, "take_turns={take_turns}");
            assert_eq!(b.unwrap(), expected, "take_turns={take_turns}");
            assert!(current().is_none());
        }
    }

    #[test]
    fn taking_turns_keeps_one_half_computing_at_a_time() {
        let busy = std::sync::atomic::AtomicUsize::new(0);
        let (a, b) = run(true, |part| -> Result<()> {
            let meeting = current().unwrap();
            for _ in 0..5 {
                assert_eq!(busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
                std::thread::sleep(std::time::Duration::from_millis(2));
                busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                meeting.add(vec![part as f64])?;
            }
            Ok(())
        });
        a.unwrap();
        b.unwrap();
    }

    #[test]
    fn a_half_that_stops_early_fails_the_other_instead_of_hanging() {
        for take_turns in [false, true] {
            let (a, b) = run(take_turns, |part| {
                if part == 1 {
                    return Err(candle_core::Error::Msg("no data".into()));
                }
                three_meetings(part)
            });
            let message = a.unwrap_err().to_string();
            assert!(message.contains("other half"), "{message}");
            assert!(b.is_err());
        }
    }
}
