//! What every bench shares: the runtime it runs on and the number of trials it is asked for.

/// The runtime of a bench: two worker threads, as many as the machine the numbers in
/// `BENCHMARKS.md` come from.
#[allow(clippy::expect_used)]
pub fn bench_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot build the bench's tokio runtime")
}

/// `LMBUS_BENCH_TRIALS`, or 20 when it is unset or not a number.
pub fn bench_trials() -> usize {
    std::env::var("LMBUS_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}
