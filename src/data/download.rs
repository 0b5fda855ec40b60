//! Finding MNIST on disk, or downloading it from public mirrors with each file
//! checked against its published SHA-256.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::data::idx::find_file;
use crate::data::{DataError, Result};
use crate::util::fsio::{FileError, write_atomic};

/// The four files and the SHA-256 of their decompressed bytes as published.
pub const MNIST_FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    (
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    (
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    (
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
];

/// Public mirrors of the gzip files, tried in order. `MNIST_MIRRORS` (comma-separated
/// base URLs) replaces them.
pub const DEFAULT_MIRRORS: [&str; 2] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
];

/// The stems of the test set's two files: all that evaluating a run needs.
pub const TEST_FILES: [&str; 2] = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];

/// The stems of all four files.
pub fn all_files() -> Vec<&'static str> {
    MNIST_FILES.iter().map(|(stem, _)| *stem).collect()
}

/// Whether `dir` holds every file of `stems`, `.gz` or raw.
pub fn holds(dir: &Path, stems: &[&str]) -> bool {
    stems.iter().all(|stem| find_file(dir, stem).is_some())
}

/// The directories searched when the config names none: `$MNIST_DIR`, then `data/mnist`.
pub fn default_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(env) = std::env::var_os("MNIST_DIR").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(env));
    }
    dirs.push(PathBuf::from("data/mnist"));
    dirs.dedup();
    dirs
}

/// Where the `stems` files are. A directory the config names is the only one
/// looked at: what it lacks is downloaded into it. Otherwise the first of
/// [`default_dirs`] that holds them, else they are downloaded into the first.
pub fn locate_or_download(configured: Option<&Path>, stems: &[&str]) -> Result<PathBuf> {
    let dirs = match configured {
        Some(dir) => vec![dir.to_path_buf()],
        None => default_dirs(),
    };
    if let Some(dir) = dirs.iter().find(|dir| holds(dir, stems)) {
        warn_if_two_copies(dir, stems);
        return Ok(dir.clone());
    }
    let target = &dirs[0];
    tracing::warn!(dir = %target.display(), "MNIST not found locally; downloading");
    download_mnist(target, &mirrors(), stems, &Patience::default()).map_err(|reason| {
        DataError::Download {
            searched: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            reason,
        }
    })?;
    Ok(target.clone())
}

/// Both `stem.gz` and a raw `stem` in one folder: the gzip file is read, and if
/// the two differ the user hears which.
fn warn_if_two_copies(dir: &Path, stems: &[&str]) {
    for stem in stems {
        let (gz, raw) = (dir.join(format!("{stem}.gz")), dir.join(stem));
        if !(gz.is_file() && raw.is_file()) {
            continue;
        }
        let same = crate::data::idx::read_maybe_gzip(&gz)
            .ok()
            .zip(std::fs::read(&raw).ok())
            .is_some_and(|(a, b)| a == b);
        if !same {
            tracing::warn!(used = %gz.display(), ignored = %raw.display(), "two different copies of one MNIST file; reading the .gz");
        }
    }
}

fn mirrors() -> Vec<String> {
    match std::env::var("MNIST_MIRRORS") {
        Ok(list) if !list.trim().is_empty() => {
            list.split(',').map(|m| m.trim().to_string()).collect()
        }
        _ => DEFAULT_MIRRORS.iter().map(|m| m.to_string()).collect(),
    }
}

/// Why the files could not be downloaded.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Every mirror failed for this file.
    #[error("{}", attempts.iter().map(|(url, e)| format!("{url}: {e}")).collect::<Vec<_>>().join("; "))]
    AllMirrorsFailed { attempts: Vec<(String, FetchError)> },
    #[error(transparent)]
    File(#[from] FileError),
}

/// Why one URL did not give a good file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Http(ureq::Error),
    #[error("{0}")]
    TimedOut(String),
    #[error("reading the response: {0}")]
    Body(std::io::Error),
    #[error("not a gzip file: {0}")]
    NotGzip(std::io::Error),
    #[error("SHA-256 {actual}, expected {expected}")]
    WrongHash { actual: String, expected: String },
}

impl FetchError {
    /// Whether trying again may help: a timeout, a broken transfer or a server
    /// error may pass; no network, a refused connection, a missing file or a
    /// wrong one will not.
    fn may_pass(&self) -> bool {
        use std::io::ErrorKind;
        match self {
            FetchError::TimedOut(_) | FetchError::Body(_) => true,
            FetchError::Http(ureq::Error::StatusCode(code)) => *code >= 500,
            FetchError::Http(ureq::Error::Io(e)) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

/// How long a download waits, and how often it tries again, before it gives a
/// mirror up: a server that accepts the connection and never answers, or sends
/// a byte now and then, must not hang a run.
#[derive(Debug, Clone)]
pub struct Patience {
    pub connect: Duration,
    /// The longest wait for the next byte.
    pub stall: Duration,
    /// The longest one file may take, all of it.
    pub per_file: Duration,
    /// Tries per mirror.
    pub attempts: usize,
    /// The wait before the second try, doubled before each later one.
    pub backoff: Duration,
}

impl Default for Patience {
    fn default() -> Self {
        Patience {
            connect: Duration::from_secs(10),
            stall: Duration::from_secs(30),
            per_file: Duration::from_secs(600),
            attempts: 3,
            backoff: Duration::from_secs(1),
        }
    }
}

impl Patience {
    fn agent(&self) -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_connect(Some(self.connect))
            .timeout_per_read(Some(self.stall))
            .timeout_global(Some(self.per_file))
            .build()
            .into()
    }

    /// Names a timeout by the limit it hit.
    fn timed_out(&self, timeout: ureq::Timeout) -> FetchError {
        let secs = |d: Duration| d.as_secs_f64();
        FetchError::TimedOut(match timeout {
            ureq::Timeout::Connect | ureq::Timeout::Resolve => {
                format!("no connection within {} s", secs(self.connect))
            }
            ureq::Timeout::Global => format!("not complete within {} s", secs(self.per_file)),
            _ => format!("no data for {} s", secs(self.stall)),
        })
    }
}

/// Downloads the missing files into `dir`, verifying each by the SHA-256 of its
/// decompressed bytes before it is renamed into place.
pub fn download_mnist(
    dir: &Path,
    mirrors: &[String],
    stems: &[&str],
    patience: &Patience,
) -> std::result::Result<(), DownloadError> {
    let agent = patience.agent();
    // Fetch everything first: a failed download leaves no directory or file behind.
    let mut fetched = Vec::new();
    for (stem, sha) in MNIST_FILES {
        if !stems.contains(&stem) || find_file(dir, stem).is_some() {
            continue;
        }
        let mut attempts = Vec::new();
        let bytes = mirrors.iter().find_map(|mirror| {
            let url = format!("{}/{stem}.gz", mirror.trim_end_matches('/'));
            fetch_with_retries(&agent, &url, sha, patience)
                .map_err(|e| attempts.push((url, e)))
                .ok()
        });
        let bytes = bytes.ok_or(DownloadError::AllMirrorsFailed { attempts })?;
        fetched.push((stem, bytes));
    }
    std::fs::create_dir_all(dir).map_err(FileError::on("create", dir))?;
    for (stem, bytes) in fetched {
        write_atomic(&dir.join(format!("{stem}.gz")), &bytes)?;
    }
    Ok(())
}

/// Tries one URL up to `patience.attempts` times, waiting longer before each
/// retry; a file that arrives but is wrong (not gzip, wrong hash) is not retried.
fn fetch_with_retries(
    agent: &ureq::Agent,
    url: &str,
    sha: &str,
    patience: &Patience,
) -> std::result::Result<Vec<u8>, FetchError> {
    let mut wait = patience.backoff;
    let mut attempt = 1;
    loop {
        match fetch_verified(agent, url, sha, patience) {
            Err(error) if error.may_pass() && attempt < patience.attempts => {
                tracing::warn!(url, %error, attempt, "download failed; trying again");
                std::thread::sleep(wait);
                wait *= 2;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Fetches one gzip file and checks its decompressed SHA-256.
fn fetch_verified(
    agent: &ureq::Agent,
    url: &str,
    expected_sha: &str,
    patience: &Patience,
) -> std::result::Result<Vec<u8>, FetchError> {
    let http_error = |error: ureq::Error| match error {
        ureq::Error::Timeout(timeout) => patience.timed_out(timeout),
        other => FetchError::Http(other),
    };
    let mut response = agent.get(url).call().map_err(http_error)?;
    let length = response.body().content_length();
    let bar = crate::util::progress::download_bar(length, url);
    let mut bytes = Vec::new();
    let read = bar
        .wrap_read(response.body_mut().as_reader())
        .read_to_end(&mut bytes);
    bar.finish_and_clear();
    read.map_err(|e| {
        // ureq hands its own timeouts through the reader inside an io::Error.
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>());
        match inner {
            Some(ureq::Error::Timeout(timeout)) => patience.timed_out(*timeout),
            _ if e.kind() == std::io::ErrorKind::TimedOut => {
                patience.timed_out(ureq::Timeout::PerRead)
            }
            _ => FetchError::Body(e),
        }
    })?;
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(bytes.as_slice())
        .read_to_end(&mut raw)
        .map_err(FetchError::NotGzip)?;
    let actual = sha256_hex(&raw);
    if actual != expected_sha {
        return Err(FetchError::WrongHash {
            actual,
            expected: expected_sha.to_string(),
        });
    }
    Ok(bytes)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A digest in lower-case hex, as published hashes are written.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
