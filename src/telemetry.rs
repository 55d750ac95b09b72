//! Logs and Prometheus metrics.
//!
//! One log line per denied Check names the route, the plugin and the reason — never
//! a token, cookie or secret: reasons are fixed strings chosen by plugins, and
//! request headers are not logged at all.
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{Counter, Histogram};

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
    let handle = match builder.install_recorder() {
        Ok(handle) => {
            spawn_upkeep(handle.clone());
            handle
        }
        // A recorder is already installed (tests start several servers in one process).
        Err(_) => PrometheusBuilder::new().build_recorder().handle(),
    };
    RECORDER_READY.store(true, Ordering::Relaxed);
    handle
}

/// How often histogram samples are folded into their buckets: the exporter's own
/// default for the recorders it installs itself.
const UPKEEP_PERIOD: Duration = Duration::from_secs(5);

/// `install_recorder` leaves upkeep to the caller: until it runs, every histogram
/// sample waits in a queue. A `/metrics` scrape drains it, so a replica nobody
/// scrapes grew by 8 bytes per histogram per Check (2.2 MiB per 140k Checks,
/// without bound). A task on the server's runtime, not a thread of its own: with a
/// thread started during startup, the settled RSS at 100k consumers was 25 MiB
/// higher (a new thread is handed one of glibc's arenas, see `memory.rs`).
fn spawn_upkeep(handle: PrometheusHandle) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // Benches record outside a runtime and never run long enough to matter.
        return;
    };
    runtime.spawn(async move {
        let mut period = tokio::time::interval(UPKEEP_PERIOD);
        period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            period.tick().await;
            handle.run_upkeep();
        }
    });
}

pub fn record_decision(front: &'static str, verdict: &Verdict, took: Duration) {
    let route = verdict.route_id.as_deref().unwrap_or("");
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
    let labels = (front, verdict.route_id.clone(), plugin, decision);
    let (checks, duration) = handles(labels);
    checks.increment(1);
    duration.record(took.as_secs_f64());
}

/// The label set of one Check's metrics: front, route, plugin, decision.
type Labels = (&'static str, Option<Arc<str>>, &'static str, &'static str);

/// Set once the process-wide recorder is in place: handles taken before that would
/// be no-ops, so they are only cached afterwards.
static RECORDER_READY: AtomicBool = AtomicBool::new(false);

/// More label sets than this (route churn) and a thread's cache starts over.
const MAX_CACHED_LABEL_SETS: usize = 4096;

thread_local! {
    static HANDLES: RefCell<HashMap<Labels, (Counter, Histogram)>> = RefCell::new(HashMap::new());
}

/// The counter and histogram for a label set. `counter!`/`histogram!` with labels
/// build a `Key` (allocating the route label) and look it up in the recorder's
/// registry on every call — about two thirds of the in-process cost of a no-plugin
/// Check (docs/benchmarks.md); a per-thread cache of the handles makes it a hash
/// lookup.
fn handles(labels: Labels) -> (Counter, Histogram) {
    let make = |(front, route, plugin, decision): &Labels| {
        let route = route.as_deref().unwrap_or("").to_owned();
        (
            metrics::counter!("portcullis_checks_total", "front" => *front, "route" => route.clone(), "plugin" => *plugin, "decision" => *decision),
            metrics::histogram!("portcullis_check_duration_seconds", "front" => *front, "route" => route, "decision" => *decision),
        )
    };
    if !RECORDER_READY.load(Ordering::Relaxed) {
        return make(&labels);
    }
    HANDLES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(h) = cache.get(&labels) {
            return h.clone();
        }
        if cache.len() >= MAX_CACHED_LABEL_SETS {
            cache.clear();
        }
        let h = make(&labels);
        cache.insert(labels, h.clone());
        h
    })
}
