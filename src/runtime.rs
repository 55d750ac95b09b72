//! The live state every front reads: the current snapshot behind an atomic pointer,
//! and the plugin state that outlives snapshots.
//!
//! `check` is the whole decision for one Envoy `CheckRequest`. It never fails: a
//! malformed request, a panicking plugin, anything, becomes an explicit denial —
//! an RPC error would hand the decision to Envoy's `failure_mode_allow`.
// Every Check's future is built here: keep it small (clippy.toml).
#![warn(clippy::large_futures)]
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;

use crate::wire::CheckRequest;
use futures::FutureExt;

use crate::decision::{Decision, Deny};
use crate::pipeline::{self, Verdict};
use crate::plugins::Shared;
use crate::request::Request;
use crate::snapshot::{Consumers, Snapshot};
use crate::{encode, telemetry};

pub struct Runtime {
    snapshot: ArcSwap<Snapshot>,
    pub shared: Shared,
    loaded: AtomicBool,
    draining: AtomicBool,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            snapshot: ArcSwap::from_pointee(Snapshot {
                router: Default::default(),
                consumers: Arc::new(Consumers::default()),
                unmatched: Default::default(),
            }),
            shared: Shared::default(),
            loaded: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }
}

impl Runtime {
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn publish(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
        self.loaded.store(true, Ordering::Release);
    }

    /// Ready to take traffic: configuration loaded and not shutting down.
    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Decides one request from any front. Panics become a 500 denial.
    pub async fn decide(&self, req: &Request<'_>, front: &'static str) -> Verdict {
        let started = Instant::now();
        let snapshot = self.snapshot.load_full();
        let verdict = std::panic::AssertUnwindSafe(pipeline::decide(&snapshot, &self.shared, req))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                tracing::error!(path = req.path, "a plugin panicked; denying the request");
                Verdict {
                    route_id: None,
                    plugin: None,
                    decision: Decision::Deny(
                        Deny::message(500, "internal error").because("plugin panicked"),
                    ),
                }
            });
        telemetry::record_decision(front, &verdict, started.elapsed());
        verdict
    }

    pub async fn check(&self, msg: &CheckRequest) -> CheckResponse {
        match Request::from_check(msg) {
            Ok(req) => encode::check_response(self.decide(&req, "grpc").await.decision),
            Err(e) => {
                tracing::warn!(error = %e, "malformed CheckRequest; denying");
                let verdict = Verdict {
                    route_id: None,
                    plugin: None,
                    decision: Decision::Deny(
                        Deny::message(400, "Bad Request").because("malformed CheckRequest"),
                    ),
                };
                telemetry::record_decision("grpc", &verdict, std::time::Duration::ZERO);
                encode::check_response(verdict.decision)
            }
        }
    }
}
