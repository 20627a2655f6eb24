//! The calling thread's CPU time, shared by the timing examples (`bench_step`,
//! `roofline_ratio`) through `#[path]`.

/// CPU time of the calling thread in seconds. With one thread (`Parallelism::Sequential`) the
/// whole step runs on it, so on a machine shared with other jobs this is the step's time
/// without the periods other processes held the core. Wall-clock time where the platform has
/// no per-thread clock.
#[cfg(unix)]
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is always supported
    // on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(not(unix))]
pub fn thread_cpu_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
