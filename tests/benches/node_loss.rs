#![allow(clippy::unwrap_used)]
//! The node-loss bench (a row of `cargo xtask bench-failover`, or `cargo bench -p
//! lmbus-tests --bench node_loss`): `LMBUS_BENCH_TRIALS` (default 20) kill -9s of the NATS
//! node leading the ledger stream, under the redundancy rig's steady registration load,
//! each measured in two parts (`lmbus_tests::node_loss`): NATS's (until JetStream
//! announced new leaders for the streams that node led) and lmbus's (from then until the
//! first approval). The node is restarted, and every stream is whole again, before the
//! next trial. Prints one `BENCH` line, with the nats-server version.

use std::time::Duration;

use lmbus_schemas::Subjects;
use lmbus_tests::ha::{Load, Rig};
use lmbus_tests::node_loss::{kill_ledger_leader, wait_whole};

fn main() {
    let rt = lmbus_tests::bench::bench_runtime();
    rt.block_on(bench());
}

async fn bench() {
    let trials = lmbus_tests::bench::bench_trials();
    let mut rig = Rig::start().await;
    let version = rig.client.server_info().version.clone();
    let load = Load::start(&rig).await;
    let books = load.books.clone();
    let subjects = Subjects::new(&rig.cluster).unwrap();
    let mut results = Vec::new();
    for trial in 0..trials {
        load.progress(20).await;
        let (node, result) = kill_ledger_leader(&mut rig, &books).await;
        eprintln!("trial {trial}: {result}");
        results.push(result);
        tokio::time::sleep(Duration::from_millis(500)).await;
        rig.nats.restart(node).unwrap();
        for stream in [
            subjects.ledger_stream(),
            subjects.election_stream(),
            subjects.snapshot_stream(),
        ] {
            wait_whole(&rig.client, &stream, 3).await;
        }
    }
    let (audit, slaves) = load.finish(&rig).await;
    let ms = |d: Duration| (d.as_secs_f64() * 1000.0).round() as u64;
    let mut nats: Vec<u64> = results.iter().map(|t| ms(t.nats)).collect();
    let mut lmbus: Vec<u64> = results.iter().map(|t| ms(t.lmbus())).collect();
    let mut total: Vec<u64> = results.iter().map(|t| ms(t.resumed)).collect();
    let mut upper: Vec<u64> = results
        .iter()
        .map(|t| ms(t.lmbus_after_elected()))
        .collect();
    let pairs: Vec<String> = results
        .iter()
        .map(|t| {
            format!(
                "{}+{}/{}{}",
                ms(t.nats),
                ms(t.lmbus()),
                ms(t.lmbus_after_elected()),
                if t.led_lease { "L" } else { "" }
            )
        })
        .collect();
    for v in [&mut nats, &mut lmbus, &mut total, &mut upper] {
        v.sort();
    }
    let median = |v: &[u64]| v[v.len() / 2];
    println!(
        "BENCH node_loss nats_version={version} trials={} nats_median_ms={} nats_worst_ms={} lmbus_median_ms={} lmbus_worst_ms={} lmbus_best_ms={} upper_median_ms={} upper_worst_ms={} total_median_ms={} total_worst_ms={} lease_too={} trials_ms={} ledger_records={}",
        results.len(),
        median(&nats),
        nats[nats.len() - 1],
        median(&lmbus),
        lmbus[lmbus.len() - 1],
        lmbus[0],
        median(&upper),
        upper[upper.len() - 1],
        median(&total),
        total[total.len() - 1],
        results.iter().filter(|t| t.led_lease).count(),
        pairs.join(","),
        audit.records
    );
    for slave in slaves {
        slave.shutdown().await;
    }
}
