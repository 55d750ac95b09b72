//! limit-count rules: the window arithmetic directly, and the plugin through the
//! real pipeline, as a consumer plugin (the APISIX docs' anonymous-consumer example)
//! and as a route plugin.
use serde_json::{Value, json};

use super::*;
use crate::decision::Decision;
use crate::plugins::Shared as AllShared;
use crate::plugins::jwt_auth::tests::{DOC_SECRET, DOC_TOKEN, World};

fn compile(conf: Value) -> Result<Plugin, String> {
    let shared = AllShared::default();
    Plugin::compile(&conf, &BuildContext { shared: &shared })
}

#[test]
fn a_window_opens_with_its_first_request() {
    let shared = Shared::default();
    let t0 = Instant::now();
    let w = Duration::from_secs(30);
    let first = shared.incoming("k".into(), 2, w, t0);
    assert_eq!(
        first,
        Tally {
            allowed: true,
            remaining: 1,
            reset: 30.0
        }
    );
    let second = shared.incoming("k".into(), 2, w, t0 + Duration::from_millis(1500));
    assert_eq!(
        second,
        Tally {
            allowed: true,
            remaining: 0,
            reset: 28.5
        }
    );
    let third = shared.incoming("k".into(), 2, w, t0 + Duration::from_secs(2));
    assert_eq!(
        third,
        Tally {
            allowed: false,
            remaining: 0,
            reset: 28.0
        }
    );
    // Another key has its own window.
    assert!(
        shared
            .incoming("other".into(), 2, w, t0 + Duration::from_secs(2))
            .allowed
    );
    // When the window has ended, the next request opens a new one.
    let later = shared.incoming("k".into(), 2, w, t0 + Duration::from_secs(30));
    assert_eq!(
        later,
        Tally {
            allowed: true,
            remaining: 1,
            reset: 30.0
        }
    );
}

#[test]
fn ended_windows_are_swept() {
    let shared = Shared::default();
    let t0 = Instant::now();
    for i in 0..100 {
        shared.incoming(format!("k{i}"), 1, Duration::from_secs(1), t0);
    }
    assert_eq!(shared.len(), 100);
    shared.incoming(
        "fresh".into(),
        1,
        Duration::from_secs(60),
        t0 + SWEEP_EVERY + Duration::from_secs(1),
    );
    assert_eq!(shared.len(), 1);
}

/// Keys carry client values: a client sending a new (large) one on every request
/// must not grow the counters past their budget, and the newest windows survive.
#[test]
fn counters_stay_within_their_budget() {
    let shared = Shared::default();
    let t0 = Instant::now();
    let value = "v".repeat(8 * 1024);
    let window = Duration::from_secs(3600);
    let mut newest = String::new();
    for i in 0..(MAX_BYTES / (8 * 1024) + 2_000) {
        newest = format!("route:r:0:{i}:{value}");
        // Later requests, later windows: the earliest-ending are the oldest.
        let now = t0 + Duration::from_millis(i as u64);
        shared.incoming(newest.clone(), 1, window, now);
        assert!(shared.bytes.load(Ordering::Relaxed) <= MAX_BYTES + cost(&newest));
    }
    let accounted: usize = shared.windows.iter().map(|e| cost(e.key())).sum();
    assert_eq!(shared.bytes.load(Ordering::Relaxed), accounted);
    assert!(
        shared.windows.contains_key(&newest),
        "the newest window is kept"
    );
    assert!(!shared.windows.contains_key(&format!("route:r:0:0:{value}")));
    // A kept window still counts.
    let later = t0 + Duration::from_secs(10);
    assert!(!shared.incoming(newest, 1, window, later).allowed);
}

#[test]
fn reset_is_printed_like_lua() {
    assert_eq!(format_reset(30.0), "30");
    assert_eq!(format_reset(29.87), "29.87");
    assert_eq!(format_reset(29.5), "29.5");
    assert_eq!(format_reset(0.0), "0");
}

#[test]
fn config_is_checked() {
    let p = compile(json!({"count": 3, "time_window": 30})).unwrap();
    assert_eq!((p.count, p.window.as_secs(), p.rejected_code), (3, 30, 503));
    assert_eq!(p.key, KeySpec::Var("remote_addr".into()));
    assert!(p.show_limit_quota_header);
    assert!(p.rejected_body.is_none());
    let err = |v| compile(v).unwrap_err();
    assert!(err(json!({"count": 3, "time_window": 30, "policy": "redis"})).contains("redis_host"));
    assert!(
        err(json!({"count": 3, "time_window": 30, "policy": "redis-cluster"}))
            .contains("not supported")
    );
    let p = compile(json!({"count": 3, "time_window": 30, "policy": "redis",
                           "redis_host": "127.0.0.1", "redis_password": "p@ss/word"}))
    .unwrap();
    let target = p.redis.as_ref().unwrap();
    assert_eq!(
        target.shown(),
        "redis://127.0.0.1:6379/0",
        "no credentials in logs"
    );
    assert!(
        err(json!({"count": 3, "time_window": 30, "policy": "redis",
                   "redis_host": "h", "redis_ssl": true}))
        .contains("redis_ssl")
    );
    assert!(err(json!({"count": 3, "time_window": 30, "policy": "memcached"})).contains("policy"));
    assert!(err(json!({"time_window": 30})).contains("count"));
    assert!(err(json!({"count": 0, "time_window": 30})).contains("count"));
    assert!(err(json!({"count": 3, "time_window": -1})).contains("time_window"));
    assert!(err(json!({"count": "$http_x", "time_window": 30})).contains("variables"));
    assert!(
        err(json!({"count": 3, "time_window": 30, "rejected_code": 600})).contains("rejected_code")
    );
    assert!(
        err(json!({"count": 3, "time_window": 30, "rejected_msg": ""})).contains("rejected_msg")
    );
    assert!(err(json!({"count": 3, "time_window": 30, "key_type": "lua"})).contains("key_type"));
    assert!(
        err(json!({"count": 3, "time_window": 30, "window_type": "sliding"})).contains("sliding")
    );
    assert!(err(json!({"rules": [{"count": 1, "time_window": 1, "key": "x"}]})).contains("rules"));
    assert!(err(json!({"count": 3, "time_window": 30, "burst": 1})).contains("burst"));
    // Accepted as APISIX does.
    compile(
        json!({"count": 3, "time_window": 30, "policy": "local", "allow_degradation": true,
                   "sync_interval": 1, "window_type": "fixed"}),
    )
    .unwrap();
}

fn status(d: &Decision) -> u16 {
    match d {
        Decision::Allow(_) => 200,
        Decision::Deny(d) => d.status,
    }
}

fn client_header<'a>(d: &'a Decision, name: &str) -> Option<&'a str> {
    let list = match d {
        Decision::Allow(a) => &a.client_headers,
        Decision::Deny(d) => &d.headers,
    };
    list.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The APISIX jwt-auth docs' "Rate Limit with Anonymous Consumer".
fn docs_example() -> (Value, Value) {
    (
        json!([{"id": "jwt-auth-route", "uri": "/anything",
                "plugins": {"jwt-auth": {"anonymous_consumer": "anonymous"}}}]),
        json!([
            {"username": "jack",
             "plugins": {"limit-count": {"count": 3, "time_window": 30, "rejected_code": 429}},
             "credentials": [{"id": "cred-jack-jwt-auth",
                              "plugins": {"jwt-auth": {"key": "jack-key", "secret": DOC_SECRET}}}]},
            {"username": "anonymous",
             "plugins": {"limit-count": {"count": 1, "time_window": 30, "rejected_code": 429}}}
        ]),
    )
}

async fn statuses(w: &World, headers: &[(&str, &str)], n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(status(&w.check("/anything", headers).await));
    }
    out
}

#[tokio::test]
async fn jack_gets_three_and_anonymous_gets_one() {
    let (routes, consumers) = docs_example();
    let w = World::new(routes, consumers);
    let jack = [("authorization", DOC_TOKEN)];
    assert_eq!(statuses(&w, &jack, 5).await, [200, 200, 200, 429, 429]);
    assert_eq!(statuses(&w, &[], 5).await, [200, 429, 429, 429, 429]);
}

#[tokio::test]
async fn quota_headers_on_allow_and_reject() {
    let (routes, consumers) = docs_example();
    let w = World::new(routes, consumers);
    let jack = [("authorization", DOC_TOKEN)];
    let first = w.check("/anything", &jack).await;
    assert_eq!(client_header(&first, "x-ratelimit-limit"), Some("3"));
    assert_eq!(client_header(&first, "x-ratelimit-remaining"), Some("2"));
    assert_eq!(client_header(&first, "x-ratelimit-reset"), Some("30"));
    w.check("/anything", &jack).await;
    w.check("/anything", &jack).await;
    let rejected = w.check("/anything", &jack).await;
    assert_eq!(status(&rejected), 429);
    assert_eq!(client_header(&rejected, "x-ratelimit-limit"), Some("3"));
    assert_eq!(client_header(&rejected, "x-ratelimit-remaining"), Some("0"));
    let reset: f64 = client_header(&rejected, "x-ratelimit-reset")
        .unwrap()
        .parse()
        .unwrap();
    assert!((29.0..=30.0).contains(&reset), "{reset}");
    let Decision::Deny(deny) = &rejected else {
        unreachable!()
    };
    assert!(deny.body.is_empty(), "no rejected_msg, no body");
}

#[tokio::test]
async fn rejected_msg_and_default_code() {
    let w = World::new(
        json!([{"id": "r", "uri": "/anything", "plugins": {"limit-count": {
            "count": 1, "time_window": 60, "rejected_msg": "slow down",
            "show_limit_quota_header": false}}}]),
        json!([]),
    );
    assert_eq!(status(&w.check("/anything", &[]).await), 200);
    let d = w.check("/anything", &[]).await;
    let Decision::Deny(deny) = &d else {
        panic!("not limited")
    };
    assert_eq!(deny.status, 503);
    assert_eq!(
        serde_json::from_str::<Value>(&deny.body).unwrap(),
        json!({"error_msg": "slow down"})
    );
    assert!(client_header(&d, "x-ratelimit-limit").is_none());
}

#[tokio::test]
async fn a_config_swap_keeps_counts_unless_the_limit_changes() {
    let (routes, consumers) = docs_example();
    let mut w = World::new(routes.clone(), consumers.clone());
    let jack = [("authorization", DOC_TOKEN)];
    assert_eq!(statuses(&w, &jack, 2).await, [200, 200]);
    // An unrelated change: a new route. Jack has one request left.
    let mut more = routes.as_array().unwrap().clone();
    more.push(json!({"id": "other", "uri": "/other"}));
    w.swap(Value::Array(more), consumers.clone());
    assert_eq!(statuses(&w, &jack, 2).await, [200, 429]);
    // Jack's quota changes: a new counter, as APISIX's conf version gives.
    let mut changed = consumers.clone();
    changed[0]["plugins"]["limit-count"]["count"] = json!(4);
    w.swap(routes, changed);
    assert_eq!(statuses(&w, &jack, 5).await, [200, 200, 200, 200, 429]);
}

#[tokio::test]
async fn a_consumer_quota_spans_routes_and_a_route_quota_does_not() {
    let (_, consumers) = docs_example();
    let w = World::new(
        json!([
            {"id": "a", "uri": "/anything", "plugins": {"jwt-auth": {}}},
            {"id": "b", "uri": "/other", "plugins": {"jwt-auth": {}}},
            {"id": "c", "uri": "/c", "plugins": {"limit-count": {"count": 1, "time_window": 60}}},
            {"id": "d", "uri": "/d", "plugins": {"limit-count": {"count": 1, "time_window": 60}}}
        ]),
        consumers,
    );
    let jack = [("authorization", DOC_TOKEN)];
    assert_eq!(status(&w.check("/anything", &jack).await), 200);
    assert_eq!(status(&w.check("/other", &jack).await), 200);
    assert_eq!(status(&w.check("/anything", &jack).await), 200);
    assert_eq!(status(&w.check("/other", &jack).await), 429);
    assert_eq!(status(&w.check("/c", &[]).await), 200);
    assert_eq!(status(&w.check("/d", &[]).await), 200);
    assert_eq!(status(&w.check("/c", &[]).await), 503);
}

#[tokio::test]
async fn keys_from_variables_combinations_and_constants() {
    let route = |id: &str, conf: Value| json!({"id": id, "uri": format!("/{id}"), "plugins": {"limit-count": conf}});
    let w = World::new(
        json!([
            route(
                "var",
                json!({"count": 1, "time_window": 60, "key": "http_x_api_key"})
            ),
            route(
                "combo",
                json!({"count": 1, "time_window": 60, "key_type": "var_combination",
                                  "key": "$remote_addr ${arg_user}"})
            ),
            route(
                "constant",
                json!({"count": 1, "time_window": 60, "key_type": "constant", "key": "all"})
            ),
        ]),
        json!([]),
    );
    assert_eq!(status(&w.check("/var", &[("x-api-key", "a")]).await), 200);
    assert_eq!(status(&w.check("/var", &[("x-api-key", "b")]).await), 200);
    assert_eq!(status(&w.check("/var", &[("x-api-key", "a")]).await), 503);
    // Without the header the key falls back to the client address.
    assert_eq!(status(&w.check("/var", &[]).await), 200);
    assert_eq!(status(&w.check("/var", &[]).await), 503);

    assert_eq!(status(&w.check("/combo?user=u1", &[]).await), 200);
    assert_eq!(status(&w.check("/combo?user=u2", &[]).await), 200);
    assert_eq!(status(&w.check("/combo?user=u1", &[]).await), 503);

    assert_eq!(
        status(&w.check("/constant", &[("x-api-key", "a")]).await),
        200
    );
    assert_eq!(
        status(&w.check("/constant", &[("x-api-key", "b")]).await),
        503
    );
}

#[tokio::test]
async fn a_group_shares_one_counter() {
    let conf = json!({"count": 2, "time_window": 60, "group": "g1"});
    let w = World::new(
        json!([
            {"id": "a", "uri": "/a", "plugins": {"limit-count": conf}},
            {"id": "b", "uri": "/b", "plugins": {"limit-count": conf}}
        ]),
        json!([]),
    );
    assert_eq!(status(&w.check("/a", &[]).await), 200);
    assert_eq!(status(&w.check("/b", &[]).await), 200);
    assert_eq!(status(&w.check("/a", &[]).await), 503);
}
