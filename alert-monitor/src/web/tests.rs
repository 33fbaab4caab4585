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
