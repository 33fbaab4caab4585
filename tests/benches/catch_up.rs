#![allow(clippy::unwrap_used)]
//! The catch-up bench (`cargo xtask bench-catchup`, or `cargo bench -p lmbus-tests --bench
//! catch_up`): a cold replica replays ledgers of `LMBUS_BENCH_SEATS` seats (default
//! "100000,1000000"); reading alone is the baseline from the same run. Prints one `BENCH`
//! line per size.

fn main() {
    let sizes: Vec<usize> = std::env::var("LMBUS_BENCH_SEATS")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for seats in sizes {
            let (read, caught_up) = lmbus_tests::catch_up::measure(seats).await;
            println!(
                "BENCH catchup seats={seats} read_ms={:.0} catchup_ms={:.0} ratio={:.2}",
                read.as_secs_f64() * 1000.0,
                caught_up.as_secs_f64() * 1000.0,
                caught_up.as_secs_f64() / read.as_secs_f64()
            );
        }
    });
}
