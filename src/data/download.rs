//! Finding MNIST on disk, or downloading it from public mirrors with each file
//! checked against its published SHA-256.

use std::io::Read;
use std::path::{Path, PathBuf};

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

fn holds_mnist(dir: &Path) -> bool {
    MNIST_FILES
        .iter()
        .all(|(stem, _)| find_file(dir, stem).is_some())
}

/// The directories searched, in order: the config's, `$MNIST_DIR`, `data/mnist`.
pub fn candidate_dirs(configured: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = configured.map(Path::to_path_buf).into_iter().collect();
    if let Some(env) = std::env::var_os("MNIST_DIR").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(env));
    }
    dirs.push(PathBuf::from("data/mnist"));
    dirs.dedup();
    dirs
}

/// The first candidate that holds all four files; else downloads into the first.
pub fn locate_or_download(configured: Option<&Path>) -> Result<PathBuf> {
    let dirs = candidate_dirs(configured);
    if let Some(dir) = dirs.iter().find(|dir| holds_mnist(dir)) {
        return Ok(dir.clone());
    }
    let target = &dirs[0];
    tracing::warn!(dir = %target.display(), "MNIST not found locally; downloading");
    download_mnist(target, &mirrors()).map_err(|reason| DataError::Download {
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        reason,
    })?;
    Ok(target.clone())
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
    Http(#[from] ureq::Error),
    #[error("reading the response: {0}")]
    Body(std::io::Error),
    #[error("not a gzip file: {0}")]
    NotGzip(std::io::Error),
    #[error("SHA-256 {actual}, expected {expected}")]
    WrongHash { actual: String, expected: String },
}

/// Downloads the missing files into `dir`, verifying each by the SHA-256 of its
/// decompressed bytes before it is renamed into place.
pub fn download_mnist(dir: &Path, mirrors: &[String]) -> std::result::Result<(), DownloadError> {
    // Fetch everything first: a failed download leaves no directory or file behind.
    let mut fetched = Vec::new();
    for (stem, sha) in MNIST_FILES {
        if find_file(dir, stem).is_some() {
            continue;
        }
        let mut attempts = Vec::new();
        let bytes = mirrors.iter().find_map(|mirror| {
            let url = format!("{}/{stem}.gz", mirror.trim_end_matches('/'));
            fetch_verified(&url, sha)
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

/// Fetches one gzip file and checks its decompressed SHA-256.
fn fetch_verified(url: &str, expected_sha: &str) -> std::result::Result<Vec<u8>, FetchError> {
    let mut response = ureq::get(url).call()?;
    let length = response.body().content_length();
    let bar = crate::util::progress::download_bar(length, url);
    let mut bytes = Vec::new();
    bar.wrap_read(response.body_mut().as_reader())
        .read_to_end(&mut bytes)
        .map_err(FetchError::Body)?;
    bar.finish_and_clear();
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
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
