//! The download path against a local HTTP mirror serving the real MNIST files:
//! fallback from a dead mirror, checksum verification, nothing left on failure.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use std::time::{Duration, Instant};

use mnist_lab::data::download::{Patience, all_files};
use mnist_lab::data::{self, MNIST_FILES};

mod common;
use common::{full_mnist_or_skip, mnist_subset};

/// Short limits, so that a server that hangs fails the test in seconds.
fn quick() -> Patience {
    Patience {
        connect: Duration::from_secs(2),
        stall: Duration::from_millis(300),
        per_file: Duration::from_secs(2),
        attempts: 2,
        backoff: Duration::from_millis(10),
    }
}

/// A server that accepts connections, reads the request and then either
/// says nothing, or drips one byte of a long response every 100 ms.
fn hanging_server(drip: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/mnist/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                if drip {
                    let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n";
                    let _ = stream.write_all(head.as_bytes());
                    for _ in 0..600 {
                        std::thread::sleep(Duration::from_millis(100));
                        if stream.write_all(b"x").is_err() {
                            return;
                        }
                    }
                } else {
                    std::thread::sleep(Duration::from_secs(30));
                }
            });
        }
    });
    base
}

/// Serves `GET /<name>` from `files` (name -> bytes) on loopback, for `requests`
/// requests; returns the base URL.
fn serve(files: Vec<(String, Vec<u8>)>, requests: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/mnist/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            let mut request_line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            reader.read_line(&mut request_line).unwrap();
            // Drain the headers.
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("");
            let name = path.rsplit('/').next().unwrap_or("");
            match files.iter().find(|(n, _)| n == name) {
                Some((_, body)) => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    stream.write_all(head.as_bytes()).unwrap();
                    stream.write_all(body).unwrap();
                }
                None => {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
        }
    });
    base
}

/// The four real .gz files, or `None` (the test skips) without full MNIST.
fn real_files(test: &str) -> Option<Vec<(String, Vec<u8>)>> {
    let dir = full_mnist_or_skip(test)?;
    let gzipped = |stem: &str| {
        std::fs::read(dir.join(format!("{stem}.gz"))).unwrap_or_else(|_| {
            let raw = std::fs::read(dir.join(stem)).unwrap();
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), Default::default());
            encoder.write_all(&raw).unwrap();
            encoder.finish().unwrap()
        })
    };
    let files = MNIST_FILES
        .iter()
        .map(|(stem, _)| (format!("{stem}.gz"), gzipped(stem)))
        .collect();
    Some(files)
}

/// A loopback port with nothing listening: connections are refused at once.
fn dead_mirror() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mnist/", listener.local_addr().unwrap());
    drop(listener);
    url
}

#[test]
fn downloads_verifies_and_falls_back_to_the_next_mirror() {
    let target = tempfile::tempdir().unwrap();
    let dir = target.path().join("mnist");
    let Some(files) = real_files("downloads_verifies_and_falls_back_to_the_next_mirror") else {
        return;
    };
    let mirrors = vec![dead_mirror(), serve(files, 4)];
    data::download::download_mnist(&dir, &mirrors, &all_files(), &Patience::default()).unwrap();
    for (stem, _) in MNIST_FILES {
        assert!(dir.join(format!("{stem}.gz")).is_file(), "{stem}");
    }
    let mnist = data::Mnist::read(&dir).unwrap();
    assert_eq!((mnist.train.len(), mnist.test.len()), (60_000, 10_000));
}

#[test]
fn a_file_with_the_wrong_checksum_is_refused_and_nothing_is_written() {
    let target = tempfile::tempdir().unwrap();
    let dir = target.path().join("mnist");
    // Every name serves the (valid gzip, wrong content) test labels.
    let labels = std::fs::read(mnist_subset().join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let files = MNIST_FILES
        .iter()
        .map(|(stem, _)| (format!("{stem}.gz"), labels.clone()))
        .collect();
    let err = data::download::download_mnist(&dir, &[serve(files, 1)], &all_files(), &quick())
        .unwrap_err()
        .to_string();
    assert!(err.contains("SHA-256"), "{err}");
    assert!(!dir.exists(), "a failed download leaves no directory");
}

#[test]
fn a_server_that_never_answers_or_drips_fails_in_bounded_time() {
    for (drip, expected) in [
        (false, "no data for 0.3 s"),
        (true, "not complete within 2 s"),
    ] {
        let target = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let err = data::download::download_mnist(
            &target.path().join("mnist"),
            &[hanging_server(drip)],
            &all_files(),
            &quick(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(expected) && err.contains("127.0.0.1"), "{err}");
        // Two tries of at most 2 s each, and the backoff.
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
    }
}
