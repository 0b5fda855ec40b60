//! Logging: human-readable events on stderr (filtered by `RUST_LOG`, default
//! `info`), and the same events as JSON lines captured per run for `events.jsonl`.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};

use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, filter_fn};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

thread_local! {
    /// JSON lines of the run in progress on this thread, if one is capturing.
    static CAPTURED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Events with every field for `events.jsonl`, kept off the console (which gets
/// a [`CONSOLE_TARGET`] line for them instead).
pub const RECORD_TARGET: &str = "mnist_lab::record";
/// Lines written for people on the console, kept out of `events.jsonl`.
pub const CONSOLE_TARGET: &str = "mnist_lab::console";

/// Installs the global subscriber. Call once, at start-up.
pub fn init() {
    let stderr_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_timer(ClockTime)
        .with_filter(stderr_filter.and(filter_fn(|m| m.target() != RECORD_TARGET)));
    let captured = fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(|| CaptureWriter)
        .with_filter(LevelFilter::INFO.and(filter_fn(|m| m.target() != CONSOLE_TARGET)));
    // A second init (tests calling into the library) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(captured)
        .try_init();
}

/// The console's time stamp: `HH:MM:SS` UTC, short enough for one epoch per
/// line in 100 columns (`events.jsonl` keeps the full time).
struct ClockTime;

impl FormatTime for ClockTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        write!(w, "{}", chrono::Utc::now().format("%H:%M:%S"))
    }
}

/// Appends to this thread's capture buffer when one is active; else discards.
struct CaptureWriter;

impl Write for CaptureWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        CAPTURED.with(|captured| {
            if let Some(buffer) = captured.borrow_mut().as_mut() {
                buffer.extend_from_slice(bytes);
            }
        });
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures the events of one run on the current thread until dropped.
pub struct EventCapture(());

impl EventCapture {
    pub fn start() -> EventCapture {
        CAPTURED.with(|captured| *captured.borrow_mut() = Some(Vec::new()));
        EventCapture(())
    }

    /// The JSON lines captured so far.
    pub fn contents(&self) -> Vec<u8> {
        CAPTURED.with(|captured| captured.borrow().clone().unwrap_or_default())
    }
}

impl Drop for EventCapture {
    fn drop(&mut self) {
        CAPTURED.with(|captured| *captured.borrow_mut() = None);
    }
}
