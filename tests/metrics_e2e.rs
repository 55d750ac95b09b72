//! Prometheus metrics on `/metrics` move with what happens: Checks through real Envoy
//! by route and decision, their latency, Admin API writes, and config reloads that
//! succeed or are refused.
mod common;

use std::time::Duration;

use common::{Stack, eventually, http_client};
use serde_json::json;

const CONFIG: &str = r#"
admin: { api_key: $env://ADMIN_API_KEY }
routes:
  - { id: open, uri: /open/*, plugins: {} }
"#;

async fn metrics(stack: &Stack) -> String {
    http_client()
        .get(stack.portcullis.http_url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .unwrap()
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test]
async fn counters_move_with_checks_writes_and_reloads() {
    let stack = Stack::start(CONFIG).await;
    for _ in 0..3 {
        assert_eq!(stack.get("/open/x").await.status, 200);
    }
    assert_eq!(stack.get("/nowhere").await.status, 404);

    let text = metrics(&stack).await;
    let allowed =
        r#"portcullis_checks_total{front="grpc",route="open",plugin="",decision="allow"}"#;
    let denied = r#"portcullis_checks_total{front="grpc",route="",plugin="",decision="deny"}"#;
    assert_eq!(sample(&text, allowed), 3.0, "{text}");
    assert_eq!(sample(&text, denied), 1.0, "{text}");
    assert!(
        text.contains(r#"portcullis_check_duration_seconds_bucket{front="grpc",route="open",decision="allow",le="#),
        "{text}"
    );

    let (status, _) = stack.admin().put("routes/r2", json!({"uri": "/r2"})).await;
    assert_eq!(status, 201);
    let text = metrics(&stack).await;
    assert_eq!(
        sample(&text, r#"portcullis_admin_writes_total{op="put"}"#),
        1.0,
        "{text}"
    );
    // The first write makes the state file; the next is a line in its journal.
    let (status, _) = stack.admin().put("routes/r3", json!({"uri": "/r3"})).await;
    assert_eq!(status, 201);
    let text = metrics(&stack).await;
    for how in ["rewrite", "append"] {
        let series = format!(r#"portcullis_state_file_write_seconds_count{{how="{how}"}}"#);
        assert_eq!(sample(&text, &series), 1.0, "{series}\n{text}");
    }

    stack.portcullis.reload(
        "admin: { api_key: $env://ADMIN_API_KEY }\nroutes: [ { id: open, uri: /open2/* } ]\n",
    );
    eventually(
        Duration::from_secs(5),
        "a successful reload is counted",
        || async {
            sample(
                &metrics(&stack).await,
                r#"portcullis_config_reloads_total{result="ok"}"#,
            ) == 1.0
        },
    )
    .await;
    stack.portcullis.reload_raw("routes: not-a-list\n");
    eventually(
        Duration::from_secs(5),
        "a refused reload is counted",
        || async {
            sample(
                &metrics(&stack).await,
                r#"portcullis_config_reloads_total{result="error"}"#,
            ) == 1.0
        },
    )
    .await;
    // The refused file changed nothing: the reloaded route still answers.
    assert_eq!(stack.get("/open2/x").await.status, 200);
}
