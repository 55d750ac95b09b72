//! The plain-HTTP front on `listen.http`: liveness, readiness and Prometheus
//! metrics for operators, and the auth_request/forwardAuth endpoint for proxies
//! (see `auth_request`).
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{any, get};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::runtime::Runtime;

#[derive(Clone)]
pub struct HttpState {
    pub runtime: Arc<Runtime>,
    pub metrics: PrometheusHandle,
    /// Path of the auth endpoint; everything below it is the Envoy HTTP ext_authz form.
    pub auth_path: Arc<str>,
    pub original: crate::config::OriginalFrom,
}

pub fn router(state: HttpState) -> Router {
    let auth = state.auth_path.trim_end_matches('/').to_owned();
    Router::new()
        .route(&auth, any(crate::auth_request::handle))
        .route(
            &format!("{auth}/{{*rest}}"),
            any(crate::auth_request::handle),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, &'static str) {
    if s.runtime.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<HttpState>) -> String {
    s.metrics.render()
}
