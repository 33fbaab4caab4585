#![allow(clippy::unwrap_used)]
//! The failover bench (`cargo xtask bench-failover`, or `cargo bench -p lmbus-tests --bench
//! failover`): `LMBUS_BENCH_TRIALS` (default 20) kill -9s of the current leader broker under
//! a steady registration load on the redundancy rig, each measured from the kill to the
//! first approved registration sent after it; the killed replica is restarted before the
//! next trial. Prints one `BENCH` line.

use std::time::Duration;

use lmbus_schemas::AlertKind;
use lmbus_tests::ha::{Load, Rig, current_leader, first_approval_after, priority_of};
use nix::sys::signal::Signal;
use tokio::time::Instant;

fn main() {
    let rt = lmbus_tests::bench::bench_runtime();
    rt.block_on(bench());
}

async fn bench() {
    let trials = lmbus_tests::bench::bench_trials();
    let mut rig = Rig::start().await;
    let load = Load::start(&rig).await;
    let books = load.books.clone();
    let mut alerts = rig.alerts().await;
    let mut results = Vec::new();
    for trial in 0..trials {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            if let Some(l) = current_leader(&rig).await {
                break l;
            }
            assert!(Instant::now() < deadline, "no leader within 30 s");
        };
        let killed = Instant::now();
        rig.brokers[&leader].signal(Signal::SIGKILL).unwrap();
        let took = first_approval_after(&books, killed).await;
        eprintln!("trial {trial}: killed {leader}; first approval after {took:?}");
        results.push(took);
        let started = |a: &lmbus_schemas::Alert| a.kind == AlertKind::BrokerStarted;
        let before = alerts.seen.iter().filter(|a| started(a)).count();
        rig.spawn_broker(&leader, priority_of(&leader));
        alerts
            .wait_count("the restarted replica", before + 1, started)
            .await
            .unwrap();
    }
    let (audit, slaves) = load.finish(&rig).await;
    results.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = results[results.len() / 2];
    let worst = results[results.len() - 1];
    println!(
        "BENCH failover trials={} median_ms={:.0} worst_ms={:.0} best_ms={:.0} all_ms={:?} ledger_records={}",
        results.len(),
        ms(median),
        ms(worst),
        ms(results[0]),
        results
            .iter()
            .map(|d| ms(*d).round() as u64)
            .collect::<Vec<_>>(),
        audit.records
    );
    for slave in slaves {
        slave.shutdown().await;
    }
}
