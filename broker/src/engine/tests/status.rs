//! The License Monitor status.

use super::*;

/// The status reply lists at most `STATUS_MAX_SLAVES` slaves, disconnected ones first, and
/// counts them all, so it stays within the message size limit at any number of slaves.
#[test]
fn status_lists_a_bounded_number_of_slaves_and_counts_all() {
    let mut h = Harness::new(true);
    h.engine.cfg.max_slaves = 5000;
    let n = lmbus_schemas::STATUS_MAX_SLAVES + 5;
    for i in 0..n {
        h.hello(&format!("s{i:05}"), None);
    }
    // s01000 goes silent and is marked disconnected.
    h.advance(Duration::from_secs(2));
    for i in (0..n).filter(|i| *i != 1000) {
        h.heartbeat(&format!("s{i:05}"));
    }
    h.advance(Duration::from_secs(2));
    h.engine.handle(h.now, Event::Tick { today: TODAY });
    let status = h.engine.status(h.now);
    assert_eq!(status.slaves.len(), lmbus_schemas::STATUS_MAX_SLAVES);
    assert_eq!(status.slaves_total as usize, n);
    assert_eq!(status.slaves_connected as usize, n - 1);
    assert_eq!(status.slaves[0].slave_id, "s01000");
    assert!(!status.slaves[0].connected);
    assert!(lmbus_schemas::encode(&status).unwrap().len() < lmbus_schemas::MAX_MESSAGE_BYTES);
}
