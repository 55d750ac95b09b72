//! Route matching as an APISIX user expects it, observed through real Envoy: which
//! requests reach the upstream, which get APISIX's 404, and what the upstream is told.
mod common;

use common::{ENVOY_ROUTE_ID, Reply, Stack};
use reqwest::Method;
use serde_json::json;

fn assert_passes(reply: &Reply, what: &str) {
    assert!(
        reply.status == 200 && reply.reached_upstream(),
        "{what}: expected the upstream's 200, got {} {:?}",
        reply.status,
        reply.body
    );
}

fn assert_route_not_found(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 404, "{what}: {:?}", reply.body);
    assert!(!reply.reached_upstream(), "{what}: reached the upstream");
    assert_eq!(
        reply.json(),
        json!({"message": "404 Route Not Found"}),
        "{what}"
    );
}

const ROUTES: &str = r#"
unmatched: deny
routes:
  - { id: exact, uri: /exact }
  - { id: prefix, uri: "/pre/*" }
  - { id: several, uris: [/one, "/two/*"] }
  - { id: host, uri: /by-host, host: api.example.com }
  - { id: wildcard, uri: /by-wildcard, hosts: ["*.wild.example.com", exact.example.org] }
  - { id: methods, uri: /by-method, methods: [GET, PUT] }
  - { id: disabled, uri: /disabled, status: 0 }
  - { id: enabled, uri: /enabled, status: 1 }
  - { id: numeric-fields, uri: /apisix-body, upstream: { type: roundrobin, nodes: { "127.0.0.1:1980": 1 } } }
"#;

async fn with_host(stack: &Stack, path: &str, host: &str) -> Reply {
    stack
        .send(stack.request(Method::GET, path).header("host", host))
        .await
}

#[tokio::test]
async fn uri_exact_prefix_and_uris_match_as_in_apisix() {
    let stack = Stack::start(ROUTES).await;

    assert_passes(&stack.get("/exact").await, "exact uri");
    assert_passes(&stack.get("/exact?x=1").await, "exact uri with a query");
    assert_route_not_found(&stack.get("/exact/more").await, "below an exact uri");
    assert_route_not_found(&stack.get("/exac").await, "shorter than an exact uri");
    assert_route_not_found(&stack.get("/EXACT").await, "uris are case-sensitive");

    assert_passes(&stack.get("/pre/").await, "prefix itself");
    assert_passes(&stack.get("/pre/a/b/c?d=e").await, "deep below a prefix");
    assert_route_not_found(&stack.get("/pre").await, "/pre/* does not match /pre");
    assert_route_not_found(&stack.get("/prefix").await, "/pre/* does not match /prefix");

    assert_passes(&stack.get("/one").await, "uris[0]");
    assert_passes(&stack.get("/two/x").await, "uris[1] prefix");
    assert_route_not_found(&stack.get("/one/x").await, "below exact uris[0]");

    // The upstream gets the request as the client sent it.
    let seen = stack.get("/pre/a?b=c&d=e").await.echoed();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/pre/a")
    );
    assert_eq!(seen.query.as_deref(), Some("b=c&d=e"));

    // APISIX fields that configure proxying are accepted and ignored.
    assert_passes(
        &stack.get("/apisix-body").await,
        "route with an upstream block",
    );
}

#[tokio::test]
async fn host_and_wildcard_hosts_match_case_insensitively_without_the_port() {
    let stack = Stack::start(ROUTES).await;

    assert_passes(
        &with_host(&stack, "/by-host", "api.example.com").await,
        "exact host",
    );
    assert_passes(
        &with_host(&stack, "/by-host", "API.Example.COM").await,
        "host case",
    );
    assert_passes(
        &with_host(&stack, "/by-host", "api.example.com:8443").await,
        "host with a port",
    );
    assert_route_not_found(
        &with_host(&stack, "/by-host", "example.com").await,
        "other host",
    );
    assert_route_not_found(
        &with_host(&stack, "/by-host", "xapi.example.com").await,
        "host with a prefix",
    );
    assert_route_not_found(&stack.get("/by-host").await, "no matching host (127.0.0.1)");

    let wild = "/by-wildcard";
    assert_passes(
        &with_host(&stack, wild, "a.wild.example.com").await,
        "wildcard",
    );
    assert_passes(
        &with_host(&stack, wild, "a.b.wild.example.com").await,
        "deeper wildcard",
    );
    assert_passes(
        &with_host(&stack, wild, "exact.example.org").await,
        "second of hosts",
    );
    assert_route_not_found(
        &with_host(&stack, wild, "wild.example.com").await,
        "*.wild.example.com does not match wild.example.com",
    );
    assert_route_not_found(
        &with_host(&stack, wild, "awild.example.com").await,
        "*.wild.example.com does not match awild.example.com",
    );
}

#[tokio::test]
async fn methods_limit_a_route() {
    let stack = Stack::start(ROUTES).await;
    for method in [Method::GET, Method::PUT] {
        let reply = stack
            .send(stack.request(method.clone(), "/by-method"))
            .await;
        assert_passes(&reply, &format!("{method} on a GET/PUT route"));
        assert_eq!(reply.echoed().method, method.as_str());
    }
    for method in [Method::POST, Method::DELETE, Method::PATCH] {
        let reply = stack
            .send(stack.request(method.clone(), "/by-method"))
            .await;
        assert_route_not_found(&reply, &format!("{method} on a GET/PUT route"));
    }
    // No `methods`: every method.
    let reply = stack.send(stack.request(Method::DELETE, "/exact")).await;
    assert_passes(&reply, "DELETE on a route without methods");
}

#[tokio::test]
async fn status_0_disables_a_route() {
    let stack = Stack::start(ROUTES).await;
    assert_route_not_found(&stack.get("/disabled").await, "status 0");
    assert_passes(&stack.get("/enabled").await, "status 1");

    // Switching it on through the Admin API takes effect on the next request.
    let (status, body) = stack
        .admin()
        .patch("routes/disabled", json!({"status": 1}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_passes(&stack.get("/disabled").await, "status patched to 1");
    let (status, body) = stack
        .admin()
        .patch("routes/disabled", json!({"status": 0}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_route_not_found(&stack.get("/disabled").await, "status patched back to 0");
}

#[tokio::test]
async fn a_route_without_plugins_allows_and_unmatched_deny_answers_404() {
    let stack = Stack::start(ROUTES).await;
    assert_passes(&stack.get("/exact").await, "route without plugins");
    let before = stack.upstream.hits();
    for path in ["/", "/nothing", "/pre", "/exact/"] {
        assert_route_not_found(&stack.get(path).await, path);
    }
    let post = stack
        .send(stack.request(Method::POST, "/nothing").body("x=1"))
        .await;
    assert_route_not_found(&post, "POST with a body to no route");
    assert_eq!(stack.upstream.hits(), before, "a 404 reached the upstream");
}

#[tokio::test]
async fn unmatched_allow_passes_requests_no_route_matches() {
    let stack = Stack::start("unmatched: allow\nroutes: [{id: r1, uri: /r1}]").await;
    assert_passes(&stack.get("/r1").await, "matched");
    assert_passes(&stack.get("/anything/else?q=1").await, "unmatched, allowed");
    let reply = stack
        .send(stack.request(Method::POST, "/form").body("a=1"))
        .await;
    assert_eq!(reply.echoed().body, "a=1", "the body reaches the upstream");
}

#[tokio::test]
async fn no_routes_at_all_denies_everything_by_default() {
    let stack = Stack::start("").await;
    assert_route_not_found(&stack.get("/").await, "empty config");
    assert_route_not_found(&stack.get("/headers").await, "empty config");
}

/// Envoy's per-route `context_extensions: { route_id: ... }` (envoy/envoy-route-id.yaml)
/// selects the portcullis route directly, whatever its uri says.
#[tokio::test]
async fn route_id_context_extension_selects_the_route() {
    let yaml = r#"
unmatched: deny
routes:
  - { id: api, uri: /matched-by-id-only }
  - { id: app, uri: "/*", status: 0 }
  - { id: other, uri: "/other/*" }
"#;
    let stack = Stack::start_with(ENVOY_ROUTE_ID, yaml).await;

    // /api/* carries route_id=api: allowed although route `api`'s uri does not match.
    assert_passes(&stack.get("/api/anything").await, "route_id=api");
    // /app/* carries route_id=app, which is disabled: denied, even though a uri match
    // would otherwise be attempted.
    assert_route_not_found(&stack.get("/app/x").await, "route_id of a disabled route");
    // Other paths have no route_id: ordinary matching.
    assert_passes(
        &stack.get("/other/x").await,
        "uri matching without route_id",
    );
    assert_passes(
        &stack.get("/matched-by-id-only").await,
        "route `api` by its uri",
    );

    // Deleting the route the extension names denies its Envoy route.
    let (status, body) = stack.admin().delete("routes/api").await;
    assert_eq!(status, 200, "{body}");
    assert_route_not_found(
        &stack.get("/api/anything").await,
        "route_id of a deleted route",
    );
}

/// A route_id naming no route is a misconfiguration: denied even with `unmatched: allow`.
#[tokio::test]
async fn route_id_naming_no_route_is_denied_even_when_unmatched_is_allow() {
    let yaml = "unmatched: allow\nroutes: [{ id: api, uri: /x }]";
    let stack = Stack::start_with(ENVOY_ROUTE_ID, yaml).await;
    assert_passes(&stack.get("/api/y").await, "route_id=api exists");
    assert_route_not_found(&stack.get("/app/y").await, "route_id=app does not exist");
    assert_passes(
        &stack.get("/elsewhere").await,
        "no route_id, unmatched allow",
    );
}

/// A client cannot hand the upstream an identity: the identity headers portcullis owns
/// are removed from every request it lets through, on matched routes and with
/// `unmatched: allow`, whatever their case, count or spelling.
#[tokio::test]
async fn clients_cannot_spoof_identity_headers() {
    let stack = Stack::start("unmatched: allow\nroutes: [{id: open, uri: /open}]").await;
    let forged = [
        ("X-Consumer-Username", "admin"),
        ("x-credential-identifier", "forged"),
        ("X-Consumer-Custom-Id", "0"),
        ("X-Userinfo", "eyJzdWIiOiJhZG1pbiJ9"),
        ("X-ID-Token", "eyJzdWIiOiJhZG1pbiJ9"),
        ("X-Refresh-Token", "r"),
        ("X-Raw-ID-Token", "t"),
        ("X-Access-Token", "forged"),
        ("X-Consumer_Username", "admin"),
        ("x_credential_identifier", "forged"),
    ];
    for path in ["/open", "/unmatched"] {
        let mut request = stack.request(Method::GET, path);
        for (name, value) in forged {
            request = request.header(name, value);
        }
        // The same header twice (Envoy joins them with ",").
        request = request.header("X-Consumer-Username", "root");
        let seen = stack.send(request).await.echoed();
        for (name, _) in forged {
            let lower = name.to_ascii_lowercase();
            assert!(
                seen.header_all(&lower).is_empty(),
                "{path}: client's {name} reached the upstream: {:?}",
                seen.header_list
            );
        }
        for (name, value) in &seen.header_list {
            let folded = name.replace('_', "-");
            assert!(
                !folded.starts_with("x-consumer-") && folded != "x-credential-identifier",
                "{path}: {name}: {value} reached the upstream"
            );
        }
    }
}

/// The same matching through Envoy's HTTP ext_authz mode (envoy/envoy-http-authz.yaml →
/// portcullis's `/auth` front): the original method, host, path and query reach the
/// decision, and a client cannot steer it with forged X-Forwarded-* / X-Original-*
/// headers (oauth2-proxy CVE-2026-40575).
#[tokio::test]
async fn envoy_http_mode_decides_the_same_and_ignores_forged_forwarding_headers() {
    let stack = Stack::start_with(common::ENVOY_HTTP, ROUTES).await;

    assert_passes(&stack.get("/exact").await, "exact");
    assert_passes(&stack.get("/pre/a/b?c=d").await, "prefix");
    assert_eq!(
        stack.get("/pre/a/b?c=d").await.echoed().query.as_deref(),
        Some("c=d")
    );
    assert_route_not_found(&stack.get("/nothing").await, "no route");
    assert_passes(
        &with_host(&stack, "/by-host", "api.example.com").await,
        "host",
    );
    assert_route_not_found(
        &with_host(&stack, "/by-host", "example.com").await,
        "other host",
    );
    let post = stack
        .send(stack.request(Method::POST, "/by-method").body("x"))
        .await;
    assert_route_not_found(&post, "POST on a GET/PUT route");
    let put = stack
        .send(stack.request(Method::PUT, "/by-method").body("x"))
        .await;
    assert_passes(&put, "PUT on a GET/PUT route");

    for (name, value) in [
        ("X-Forwarded-Uri", "/exact"),
        ("X-Original-URL", "http://api.example.com/exact"),
        ("X-Original-URI", "/exact"),
        ("X-Forwarded-Host", "api.example.com"),
    ] {
        let forged = stack
            .send(stack.request(Method::GET, "/nothing").header(name, value))
            .await;
        assert_route_not_found(&forged, &format!("/nothing with {name}: {value}"));
        let forged = stack
            .send(stack.request(Method::GET, "/by-host").header(name, value))
            .await;
        assert_route_not_found(&forged, &format!("/by-host with {name}: {value}"));
    }
    let forged_method = stack
        .send(
            stack
                .request(Method::POST, "/by-method")
                .header("X-Forwarded-Method", "GET"),
        )
        .await;
    assert_route_not_found(&forged_method, "POST with X-Forwarded-Method: GET");
}

#[tokio::test]
async fn envoy_http_mode_clients_cannot_spoof_identity_headers() {
    let stack = Stack::start_with(
        common::ENVOY_HTTP,
        "unmatched: allow\nroutes: [{id: open, uri: /open}]",
    )
    .await;
    for path in ["/open", "/unmatched"] {
        let seen = stack
            .send(
                stack
                    .request(Method::GET, path)
                    .header("X-Consumer-Username", "admin")
                    .header("X-Credential-Identifier", "forged")
                    .header("X-Userinfo", "eyJzdWIiOiJhZG1pbiJ9")
                    .header("X-Access-Token", "forged"),
            )
            .await
            .echoed();
        for name in [
            "x-consumer-username",
            "x-credential-identifier",
            "x-userinfo",
            "x-access-token",
        ] {
            assert!(
                seen.header_all(name).is_empty(),
                "{path}: client's {name} reached the upstream: {:?}",
                seen.header_list
            );
        }
    }
}

/// The shipped Envoy config normalises the path before the Check, so portcullis decides
/// on the path the upstream receives: dot segments and doubled slashes cannot smuggle a
/// request past a route, and encoded slashes are redirected to their decoded form.
#[tokio::test]
async fn paths_are_normalised_before_the_decision() {
    let stack = Stack::start(ROUTES).await;
    let port = stack.envoy.ports.listener;

    for (target, upstream_path) in [
        ("/pre/../exact", "/exact"),
        ("/nothing/../pre/x", "/pre/x"),
        ("//exact", "/exact"),
        ("/pre//a", "/pre/a"),
        ("/pre/./a", "/pre/a"),
    ] {
        let answer = common::raw_get(port, target).await;
        assert_eq!(common::raw_status(&answer), 200, "{target}: {answer}");
        assert!(
            answer.contains(&format!("\"path\":\"{upstream_path}\"")),
            "{target}: the upstream did not get {upstream_path}: {answer}"
        );
    }
    for target in [
        "/pre/../nothing",
        "/exact/../../secret",
        "/pre/%2e%2e/secret",
    ] {
        let answer = common::raw_get(port, target).await;
        assert_eq!(common::raw_status(&answer), 404, "{target}: {answer}");
        assert!(answer.contains("404 Route Not Found"), "{target}: {answer}");
    }
    // `%2F` is unescaped and redirected, never decided (or proxied) in its encoded form.
    let before = stack.upstream.hits();
    let answer = common::raw_get(port, "/pre%2F..%2Fsecret").await;
    assert!(
        matches!(common::raw_status(&answer), 301 | 307 | 308),
        "{answer}"
    );
    assert_eq!(
        stack.upstream.hits(),
        before,
        "an encoded-slash path reached the upstream"
    );
}

/// Which of several matching routes decides, made visible by putting jwt-auth (401
/// without a token) on one and nothing on the other: exact before prefix, the longest
/// prefix first, and higher `priority` first among routes on the same uri.
#[tokio::test]
async fn exact_longest_prefix_and_priority_pick_the_route() {
    let yaml = r#"
routes:
  - { id: exact-guarded, uri: /p/x, plugins: { jwt-auth: {} } }
  - { id: prefix-open, uri: "/p/*" }
  - { id: longer-guarded, uri: "/p/q/*", plugins: { jwt-auth: {} } }
  - { id: low-open, uri: /prio, priority: 0 }
  - { id: high-guarded, uri: /prio, priority: 10, plugins: { jwt-auth: {} } }
  - { id: host-open, uri: /h, host: a.example.com, priority: 0 }
  - { id: any-host-guarded, uri: /h, priority: 5, plugins: { jwt-auth: {} } }
"#;
    let stack = Stack::start(yaml).await;
    assert_eq!(stack.get("/p/x").await.status, 401, "exact beats prefix");
    assert_passes(&stack.get("/p/y").await, "prefix");
    assert_eq!(
        stack.get("/p/q/z").await.status,
        401,
        "longest prefix first"
    );
    assert_eq!(stack.get("/prio").await.status, 401, "priority 10 before 0");
    assert_eq!(
        with_host(&stack, "/h", "a.example.com").await.status,
        401,
        "priority before host"
    );

    // Swapping the priorities swaps the decision on the next request.
    let admin = stack.admin();
    let (status, body) = admin
        .patch("routes/low-open", json!({"priority": 20}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_passes(&stack.get("/prio").await, "priority 20 before 10");
    // Equal priorities: the route whose other conditions fail is skipped.
    let (status, body) = admin
        .patch("routes/any-host-guarded", json!({"host": "b.example.com"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_passes(
        &with_host(&stack, "/h", "a.example.com").await,
        "host filters before priority",
    );
}

/// HTTP allows bytes 0x80–0xFF in a header value (obs-text). Envoy replaces them
/// before they reach a CheckRequest (protobuf strings are UTF-8), so such a request is
/// decided like any other — it neither fails the Check (Envoy's 503) nor skips it.
/// (A gRPC client that sends non-UTF-8 text itself gets a 400: src/request.rs.)
#[tokio::test]
async fn a_header_value_that_is_not_utf8_is_still_decided() {
    let stack = Stack::start(ROUTES).await;
    let value = reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap();
    let reply = stack
        .send(
            stack
                .request(Method::GET, "/exact")
                .header("x-latin1", value.clone()),
        )
        .await;
    assert_passes(&reply, "route without plugins, obs-text header");
    let reply = stack
        .send(
            stack
                .request(Method::GET, "/nothing")
                .header("x-latin1", value),
        )
        .await;
    assert_route_not_found(&reply, "no route, obs-text header");
}
