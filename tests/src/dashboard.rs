//! The web dashboard (`lmbus-monitor web`) in-process on a free loopback port, with a users
//! file of the given accounts, and a small HTTP client that keeps its cookies, for the
//! HTTP-level and browser tests.

use std::collections::BTreeMap;
use std::time::Duration;

use lmbus_monitor::web::{WebConfig, hash_password, serve};

use crate::Fixture;

/// A running dashboard; stopped when dropped.
#[derive(Debug)]
pub struct Dashboard {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Dashboard {
    /// Serves the dashboard of `f`'s cluster with these `(name, role, password)` accounts
    /// (none: no login, read-only), asking the master every `every`.
    pub async fn start(f: &Fixture, accounts: &[(&str, &str, &str)], every: Duration) -> Self {
        let users = (!accounts.is_empty()).then(|| {
            let text: String = accounts
                .iter()
                .map(|(name, role, password)| {
                    format!(
                        "[[user]]\nname = \"{name}\"\nrole = \"{role}\"\npassword = \"{}\"\n\n",
                        hash_password(password).expect("hash")
                    )
                })
                .collect();
            lmbus_monitor::web::Users::parse(&text).expect("users file")
        });
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let url = format!("http://{}", tcp.local_addr().expect("bound"));
        let cfg = WebConfig {
            listen: tcp.local_addr().expect("bound"),
            users,
            tls: None,
            secure_cookies: false,
            every,
            timeout: Duration::from_secs(3),
            session_idle: Duration::from_secs(3600),
            history_days: 30,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let subjects = lmbus_schemas::Subjects::new(&f.cluster).expect("cluster name");
        let task = tokio::spawn(serve(f.client.clone(), subjects, cfg, tcp, async move {
            let _ = stopped.await;
        }));
        Self {
            url,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server and waits (bounded) for it to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// One HTTP answer: status, `Location`, body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
}

/// A browser without a browser: follows no redirects, keeps the cookies it is given.
#[derive(Debug, Clone, Default)]
pub struct WebClient {
    pub base: String,
    pub cookies: BTreeMap<String, String>,
}

impl WebClient {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            cookies: BTreeMap::new(),
        }
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        self.call(path, None).await
    }

    /// POSTs a form (`application/x-www-form-urlencoded`).
    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Answer {
        let body: Vec<String> = form
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        self.call(path, Some(body.join("&"))).await
    }

    /// POSTs `multipart/form-data`: text fields, and one file field `(name, file name,
    /// bytes)`, as a browser's upload form sends them.
    pub async fn post_upload(
        &mut self,
        path: &str,
        fields: &[(&str, &str)],
        file: Option<(&str, &str, &[u8])>,
    ) -> Answer {
        let boundary = "lmbus-test-boundary-7f3a9c";
        let mut body = Vec::new();
        for (name, value) in fields {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        }
        if let Some((name, file_name, bytes)) = file {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file_name}\"\r\nContent-Type: text/plain\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        self.send(
            path,
            Some((format!("multipart/form-data; boundary={boundary}"), body)),
        )
        .await
    }

    /// POSTs a body as it is (oversized or malformed forms).
    pub async fn post_raw(&mut self, path: &str, body: String) -> Answer {
        self.call(path, Some(body)).await
    }

    async fn call(&mut self, path: &str, body: Option<String>) -> Answer {
        let body = body.map(|b| {
            (
                "application/x-www-form-urlencoded".to_owned(),
                b.into_bytes(),
            )
        });
        self.send(path, body).await
    }

    /// A GET, or a POST of `(content type, body)`.
    async fn send(&mut self, path: &str, body: Option<(String, Vec<u8>)>) -> Answer {
        let url = format!("{}{path}", self.base);
        let cookie: Vec<String> = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let cookie = cookie.join("; ");
        let (answer, set) = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .max_redirects_will_error(false)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into();
            let response = match body {
                Some((kind, body)) => agent
                    .post(&url)
                    .header("Cookie", &cookie)
                    .header("Content-Type", &kind)
                    .send(&body[..]),
                None => agent.get(&url).header("Cookie", &cookie).call(),
            };
            let mut response = response.expect("the dashboard answers");
            let set: Vec<String> = response
                .headers()
                .get_all("set-cookie")
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_owned))
                .collect();
            let location = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok().map(str::to_owned));
            let status = response.status().as_u16();
            let body = response.body_mut().read_to_string().unwrap_or_default();
            (
                Answer {
                    status,
                    location,
                    body,
                },
                set,
            )
        })
        .await
        .expect("the request task");
        for line in set {
            let Some((pair, attributes)) = line.split_once(';').or(Some((line.as_str(), "")))
            else {
                continue;
            };
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            if value.is_empty() || attributes.contains("Max-Age=0") {
                self.cookies.remove(name.trim());
            } else {
                self.cookies
                    .insert(name.trim().to_owned(), value.trim().to_owned());
            }
        }
        answer
    }

    /// Logs in through the login page; returns the login POST's answer.
    pub async fn log_in(&mut self, user: &str, password: &str) -> Answer {
        let page = self.get("/login").await;
        let csrf = csrf_of(&page.body).expect("the login form has a csrf field");
        self.post(
            "/login",
            &[("csrf", &csrf), ("user", user), ("password", password)],
        )
        .await
    }
}

/// The CSRF token in a page's first form.
pub fn csrf_of(html: &str) -> Option<String> {
    let at = html.find(r#"name="csrf" value=""#)? + r#"name="csrf" value=""#.len();
    let rest = &html[at..];
    Some(rest[..rest.find('"')?].to_owned())
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
