//! The exposure rule; pages, roles and CSRF are tested over HTTP in `tests/tests/web.rs`.

use super::*;

fn config(listen: &str, users: bool, tls: bool) -> WebConfig {
    WebConfig {
        listen: listen.parse().unwrap(),
        users: users.then(Users::default),
        tls: tls.then(|| (PathBuf::from("c.pem"), PathBuf::from("k.pem"))),
        secure_cookies: false,
        every: Duration::from_secs(2),
        timeout: Duration::from_secs(3),
        session_idle: Duration::from_secs(3600),
        history_days: 30,
    }
}

/// Loopback is served as configured; any other address needs both TLS and a login, and the
/// refusal names what is missing and the loopback alternative.
#[test]
fn a_non_loopback_address_needs_tls_and_a_login() {
    assert!(check_exposure(&config("127.0.0.1:8470", false, false)).is_ok());
    assert!(check_exposure(&config("[::1]:8470", false, false)).is_ok());
    assert!(check_exposure(&config("0.0.0.0:8470", true, true)).is_ok());
    let e = check_exposure(&config("0.0.0.0:8470", false, false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("without TLS (--tls-cert and --tls-key) and a login (--users FILE)")
            && e.contains("127.0.0.1:8470"),
        "{e}"
    );
    let e = check_exposure(&config("10.0.0.5:80", true, false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("without TLS") && !e.contains("a login"), "{e}");
}

#[test]
fn a_sample_recalled_and_followed_is_kept_once_in_time_order() {
    let sample = |time_ms, total| render::Sample {
        time_ms,
        total,
        by_type: [("inbound".to_owned(), total)].into(),
        hour: false,
    };
    let mut s = Snapshot::default();
    // Followed live first, then the same alerts recalled from the log, out of order.
    s.add_sample(sample(3_000, 1));
    s.add_sample(sample(1_000, 2));
    s.add_sample(sample(3_000, 1));
    s.add_sample(sample(1_000, 2));
    // A different count at the same time is another sample (a status poll).
    s.add_sample(sample(3_000, 0));
    let got: Vec<(i64, u32)> = s.history.iter().map(|x| (x.time_ms, x.total)).collect();
    assert_eq!(got, [(1_000, 2), (3_000, 1), (3_000, 0)]);
}

/// Samples more than a day before the newest become one per hour with each series' own
/// peak (a peak is never averaged away), folding the same sample again changes nothing,
/// the range picks what is shown, and the CSV writes an hour as an ISO 8601 interval; the
/// oldest of more than `MAX_SAMPLES` recent samples is folded, not dropped.
#[test]
fn samples_older_than_a_day_are_kept_as_hourly_peaks() {
    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;
    let sample = |time_ms, inbound: u32, outbound: u32| render::Sample {
        time_ms,
        total: inbound + outbound,
        by_type: [
            ("inbound".to_owned(), inbound),
            ("outbound".to_owned(), outbound),
        ]
        .into(),
        hour: false,
    };
    let now = 20_000 * DAY;
    let old = now - 3 * DAY + 5 * 60_000;
    let mut s = Snapshot::default();
    s.add_sample(sample(old, 5, 0));
    s.add_sample(sample(old + 60_000, 1, 3));
    s.add_sample(sample(now, 1, 0));
    // Recalled again, as a restart or an overlap of the log and the live tail does.
    s.add_sample(sample(old + 60_000, 1, 3));
    assert_eq!(s.history, [sample(now, 1, 0)]);
    let hour = render::Sample {
        time_ms: now - 3 * DAY,
        total: 5,
        by_type: [("inbound".to_owned(), 5), ("outbound".to_owned(), 3)].into(),
        hour: true,
    };
    assert_eq!(s.hourly, std::slice::from_ref(&hour));
    assert_eq!(s.history_in(Some(1)), [&sample(now, 1, 0)]);
    assert_eq!(s.history_in(Some(7)), [&hour, &sample(now, 1, 0)]);
    assert_eq!(s.history_in(None).len(), 2);
    let csv = render::history_csv(&s, None);
    assert!(
        csv.contains("\n2024-10-01 00:00:00.000Z/PT1H,5,5,3\n"),
        "{csv}"
    );
    let page = render::live_history(&s, Some(7));
    assert!(
        page.contains(
            "<td class=\"peak\">5</td><td>in the hour from 2024-10-01 00:00:00.000Z</td>"
        ) && page.contains("<b>7 days</b>")
            && page.contains("href=\"/history.csv?days=7\""),
        "{page}"
    );
    // A full day of samples and one more: the oldest is folded into its hour.
    let mut s = Snapshot::default();
    for i in 0..=render::MAX_SAMPLES as i64 {
        s.add_sample(sample(now + i * 1_000, u32::from(i == 0) * 9, 0));
    }
    assert_eq!(s.history.len(), render::MAX_SAMPLES);
    assert_eq!(s.hourly.len(), 1);
    assert_eq!(s.hourly[0].total, 9);
}

/// A counts alert whose peaks since the previous one are higher than its counts becomes
/// two samples: the peaks just before it, then the counts; without higher peaks, one.
#[test]
fn a_counts_alert_charts_its_peak_since_the_last_one() {
    let mut alert = Alert::new(
        lmbus_schemas::Severity::Info,
        lmbus_schemas::AlertKind::LicenseCounts,
        "license counts",
    )
    .counts([("total".to_owned(), 1), ("inbound".to_owned(), 1)].into());
    alert.time_ms = 10_000;
    assert_eq!(render::Sample::of_counts(&alert).len(), 1);
    alert.peaks = [("total".to_owned(), 4), ("inbound".to_owned(), 4)].into();
    let samples = render::Sample::of_counts(&alert);
    let got: Vec<(i64, u32)> = samples.iter().map(|x| (x.time_ms, x.total)).collect();
    assert_eq!(got, [(9_999, 4), (10_000, 1)]);
    assert_eq!(samples[0].by_type.get("inbound"), Some(&4));
}
