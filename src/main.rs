//! The `mnist-lab` binary: the allocator, signal handling and exit codes around
//! the library's command line ([`mnist_lab::cli`]).

use std::process::ExitCode;

use clap::Parser;
use mimalloc::MiMalloc;
use mnist_lab::cli::{self, Cli};
use mnist_lab::util::{alloc, interrupt, telemetry};

// Training allocates and frees many same-sized tensors per step; mimalloc reuses
// that memory instead of returning it to the OS and faulting it back in. The
// count beside it is what `bench` reports per step.
#[global_allocator]
static GLOBAL: alloc::Counting<MiMalloc> = alloc::Counting(MiMalloc);

fn main() -> ExitCode {
    // Output piped into `head` that closes early ends the process quietly, as
    // for any Unix tool, instead of a panic in println!.
    // SAFETY: called first thing, before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Candle hands element-wise ops over 64K values (the gradient sums of its
    // autograd) to a pool whose workers then spin 25,000 times waiting for the
    // next op. On a small machine that spinning takes the core our kernels'
    // second thread needs; parked at once, they leave it (LeNet5 training,
    // batch 256, 2 threads: ~10% faster). An explicit setting is kept.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: as above, no other thread exists yet to read the environment.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0") };
    }
    telemetry::init();
    // First SIGINT or SIGTERM: finish the batch, write the run's files, exit. Second: exit now.
    if let Err(error) = interrupt::install_handlers() {
        eprintln!("warning: cannot handle SIGINT and SIGTERM: {error}");
    }
    match Cli::parse().execute() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(cli::exit_code(&error))
        }
    }
}
