//! openid-connect as a relying party, end to end: a browser (a cookie-keeping HTTP client
//! that follows no redirect by itself) → real Envoy (`envoy/envoy.yaml`) → portcullis over
//! ext_authz → the echo upstream, with panva's certified `oidc-provider` as the OP. Every
//! redirect, cookie and token below is real; the tests tamper with them where an attacker
//! would.
mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::oidc_provider::{ClientSettings, OidcProvider, ProviderSettings, browser};
use common::{
    ENVOY_GRPC, EchoUpstream, Envoy, EnvoyPorts, Portcullis, Reply, Stack, free_port, http_client,
};
use reqwest::cookie::CookieStore;
use serde_json::{Value, json};

const CLIENT_ID: &str = "portcullis-app";
const CLIENT_SECRET: &str = "portcullis-app-secret";
const SESSION_SECRET: &str = "a-session-secret-for-tests";

/// Each rig runs Envoy, portcullis, an OP and an upstream; on a small CI machine a dozen
/// of them at once starve each other's timers. At most this many run together.
static RIGS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(3);

/// Envoy, portcullis and the echo upstream in front of a real OP that knows our client.
struct Rig {
    _slot: tokio::sync::SemaphorePermit<'static>,
    stack: Stack,
    op: OidcProvider,
    /// `http://127.0.0.1:<envoy>`: what the browser sees as the application.
    app: String,
    /// The portcullis config, for starting a second replica.
    yaml: String,
}

impl Rig {
    /// Starts everything; `plugin` is merged over a working openid-connect configuration
    /// (client, discovery, session secret, redirect_uri `/callback`).
    async fn start(op: ProviderSettings, plugin: Value) -> Rig {
        let slot = RIGS.acquire().await.expect("the semaphore is never closed");
        let listener = free_port();
        let app = format!("http://127.0.0.1:{listener}");
        let client = ClientSettings::confidential(CLIENT_ID, CLIENT_SECRET)
            .redirect_uri(&format!("{app}/callback"))
            .redirect_uri(&format!("{app}/app/.apisix/redirect"))
            .post_logout_redirect_uri(&format!("{app}/logged-out"));
        let op = start_op(&op.client(client));
        let mut conf = json!({
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "discovery": op.discovery_url(),
            "scope": "openid profile email offline_access",
            "redirect_uri": format!("{app}/callback"),
            "post_logout_redirect_uri": format!("{app}/logged-out"),
            "session": { "secret": SESSION_SECRET },
            "use_nonce": true,
            // offline_access (a refresh token) needs consent at oidc-provider.
            "authorization_params": { "prompt": "consent" },
        });
        merge(&mut conf, plugin);
        let yaml = format!(
            "routes:\n  - {{ id: app, uri: \"/*\", plugins: {{ openid-connect: {conf} }} }}\n"
        );
        let upstream = EchoUpstream::start();
        let portcullis = Portcullis::start(&yaml).await;
        let ports = EnvoyPorts {
            listener,
            admin: free_port(),
            upstream: upstream.port,
            grpc: portcullis.ports.grpc,
            http: portcullis.ports.http,
        };
        let envoy = Envoy::start(ENVOY_GRPC, ports).await;
        assert_eq!(
            envoy.ports.listener, listener,
            "Envoy had to move its listener; the OP knows the old redirect_uri"
        );
        Rig {
            _slot: slot,
            stack: Stack {
                envoy,
                portcullis,
                upstream,
                client: http_client(),
            },
            op,
            app,
            yaml,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.app)
    }

    async fn get(&self, browser: &reqwest::Client, path_or_url: &str) -> Reply {
        let url = if path_or_url.starts_with("http") {
            path_or_url.to_owned()
        } else {
            self.url(path_or_url)
        };
        let response = browser
            .get(url)
            .send()
            .await
            .expect("request through Envoy");
        Reply::read(response).await
    }

    /// From a request for `path` without a session to the OP's callback URL (code and
    /// state), logging in as `user`. Returns the callback URL and the first redirect.
    async fn to_callback(&self, browser: &reqwest::Client, path: &str, user: &str) -> String {
        let r = self.get(browser, path).await;
        assert_eq!(r.status, 302, "{r:?}\n{}", self.logs());
        let authorize = r.header("location").expect("Location").to_owned();
        assert!(authorize.starts_with(&self.op.url("/auth")), "{authorize}");
        self.op.log_in(browser, &authorize, user).await
    }

    /// A whole login ending on the upstream at `path`.
    async fn log_in(&self, browser: &reqwest::Client, path: &str, user: &str) -> Reply {
        let callback = self.to_callback(browser, path, user).await;
        assert!(callback.starts_with(&self.url("/callback?")), "{callback}");
        let r = self.get(browser, &callback).await;
        assert_eq!(r.status, 302, "{r:?}\n{}", self.logs());
        assert_eq!(r.header("location"), Some(path), "back where the user was");
        let r = self.get(browser, path).await;
        assert_eq!(r.status, 200, "{r:?}\n{}", self.logs());
        r
    }

    fn logs(&self) -> String {
        format!(
            "portcullis:\n{}\nOP:\n{}",
            self.stack.portcullis.output(),
            self.op.stderr()
        )
    }
}

/// The OP, started again if it does not come up: under heavy load (several suites on a
/// two-core machine) a start now and then misses the helper's deadline, and one retry is
/// cheaper than a red run. A third failure is a real one.
fn start_op(settings: &ProviderSettings) -> OidcProvider {
    for attempt in 1..=3 {
        let started = std::time::Instant::now();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            OidcProvider::start(settings)
        })) {
            Ok(op) => return op,
            Err(_) if attempt < 3 => eprintln!(
                "the test OP did not start (attempt {attempt}, after {:?}); retrying",
                started.elapsed()
            ),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    unreachable!("the last attempt returns or panics")
}

fn merge(base: &mut Value, over: Value) {
    if let (Value::Object(b), Value::Object(o)) = (base, over) {
        for (k, v) in o {
            if v.is_null() {
                b.remove(&k);
            } else {
                b.insert(k, v);
            }
        }
    }
}

fn decode_header(value: &str) -> Value {
    serde_json::from_slice(&STANDARD.decode(value).expect("base64 header")).expect("JSON")
}

/// `name=value` of every Set-Cookie of a reply.
fn set_cookies(r: &Reply) -> Vec<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ASCII cookie").to_owned())
        .collect()
}

#[tokio::test]
async fn login_reaches_the_upstream_with_identity_headers_then_logout_ends_it() {
    let rig = Rig::start(
        ProviderSettings::default(),
        json!({ "set_refresh_token_header": true, "use_pkce": true }),
    )
    .await;
    let browser = browser();

    // No session: to the OP with state, nonce, PKCE S256, scope and our parameters.
    let r = rig.get(&browser, "/app/page?x=1").await;
    assert_eq!(r.status, 302);
    assert!(!r.reached_upstream());
    let authorize = url::Url::parse(r.header("location").unwrap()).unwrap();
    let q: std::collections::HashMap<_, _> = authorize.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], rig.url("/callback"));
    assert_eq!(q["scope"], "openid profile email offline_access");
    assert_eq!(q["prompt"], "consent");
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(q["state"].len() >= 22 && q["nonce"].len() >= 22);
    assert!(q["code_challenge"].len() >= 43);
    assert!(
        set_cookies(&r).iter().any(|c| c.contains("HttpOnly")),
        "the login is remembered in a cookie: {r:?}"
    );

    let callback = rig.op.log_in(&browser, authorize.as_str(), "alice").await;
    let r = rig.get(&browser, &callback).await;
    assert_eq!(r.status, 302, "{r:?}\n{}", rig.logs());
    assert_eq!(r.header("location"), Some("/app/page?x=1"));
    let cookies = set_cookies(&r);
    assert!(
        cookies.len() >= 2,
        "session and login-cookie removal both reach the browser through Envoy: {cookies:?}"
    );

    // The upstream sees who logged in, never the session cookie, never a client's forgery.
    let r = rig
        .stack
        .send(
            browser
                .get(rig.url("/app/page?x=1"))
                .header("X-Userinfo", "forged")
                .header("X-ID-Token", "forged")
                .header("X-Refresh-Token", "forged"),
        )
        .await;
    let seen = r.echoed();
    let id = decode_header(seen.header("x-id-token").expect("X-ID-Token"));
    assert_eq!(id["sub"], "alice");
    assert_eq!(id["aud"], CLIENT_ID);
    assert_eq!(id["iss"], rig.op.issuer);
    let user = decode_header(seen.header("x-userinfo").expect("X-Userinfo"));
    assert_eq!(user["sub"], "alice");
    assert_eq!(user["email"], "alice@example.test");
    assert!(seen.header("x-access-token").is_some_and(|t| t.len() > 20));
    assert!(
        seen.header("x-refresh-token")
            .is_some_and(|t| t != "forged" && t.len() > 20)
    );
    let cookie = seen.header("cookie").unwrap_or_default();
    assert!(
        !cookie.split(';').any(|c| c.trim().starts_with("session")),
        "the session cookie is ours: {cookie}"
    );

    // Logout: every session cookie cleared, off to the OP's end_session_endpoint.
    let r = rig.get(&browser, "/logout").await;
    assert_eq!(r.status, 302, "{r:?}");
    let end_session = url::Url::parse(r.header("location").unwrap()).unwrap();
    assert!(
        end_session
            .as_str()
            .starts_with(&rig.op.url("/session/end"))
    );
    let q: std::collections::HashMap<_, _> = end_session.query_pairs().into_owned().collect();
    assert!(
        q.get("id_token_hint")
            .is_some_and(|h| h.split('.').count() == 3),
        "{end_session}"
    );
    assert_eq!(q["post_logout_redirect_uri"], rig.url("/logged-out"));
    assert!(
        set_cookies(&r)
            .iter()
            .any(|c| c.starts_with("session=;") && c.contains("Max-Age=0")),
        "{r:?}"
    );
    let after = rig.op.log_out(&browser, end_session.as_str()).await;
    assert_eq!(after, rig.url("/logged-out"));

    // The next request starts a new login.
    let r = rig.get(&browser, "/app/page").await;
    assert_eq!(r.status, 302);
    assert!(
        r.header("location")
            .unwrap()
            .starts_with(&rig.op.url("/auth"))
    );
}

/// A browser whose cookie jar the test can read and fill.
struct Jarred {
    client: reqwest::Client,
    jar: std::sync::Arc<reqwest::cookie::Jar>,
}

impl Jarred {
    fn new() -> Self {
        let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
        let client = reqwest::Client::builder()
            .cookie_provider(jar.clone())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .expect("reqwest client");
        Jarred { client, jar }
    }

    /// The value of cookie `name` the browser would send to `url`.
    fn cookie(&self, url: &str, name: &str) -> Option<String> {
        let header = self.jar.cookies(&url.parse().unwrap())?;
        header
            .to_str()
            .unwrap()
            .split("; ")
            .find_map(|c| c.strip_prefix(&format!("{name}=")).map(str::to_owned))
    }

    fn add(&self, url: &str, set_cookie: &str) {
        self.jar.add_cookie_str(set_cookie, &url.parse().unwrap());
    }
}

fn confidential_client() -> ClientSettings {
    ClientSettings::confidential(CLIENT_ID, CLIENT_SECRET)
}

#[tokio::test]
async fn an_expired_access_token_is_refreshed_and_a_failed_refresh_logs_in_again() {
    // Access tokens live 60 s; with a 56 s leeway portcullis renews them after 4 s.
    let rig = Rig::start(
        ProviderSettings::default().ttl("AccessToken", 60),
        json!({ "access_token_expires_leeway": 56, "set_refresh_token_header": true }),
    )
    .await;
    let b = Jarred::new();
    let first = rig.log_in(&b.client, "/app", "bob").await.echoed();
    let token1 = first.header("x-access-token").unwrap().to_owned();
    let refresh1 = first.header("x-refresh-token").unwrap().to_owned();

    tokio::time::sleep(Duration::from_millis(4100)).await;
    let r = rig.get(&b.client, "/app").await;
    let renewed = set_cookies(&r);
    let seen = r.echoed();
    let token2 = seen.header("x-access-token").unwrap().to_owned();
    assert_ne!(token1, token2, "a new access token from the token endpoint");
    assert!(
        renewed.iter().any(|c| c.starts_with("session=")),
        "the renewed session reaches the browser on the allowed answer: {renewed:?}"
    );
    assert_eq!(
        decode_header(seen.header("x-id-token").unwrap())["sub"],
        "bob"
    );
    // The new session is the one the browser now holds.
    let r = rig.get(&b.client, "/app").await;
    assert_eq!(r.echoed().header("x-access-token"), Some(token2.as_str()));

    // The OP forgets the grant: the next renewal fails and the user logs in again.
    let refresh2 = r.echoed().header("x-refresh-token").unwrap().to_owned();
    for token in [&refresh1, &refresh2] {
        let revoked = reqwest::Client::new()
            .post(rig.op.url("/token/revocation"))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[("token", token.as_str())])
            .send()
            .await
            .unwrap();
        assert!(revoked.status().is_success());
    }
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let r = rig.get(&b.client, "/app").await;
    assert_eq!(r.status, 302, "{r:?}");
    assert!(
        r.header("location")
            .unwrap()
            .starts_with(&rig.op.url("/auth"))
    );
}

#[tokio::test]
async fn a_forged_or_replayed_callback_never_logs_anyone_in() {
    let rig = Rig::start(ProviderSettings::default(), json!({})).await;

    // The attacker's own code and state, from their own login at the OP.
    let attacker = browser();
    let attacker_callback = rig.to_callback(&attacker, "/app", "mallory").await;
    let attacker_url = url::Url::parse(&attacker_callback).unwrap();
    let code = attacker_url
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();

    // A victim with no login in progress: 401.
    let victim = browser();
    let r = rig.get(&victim, &attacker_callback).await;
    assert_eq!(r.status, 401, "{r:?}");

    // A victim mid-login: the state does not match theirs, so the login restarts (a new
    // state each time) and after three restarts it is refused.
    let r = rig.get(&victim, "/app").await;
    assert_eq!(r.status, 302);
    for _ in 0..3 {
        let r = rig.get(&victim, &attacker_callback).await;
        assert_eq!(r.status, 302, "{r:?}");
        assert!(
            r.header("location")
                .unwrap()
                .starts_with(&rig.op.url("/auth"))
        );
    }
    let r = rig.get(&victim, &attacker_callback).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(!r.reached_upstream());

    // None of this spent the attacker's code: portcullis never went to the token endpoint.
    let (status, body) = rig
        .op
        .token_request(
            &confidential_client(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", &rig.url("/callback")),
            ],
        )
        .await;
    assert_eq!(status, 200, "the code was still unused: {body}");

    // A replayed callback: the login cookie is gone after use; with a copy of it the code
    // is refused by the OP.
    let b = Jarred::new();
    let r = rig.get(&b.client, "/app").await;
    let login_cookie = set_cookies(&r)
        .into_iter()
        .find(|c| c.starts_with("session_login="))
        .expect("login cookie");
    let authorize = r.header("location").unwrap().to_owned();
    let callback = rig.op.log_in(&b.client, &authorize, "alice").await;
    let r = rig.get(&b.client, &callback).await;
    assert_eq!(r.status, 302);
    let r = rig.get(&b.client, &callback).await;
    assert_eq!(r.status, 401, "the login cookie was consumed: {r:?}");
    let thief = Jarred::new();
    thief.add(&rig.app, &login_cookie);
    let r = rig.get(&thief.client, &callback).await;
    assert_eq!(r.status, 401, "the OP refuses a used code: {r:?}");
    assert!(thief.cookie(&rig.app, "session").is_none());
}

/// `required_scopes` holds for sessions too: the scopes the OP granted at login decide,
/// on every request (the session path decodes them only when a route requires some).
#[tokio::test]
async fn required_scopes_are_checked_against_the_session() {
    for (required, status) in [("email", 200), ("admin", 403)] {
        let rig = Rig::start(
            ProviderSettings::default(),
            json!({ "required_scopes": [required] }),
        )
        .await;
        let b = browser();
        let callback = rig.to_callback(&b, "/app", "alice").await;
        let r = rig.get(&b, &callback).await;
        assert_eq!(r.status, 302, "{r:?}\n{}", rig.logs());
        let r = rig.get(&b, "/app").await;
        assert_eq!(r.status, status, "{required}: {r:?}\n{}", rig.logs());
        assert_eq!(r.reached_upstream(), status == 200, "{required}");
        if status == 403 {
            assert!(
                r.body.contains("required scopes admin not present"),
                "{}",
                r.body
            );
        }
    }
}

#[tokio::test]
async fn a_tampered_session_cookie_is_no_session() {
    let rig = Rig::start(ProviderSettings::default(), json!({})).await;
    let b = Jarred::new();
    rig.log_in(&b.client, "/app", "alice").await;
    let value = b.cookie(&rig.app, "session").expect("session cookie");

    let mut flipped = value.clone().into_bytes();
    let i = flipped.len() / 2;
    flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    for forged in [
        flipped.as_str(),
        &value[..value.len() - 10],
        "1.AAAA",
        "9.garbage",
        "",
    ] {
        let r = rig
            .stack
            .send(
                http_client()
                    .get(rig.url("/app"))
                    .header("cookie", format!("session={forged}")),
            )
            .await;
        assert_eq!(r.status, 302, "{forged:?} → {r:?}");
        assert!(!r.reached_upstream());
    }
    // The genuine one still works, from any client (nothing is held server-side).
    let r = rig
        .stack
        .send(
            http_client()
                .get(rig.url("/app"))
                .header("cookie", format!("session={value}")),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test]
async fn a_large_session_is_chunked_into_cookies_and_reassembled() {
    let bio = "portcullis ".repeat(400);
    let rig = Rig::start(
        ProviderSettings {
            conform_id_token_claims: Some(false),
            ..ProviderSettings::default()
        }
        .account("carol", json!({ "bio": bio })),
        json!({}),
    )
    .await;
    let b = Jarred::new();
    let r = rig.get(&b.client, "/app").await;
    let callback = rig
        .op
        .log_in(&b.client, r.header("location").unwrap(), "carol")
        .await;
    let r = rig.get(&b.client, &callback).await;
    assert_eq!(r.status, 302, "{r:?}");
    let chunks: Vec<String> = set_cookies(&r)
        .into_iter()
        .filter(|c| c.starts_with("session=") || c.starts_with("session_"))
        .filter(|c| !c.starts_with("session_login"))
        .collect();
    assert!(chunks.len() >= 3, "{chunks:?}");
    assert!(chunks.iter().all(|c| c.len() < 4096));
    assert!(b.cookie(&rig.app, "session_3").is_some());

    let r = rig.get(&b.client, "/app").await;
    let seen = r.echoed();
    assert_eq!(
        decode_header(seen.header("x-id-token").unwrap())["bio"],
        bio.as_str()
    );
    assert_eq!(
        decode_header(seen.header("x-userinfo").unwrap())["bio"],
        bio.as_str()
    );
    let cookie = seen.header("cookie").unwrap_or_default();
    assert!(
        !cookie
            .split("; ")
            .any(|c| c.starts_with("session=") || c.starts_with("session_")),
        "no chunk reaches the upstream (the OP's own `_session` may): {cookie}"
    );

    // A missing chunk is no session.
    let all = b.jar.cookies(&rig.app.parse().unwrap()).unwrap();
    let without_2: Vec<&str> = all
        .to_str()
        .unwrap()
        .split("; ")
        .filter(|c| !c.starts_with("session_2="))
        .collect();
    let r = rig
        .stack
        .send(
            http_client()
                .get(rig.url("/app"))
                .header("cookie", without_2.join("; ")),
        )
        .await;
    assert_eq!(r.status, 302, "{r:?}");

    // Logout clears every chunk.
    let r = rig.get(&b.client, "/logout").await;
    let cleared: Vec<String> = set_cookies(&r)
        .into_iter()
        .filter(|c| c.contains("Max-Age=0"))
        .collect();
    assert!(cleared.len() >= 3, "{cleared:?}");
    assert!(b.cookie(&rig.app, "session").is_none());
    assert!(b.cookie(&rig.app, "session_2").is_none());
}

#[tokio::test]
async fn unauth_action_deny_pass_and_api_clients() {
    let deny = Rig::start(
        ProviderSettings::default(),
        json!({ "unauth_action": "deny" }),
    )
    .await;
    let r = deny.get(&browser(), "/app").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(!r.reached_upstream());

    // One rig at a time: tests never hold two rig slots (no deadlock on RIGS).
    drop(deny);
    let pass = Rig::start(
        ProviderSettings::default(),
        json!({ "unauth_action": "pass" }),
    )
    .await;
    let r = pass
        .stack
        .send(
            http_client()
                .get(pass.url("/app"))
                .header("X-Userinfo", "forged")
                .header("cookie", "session=1.garbage; other=1"),
        )
        .await;
    let seen = r.echoed();
    assert_eq!(seen.header("x-userinfo"), None);
    assert_eq!(seen.header("x-id-token"), None);
    assert_eq!(seen.header("cookie"), Some("other=1"));

    // auth (the default): a browser is redirected, an API client asking for JSON is not.
    drop(pass);
    let auth = Rig::start(ProviderSettings::default(), json!({})).await;
    let r = auth
        .stack
        .send(
            http_client()
                .get(auth.url("/api"))
                .header("accept", "application/json"),
        )
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"apisix\"")
    );
    let r = auth
        .stack
        .send(http_client().get(auth.url("/page")).header(
            "accept",
            "text/html,application/xhtml+xml,application/json;q=0.9",
        ))
        .await;
    assert_eq!(r.status, 302, "{r:?}");
}

#[tokio::test]
async fn redirects_never_leave_the_site() {
    let rig = Rig::start(ProviderSettings::default(), json!({})).await;
    let port: u16 = rig.app.rsplit(':').next().unwrap().parse().unwrap();
    for target in ["//evil.com/x", "/\\evil.com/x", "/%2F%2Fevil.com"] {
        let answer = common::raw_get(port, target).await;
        let status = common::raw_status(&answer);
        if status == 307 {
            // Envoy's own answer to escaped slashes: a same-site path.
            assert!(answer.contains("\nlocation: /evil.com\r"), "{answer}");
            continue;
        }
        if status != 302 {
            assert!(status >= 400, "{target}: {answer}");
            continue;
        }
        let b = Jarred::new();
        let mut authorize = None;
        for line in answer.lines() {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("set-cookie:") {
                b.add(&rig.app, line["set-cookie:".len()..].trim());
            } else if lower.starts_with("location:") {
                authorize = Some(line["location:".len()..].trim().to_owned());
            }
        }
        let authorize = authorize.expect("Location");
        let callback = rig.op.log_in(&b.client, &authorize, "alice").await;
        let r = rig.get(&b.client, &callback).await;
        assert_eq!(r.status, 302, "{r:?}");
        let back = r.header("location").unwrap();
        assert!(
            back.starts_with('/') && !back.starts_with("//") && !back.starts_with("/\\"),
            "{target} → {back}"
        );
    }

    // Logout never redirects where the query says.
    let b = Jarred::new();
    rig.log_in(&b.client, "/app", "alice").await;
    let r = rig
        .get(
            &b.client,
            "/logout?post_logout_redirect_uri=https%3A%2F%2Fevil.com&redirect_uri=https%3A%2F%2Fevil.com",
        )
        .await;
    assert_eq!(r.status, 302);
    let location = r.header("location").unwrap();
    assert!(
        location.starts_with(&rig.op.url("/session/end")),
        "{location}"
    );
    assert!(!location.contains("evil.com"), "{location}");
}

#[tokio::test]
async fn the_default_redirect_uri_is_the_path_plus_apisix_redirect() {
    let rig = Rig::start(
        ProviderSettings::default(),
        json!({ "redirect_uri": null, "use_pkce": true }),
    )
    .await;
    let b = browser();
    let r = rig.get(&b, "/app").await;
    assert_eq!(r.status, 302);
    let authorize = url::Url::parse(r.header("location").unwrap()).unwrap();
    let redirect_uri = authorize
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .unwrap()
        .1
        .into_owned();
    assert_eq!(redirect_uri, rig.url("/app/.apisix/redirect"));
    let callback = rig.op.log_in(&b, authorize.as_str(), "dave").await;
    assert!(callback.starts_with(&redirect_uri), "{callback}");
    let r = rig.get(&b, &callback).await;
    assert_eq!(r.status, 302, "{r:?}\n{}", rig.logs());
    assert_eq!(r.header("location"), Some("/app"));
    let r = rig.get(&b, "/app").await;
    assert_eq!(
        decode_header(r.echoed().header("x-id-token").unwrap())["sub"],
        "dave"
    );
}

#[tokio::test]
async fn an_error_from_the_op_is_a_clear_401() {
    // prompt=none without a session at the OP: it answers error=login_required.
    let rig = Rig::start(
        ProviderSettings::default(),
        json!({ "authorization_params": { "prompt": "none" } }),
    )
    .await;
    let b = Jarred::new();
    let callback = rig.to_callback(&b.client, "/app", "erin").await;
    assert!(callback.contains("error=login_required"), "{callback}");
    let r = rig.get(&b.client, &callback).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        r.json(),
        json!({ "message": "the OpenID Provider refused the login" })
    );
    assert!(
        b.cookie(&rig.app, "session_login").is_none(),
        "the failed login is forgotten"
    );
    assert!(b.cookie(&rig.app, "session").is_none());
}

#[tokio::test]
async fn a_rotated_signing_key_is_fetched_on_the_next_login() {
    let rig = Rig::start(ProviderSettings::default(), json!({})).await;
    rig.log_in(&browser(), "/app", "frank").await;
    // New keys only: the next ID token has a kid portcullis has never seen.
    rig.op.rotate_keys(false).await;
    // Unknown kids refetch the JWKS at most once a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = rig.log_in(&browser(), "/app", "frank").await;
    assert_eq!(
        decode_header(r.echoed().header("x-id-token").unwrap())["sub"],
        "frank"
    );
}

#[tokio::test]
async fn an_idle_session_ends_and_a_used_one_lives_on() {
    let rig = Rig::start(
        ProviderSettings::default(),
        json!({ "session": { "secret": SESSION_SECRET, "idling_timeout": 3,
                             "cookie_name": "app_session" } }),
    )
    .await;
    let b = Jarred::new();
    rig.log_in(&b.client, "/app", "heidi").await;
    assert!(b.cookie(&rig.app, "app_session").is_some());
    // Used every second for four seconds: each use renews it.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let r = rig.get(&b.client, "/app").await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    // Then left alone past idling_timeout: login again.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = rig.get(&b.client, "/app").await;
    assert_eq!(r.status, 302, "{r:?}");
}

#[tokio::test]
async fn two_tabs_logging_in_at_once_both_land_where_they_were() {
    let rig = Rig::start(ProviderSettings::default(), json!({})).await;
    let b = browser();
    let one = rig.get(&b, "/app/one").await;
    let two = rig.get(&b, "/app/two").await;
    let (one, two) = (
        one.header("location").unwrap().to_owned(),
        two.header("location").unwrap().to_owned(),
    );
    // Tab one finishes first, then tab two (already signed in at the OP).
    for (authorize, path) in [(one, "/app/one"), (two, "/app/two")] {
        let callback = rig.op.log_in(&b, &authorize, "ivan").await;
        let r = rig.get(&b, &callback).await;
        assert_eq!(r.status, 302, "{r:?}\n{}", rig.logs());
        assert_eq!(r.header("location"), Some(path));
        assert_eq!(rig.get(&b, path).await.status, 200);
    }
}

/// chromedriver in its own process group, so dropping it also ends the Chromium it
/// started.
struct ChromeDriver {
    child: std::process::Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(bin).is_file()))
}

/// A WebDriver command; panics with the driver's answer on failure.
async fn webdriver(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> Value {
    let mut request = http.request(method, &url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("chromedriver answers");
    let status = response.status();
    let answer: Value = response.json().await.expect("JSON from chromedriver");
    assert!(status.is_success(), "{url}: {status} {answer}");
    answer["value"].clone()
}

#[tokio::test]
async fn headless_chromium_logs_in_through_envoy() {
    if !on_path("chromium") || !on_path("chromedriver") {
        eprintln!(
            "SKIPPED headless_chromium_logs_in_through_envoy: Debian `chromium` and \
             `chromium-driver` are not installed (apt-get install -y chromium chromium-driver)"
        );
        return;
    }
    // Chromium weighs as much as a second rig.
    let _chromium = RIGS.acquire().await.expect("the semaphore is never closed");
    let rig = Rig::start(ProviderSettings::default(), json!({ "use_pkce": true })).await;
    let port = free_port();
    let profile = tempfile::tempdir().expect("profile directory");
    let mut cmd = std::process::Command::new("chromedriver");
    cmd.arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let driver = ChromeDriver {
        child: cmd.spawn().expect("start chromedriver"),
        port,
        _profile: profile,
    };
    let http = http_client();
    let base = format!("http://127.0.0.1:{}", driver.port);
    common::eventually(Duration::from_secs(20), "chromedriver ready", || {
        let http = http.clone();
        let url = format!("{base}/status");
        async move {
            match http.get(url).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            }
        }
    })
    .await;
    let session = webdriver(
        &http,
        reqwest::Method::POST,
        format!("{base}/session"),
        Some(json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ]}
        }}})),
    )
    .await;
    let id = session["sessionId"].as_str().expect("sessionId").to_owned();
    let s = format!("{base}/session/{id}");
    let find = |css: &str| {
        let (http, s, css) = (http.clone(), s.clone(), css.to_owned());
        async move {
            let found = http
                .post(format!("{s}/element"))
                .json(&json!({ "using": "css selector", "value": css }))
                .send()
                .await
                .ok()?;
            if !found.status().is_success() {
                return None;
            }
            let v: Value = found.json().await.ok()?;
            v["value"]
                .as_object()?
                .values()
                .next()?
                .as_str()
                .map(str::to_owned)
        }
    };

    webdriver(
        &http,
        reqwest::Method::POST,
        format!("{s}/url"),
        Some(json!({ "url": rig.url("/app/browser") })),
    )
    .await;
    let mut page = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        page = webdriver(&http, reqwest::Method::GET, format!("{s}/source"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if page.contains("x-id-token") {
            break;
        }
        if page.contains(r#"name="prompt" value="login""#)
            && let Some(login) = find("input[name=login]").await
        {
            for (field, text) in [(login, "grace")] {
                webdriver(
                    &http,
                    reqwest::Method::POST,
                    format!("{s}/element/{field}/value"),
                    Some(json!({ "text": text })),
                )
                .await;
            }
            if let Some(password) = find("input[name=password]").await {
                webdriver(
                    &http,
                    reqwest::Method::POST,
                    format!("{s}/element/{password}/value"),
                    Some(json!({ "text": "any password" })),
                )
                .await;
            }
        }
        if (page.contains(r#"name="prompt" value="login""#)
            || page.contains(r#"name="prompt" value="consent""#))
            && let Some(button) = find("button[type=submit]").await
        {
            webdriver(
                &http,
                reqwest::Method::POST,
                format!("{s}/element/{button}/click"),
                Some(json!({})),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let current = webdriver(&http, reqwest::Method::GET, format!("{s}/url"), None).await;
    assert_eq!(
        current.as_str(),
        Some(rig.url("/app/browser").as_str()),
        "{page}\n{}",
        rig.logs()
    );
    // Chromium shows the echo's JSON in a <pre>.
    let pre = page.find("<pre").expect("the echo's JSON on the page");
    let start = pre + page[pre..].find('>').unwrap() + 1;
    let end = start + page[start..].find("</pre>").unwrap();
    let json_text = page[start..end]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    let echoed: Value = serde_json::from_str(&json_text).expect("echo JSON");
    let id_token = echoed["headers"]["x-id-token"]
        .as_str()
        .expect("X-ID-Token");
    assert_eq!(decode_header(id_token)["sub"], "grace");
    let _ = webdriver(&http, reqwest::Method::DELETE, s, None).await;
}

/// `session.storage: redis` (issue 8): the cookie carries only the session's id and the
/// session lives in Redis, so a login made through replica A is accepted by replica B
/// (its own portcullis and Envoy, same config), and emptying Redis ends the session.
#[tokio::test]
async fn a_redis_session_from_one_replica_is_accepted_by_another() {
    let redis = common::redis::Redis::start().await;
    let rig = Rig::start(
        ProviderSettings::default(),
        json!({ "session": {
            "secret": SESSION_SECRET,
            "storage": "redis",
            "redis": { "host": "127.0.0.1", "port": redis.port, "prefix": "portcullis-test" },
        }}),
    )
    .await;
    let browser = browser();
    let seen = rig.log_in(&browser, "/app/page", "alice").await.echoed();
    assert_eq!(
        decode_header(seen.header("x-id-token").expect("X-ID-Token"))["sub"],
        "alice"
    );
    let mut con = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("portcullis-test:*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "one session stored in Redis: {keys:?}");

    // Replica B: another portcullis and Envoy with the same config. The browser's
    // cookies are host-only for 127.0.0.1, so they go to B's port as well.
    let upstream = EchoUpstream::start();
    let portcullis = Portcullis::start(&rig.yaml).await;
    let envoy = Envoy::start(
        ENVOY_GRPC,
        EnvoyPorts {
            listener: free_port(),
            admin: free_port(),
            upstream: upstream.port,
            grpc: portcullis.ports.grpc,
            http: portcullis.ports.http,
        },
    )
    .await;
    let r = Reply::read(browser.get(envoy.url("/app/page")).send().await.unwrap()).await;
    assert_eq!(r.status, 200, "{r:?}\n{}", portcullis.output());
    assert_eq!(
        decode_header(r.echoed().header("x-id-token").expect("X-ID-Token"))["sub"],
        "alice"
    );

    // The cookie alone is not the session: without Redis's copy, B sends a login.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await.unwrap();
    let r = Reply::read(browser.get(envoy.url("/app/page")).send().await.unwrap()).await;
    assert_eq!(r.status, 302, "{r:?}");
    assert!(!r.reached_upstream());
}
