//! Logs and Prometheus metrics.
//!
//! One log line per denied Check names the route, the plugin and the reason — never
//! a token, cookie or secret: reasons are fixed strings chosen by plugins, and
//! request headers are not logged at all.
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::decision::Decision;
use crate::pipeline::Verdict;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global log subscriber; `RUST_LOG` overrides the default `info`.
pub fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Installs the process-wide metrics recorder and returns the handle `/metrics` renders.
pub fn init_metrics() -> PrometheusHandle {
    let buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    let builder = PrometheusBuilder::new()
        .set_buckets(&buckets)
        .expect("static, non-empty buckets");
    match builder.install_recorder() {
        Ok(handle) => handle,
        // A recorder is already installed (tests start several servers in one process).
        Err(_) => PrometheusBuilder::new().build_recorder().handle(),
    }
}

pub fn record_decision(front: &'static str, verdict: &Verdict, took: Duration) {
    let route = verdict.route_id.as_deref().unwrap_or("").to_owned();
    let plugin = verdict.plugin.unwrap_or("");
    let decision = match &verdict.decision {
        Decision::Allow(_) => "allow",
        Decision::Deny(d) => {
            tracing::info!(
                front,
                route = %route,
                plugin,
                status = d.status,
                reason = %d.reason,
                "denied"
            );
            "deny"
        }
    };
    metrics::counter!("portcullis_checks_total", "front" => front, "route" => route.clone(), "plugin" => plugin, "decision" => decision).increment(1);
    metrics::histogram!("portcullis_check_duration_seconds", "front" => front, "route" => route, "decision" => decision).record(took.as_secs_f64());
}
