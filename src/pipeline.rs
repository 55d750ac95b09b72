//! One way through: match a route, run its plugins in priority order, fold their
//! outcomes into a decision.
//!
//! When an auth plugin attaches a consumer, the consumer's own plugins (e.g.
//! limit-count) join the remaining ones, replacing a route plugin of the same name,
//! as APISIX merges consumer and route plugins. The first deny ends the Check.
// Every Check's future is built here: keep it small (clippy.toml).
#![warn(clippy::large_futures)]
use std::cell::OnceCell;
use std::sync::Arc;

use crate::config::Unmatched;
use crate::decision::{Allow, Decision, Deny};
use crate::plugins::{Ctx, Outcome, Plugin, Shared};
use crate::request::Request;
use crate::snapshot::{Consumer, Snapshot};

/// A decision with what logs and metrics need to explain it.
#[derive(Debug)]
pub struct Verdict {
    pub route_id: Option<Arc<str>>,
    /// The plugin that denied, if one did.
    pub plugin: Option<&'static str>,
    pub decision: Decision,
}

pub fn route_not_found() -> Deny {
    Deny::message(404, "404 Route Not Found").because("no route matched")
}

pub async fn decide(snapshot: &Snapshot, shared: &Shared, req: &Request<'_>) -> Verdict {
    let Some(route) = snapshot.router.find(req) else {
        let explicit = req.context_extension("route_id").is_some();
        let decision = match snapshot.unmatched {
            Unmatched::Allow if !explicit => {
                let mut allow = Allow::default();
                allow.scrub_owned(req.headers, &[]);
                Decision::Allow(allow)
            }
            // A route_id naming no enabled route is a misconfiguration: deny.
            _ => Decision::Deny(route_not_found()),
        };
        return Verdict {
            route_id: None,
            plugin: None,
            decision,
        };
    };

    let mut cx = Ctx {
        req,
        route,
        snapshot,
        shared,
        identity: None,
        allow: Allow::default(),
    };
    let consumer: OnceCell<Arc<Consumer>> = OnceCell::new();
    let mut plugins: Vec<&Plugin> = route.plugins.iter().collect();
    let mut next = 0;
    while let Some(plugin) = plugins.get(next).copied() {
        if let Outcome::Deny(deny) = plugin.run(&mut cx).await {
            return Verdict {
                route_id: Some(route.id.clone()),
                plugin: Some(plugin.name()),
                decision: Decision::Deny(deny),
            };
        }
        next += 1;
        if consumer.get().is_none()
            && let Some(identity) = &cx.identity
        {
            let c = consumer.get_or_init(|| identity.consumer.clone());
            if !c.plugins.is_empty() {
                let mut rest: Vec<&Plugin> = plugins
                    .drain(next..)
                    .filter(|p| !c.plugins.iter().any(|cp| cp.name() == p.name()))
                    .collect();
                rest.extend(c.plugins.iter());
                rest.sort_by_key(|p| std::cmp::Reverse(p.priority()));
                plugins.extend(rest);
            }
        }
    }
    cx.allow.scrub_owned(req.headers, &route.owned_headers);
    Verdict {
        route_id: Some(route.id.clone()),
        plugin: None,
        decision: Decision::Allow(cx.allow),
    }
}
