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
    let rt = lmbus_tests::bench::bench_runtime();
    rt.block_on(async {
        for seats in sizes {
            let m = lmbus_tests::catch_up::measure(seats).await;
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
            println!(
                "BENCH catchup seats={seats} read_ms={:.0} replay_ms={:.0} snapshot_load_ms={:.0} snapshot_write_ms={:.0} snapshot_copy_ms={:.0} chunks={} replay_ratio={:.2} snapshot_ratio={:.2}",
                ms(m.read),
                ms(m.replay),
                ms(m.snapshot_load),
                ms(m.snapshot_write),
                ms(m.snapshot_copy),
                m.snapshot_chunks,
                ms(m.replay) / ms(m.read),
                ms(m.snapshot_load) / ms(m.read),
            );
        }
    });
}
