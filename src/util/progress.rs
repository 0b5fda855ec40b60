//! Progress bars on a terminal; nothing when stderr is not one (CI, pipes, files).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::util::table::thousands;

fn on_terminal(bar: ProgressBar) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}

/// A bar over the training images of one epoch.
pub fn epoch_bar(images: usize, epoch: usize, epochs: usize) -> ProgressBar {
    let bar = on_terminal(ProgressBar::new(images as u64));
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:25}] {pos}/{len}  {msg}  eta {eta}")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
}

/// `loss 0.0412  acc 98.71%  13,412 img/s`: the epoch so far, for the bar's message.
pub fn running_figures(bar: &ProgressBar, loss: f64, accuracy: f64) -> String {
    let rate = bar.position() as f64 / bar.elapsed().as_secs_f64().max(1e-9);
    format!(
        "loss {loss:.4}  acc {:.2}%  {} img/s",
        100.0 * accuracy,
        thousands(rate.round() as usize)
    )
}

/// A bar over the bytes of one download (a spinner when the size is unknown).
pub fn download_bar(bytes: Option<u64>, url: &str) -> ProgressBar {
    let bar = on_terminal(match bytes {
        Some(len) => ProgressBar::new(len),
        None => ProgressBar::new_spinner(),
    });
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar.set_message(url.rsplit('/').next().unwrap_or(url).to_string());
    bar
}
