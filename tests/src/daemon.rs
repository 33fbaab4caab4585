//! A slave daemon (`lmbus-slave run`) in its own process, so tests can pause it (SIGSTOP)
//! and kill it, driven the way a host drives it: through its local HTTP API. The HTTP
//! calls block, so each runs on tokio's blocking pool.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use lmbus_slave::{Outcome, SlaveStatusView};

use crate::books::AllotView;
use crate::{Proc, bin, eventually, free_port};

/// How long a host waits for an answer: longer than any pause a test makes.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct SlaveDaemon {
    pub id: String,
    /// `127.0.0.1:PORT` of its local API.
    pub api: String,
    pub proc: Proc,
}

impl SlaveDaemon {
    /// Starts an unlicensed slave daemon with heartbeats every 200 ms, a 2 s grace period,
    /// a 1 s request timeout and short failover waits (its reclaim margin on the master is
    /// then about 2 s past the grace period), plus `flags`; waits until its API answers.
    pub async fn start(nats_url: &str, cluster: &str, id: &str, flags: &[&str]) -> Self {
        Self::start_with_grace(nats_url, cluster, id, Duration::from_secs(2), flags).await
    }

    /// Like [`SlaveDaemon::start`], with this grace period.
    pub async fn start_with_grace(
        nats_url: &str,
        cluster: &str,
        id: &str,
        grace: Duration,
        flags: &[&str],
    ) -> Self {
        let grace = format!("{}ms", grace.as_millis());
        // A free port may be taken by another test's daemon before this one binds it (that
        // one then answers here, under its own id): try another port until this daemon is
        // the one answering.
        for _ in 0..5 {
            let api = format!("127.0.0.1:{}", free_port());
            let proc = Proc::spawn(
                Command::new(bin("lmbus-slave").expect("lmbus-slave is built"))
                    .args(["run", "--nats", nats_url, "--cluster", cluster])
                    .args(["--id", id, "--api", &api])
                    .args(["--heartbeat-interval", "200ms", "--grace-period", &grace])
                    .args(["--request-timeout", "1s", "--failover-wait", "0s"])
                    .args(["--election-wait", "1s"])
                    .args(flags)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
            .expect("lmbus-slave starts");
            let daemon = SlaveDaemon {
                id: id.to_owned(),
                api,
                proc,
            };
            eventually("the slave daemon's API answers", || async {
                daemon.status().await.is_some()
            })
            .await
            .expect("the slave daemon's API answers");
            if daemon
                .status()
                .await
                .is_some_and(|status| status.slave_id == id)
            {
                return daemon;
            }
            eprintln!(
                "another slave daemon answers on {}: trying another port",
                daemon.api
            );
        }
        panic!("slave daemon {id} found no free port for its API in 5 tries")
    }

    /// Registers `agent` (type `inbound`): `Some(true)` approved, `Some(false)` refused,
    /// `None` no answer (or an error without an outcome). A refusal is HTTP 409 or 503 with
    /// the outcome in the body.
    pub async fn register(&self, agent: &str) -> Option<bool> {
        let url = format!("http://{}/v1/agents", self.api);
        let body = serde_json::json!({"agent_id": agent, "agent_type": "inbound"});
        blocking(move || {
            let outcome = ureq::post(&url)
                .config()
                .timeout_global(Some(HTTP_TIMEOUT))
                .http_status_as_error(false)
                .build()
                .send_json(body)
                .ok()?
                .into_body()
                .read_json::<Outcome>()
                .ok()?;
            Some(outcome.is_approved())
        })
        .await
    }

    /// Unregisters `agent`; whether the daemon released its seat (an agent that held none
    /// is a 404, and an error is false too).
    pub async fn unregister(&self, agent: &str) -> bool {
        let url = format!("http://{}/v1/agents/{agent}", self.api);
        blocking(move || {
            ureq::delete(&url)
                .config()
                .timeout_global(Some(HTTP_TIMEOUT))
                .build()
                .call()
                .is_ok()
        })
        .await
    }

    /// The agents the daemon holds, sorted; `None` if its API does not answer.
    pub async fn agents(&self) -> Option<Vec<String>> {
        let url = format!("http://{}/v1/agents", self.api);
        blocking(move || {
            let list: Vec<lmbus_schemas::AgentClaim> = ureq::get(&url)
                .config()
                .timeout_global(Some(HTTP_TIMEOUT))
                .build()
                .call()
                .ok()?
                .into_body()
                .read_json()
                .ok()?;
            let mut agents: Vec<String> = list.into_iter().map(|c| c.agent_id).collect();
            agents.sort();
            Some(agents)
        })
        .await
    }

    /// What a host polling the daemon learns: takes the agents the daemon reports logged
    /// out (its recent logouts) out of `told`, the hosts' books. Agent ids must be used
    /// once each, so a logout cannot be mistaken for a later registration's.
    pub async fn forget_logged_out(&self, told: &mut std::collections::BTreeSet<String>) {
        let status = self.status().await.expect("the slave daemon's API answers");
        for out in status.logged_out {
            told.remove(&out.agent_id);
        }
    }

    /// The daemon's status (mode, recent logouts), `None` if its API does not answer.
    pub async fn status(&self) -> Option<SlaveStatusView> {
        serde_json::from_value(self.status_json().await?).ok()
    }

    /// The allotment-mode part of the daemon's status, read by name from its JSON; an error
    /// if its API does not answer or the fields are missing.
    pub async fn allot(&self) -> anyhow::Result<AllotView> {
        let json = self
            .status_json()
            .await
            .context("the slave daemon's API does not answer")?;
        serde_json::from_value(json).context(
            "the slave daemon's status has no allotment fields (admission, allotted, allot_lease_left_ms, journal_unacked, local_decisions)",
        )
    }

    /// The daemon's `/v1/status` JSON as it is, `None` if its API does not answer.
    async fn status_json(&self) -> Option<serde_json::Value> {
        let url = format!("http://{}/v1/status", self.api);
        blocking(move || {
            ureq::get(&url)
                .config()
                .timeout_global(Some(Duration::from_secs(2)))
                .build()
                .call()
                .ok()?
                .into_body()
                .read_json()
                .ok()
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking HTTP call panicked")
}
