#![allow(clippy::unwrap_used)]
//! How long a cold replica takes to catch up with a ledger that holds many seats: the work
//! a new leader does before it answers anyone when it was not a hot standby (a restarted
//! broker). A small size runs here; `cargo xtask bench-catchup` runs 10^5 and 10^6.

use lmbus_tests::catch_up::measure;

/// Steps: write 20,000 seats to a ledger on a real nats-server; a cold engine replays it
/// and holds exactly those seats (checked inside `measure`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_replica_catches_up_with_every_seat() {
    let (read, caught_up) = measure(20_000).await;
    eprintln!("measured: 20,000 seats: read {read:?}, caught up {caught_up:?}");
}
