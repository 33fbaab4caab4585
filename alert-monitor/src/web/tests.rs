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
