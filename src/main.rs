//! The `mnist-lab` binary: the allocator, Ctrl-C handling and exit codes around
//! the library's command line ([`mnist_lab::cli`]).

use std::process::ExitCode;

use clap::Parser;
use mimalloc::MiMalloc;
use mnist_lab::cli::Cli;
use mnist_lab::{telemetry, train};

// Training allocates and frees many same-sized tensors per step; mimalloc reuses
// that memory instead of returning it to the OS and faulting it back in.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> ExitCode {
    telemetry::init();
    // First Ctrl-C: finish the batch, write the run's files, exit. Second: exit now.
    let _ = ctrlc::set_handler(|| {
        if train::request_stop() {
            std::process::exit(130);
        }
        eprintln!("stopping after this batch (Ctrl-C again to quit at once)");
    });
    match Cli::parse().execute() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
