//! A batch trained as two halves, each on a thread of its own, that meet at
//! every BatchNorm to add their per-channel sums: the statistics of the whole
//! batch forward, and the whole batch's gradient sums backward, so each half
//! computes exactly its share of the whole batch's gradient.
//!
//! The halves run on two threads of their own (each the one worker of a pool
//! of its own), so a half waiting at a meeting can never be handed the other
//! half's work and wait for itself. The first is also where a training loop
//! runs, so a step hands only its second half to another thread, and that
//! thread stays awake between steps. Batches without BatchNorm run the same
//! way, with no meetings. With one kernel thread the halves
//! still run on both, but take turns: one computes while the other waits, so
//! a run uses one core and gives the same numbers as with two.
//!
//! A half finds its meeting through [`current`], set on its thread for the
//! length of its pass: the layers reach it without every module's signature
//! carrying it.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

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

/// The two threads the halves run on. The first is also the training thread:
/// a training loop runs there (see [`on_first_half_thread`]), so each batch's
/// first half starts where the batch is, without a hand-off.
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

/// Runs `work` on the first half's thread and waits for it; at once when
/// already there. Work reaches that thread only through here, one at a time,
/// so while it waits inside a batch it can never take on other work (a rayon
/// worker that waits runs what is queued for its pool): two batches' halves
/// never interleave on the two threads, each half waiting for the other.
pub fn on_first_half_thread<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let pool = half_pool(0);
    if pool.current_thread_index().is_some() {
        return work();
    }
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _only = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    pool.install(work)
}

/// Runs `pass(0)` and `pass(1)`, the two halves of a batch, side by side (or
/// taking turns, when `take_turns`), each with its [`Meeting`] as [`current`],
/// on its own thread: the first on the first half's thread (moving there if
/// called elsewhere), the second handed to the other. `pass` must not hand
/// work to another pool: the halves' threads are the only ones sure to be free.
pub fn run<R: Send>(take_turns: bool, pass: impl Fn(usize) -> R + Sync) -> (R, R) {
    let pass = &pass;
    on_first_half_thread(|| run_here(take_turns, pass))
}

/// [`run`], on the first half's thread.
fn run_here<R: Send>(take_turns: bool, pass: impl Fn(usize) -> R + Sync) -> (R, R) {
    let halves = Arc::new(Halves {
        take_turns,
        ..Halves::default()
    });
    let enter = |part: usize| {
        let _stay = Stay::enter(Meeting {
            halves: halves.clone(),
            part,
        });
        pass(part)
    };
    let mut second = None;
    let handed = HANDED_OVER.fetch_add(1, Ordering::Release) + 1;
    let first = half_pool(1).in_place_scope(|scope| {
        scope.spawn(|_| {
            second = Some(enter(1));
            if !take_turns {
                rayon::spawn(move || keep_warm(handed));
            }
        });
        enter(0)
    });
    (first, second.expect("the second half ran"))
}

/// `item(0)`, ..., `item(count - 1)` in order, computed on the halves' two
/// threads (taking turns, when `take_turns`: then the first does them all),
/// each taking the next item when it finishes one: a busier thread takes fewer.
pub fn map<T: Send>(take_turns: bool, count: usize, item: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (first, second) = run(take_turns, |_| {
        let mut done = Vec::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= count {
                return done;
            }
            done.push((index, item(index)));
        }
    });
    let mut items: Vec<(usize, T)> = first.into_iter().chain(second).collect();
    items.sort_unstable_by_key(|(index, _)| *index);
    items.into_iter().map(|(_, value)| value).collect()
}

/// Second halves handed over so far.
static HANDED_OVER: AtomicU64 = AtomicU64::new(0);

/// Keeps the second half's thread awake, for up to 2 ms, until the batch after
/// the `handed`-th hands it a half (if that happened already, it returns at
/// once: the half waits in the pool's queue behind this). Between two batches
/// the first half's thread runs the optimiser and fetches the batch (~50-100
/// µs); a thread left to sleep in that gap costs each step two wake-ups of
/// ~20 µs (CustomMLP, batch 64: 200k -> 270k images/s awake). Spins first,
/// then yields the core to any thread that wants it.
fn keep_warm(handed: u64) {
    const SPIN: Duration = Duration::from_micros(30);
    const LIMIT: Duration = Duration::from_millis(2);
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if HANDED_OVER.load(Ordering::Acquire) != handed {
                return;
            }
            std::hint::spin_loop();
        }
        let waited = start.elapsed();
        if waited > LIMIT {
            return;
        }
        if waited > SPIN {
            std::thread::yield_now();
        }
    }
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

    /// A training loop on the first half's thread runs each batch's first half
    /// right there; called from elsewhere, the halves still run on their two
    /// threads.
    #[test]
    fn the_first_half_runs_on_the_training_thread() {
        let here = on_first_half_thread(|| {
            let here = std::thread::current().id();
            let (first, second) = run(false, |_| std::thread::current().id());
            assert_eq!(first, here);
            assert_ne!(second, here);
            here
        });
        let (first, second) = run(false, |_| std::thread::current().id());
        assert_eq!(first, here);
        assert_ne!(second, std::thread::current().id());
    }

    /// Batches started from several threads at once each get their own halves'
    /// sums, side by side or taking turns, and none waits forever.
    #[test]
    fn batches_from_several_threads_each_meet_their_own_half() {
        std::thread::scope(|scope| {
            for caller in 0..4 {
                scope.spawn(move || {
                    for round in 0..20 {
                        let take_turns = (caller + round) % 3 == 0;
                        let offset = (caller * 100 + round) as f64;
                        let (a, b) = run(take_turns, |part| {
                            current().unwrap().add(vec![offset, part as f64 + 1.0])
                        });
                        assert_eq!(a.unwrap(), vec![2.0 * offset, 3.0]);
                        assert_eq!(b.unwrap(), vec![2.0 * offset, 3.0]);
                    }
                });
            }
        });
    }

    /// Every item once, in order, from both threads (or the first alone).
    #[test]
    fn map_gives_every_item_once_in_order() {
        for take_turns in [false, true] {
            let threads = Mutex::new(std::collections::HashSet::new());
            let items = map(take_turns, 40, |index| {
                threads.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(Duration::from_micros(500));
                index * 3
            });
            assert_eq!(items, (0..40).map(|i| i * 3).collect::<Vec<_>>());
            let threads = threads.into_inner().unwrap().len();
            assert_eq!(
                threads,
                if take_turns { 1 } else { 2 },
                "take_turns={take_turns}"
            );
        }
        assert!(map(false, 0, |index| index).is_empty());
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
