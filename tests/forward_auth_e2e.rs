//! forward-auth through real Envoy against real HTTP auth services written here:
//! the APISIX docs' example, POST bodies, dead and slow services, an
//! authentik-outpost-like and an Authgear-resolver-like service, and the decision
//! cache.
mod common;

use std::time::{Duration, Instant};

use common::{Answer, Stack, TestServer};
use reqwest::Method;

/// The APISIX forward-auth docs' auth service: `Authorization: 123` passes,
/// `321` passes as user `i-am-user`, anything else is sent to a login page.
fn docs_auth_service() -> TestServer {
    TestServer::start(|req| match req.header("authorization") {
        Some("123") => Answer::new(200),
        Some("321") => Answer::new(200).header("X-User-ID", "i-am-user"),
        _ => Answer::new(403)
            .header("Location", "http://example.com/auth")
            .header("X-Internal-Secret", "do-not-leak")
            .body("Forbidden"),
    })
}

fn route(id: &str, uri: &str, plugin: &str) -> String {
    format!("  - {{ id: {id}, uri: \"{uri}\", plugins: {{ forward-auth: {plugin} }} }}\n")
}

#[tokio::test]
async fn the_apisix_docs_example() {
    let auth = docs_auth_service();
    let config = format!(
        "routes:\n{}",
        route(
            "fa",
            "/headers*",
            &format!(
                "{{ uri: \"{}\", request_headers: [Authorization], upstream_headers: [X-User-ID], client_headers: [Location] }}",
                auth.url("/auth")
            )
        )
    );
    let stack = Stack::start(&config).await;

    // 123: allowed; a client's own X-User-ID never reaches the upstream.
    let r = stack
        .send(
            stack
                .request(Method::GET, "/headers?a=1")
                .header("Authorization", "123")
                .header("X-User-ID", "admin"),
        )
        .await;
    assert_eq!(r.echoed().header("x-user-id"), None);

    // 321: the auth service's X-User-ID replaces the client's.
    let r = stack
        .send(
            stack
                .request(Method::GET, "/headers")
                .header("Authorization", "321")
                .header("X-User-ID", "admin"),
        )
        .await;
    assert_eq!(r.echoed().header("x-user-id"), Some("i-am-user"));

    // Anything else: the auth service's status, body and only the listed headers.
    let hits = stack.upstream.hits();
    let r = stack
        .send(
            stack
                .request(Method::GET, "/headers")
                .header("Authorization", "nope"),
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body, "Forbidden");
    assert_eq!(r.header("location"), Some("http://example.com/auth"));
    assert_eq!(
        r.header("x-internal-secret"),
        None,
        "only client_headers reach the client"
    );
    assert_eq!(stack.upstream.hits(), hits);

    // The auth service was told what Envoy saw, not what the client claimed.
    let r = stack
        .send(
            stack
                .request(Method::GET, "/headers/x?y=1")
                .header("Authorization", "123")
                .header("X-Forwarded-Uri", "/admin")
                .header("X-Forwarded-Method", "DELETE"),
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = auth.last_request().unwrap();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.header("x-forwarded-uri"), Some("/headers/x?y=1"));
    assert_eq!(seen.header("x-forwarded-method"), Some("GET"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert!(
        seen.header("x-forwarded-host")
            .is_some_and(|h| h.starts_with("127.0.0.1"))
    );
}

#[tokio::test]
async fn post_sends_the_body_and_refuses_an_oversize_one() {
    let auth = TestServer::start(|req| {
        if req.body == "let me in" {
            Answer::new(200)
        } else {
            Answer::new(401)
        }
    });
    let config = format!(
        "routes:\n{}",
        route(
            "post",
            "/post",
            &format!(
                "{{ uri: \"{}\", request_method: POST, max_req_body_size: 1000 }}",
                auth.url("/auth")
            )
        )
    );
    let stack = Stack::start(&config).await;
    let r = stack
        .send(stack.request(Method::POST, "/post").body("let me in"))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(auth.last_request().unwrap().body, "let me in");
    assert_eq!(auth.last_request().unwrap().method, "POST");
    let r = stack
        .send(stack.request(Method::POST, "/post").body("nope"))
        .await;
    assert_eq!(r.status, 401);

    let hits = auth.hits();
    let r = stack
        .send(stack.request(Method::POST, "/post").body("x".repeat(2000)))
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(
        auth.hits(),
        hits,
        "an oversize body never reaches the auth service"
    );
}

#[tokio::test]
async fn a_dead_or_slow_auth_service_fails_as_configured() {
    let dead = format!("http://127.0.0.1:{}/auth", common::free_port());
    let slow = TestServer::start(|_| Answer::new(200).delay(Duration::from_secs(3)));
    let config = format!(
        "routes:\n{}{}{}{}",
        route("dead", "/dead", &format!("{{ uri: \"{dead}\" }}")),
        route(
            "dead503",
            "/dead503",
            &format!("{{ uri: \"{dead}\", status_on_error: 503 }}")
        ),
        route(
            "degrade",
            "/degrade",
            &format!("{{ uri: \"{dead}\", allow_degradation: true }}")
        ),
        route(
            "slow",
            "/slow",
            &format!("{{ uri: \"{}\", timeout: 300 }}", slow.url("/auth"))
        ),
    );
    let stack = Stack::start(&config).await;
    assert_eq!(stack.get("/dead").await.status, 403);
    assert_eq!(stack.get("/dead503").await.status, 503);
    assert!(stack.get("/degrade").await.reached_upstream());

    let started = Instant::now();
    let r = stack.get("/slow").await;
    let took = started.elapsed();
    assert_eq!(r.status, 403);
    assert!(
        took < Duration::from_millis(1000),
        "timeout 300 ms took {took:?}"
    );
    assert!(
        took >= Duration::from_millis(290),
        "gave up before the timeout: {took:?}"
    );
}

/// An authentik outpost: no session → 302 to the login flow with a cookie; a valid
/// session → 200 with the user's identity headers.
fn authentik_outpost() -> TestServer {
    TestServer::start(|req| {
        let cookie = req.header("cookie").unwrap_or_default();
        if cookie.contains("authentik_proxy_session=valid") {
            Answer::new(200)
                .header("X-authentik-username", "akadmin")
                .header("X-authentik-groups", "admins|users")
                .header("X-authentik-email", "admin@example.com")
                .header(
                    "Set-Cookie",
                    "authentik_proxy_session=valid; Path=/; HttpOnly",
                )
        } else {
            let rd = req.header("x-forwarded-uri").unwrap_or("/");
            Answer::new(302)
                .header(
                    "Location",
                    &format!("https://auth.example.com/outpost.goauthentik.io/start?rd={rd}"),
                )
                .header("Set-Cookie", "authentik_proxy_state=xyz; Path=/; HttpOnly")
                .header("Set-Cookie", "authentik_csrf=abc; Path=/; Secure")
        }
    })
}

#[tokio::test]
async fn an_authentik_outpost() {
    let outpost = authentik_outpost();
    let plugin = format!(
        "{{ uri: \"{}\", request_headers: [Cookie], \
         upstream_headers: [X-authentik-username, X-authentik-groups, X-authentik-email], \
         client_headers: [Location, Set-Cookie], \
         portcullis: {{ client_headers_on_success: [Set-Cookie] }} }}",
        outpost.url("/outpost.goauthentik.io/auth/nginx")
    );
    let stack = Stack::start(&format!("routes:\n{}", route("app", "/app/*", &plugin))).await;

    let r = stack.get("/app/page").await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some("https://auth.example.com/outpost.goauthentik.io/start?rd=/app/page")
    );
    let cookies: Vec<_> = r
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        cookies,
        vec![
            "authentik_proxy_state=xyz; Path=/; HttpOnly",
            "authentik_csrf=abc; Path=/; Secure"
        ],
        "every Set-Cookie of the redirect reaches the browser"
    );

    let r = stack
        .send(
            stack
                .request(Method::GET, "/app/page")
                .header("Cookie", "authentik_proxy_session=valid")
                .header("X-authentik-username", "forged"),
        )
        .await;
    assert_eq!(
        r.header("set-cookie"),
        Some("authentik_proxy_session=valid; Path=/; HttpOnly")
    );
    let echoed = r.echoed();
    assert_eq!(echoed.header("x-authentik-username"), Some("akadmin"));
    assert_eq!(echoed.header("x-authentik-groups"), Some("admins|users"));
    assert_eq!(
        echoed.header("x-authentik-email"),
        Some("admin@example.com")
    );
}

#[tokio::test]
async fn an_authgear_resolver() {
    // Authgear's resolver answers 200 for everyone and reports the session state.
    let resolver = TestServer::start(|req| {
        if req
            .header("cookie")
            .unwrap_or_default()
            .contains("session=good")
        {
            Answer::new(200)
                .header("x-authgear-session-valid", "true")
                .header("x-authgear-user-id", "user-42")
        } else {
            Answer::new(200).header("x-authgear-session-valid", "false")
        }
    });
    let plugin = format!(
        "{{ uri: \"{}\", request_headers: [Cookie, Authorization], \
         upstream_headers: [x-authgear-session-valid, x-authgear-user-id], \
         portcullis: {{ deny_when: [ {{ header: x-authgear-session-valid, equals: \"false\", status: 401 }} ] }} }}",
        resolver.url("/_resolver/resolve")
    );
    let stack = Stack::start(&format!("routes:\n{}", route("api", "/api/*", &plugin))).await;
    let r = stack
        .send(
            stack
                .request(Method::GET, "/api/me")
                .header("x-authgear-user-id", "forged"),
        )
        .await;
    assert_eq!(r.status, 401);
    assert!(!r.reached_upstream());
    let r = stack
        .send(
            stack
                .request(Method::GET, "/api/me")
                .header("Cookie", "session=good"),
        )
        .await;
    let echoed = r.echoed();
    assert_eq!(echoed.header("x-authgear-user-id"), Some("user-42"));
    assert_eq!(echoed.header("x-authgear-session-valid"), Some("true"));
}

#[tokio::test]
async fn the_decision_cache_saves_calls_and_never_caches_denials() {
    let auth = TestServer::start(|req| {
        if req.header("cookie").unwrap_or_default().starts_with("s=") {
            Answer::new(200).header("X-User", req.header("cookie").unwrap())
        } else {
            Answer::new(401)
        }
    });
    let plugin = format!(
        "{{ uri: \"{}\", request_headers: [Cookie], upstream_headers: [X-User], \
         portcullis: {{ cache: {{ key_headers: [Cookie, Authorization], ttl: 60, max_entries: 100 }} }} }}",
        auth.url("/auth")
    );
    let stack = Stack::start(&format!("routes:\n{}", route("c", "/c", &plugin))).await;
    for _ in 0..5 {
        let r = stack
            .send(stack.request(Method::GET, "/c").header("Cookie", "s=1"))
            .await;
        assert_eq!(
            r.echoed().header("x-user"),
            Some("s=1"),
            "the cached answer still sets the header"
        );
    }
    assert_eq!(
        auth.hits(),
        1,
        "identical requests within the TTL: one auth call"
    );
    let r = stack
        .send(stack.request(Method::GET, "/c").header("Cookie", "s=2"))
        .await;
    assert_eq!(r.echoed().header("x-user"), Some("s=2"));
    assert_eq!(auth.hits(), 2, "another session: another call");
    for _ in 0..3 {
        assert_eq!(stack.get("/c").await.status, 401);
    }
    assert_eq!(auth.hits(), 5, "denials are never cached");
}
