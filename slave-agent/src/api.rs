//! The local HTTP/JSON API of the `lmbus-slave` daemon, for host applications in any
//! language. It listens on loopback only: it has no authentication, so anyone who can
//! reach it can register agents.
//!
//! | method and path            | body                          | answer                           |
//! |----------------------------|-------------------------------|----------------------------------|
//! | `POST /v1/agents`          | `{"agent_id","agent_type"}`   | `Outcome` (`{"outcome":"approved",…}` or `{"outcome":"rejected","reason":…}`) |
//! | `DELETE /v1/agents/{id}`   |                               | `{"released": bool}`             |
//! | `GET /v1/agents`           |                               | `[{"agent_id","agent_type"}]`    |
//! | `GET /v1/status`           |                               | `SlaveStatusView`                |
//! | `GET /metrics`             |                               | Prometheus text (see `metrics.rs`), with the `process_*` metrics |
//!
//! Errors are `{"error": "..."}` with status 400 (bad input) or 502 (NATS trouble).

use std::future::Future;
use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::agent::SlaveAgent;
use crate::error::SlaveError;

#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterBody {
    pub agent_id: String,
    pub agent_type: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Released {
    pub released: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

struct ApiError(SlaveError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.0 {
            SlaveError::InvalidInput(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        };
        (
            status,
            Json(ErrorBody {
                error: self.0.to_string(),
            }),
        )
            .into_response()
    }
}

pub fn router(agent: SlaveAgent) -> Router {
    Router::new()
        .route("/v1/agents", get(list).post(register))
        .route("/v1/agents/{agent_id}", delete(unregister))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(agent)
}

async fn register(
    State(agent): State<SlaveAgent>,
    Json(body): Json<RegisterBody>,
) -> Result<Response, ApiError> {
    let outcome = agent
        .register(&body.agent_id, &body.agent_type)
        .await
        .map_err(ApiError)?;
    Ok(Json(outcome).into_response())
}

async fn unregister(
    State(agent): State<SlaveAgent>,
    Path(agent_id): Path<String>,
) -> Result<Response, ApiError> {
    let released = agent.unregister(&agent_id).await.map_err(ApiError)?;
    Ok(Json(Released { released }).into_response())
}

async fn list(State(agent): State<SlaveAgent>) -> Response {
    Json(agent.agents()).into_response()
}

async fn metrics(State(agent): State<SlaveAgent>) -> Response {
    let process = tokio::task::spawn_blocking(crate::metrics::process_text)
        .await
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        agent.metrics_text() + &process,
    )
        .into_response()
}

async fn status(State(agent): State<SlaveAgent>) -> Response {
    Json(agent.status()).into_response()
}

/// Binds the API on `addr`, which must be a loopback address, and returns the bound
/// address and the server future.
pub async fn bind(
    agent: SlaveAgent,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    if !addr.ip().is_loopback() {
        bail!(
            "the local API must listen on a loopback address (127.0.0.1 or ::1), not {addr}: it has no authentication"
        );
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the local API"))?;
    let bound = listener.local_addr()?;
    let server = axum::serve(listener, router(agent)).with_graceful_shutdown(shutdown);
    Ok((bound, async move { server.await }))
}
