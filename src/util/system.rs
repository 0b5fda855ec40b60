//! Facts about this process and machine that runs record: peak memory, the CPU.

/// Peak resident set size of this process in MiB, from `/proc/self/status`
/// (`None` where that file does not exist).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

/// Restarts the peak that [`peak_rss_mb`] reports, so each run of a sweep reports
/// its own (Linux: writing 5 to `/proc/self/clear_refs`; elsewhere nothing).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Hands memory that earlier runs freed back to the OS, so a run that follows
/// others in one process (a sweep) starts from, and reports, its own footprint.
/// Also after loading the data: mimalloc keeps a thread's freed pages until
/// that thread allocates again, and the threads that decoded the files
/// (rayon's global pool) then sit idle for the whole run, holding the ~60 MB
/// of raw images they freed.
pub fn release_freed_memory() {
    // SAFETY: mi_collect only returns mimalloc's unused pages; it is harmless
    // where mimalloc is not the global allocator (its heaps are then empty).
    let collect = || unsafe { libmimalloc_sys::mi_collect(true) };
    collect();
    rayon::broadcast(|_| collect());
}

/// `<CPU model>, <n> cores` from `/proc/cpuinfo` (`None` where it does not exist).
pub fn host_description() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.split_whitespace().collect::<Vec<_>>().join(" "))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(format!("{model}, {cores} cores"))
}

/// This machine's network name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .unwrap_or_default()
}

/// Whether a process with this id runs on this machine. Where `/proc` is missing
/// every process is taken as alive, so no run is wrongly called stale.
pub fn process_alive(pid: u32) -> bool {
    let proc = std::path::Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// The time now, UTC, as RFC 3339 to the second.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
