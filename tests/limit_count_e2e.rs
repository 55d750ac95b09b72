//! limit-count through real Envoy: the APISIX jwt-auth docs' "Rate Limit with
//! Anonymous Consumer" via the Admin API, the shipped seed example, the quota headers
//! the client sees, and counters that survive a config reload.
mod common;

use std::time::Duration;

use common::{Reply, Stack, eventually};
use reqwest::Method;
use serde_json::{Value, json};

const DOC_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJrZXkiOiJqYWNrLWtleSIsIm5iZiI6MTcyOTEzMjI3MX0.UEPXy5jpid624T1XpfjM0PLY73LZPjV3Qt8yZ92kVuU";

#[track_caller]
fn ok(answer: (u16, Value)) {
    assert!(
        answer.0 == 200 || answer.0 == 201,
        "Admin API: {} {}",
        answer.0,
        answer.1
    );
}

async fn as_jack(stack: &Stack, path: &str) -> Reply {
    stack
        .send(
            stack
                .request(Method::GET, path)
                .header("Authorization", DOC_TOKEN),
        )
        .await
}

/// Five requests as jack, then five without a token: the docs' two loops.
async fn docs_loops(stack: &Stack, path: &str) -> (Vec<u16>, Vec<u16>) {
    let mut jack = Vec::new();
    for _ in 0..5 {
        jack.push(as_jack(stack, path).await.status);
    }
    let mut anonymous = Vec::new();
    for _ in 0..5 {
        anonymous.push(stack.get(path).await.status);
    }
    (jack, anonymous)
}

#[tokio::test]
async fn docs_rate_limit_with_anonymous_consumer() {
    let stack = Stack::start("").await;
    let admin = stack.admin();
    ok(admin
        .put(
            "consumers",
            json!({"username": "jack", "plugins": {"limit-count": {
                "count": 3, "time_window": 30, "rejected_code": 429}}}),
        )
        .await);
    ok(admin
        .put(
            "consumers/jack/credentials",
            json!({"id": "cred-jack-jwt-auth", "plugins": {"jwt-auth": {
                "key": "jack-key", "secret": "jack-hs256-secret-that-is-very-long"}}}),
        )
        .await);
    ok(admin
        .put(
            "consumers",
            json!({"username": "anonymous", "plugins": {"limit-count": {
                "count": 1, "time_window": 30, "rejected_code": 429}}}),
        )
        .await);
    ok(admin
        .put(
            "routes",
            json!({"id": "jwt-auth-route", "uri": "/anything",
                   "plugins": {"jwt-auth": {"anonymous_consumer": "anonymous"}},
                   "upstream": {"type": "roundrobin", "nodes": {"httpbin.org:80": 1}}}),
        )
        .await);

    let (jack, anonymous) = docs_loops(&stack, "/anything").await;
    assert_eq!(jack, [200, 200, 200, 429, 429]);
    assert_eq!(anonymous, [200, 429, 429, 429, 429]);
}

#[tokio::test]
async fn the_seed_example_gives_jack_three_and_anonymous_one() {
    let seed = std::fs::read_to_string("examples/portcullis.yaml").expect("read the seed");
    let stack = Stack::start(&seed).await;

    // /get is jack-only; it shares jack's quota with /anything, as a consumer
    // plugin's counter belongs to the consumer.
    let seen = as_jack(&stack, "/get").await.echoed();
    assert_eq!(seen.header("x-consumer-username"), Some("jack"));
    assert_eq!(seen.header("x-consumer-custom-id"), Some("495aec6a"));
    assert_eq!(stack.get("/get").await.status, 401);
    assert_eq!(
        stack.get("/headers").await.status,
        404,
        "left for the README"
    );
    drop(stack);

    let stack = Stack::start(&seed).await;
    let (jack, anonymous) = docs_loops(&stack, "/anything").await;
    assert_eq!(jack, [200, 200, 200, 429, 429]);
    assert_eq!(anonymous, [200, 429, 429, 429, 429]);
}

#[tokio::test]
async fn quota_headers_reach_the_client_on_allow_and_reject() {
    let stack = Stack::start(
        r#"
routes:
  - id: limited
    uri: /limited
    plugins:
      limit-count: { count: 2, time_window: 60, rejected_code: 429, rejected_msg: "Too many requests" }
  - id: quiet
    uri: /quiet
    plugins:
      limit-count: { count: 1, time_window: 60, show_limit_quota_header: false }
"#,
    )
    .await;
    let first = stack.get("/limited").await;
    assert!(first.reached_upstream());
    assert_eq!(first.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(first.header("x-ratelimit-remaining"), Some("1"));
    assert_eq!(first.header("x-ratelimit-reset"), Some("60"));
    let second = stack.get("/limited").await;
    assert_eq!(second.header("x-ratelimit-remaining"), Some("0"));
    let third = stack.get("/limited").await;
    assert_eq!(third.status, 429);
    assert!(!third.reached_upstream());
    assert_eq!(third.json(), json!({"error_msg": "Too many requests"}));
    assert_eq!(third.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(third.header("x-ratelimit-remaining"), Some("0"));
    let reset: f64 = third
        .header("x-ratelimit-reset")
        .expect("reset header")
        .parse()
        .unwrap();
    assert!((0.0..=60.0).contains(&reset), "{reset}");

    let quiet = stack.get("/quiet").await;
    assert!(quiet.reached_upstream());
    assert_eq!(quiet.header("x-ratelimit-limit"), None);
    let rejected = stack.get("/quiet").await;
    assert_eq!(rejected.status, 503, "APISIX's default rejected_code");
    assert_eq!(rejected.body, "");
    assert_eq!(rejected.header("x-ratelimit-limit"), None);
}

const RELOADED: &str = r#"
routes:
  - { id: anything, uri: /anything, plugins: { jwt-auth: {} } }
consumers:
  - username: jack
    plugins:
      limit-count: { count: 3, time_window: 60, rejected_code: 429 }
    credentials:
      - id: cred-jack-jwt-auth
        plugins: { jwt-auth: { key: jack-key, secret: jack-hs256-secret-that-is-very-long } }
"#;

#[tokio::test]
async fn counters_survive_a_config_reload() {
    let stack = Stack::start(RELOADED).await;
    assert_eq!(as_jack(&stack, "/anything").await.status, 200);
    assert_eq!(as_jack(&stack, "/anything").await.status, 200);

    // A change elsewhere in the file: a new route. Jack's counter is kept.
    let more = RELOADED.replacen("routes:\n", "routes:\n  - { id: new, uri: /new }\n", 1);
    stack.portcullis.reload(&more);
    let client = stack.client.clone();
    let url = stack.url("/new");
    eventually(Duration::from_secs(10), "the reloaded route", || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    assert_eq!(as_jack(&stack, "/anything").await.status, 200);
    assert_eq!(as_jack(&stack, "/anything").await.status, 429);
}
