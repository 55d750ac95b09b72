//! The Admin API as APISIX users drive it: the `curl` bodies from the APISIX docs, the
//! same answers, and every accepted write deciding the very next request through Envoy
//! and surviving a restart.
mod common;

use common::{ADMIN_KEY, Admin, Stack};
use reqwest::Method;
use serde_json::{Value, json};

/// APISIX's route example (`PUT /apisix/admin/routes/1`), minus `remote_addrs`, which
/// portcullis refuses rather than ignores (see `unsupported_match_fields_are_refused`).
fn docs_route() -> Value {
    json!({
        "uri": "/index.html",
        "hosts": ["foo.com", "*.bar.com"],
        "methods": ["PUT", "GET"],
        "enable_websocket": true,
        "upstream": { "type": "roundrobin", "nodes": { "127.0.0.1:1980": 1 } }
    })
}

fn error_msg(body: &Value) -> &str {
    body.get("error_msg")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no error_msg in {body}"))
}

/// A 400 whose `error_msg` names `field`.
fn assert_bad_request(answer: &(u16, Value), field: &str) {
    let (status, body) = answer;
    assert_eq!(
        *status, 400,
        "expected 400 naming {field:?}, got {status} {body}"
    );
    let msg = error_msg(body);
    assert!(
        msg.contains(field),
        "error_msg {msg:?} does not name {field:?}"
    );
}

async fn through(stack: &Stack, path: &str, host: &str) -> u16 {
    stack
        .send(stack.request(Method::GET, path).header("host", host))
        .await
        .status
}

#[tokio::test]
async fn the_admin_api_requires_the_key() {
    let stack = Stack::start("").await;
    let admin = stack.admin();
    for key in [
        None,
        Some("wrong"),
        Some(""),
        Some(&ADMIN_KEY[..ADMIN_KEY.len() - 1]),
    ] {
        let admin = admin.with_key(key);
        for (method, path) in [
            (Method::GET, "routes"),
            (Method::GET, "routes/1"),
            (Method::PUT, "routes/1"),
            (Method::POST, "routes"),
            (Method::PATCH, "routes/1"),
            (Method::DELETE, "routes/1"),
            (Method::GET, "consumers"),
            (Method::PUT, "consumers"),
            (Method::GET, "consumers/jack/credentials"),
            (Method::PUT, "consumers/jack/credentials/c1"),
        ] {
            let body = matches!(method, Method::PUT | Method::POST | Method::PATCH)
                .then(|| docs_route().to_string());
            let (status, headers, answer) = admin.send_full(method.clone(), path, body).await;
            assert_eq!(status, 401, "{method} {path} with key {key:?}: {answer}");
            assert_eq!(answer, json!({"error_msg": "failed to check token"}));
            assert_eq!(
                headers.get("x-api-version").map(|v| v.to_str().unwrap()),
                Some("v3")
            );
        }
    }
    // Nothing was written by the refused calls.
    let (status, list) = admin.get("routes").await;
    assert_eq!((status, &list["total"]), (200, &json!(0)), "{list}");
}

#[tokio::test]
async fn the_admin_api_is_not_served_without_a_key() {
    let stack = Stack::start("admin: {}\nroutes: [{id: r, uri: /r}]").await;
    let url = stack.admin().url("routes");
    let refused = common::http_client()
        .get(url)
        .header("X-API-KEY", ADMIN_KEY)
        .send()
        .await;
    assert!(
        refused.is_err(),
        "the Admin API answered without a configured key: {refused:?}"
    );
    assert_eq!(
        stack.get("/r").await.status,
        200,
        "the proxy path still works"
    );
}

#[tokio::test]
async fn routes_crud_follows_apisix_and_decides_the_next_request() {
    let stack = Stack::start("").await;
    let admin = stack.admin();
    assert_eq!(through(&stack, "/index.html", "foo.com").await, 404);

    // Create: 201, `key` and `value` with the id and server-set times.
    let (status, body) = admin.put("routes/1", docs_route()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["key"], "/apisix/routes/1");
    assert_eq!(body["value"]["id"], "1");
    assert_eq!(body["value"]["uri"], "/index.html");
    assert_eq!(body["value"]["hosts"], json!(["foo.com", "*.bar.com"]));
    assert!(body["value"]["create_time"].is_i64(), "{body}");
    assert!(body["value"]["update_time"].is_i64(), "{body}");
    // ...and it decides the very next request.
    assert_eq!(through(&stack, "/index.html", "foo.com").await, 200);
    assert_eq!(through(&stack, "/index.html", "a.bar.com").await, 200);
    assert_eq!(through(&stack, "/index.html", "baz.com").await, 404);

    // Read one.
    let (status, got) = admin.get("routes/1").await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["key"], "/apisix/routes/1");
    assert_eq!(got["value"], body["value"]);
    assert!(
        got["createdIndex"].is_u64() && got["modifiedIndex"].is_u64(),
        "{got}"
    );

    // Replace: 200, create_time kept.
    let mut replaced = docs_route();
    replaced["uri"] = json!("/other.html");
    let (status, put_again) = admin.put("routes/1", replaced).await;
    assert_eq!(status, 200, "{put_again}");
    assert_eq!(
        put_again["value"]["create_time"],
        body["value"]["create_time"]
    );
    assert_eq!(through(&stack, "/index.html", "foo.com").await, 404);
    assert_eq!(through(&stack, "/other.html", "foo.com").await, 200);

    // Patch merges (RFC 7396).
    let (status, patched) = admin
        .patch("routes/1", json!({"uri": "/index.html", "desc": "d"}))
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["value"]["uri"], "/index.html");
    assert_eq!(patched["value"]["desc"], "d");
    assert_eq!(patched["value"]["methods"], json!(["PUT", "GET"]));
    assert_eq!(through(&stack, "/index.html", "foo.com").await, 200);
    let (status, later) = admin.get("routes/1").await;
    assert_eq!(status, 200);
    assert!(
        later["modifiedIndex"].as_u64() > got["modifiedIndex"].as_u64(),
        "modifiedIndex did not grow: {got} -> {later}"
    );

    // The id may come in the body instead of the path.
    let (status, by_body) = admin
        .put("routes", json!({"id": "2", "uri": "/two", "plugins": {}}))
        .await;
    assert_eq!(status, 201, "{by_body}");
    assert_eq!(by_body["key"], "/apisix/routes/2");
    assert_eq!(stack.get("/two").await.status, 200);
    // An integer id, as APISIX accepts.
    let (status, numeric) = admin.put("routes", json!({"id": 3, "uri": "/three"})).await;
    assert_eq!(status, 201, "{numeric}");
    assert_eq!(numeric["key"], "/apisix/routes/3");

    // POST generates the id.
    let (status, posted) = admin.post("routes", json!({"uri": "/posted"})).await;
    assert_eq!(status, 201, "{posted}");
    let generated = posted["value"]["id"]
        .as_str()
        .expect("generated id")
        .to_owned();
    assert_eq!(posted["key"], format!("/apisix/routes/{generated}"));
    assert_eq!(stack.get("/posted").await.status, 200);
    let (status, second) = admin.post("routes", json!({"uri": "/posted2"})).await;
    assert_eq!(status, 201, "{second}");
    assert_ne!(
        second["value"]["id"], posted["value"]["id"],
        "POST ids must be unique"
    );

    // List.
    let (status, list) = admin.get("routes").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], 5, "{list}");
    let items = list["list"].as_array().expect("list");
    assert_eq!(items.len(), 5);
    for item in items {
        let id = item["value"]["id"].as_str().expect("value.id");
        assert_eq!(item["key"], format!("/apisix/routes/{id}"));
        assert!(
            item["createdIndex"].is_u64() && item["modifiedIndex"].is_u64(),
            "{item}"
        );
    }
    let (status, page) = admin.get("routes?page=1&page_size=10").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 5);

    // Delete.
    let (status, deleted) = admin.delete("routes/1").await;
    assert_eq!(
        (status, deleted),
        (200, json!({"deleted": "1", "key": "/apisix/routes/1"}))
    );
    assert_eq!(through(&stack, "/index.html", "foo.com").await, 404);
    let (status, gone) = admin.get("routes/1").await;
    assert_eq!(status, 404, "{gone}");
    let (status, again) = admin.delete("routes/1").await;
    assert_eq!(status, 404, "{again}");
    let (status, missing) = admin.patch("routes/nope", json!({"uri": "/x"})).await;
    assert_eq!(status, 404, "{missing}");
}

#[tokio::test]
async fn consumers_crud_follows_apisix() {
    let stack = Stack::start("").await;
    let admin = stack.admin();

    let jack = json!({"username": "jack", "desc": "a consumer", "labels": {"team": "blue"}});
    let (status, created) = admin.put("consumers", jack.clone()).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["key"], "/apisix/consumers/jack");
    assert_eq!(created["value"]["username"], "jack");
    assert_eq!(created["value"]["labels"], json!({"team": "blue"}));
    let (status, replaced) = admin.put("consumers", jack.clone()).await;
    assert_eq!(status, 200, "{replaced}");

    // The username may also be in the path.
    let (status, rose) = admin
        .put("consumers/rose", json!({"desc": "by path"}))
        .await;
    assert_eq!(status, 201, "{rose}");
    assert_eq!(rose["value"]["username"], "rose");

    let (status, got) = admin.get("consumers/jack").await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["key"], "/apisix/consumers/jack");
    assert_eq!(got["value"]["desc"], "a consumer");

    let (status, patched) = admin
        .patch("consumers/jack", json!({"desc": "patched"}))
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["value"]["desc"], "patched");
    assert_eq!(patched["value"]["labels"], json!({"team": "blue"}));

    let (status, list) = admin.get("consumers").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], 2, "{list}");
    let mut names: Vec<&str> = list["list"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["value"]["username"].as_str().expect("username"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["jack", "rose"]);

    // A consumer without credentials has an empty credential list.
    let (status, creds) = admin.get("consumers/jack/credentials").await;
    assert_eq!((status, creds), (200, json!({"total": 0, "list": []})));

    let (status, deleted) = admin.delete("consumers/jack").await;
    assert_eq!(
        (status, deleted),
        (
            200,
            json!({"deleted": "1", "key": "/apisix/consumers/jack"})
        )
    );
    let (status, gone) = admin.get("consumers/jack").await;
    assert_eq!(status, 404, "{gone}");
    let (status, again) = admin.delete("consumers/jack").await;
    assert_eq!(status, 404, "{again}");
}

#[tokio::test]
async fn credential_errors_follow_apisix() {
    let stack = Stack::start("consumers: [{username: jack}]").await;
    let admin = stack.admin();

    // A credential for a consumer that does not exist.
    let body = json!({"plugins": {"jwt-auth": {"key": "k", "secret": "s3cr3t-s3cr3t-s3cr3t"}}});
    let answer = admin.put("consumers/nobody/credentials/c1", body).await;
    assert_bad_request(&answer, "consumer not found");
    let answer = admin.get("consumers/nobody/credentials").await;
    assert_bad_request(&answer, "consumer not found");

    // Exactly one auth plugin.
    let answer = admin
        .put("consumers/jack/credentials/c1", json!({"plugins": {}}))
        .await;
    assert_bad_request(&answer, "plugins");
    let answer = admin
        .put(
            "consumers/jack/credentials/c1",
            json!({"desc": "no plugins"}),
        )
        .await;
    assert_bad_request(&answer, "plugins");
    let answer = admin
        .put(
            "consumers/jack/credentials/c1",
            json!({"plugins": {"key-auth": {"key": "x"}}}),
        )
        .await;
    assert_bad_request(&answer, "key-auth");

    // Unknown ones are 404s.
    let (status, body) = admin.get("consumers/jack/credentials/c1").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = admin.delete("consumers/jack/credentials/c1").await;
    assert_eq!(status, 404, "{body}");
    let (status, list) = admin.get("consumers/jack/credentials").await;
    assert_eq!((status, list), (200, json!({"total": 0, "list": []})));
}

#[tokio::test]
async fn bad_input_is_a_400_naming_the_field() {
    let stack = Stack::start("").await;
    let admin = stack.admin();

    assert_bad_request(&admin.put("routes/r", json!({"plugins": {}})).await, "uri");
    assert_bad_request(
        &admin.put("routes/r", json!({"uri": "no-slash"})).await,
        "uri",
    );
    assert_bad_request(
        &admin
            .put("routes/r", json!({"uri": "/a", "uris": ["/b"]}))
            .await,
        "uris",
    );
    assert_bad_request(
        &admin
            .put("routes/r", json!({"uri": "/a", "methods": ["FETCH"]}))
            .await,
        "methods",
    );
    assert_bad_request(
        &admin
            .put("routes/r", json!({"uri": "/a", "status": 2}))
            .await,
        "status",
    );
    assert_bad_request(
        &admin
            .put("routes/r", json!({"uri": "/a", "priority": "high"}))
            .await,
        "priority",
    );
    assert_bad_request(
        &admin
            .put("routes/r", json!({"uri": "/a", "host": "a b"}))
            .await,
        "host",
    );
    assert_bad_request(
        &admin
            .put("routes/r", json!({"uri": "/a", "hots": ["x"]}))
            .await,
        "hots",
    );
    assert_bad_request(
        &admin
            .put(
                "routes/r",
                json!({"uri": "/a", "plugins": {"no-such-plugin": {}}}),
            )
            .await,
        "no-such-plugin",
    );
    assert_bad_request(
        &admin
            .put("routes/r", json!({"uri": "/a", "create_time": 1}))
            .await,
        "create_time",
    );
    assert_bad_request(
        &admin.put("routes/bad%20id", json!({"uri": "/a"})).await,
        "id",
    );
    assert_bad_request(
        &admin
            .put("routes/r", json!({"id": "other", "uri": "/a"}))
            .await,
        "id",
    );
    assert_bad_request(
        &admin.post("routes", json!({"id": "x", "uri": "/a"})).await,
        "id",
    );
    assert_bad_request(&admin.put("routes", json!({"uri": "/a"})).await, "id");

    assert_bad_request(
        &admin.put("consumers", json!({"desc": "no name"})).await,
        "username",
    );
    assert_bad_request(
        &admin.put("consumers", json!({"username": "ja ck"})).await,
        "username",
    );
    assert_bad_request(
        &admin
            .put("consumers", json!({"username": "jack", "nick": "j"}))
            .await,
        "nick",
    );
    assert_bad_request(
        &admin
            .put(
                "consumers",
                json!({"username": "jack", "plugins": {"no-such-plugin": {}}}),
            )
            .await,
        "no-such-plugin",
    );

    // Not JSON, or not an object.
    let (status, body) = admin
        .send(Method::PUT, "routes/r", Some("{\"uri\":".into()))
        .await;
    assert_eq!(status, 400, "{body}");
    error_msg(&body);
    let (status, body) = admin
        .send(Method::PUT, "routes/r", Some("[1,2]".into()))
        .await;
    assert_eq!(status, 400, "{body}");
    error_msg(&body);

    // Nothing of the above was stored.
    assert_eq!(admin.get("routes").await.1["total"], 0);
    assert_eq!(admin.get("consumers").await.1["total"], 0);
}

/// Concurrent writes are all acknowledged, all applied and all on disk: after a
/// SIGKILL restart every route is there and decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admin_writes_are_all_persisted() {
    const ROUTES: usize = 60;
    let mut stack = Stack::start("").await;
    let admin = stack.admin();
    let writes = (0..ROUTES).map(|i| {
        let admin = admin.clone();
        async move {
            admin
                .put(&format!("routes/c{i}"), json!({"uri": format!("/c/{i}")}))
                .await
        }
    });
    for (i, (status, body)) in futures::future::join_all(writes)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(status, 201, "route c{i}: {body}");
    }
    let deletes = (0..ROUTES).step_by(3).map(|i| {
        let admin = admin.clone();
        async move { admin.delete(&format!("routes/c{i}")).await }
    });
    for (status, body) in futures::future::join_all(deletes).await {
        assert_eq!(status, 200, "{body}");
    }
    let expected = |i: usize| if i.is_multiple_of(3) { 404 } else { 200 };
    for i in 0..ROUTES {
        assert_eq!(
            stack.get(&format!("/c/{i}")).await.status,
            expected(i),
            "/c/{i}"
        );
    }

    stack.portcullis.restart().await;
    let (status, list) = admin.get("routes").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], ROUTES - ROUTES.div_ceil(3), "{list}");
    for i in 0..ROUTES {
        let after = stack.get(&format!("/c/{i}")).await.status;
        assert_eq!(after, expected(i), "/c/{i} after the restart");
    }
}

/// The credential id may come in the body, as the README's walkthrough writes it
/// (`PUT /consumers/jack/credentials -d '{"id":...}'`), like route ids and usernames.
#[tokio::test]
async fn credential_id_may_come_in_the_body() {
    let stack = Stack::start("consumers: [{username: jack}]").await;
    let admin = stack.admin();
    let body = json!({"id": "c1", "plugins": {"no-such-auth": {}}});
    let (status, answer) = admin.put("consumers/jack/credentials", body).await;
    // Refused for the plugin, not for the method or a missing id.
    assert_bad_request(&(status, answer), "no-such-auth");
    let (status, answer) = admin
        .put("consumers/jack/credentials", json!({"plugins": {}}))
        .await;
    assert_bad_request(&(status, answer), "id");
    let body = json!({"id": "other", "plugins": {}});
    let (status, answer) = admin.put("consumers/jack/credentials/c1", body).await;
    assert_bad_request(&(status, answer), "id");
}

/// Match conditions portcullis cannot evaluate must not be silently dropped (that would
/// widen the route): they are refused, naming the field.
#[tokio::test]
async fn unsupported_match_fields_are_refused() {
    let stack = Stack::start("").await;
    let admin = stack.admin();
    let mut with_remote_addrs = docs_route();
    with_remote_addrs["remote_addrs"] = json!(["127.0.0.0/8"]);
    assert_bad_request(
        &admin.put("routes/1", with_remote_addrs).await,
        "remote_addrs",
    );
    let vars = json!({"uri": "/a", "vars": [["arg_name", "==", "json"]]});
    assert_bad_request(&admin.put("routes/2", vars).await, "vars");
}

#[tokio::test]
async fn unknown_admin_paths_are_404() {
    let stack = Stack::start("").await;
    let admin = stack.admin();
    for path in ["upstreams/1", "services", "routes/1/extra", "/apisix/admin"] {
        let (status, body) = admin.get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
}

async fn persisted_decisions(stack: &Stack) -> (u16, u16, u16, u16) {
    (
        stack.get("/a").await.status,
        through(stack, "/b/x", "b.example.com").await,
        through(stack, "/b/x", "other.example.com").await,
        stack.get("/from-file").await.status,
    )
}

/// Every acknowledged write is on disk before the answer: a crash (SIGKILL) right after
/// loses nothing, and the restarted process decides exactly as before.
#[tokio::test]
async fn admin_writes_survive_a_restart() {
    let mut stack = Stack::start("routes: [{id: from-file, uri: /from-file}]").await;
    let admin: Admin = stack.admin();

    let (status, body) = admin
        .put("routes/a", json!({"uri": "/a", "methods": ["GET"]}))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = admin.put("routes/b", json!({"uri": "/b/*"})).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = admin
        .patch("routes/b", json!({"host": "b.example.com"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = admin.delete("routes/from-file").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = admin
        .put("consumers", json!({"username": "jack", "desc": "d"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, routes_before) = admin.get("routes").await;
    let (_, jack_before) = admin.get("consumers/jack").await;

    assert_eq!(persisted_decisions(&stack).await, (200, 200, 404, 404));
    assert!(
        stack.portcullis.state_path().exists(),
        "no state file was written"
    );

    stack.portcullis.restart().await;

    assert_eq!(
        persisted_decisions(&stack).await,
        (200, 200, 404, 404),
        "after the restart"
    );
    let (status, routes_after) = admin.get("routes").await;
    assert_eq!(status, 200);
    assert_eq!(routes_after["total"], routes_before["total"]);
    let values = |list: &Value| {
        let mut v: Vec<Value> = list["list"]
            .as_array()
            .expect("list")
            .iter()
            .map(|i| i["value"].clone())
            .collect();
        v.sort_by_key(|i| i["id"].as_str().unwrap_or_default().to_owned());
        v
    };
    assert_eq!(values(&routes_after), values(&routes_before));
    let (status, jack_after) = admin.get("consumers/jack").await;
    assert_eq!(status, 200);
    assert_eq!(jack_after["value"], jack_before["value"]);
}

/// The APISIX jwt-auth docs' token for `jack-key` (HS256, only `nbf`), signed with
/// `jack-hs256-secret-that-is-very-long`.
const JACK_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJrZXkiOiJqYWNrLWtleSIsIm5iZiI6MTcyOTEzMjI3MX0.UEPXy5jpid624T1XpfjM0PLY73LZPjV3Qt8yZ92kVuU";

async fn with_token(stack: &Stack, path: &str) -> common::Reply {
    let request = stack
        .request(Method::GET, path)
        .header("Authorization", JACK_TOKEN)
        // A forged identity must be overwritten, never sent next to ours.
        .header("X-Consumer-Username", "mallory")
        .header("X-Credential-Identifier", "forged");
    stack.send(request).await
}

/// The jwt-auth walkthrough of the APISIX docs, step by step through the Admin API:
/// consumer, credential, route; then the credential's whole life cycle, each step
/// deciding the next request through Envoy.
#[tokio::test]
async fn credentials_crud_follows_apisix_and_decides_the_next_request() {
    let stack = Stack::start("").await;
    let admin = stack.admin();

    let (status, body) = admin.put("consumers", json!({"username": "jack"})).await;
    assert_eq!(status, 201, "{body}");
    let credential = json!({
        "plugins": { "jwt-auth": { "key": "jack-key", "secret": "jack-hs256-secret-that-is-very-long" } }
    });
    let (status, created) = admin
        .put(
            "consumers/jack/credentials/cred-jack-jwt-auth",
            credential.clone(),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        created["key"],
        "/apisix/consumers/jack/credentials/cred-jack-jwt-auth"
    );
    assert_eq!(created["value"]["id"], "cred-jack-jwt-auth");
    assert_eq!(created["value"]["plugins"]["jwt-auth"]["key"], "jack-key");
    let (status, route) = admin
        .put(
            "routes/jwt-route",
            json!({"uri": "/headers", "plugins": {"jwt-auth": {}}}),
        )
        .await;
    assert_eq!(status, 201, "{route}");

    // The token authenticates jack through that credential; the forged headers are gone.
    let reply = with_token(&stack, "/headers").await;
    let seen = reply.echoed();
    assert_eq!(
        seen.header_all("x-consumer-username"),
        ["jack"],
        "{:?}",
        seen.header_list
    );
    assert_eq!(
        seen.header_all("x-credential-identifier"),
        ["cred-jack-jwt-auth"]
    );
    assert_eq!(stack.get("/headers").await.status, 401, "no token");

    // Read, list, replace, patch.
    let (status, got) = admin
        .get("consumers/jack/credentials/cred-jack-jwt-auth")
        .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        got["key"],
        "/apisix/consumers/jack/credentials/cred-jack-jwt-auth"
    );
    let (status, list) = admin.get("consumers/jack/credentials").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], 1);
    assert_eq!(list["list"][0]["value"]["id"], "cred-jack-jwt-auth");
    let (status, replaced) = admin
        .put(
            "consumers/jack/credentials/cred-jack-jwt-auth",
            credential.clone(),
        )
        .await;
    assert_eq!(status, 200, "{replaced}");
    let (status, patched) = admin
        .patch(
            "consumers/jack/credentials/cred-jack-jwt-auth",
            json!({"desc": "jack's key"}),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["value"]["desc"], "jack's key");
    assert_eq!(patched["value"]["plugins"]["jwt-auth"]["key"], "jack-key");
    assert_eq!(with_token(&stack, "/headers").await.status, 200);

    // The same key for another consumer is refused.
    let (status, body) = admin.put("consumers", json!({"username": "rose"})).await;
    assert_eq!(status, 201, "{body}");
    let answer = admin
        .put("consumers/rose/credentials/rose-jwt", credential.clone())
        .await;
    assert_bad_request(&answer, "jack-key");

    // A new secret takes effect on the next request.
    let rotated = json!({"plugins": {"jwt-auth": {"key": "jack-key", "secret": "another-secret-that-is-long-enough"}}});
    let (status, body) = admin
        .put("consumers/jack/credentials/cred-jack-jwt-auth", rotated)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        with_token(&stack, "/headers").await.status,
        401,
        "old secret still accepted"
    );
    let (status, body) = admin
        .put(
            "consumers/jack/credentials/cred-jack-jwt-auth",
            credential.clone(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(with_token(&stack, "/headers").await.status, 200);

    // Delete: the token stops working at once.
    let (status, deleted) = admin
        .delete("consumers/jack/credentials/cred-jack-jwt-auth")
        .await;
    assert_eq!(
        (status, deleted),
        (
            200,
            json!({"deleted": "1", "key": "/apisix/consumers/jack/credentials/cred-jack-jwt-auth"})
        )
    );
    assert_eq!(
        with_token(&stack, "/headers").await.status,
        401,
        "deleted credential still works"
    );
    let (status, gone) = admin
        .get("consumers/jack/credentials/cred-jack-jwt-auth")
        .await;
    assert_eq!(status, 404, "{gone}");

    // Deleting a consumer takes its credentials with it.
    let (status, body) = admin
        .put("consumers/jack/credentials/again", credential)
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(with_token(&stack, "/headers").await.status, 200);
    let (status, body) = admin.delete("consumers/jack").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        with_token(&stack, "/headers").await.status,
        401,
        "credential of a deleted consumer"
    );
    let answer = admin.get("consumers/jack/credentials").await;
    assert_bad_request(&answer, "consumer not found");
}

/// Writers keep the Admin API busy when the process is killed (SIGKILL, between or in
/// the middle of journal appends): every write answered 2xx before the crash is there
/// after the restart, and a line the crash cut short does not stop the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_acknowledged_before_a_crash_survives_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let mut portcullis = common::Portcullis::start("").await;
    let admin = portcullis.admin();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (admin, stop, acked) = (admin.clone(), stop.clone(), acked.clone());
            let client = reqwest::Client::new();
            tokio::spawn(async move {
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let name = format!("w{w}_{i}");
                    let body = json!({"username": name, "desc": format!("writer {w}, write {i}")});
                    let answer = client
                        .put(admin.url(&format!("consumers/{name}")))
                        .header("X-API-KEY", ADMIN_KEY)
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await;
                    match answer {
                        Ok(r) if r.status().is_success() => acked.lock().unwrap().push(name),
                        // The crash: this write was never acknowledged.
                        _ => break,
                    }
                }
            })
        })
        .collect();
    while acked.lock().unwrap().len() < 300 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    portcullis.restart().await;
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300);
    for name in &acked {
        let (status, body) = admin.get(&format!("consumers/{name}")).await;
        assert_eq!(status, 200, "{name} was acknowledged, then lost: {body}");
        assert_eq!(body["value"]["username"], name.as_str());
    }
    // The restart folded the journal into the state file.
    let mut journal = portcullis.state_path().into_os_string();
    journal.push(".journal");
    assert_eq!(std::fs::metadata(journal).map(|m| m.len()).unwrap_or(0), 0);
}
