//! The local HTTP/JSON API of the `lmbus-slave` daemon, for host applications in any
//! language. By default it listens on loopback only. Serving other hosts or containers (a
//! sidecar) takes an explicit opt-in, `--api-allow-remote`, and a bearer token
//! (`--api-token-file`): with a token, every request but `/healthz` and `/readyz` must carry
//! `Authorization: Bearer <token>`, compared in constant time.
//!
//! | method and path           | body                        | answer |
//! |---------------------------|-----------------------------|--------|
//! | `POST /v1/agents`         | `{"agent_id","agent_type"}` | 201 `{"outcome":"approved","already_held":false}` (200 when it already held the seat); a refusal is 409 (503 when no master could decide), see below |
//! | `GET /v1/agents`          |                             | 200 `[{"agent_id","agent_type","master"}]` |
//! | `GET /v1/agents/{id}`     |                             | 200 `{"agent_id","agent_type","master"}`; 404 `agent_not_found` |
//! | `DELETE /v1/agents/{id}`  |                             | 200 `{"released":true}`; 404 `agent_not_found` when it held no seat |
//! | `GET /v1/status`          |                             | 200 `SlaveStatusView` |
//! | `GET /healthz`            |                             | 200 `{"status":"ok"}`: the process serves |
//! | `GET /readyz`             |                             | 200 `{"status":"ready","master":…}` when a master answers this slave; 503 `not_ready` otherwise |
//! | `GET /v1/openapi.json`    |                             | this API's OpenAPI 3.1 document (checked in as `slave-agent/openapi.json`) |
//! | `GET /metrics`            |                             | Prometheus text (see `metrics.rs`), with the `process_*` metrics |
//!
//! Every error, the router's own (unknown path, wrong method) and the JSON and path
//! extractors' included, is JSON of one shape, `{"error":{"code","message","hint"}}`:
//! `code` is a stable snake_case token to steer by, `message` says what went wrong and
//! `hint` what to do. The codes:
//!
//! | status | code | when |
//! |--------|------|------|
//! | 400 | `invalid_json` | the body is not JSON |
//! | 400 | `invalid_path` | a path parameter does not decode |
//! | 401 | `unauthorized` | a token is configured and the request carries none or another |
//! | 404 | `not_found` | no such path |
//! | 404 | `agent_not_found` | the agent holds no seat on this slave |
//! | 405 | `method_not_allowed` | the path exists, the method does not |
//! | 409 | the reason (`aggregate_limit`, `type_limit`, `local_limit`, `unknown_agent_type`, …) | a registration refused: a decision about the seat |
//! | 413 | `body_too_large` | the body is over axum's limit (2 MB) |
//! | 415 | `unsupported_media_type` | no `Content-Type: application/json` |
//! | 422 | `invalid_body` | a field is missing, unknown or of the wrong type |
//! | 422 | `invalid_input` | the agent id or type is not one a master accepts |
//! | 500 | `internal` | a bug in this daemon |
//! | 502 | `bad_master_answer` | a master answered something that does not fit |
//! | 503 | `master_unavailable`, `restricted`, `no_leader` | a registration no master could decide (NATS down, brokers electing, grace period over) |
//! | 503 | `nats_error`, `refused_by_master` | the request could not be sent or this slave is not accepted |
//! | 503 | `not_ready` | `/readyz`: no master answers |
//!
//! A refused registration (409, or 503 for the reasons where nobody decided) carries, beside
//! `error`, the registration's outcome as it always did, `{"outcome":"rejected","reason",
//! "detail"}`, so one body serves a client that steers by status and one that reads the
//! outcome. Seats are only ever refused by 409 or 503 with `outcome`; every other 4xx is a
//! request this API did not understand, and took no seat.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use lmbus_schemas::RejectReason;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::agent::SlaveAgent;
use crate::error::SlaveError;
use crate::events::Outcome;
use crate::status::{AgentNotice, MasterView, SlaveMode, SlaveStatusView};

/// `POST /v1/agents`: the agent to register. Unknown fields are refused (422), so a typo
/// or a field this API does not have never takes a seat.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// Unique on this slave (e.g. a user or session name).
    #[schema(example = "agent-7")]
    pub agent_id: String,
    /// A type the master license names.
    #[schema(example = "inbound")]
    pub agent_type: String,
}

/// `POST /v1/agents` answered 201 or 200: the agent holds a seat.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Approved {
    /// Always `approved`.
    #[schema(example = "approved")]
    pub outcome: String,
    /// It held the seat already (the answer is then 200, not 201).
    pub already_held: bool,
}

/// `POST /v1/agents` answered 409 or 503: no seat. `outcome`, `reason` and `detail` are the
/// registration's outcome; `error` is the shape every error has.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Rejected {
    /// Always `rejected`.
    #[schema(example = "rejected")]
    pub outcome: String,
    /// Why, as a snake_case token (`aggregate_limit`, `type_limit`, `local_limit`, …; the
    /// README lists them); the same as `error.code`.
    #[schema(example = "aggregate_limit")]
    pub reason: String,
    pub detail: String,
    pub error: ErrorDetail,
}

/// `DELETE /v1/agents/{id}` answered 200: the seat is released.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Released {
    /// Always true: an agent that held no seat is a 404.
    pub released: bool,
}

/// One agent holding a seat on this slave.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    pub agent_id: String,
    pub agent_type: String,
    /// The master that granted the seat: `primary`, `secondary` or `backup`.
    #[schema(example = "primary")]
    pub master: String,
}

/// `/healthz` and `/readyz` answered 200.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` (`/healthz`) or `ready` (`/readyz`).
    #[schema(example = "ready")]
    pub status: String,
    /// `/readyz`: the master new registrations go to (`primary`, `secondary` or `backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
}

/// Every error this API answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable snake_case token (see the table in the API's description).
    #[schema(example = "agent_not_found")]
    pub code: String,
    /// What went wrong.
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

/// An error answer: its status and the [`ErrorBody`] it carries.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    fn new(
        status: StatusCode,
        code: &str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                hint: hint.into(),
            },
        }
    }

    fn agent_not_found(agent_id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "agent_not_found",
            format!("agent {} holds no seat on this slave", shown(agent_id, 80)),
            "GET /v1/agents lists the agents holding seats; register it with POST /v1/agents",
        )
    }

    fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
            "send `Authorization: Bearer <token>` with the token in the daemon's --api-token-file (the CLI: --api-token-file)",
        )
    }
}

impl From<SlaveError> for ApiError {
    fn from(e: SlaveError) -> Self {
        let message = e.to_string();
        match e {
            SlaveError::InvalidInput(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                message,
                "use an agent id of 1 to 256 bytes without control characters, and an agent type of A-Z a-z 0-9 - _ that the master license names",
            ),
            SlaveError::Protocol(_) => Self::new(
                StatusCode::BAD_GATEWAY,
                "bad_master_answer",
                message,
                "check that lmbus-broker and lmbus-slave are the same lmbus version",
            ),
            SlaveError::Nats(_) | SlaveError::Connect { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "nats_error",
                message,
                "retry later; check that NATS is reachable from this slave (`lmbus-slave status` shows the last error)",
            ),
            SlaveError::Refused { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "refused_by_master",
                message,
                "fix what the master refuses (see the message), then restart this slave",
            ),
            SlaveError::License(_) | SlaveError::Config(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                message,
                "report this with the daemon's log",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: self.detail })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // The text quotes the request (field names, positions): shown printable and short.
        let message = shown(&rejection.body_text(), 300);
        match rejection {
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                message,
                "send the body as JSON with `Content-Type: application/json`",
            ),
            JsonRejection::JsonSyntaxError(_) => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                message,
                r#"send a JSON object such as {"agent_id":"a1","agent_type":"inbound"}"#,
            ),
            JsonRejection::JsonDataError(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                message,
                r#"send exactly the fields agent_id and agent_type, both strings: {"agent_id":"a1","agent_type":"inbound"}"#,
            ),
            JsonRejection::BytesRejection(_)
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Self::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    message,
                    "send a registration body of a few hundred bytes",
                )
            }
            _ => Self::new(
                rejection.status(),
                "invalid_body",
                message,
                "send the request body again",
            ),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            shown(&rejection.body_text(), 300),
            "percent-encode the agent id as UTF-8 in the path",
        )
    }
}

/// Text from a request or a peer, as an error shows it: at most `max` bytes, printable.
fn shown(text: &str, max: usize) -> String {
    lmbus_schemas::printable(&lmbus_schemas::truncated(text, max)).into_owned()
}

/// `axum::Json` whose rejections are [`ApiError`]s.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(Self(value))
    }
}

/// `axum::extract::Path` whose rejections are [`ApiError`]s.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// The bearer token requests must carry. Its `Debug` does not show it.
#[derive(Clone)]
pub struct ApiToken(Arc<[u8]>);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

impl ApiToken {
    /// The shortest token accepted: 16 characters (a `openssl rand -hex 16` is 32).
    pub const MIN_LEN: usize = 16;

    /// The token in `text`, trimmed; refused if shorter than [`Self::MIN_LEN`].
    pub fn new(text: &str) -> anyhow::Result<Self> {
        let token = text.trim();
        if token.len() < Self::MIN_LEN {
            bail!(
                "the API token is {} characters long: use at least {} (e.g. `openssl rand -hex 32`)",
                token.len(),
                Self::MIN_LEN
            );
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!(
                "the API token has whitespace inside: use one word (e.g. `openssl rand -hex 32`)"
            );
        }
        Ok(Self(token.as_bytes().into()))
    }

    /// The token in the file at `path` (one line; surrounding whitespace is ignored).
    pub fn read(path: &FsPath) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the API token file {}", path.display()))?;
        Self::new(&text).with_context(|| format!("API token file {}", path.display()))
    }

    /// Whether `presented` is the token, in time that does not depend on where they differ.
    fn accepts(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq as _;
        bool::from(self.0.as_ref().ct_eq(presented))
    }
}

/// Where and for whom the API serves.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    pub addr: SocketAddr,
    /// Listen on a non-loopback address (needs `token`).
    pub allow_remote: bool,
    /// Required on every request but `/healthz` and `/readyz` when set.
    pub token: Option<ApiToken>,
}

impl ApiOptions {
    /// Loopback only, no token: the default.
    pub fn loopback(addr: SocketAddr) -> Self {
        Self {
            addr,
            allow_remote: false,
            token: None,
        }
    }

    /// Refuses what would expose the API unauthenticated or by accident.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.allow_remote && self.token.is_none() {
            bail!(
                "--api-allow-remote needs --api-token-file: anyone who reaches the API could register and release agents; put a token in a file (e.g. `openssl rand -hex 32 > api.token`) and pass --api-token-file"
            );
        }
        if !self.addr.ip().is_loopback() && !self.allow_remote {
            bail!(
                "the local API listens on a loopback address (127.0.0.1 or ::1), not {}: to serve other hosts or containers, pass --api-allow-remote with --api-token-file",
                self.addr
            );
        }
        Ok(())
    }
}

/// The API without a token (what a loopback daemon serves by default).
pub fn router(agent: SlaveAgent) -> Router {
    router_with_token(agent, None)
}

/// The API; with `token`, every route but `/healthz` and `/readyz` requires it.
pub fn router_with_token(agent: SlaveAgent, token: Option<ApiToken>) -> Router {
    let guarded = Router::new()
        .route("/v1/agents", get(list).post(register))
        .route("/v1/agents/{agent_id}", get(agent_seat).delete(unregister))
        .route("/v1/status", get(status))
        .route("/v1/openapi.json", get(openapi_document))
        .route("/metrics", get(metrics));
    let guarded = match token {
        Some(token) => guarded.layer(middleware::from_fn_with_state(token, require_token)),
        None => guarded,
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(agent)
}

async fn require_token(State(token): State<ApiToken>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(presented) if token.accepts(presented) => next.run(request).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such path in the lmbus-slave API",
        "the paths are /v1/agents, /v1/agents/{id}, /v1/status, /v1/openapi.json, /healthz, /readyz and /metrics",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this path does not take that method",
        "see /v1/openapi.json for the methods of each path",
    )
}

/// The status and hint a refused registration is answered with.
fn refusal(reason: RejectReason) -> (StatusCode, &'static str) {
    use RejectReason::*;
    match reason {
        // Nobody decided: NATS or the master is in trouble, not the license.
        MasterUnavailable | NoLeader | Restricted => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no master could decide: retry later, and check lmbus-broker and NATS (`lmbus-slave status` shows the last error)",
        ),
        AggregateLimit | TypeLimit | LocalLimit | SlaveLimit | Reclaimed => (
            StatusCode::CONFLICT,
            "every seat is taken: retry when an agent is released, or ask the license administrator for more seats",
        ),
        UnknownAgentType => (
            StatusCode::CONFLICT,
            "use an agent type the master license names",
        ),
        AgentTypeMismatch => (
            StatusCode::CONFLICT,
            "the agent holds a seat of another type: release it first (DELETE /v1/agents/{id})",
        ),
        SyncOverdue => (
            StatusCode::CONFLICT,
            "the master license is past its offline limit (no vendor sync within sync_within_days): agents already registered keep their seats; ask the license administrator to sync with the vendor",
        ),
        RateLimited => (
            StatusCode::CONFLICT,
            "this slave registers faster than the master allows: retry in a moment",
        ),
        _ => (
            StatusCode::CONFLICT,
            "the master refused the seat: the reason and detail say why",
        ),
    }
}

/// Register an agent: it takes a seat, or is refused one.
#[utoipa::path(
    post,
    path = "/v1/agents",
    tag = "agents",
    request_body = RegisterBody,
    responses(
        (status = 201, description = "approved: the agent took a seat", body = Approved),
        (status = 200, description = "approved: the agent held the seat already", body = Approved),
        (status = 409, description = "refused: the master or the slave's license decided there is no seat (`reason`: aggregate_limit, type_limit, local_limit, unknown_agent_type, …)", body = Rejected),
        (status = 503, description = "refused because no master could decide (`reason`: master_unavailable, no_leader, restricted), or NATS failed (`error` only)", body = Rejected),
        (status = 400, description = "the body is not JSON", body = ErrorBody),
        (status = 401, description = "a token is required", body = ErrorBody),
        (status = 415, description = "no JSON content type", body = ErrorBody),
        (status = 422, description = "a field is missing, unknown or invalid", body = ErrorBody),
        (status = 502, description = "a master answered something unexpected", body = ErrorBody),
    )
)]
async fn register(
    State(agent): State<SlaveAgent>,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<Response, ApiError> {
    match agent.register(&body.agent_id, &body.agent_type).await? {
        Outcome::Approved { already_held } => {
            let status = if already_held {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((
                status,
                Json(Approved {
                    outcome: "approved".into(),
                    already_held,
                }),
            )
                .into_response())
        }
        Outcome::Rejected { reason, detail } => {
            let (status, hint) = refusal(reason);
            let error = ErrorDetail {
                code: reason.token().to_owned(),
                message: format!(
                    "agent {} was refused a seat: {reason}: {detail}",
                    shown(&body.agent_id, 80)
                ),
                hint: hint.to_owned(),
            };
            Ok((
                status,
                Json(Rejected {
                    outcome: "rejected".into(),
                    reason: reason.token().to_owned(),
                    detail,
                    error,
                }),
            )
                .into_response())
        }
    }
}

/// Release an agent's seat.
#[utoipa::path(
    delete,
    path = "/v1/agents/{agent_id}",
    tag = "agents",
    params(("agent_id" = String, Path, description = "the agent whose seat to release")),
    responses(
        (status = 200, description = "released", body = Released),
        (status = 404, description = "`agent_not_found`: the agent held no seat", body = ErrorBody),
        (status = 401, description = "a token is required", body = ErrorBody),
        (status = 422, description = "the agent id is empty", body = ErrorBody),
        (status = 503, description = "NATS failed", body = ErrorBody),
    )
)]
async fn unregister(
    State(agent): State<SlaveAgent>,
    ApiPath(agent_id): ApiPath<String>,
) -> Result<Json<Released>, ApiError> {
    if agent.unregister(&agent_id).await? {
        Ok(Json(Released { released: true }))
    } else {
        Err(ApiError::agent_not_found(&agent_id))
    }
}

/// One agent's seat.
#[utoipa::path(
    get,
    path = "/v1/agents/{agent_id}",
    tag = "agents",
    params(("agent_id" = String, Path, description = "the agent")),
    responses(
        (status = 200, description = "the agent holds a seat", body = AgentView),
        (status = 404, description = "`agent_not_found`: it holds none", body = ErrorBody),
        (status = 401, description = "a token is required", body = ErrorBody),
    )
)]
async fn agent_seat(
    State(agent): State<SlaveAgent>,
    ApiPath(agent_id): ApiPath<String>,
) -> Result<Json<AgentView>, ApiError> {
    let claim = agent
        .agents()
        .into_iter()
        .find(|a| a.agent_id == agent_id)
        .ok_or_else(|| ApiError::agent_not_found(&agent_id))?;
    let master = agent
        .granted_by(&agent_id)
        .ok_or_else(|| ApiError::agent_not_found(&agent_id))?;
    Ok(Json(AgentView {
        agent_id: claim.agent_id,
        agent_type: claim.agent_type,
        master: master.to_owned(),
    }))
}

/// The agents holding seats on this slave.
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    responses(
        (status = 200, description = "every agent holding a seat, by agent id", body = Vec<AgentView>),
        (status = 401, description = "a token is required", body = ErrorBody),
    )
)]
async fn list(State(agent): State<SlaveAgent>) -> Json<Vec<AgentView>> {
    Json(
        agent
            .agents()
            .into_iter()
            .filter_map(|a| {
                let master = agent.granted_by(&a.agent_id)?;
                Some(AgentView {
                    agent_id: a.agent_id,
                    agent_type: a.agent_type,
                    master: master.to_owned(),
                })
            })
            .collect(),
    )
}

/// The slave's status: connection, limits, seats, recent logouts and refusals.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "slave",
    responses(
        (status = 200, description = "the status", body = SlaveStatusView),
        (status = 401, description = "a token is required", body = ErrorBody),
    )
)]
async fn status(State(agent): State<SlaveAgent>) -> Json<SlaveStatusView> {
    Json(agent.status())
}

/// Liveness: the process serves HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "probes",
    responses((status = 200, description = "alive", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        master: None,
    })
}

/// Readiness: a master answers this slave, so registrations are decided.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "probes",
    responses(
        (status = 200, description = "a master answers", body = Health),
        (status = 503, description = "`not_ready`: no master answers (starting, grace period, restricted)", body = ErrorBody),
    )
)]
async fn readyz(State(agent): State<SlaveAgent>) -> Result<Json<Health>, ApiError> {
    let status = agent.status();
    if status.masters.iter().any(|m| m.connected) {
        return Ok(Json(Health {
            status: "ready".into(),
            master: Some(status.active_master),
        }));
    }
    let why = match &status.last_error {
        Some(e) => format!(": {}", shown(e, 200)),
        None => String::new(),
    };
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        format!("no master answers this slave (mode {}){why}", status.mode),
        "check that lmbus-broker runs for this cluster and that NATS is reachable; `lmbus-slave status` shows the last error",
    ))
}

/// This API's OpenAPI document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "slave",
    responses((status = 200, description = "the OpenAPI 3.1 document", content_type = "application/json"))
)]
async fn openapi_document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

/// The slave's metrics in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "slave",
    responses(
        (status = 200, description = "Prometheus text exposition (version 0.0.4)", body = String, content_type = "text/plain"),
        (status = 401, description = "a token is required", body = ErrorBody),
    )
)]
async fn metrics(State(agent): State<SlaveAgent>) -> Response {
    let process = tokio::task::spawn_blocking(crate::metrics::process_text)
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        agent.metrics_text() + &process,
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "lmbus-slave local API",
        version = "1",
        description = "The HTTP/JSON API of an lmbus slave daemon (`lmbus-slave run`), for host applications: register and release agents' seats, read the slave's status. Loopback only unless the daemon runs with --api-allow-remote; with --api-token-file every path but /healthz and /readyz needs `Authorization: Bearer <token>`. Every error is `{\"error\":{\"code\",\"message\",\"hint\"}}`; a refused registration is 409 (503 when no master could decide) with the outcome beside the error. Generated from slave-agent/src/api.rs, whose module documentation lists every error code."
    ),
    paths(register, list, agent_seat, unregister, status, healthz, readyz, openapi_document, metrics),
    components(schemas(
        RegisterBody, Approved, Rejected, Released, AgentView, Health, ErrorBody, ErrorDetail,
        SlaveStatusView, MasterView, AgentNotice, SlaveMode
    )),
    modifiers(&BearerToken),
    tags(
        (name = "agents", description = "seats of this slave's agents"),
        (name = "slave", description = "the slave's status, metrics and this document"),
        (name = "probes", description = "liveness and readiness, never behind the token"),
    )
)]
struct ApiDoc;

/// Declares the bearer token scheme (required only when the daemon has a token).
struct BearerToken;

impl utoipa::Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "api_token",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "the token in the daemon's --api-token-file; required only when the daemon has one",
                        ))
                        .build(),
                ),
            );
    }
}

/// The OpenAPI document of this API, as the checked-in `slave-agent/openapi.json` holds it
/// (pretty JSON with a final newline).
pub fn openapi_json() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot render the OpenAPI document: {e}\"}}"));
    text.push('\n');
    text
}

/// Binds the API on `addr`, which must be a loopback address, and returns the bound
/// address and the server future.
pub async fn bind(
    agent: SlaveAgent,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    bind_with(agent, ApiOptions::loopback(addr), shutdown).await
}

/// Binds the API as `options` say (checked with [`ApiOptions::check`]) and returns the
/// bound address and the server future.
pub async fn bind_with(
    agent: SlaveAgent,
    options: ApiOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    options.check()?;
    let addr = options.addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the local API"))?;
    let bound = listener.local_addr()?;
    // Answers of pipelined requests written together only where every client is trusted
    // with the seats anyway (no token: loopback, the default), see `serve`.
    let batch_answers = options.token.is_none();
    let router = router_with_token(agent, options.token);
    Ok((bound, serve(listener, router, batch_answers, shutdown)))
}

/// How long a stopping server waits for its connections to finish the requests they are
/// answering (a registration waits for a master at most the slave's longest request)
/// before it drops them, so that a connection that never completes a request (a peer
/// that sends half a request head and stops) cannot keep the daemon from releasing its
/// seats.
pub const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown`, then stops accepting, lets each
/// connection finish the request it is answering (closing idle keep-alive connections)
/// and waits for them, at most [`SHUTDOWN_WAIT`].
///
/// HTTP/1.1 on hyper's connection, as `axum::serve` does, with `TCP_NODELAY` (an answer
/// is written whole, in one write). A client may pipeline (RFC 9112 §9.3.2: several
/// requests sent before reading): the answers come in the requests' order, one request
/// after the other, so one that waits for a master holds the ones behind it.
///
/// With `batch_answers` (hyper's `pipeline_flush`), the answers to the requests already
/// read are written together, in one write, when the last of them is answered: a busy
/// pipelining host pays one loopback write for many (the throughput bench's pipelined
/// row: 1.6× the Redis semaphore with it, 0.7× without). The price: hyper then buffers
/// answers without a cap while a client's next request is incomplete, so a client that
/// keeps sending and never completes its last request, nor reads, grows the daemon's
/// memory. It is only on where no token is configured (loopback, where every client can
/// take and release seats anyway); with a token (a sidecar others reach, and `/healthz`
/// needs none) each answer is written on its own, under hyper's write-buffer cap.
async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    batch_answers: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.pipeline_flush(batch_answers);
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if accept_error_is_the_connections(&e) => continue,
                Err(e) => {
                    // Out of file descriptors or memory: wait rather than spin, and
                    // still stop when asked.
                    tracing::error!(error = %e, "the local API cannot accept a connection; retrying in 1 s");
                    tokio::select! {
                        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(router.clone()),
        );
        let connection = graceful.watch(connection);
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a local API connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_WAIT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "the local API stopped with connections still open after {SHUTDOWN_WAIT:?}: they are closed"
        );
    }
    connections.shutdown().await;
    Ok(())
}

/// An accept error that concerns only the connection being accepted (the peer gave up),
/// not the listener.
fn accept_error_is_the_connections(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECKED_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

    /// The checked-in `slave-agent/openapi.json` is the document the code generates.
    /// Steps: generate it; with `LMBUS_BLESS=1` write it to the file; otherwise compare.
    #[test]
    fn checked_in_openapi_matches_the_code() {
        let generated = openapi_json();
        if std::env::var_os("LMBUS_BLESS").is_some_and(|v| v == "1") {
            std::fs::write(CHECKED_IN, &generated).expect("slave-agent/openapi.json is writable");
            return;
        }
        let checked_in = std::fs::read_to_string(CHECKED_IN).unwrap_or_default();
        assert!(
            checked_in == generated,
            "slave-agent/openapi.json differs from the API the code serves: regenerate it with `LMBUS_BLESS=1 cargo test -p lmbus-slave --lib checked_in_openapi_matches_the_code` and commit it"
        );
    }

    /// The document lists every route the router serves.
    #[test]
    fn openapi_lists_every_path() {
        let doc: serde_json::Value =
            serde_json::from_str(&openapi_json()).expect("the document is JSON");
        for path in [
            "/v1/agents",
            "/v1/agents/{agent_id}",
            "/v1/status",
            "/v1/openapi.json",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} is not documented");
        }
    }

    /// A remote API needs a token; a non-loopback address needs the opt-in; short tokens
    /// are refused; the token matches only itself.
    #[test]
    fn remote_access_needs_the_opt_in_and_a_token() {
        let remote: SocketAddr = "0.0.0.0:7411".parse().expect("an address");
        let err = ApiOptions::loopback(remote).check().expect_err("refused");
        assert!(err.to_string().contains("--api-allow-remote"), "{err}");
        let opted = ApiOptions {
            addr: remote,
            allow_remote: true,
            token: None,
        };
        let err = opted.check().expect_err("refused without a token");
        assert!(err.to_string().contains("--api-token-file"), "{err}");
        assert!(ApiToken::new("short").is_err());
        let token = ApiToken::new("0123456789abcdef0123\n").expect("a token");
        assert!(token.accepts(b"0123456789abcdef0123"));
        assert!(!token.accepts(b"0123456789abcdef0124"));
        assert!(!token.accepts(b"0123456789abcdef012"));
        assert!(!format!("{token:?}").contains("0123"));
        let ok = ApiOptions {
            addr: remote,
            allow_remote: true,
            token: Some(token),
        };
        ok.check().expect("remote with a token is allowed");
    }
}
