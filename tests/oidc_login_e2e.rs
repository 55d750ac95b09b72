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
use serde_json::{Value, json};

const CLIENT_ID: &str = "portcullis-app";
const CLIENT_SECRET: &str = "portcullis-app-secret";
const SESSION_SECRET: &str = "a-session-secret-for-tests";

/// Envoy, portcullis and the echo upstream in front of a real OP that knows our client.
struct Rig {
    stack: Stack,
    op: OidcProvider,
    /// `http://127.0.0.1:<envoy>`: what the browser sees as the application.
    app: String,
}

impl Rig {
    /// Starts everything; `plugin` is merged over a working openid-connect configuration
    /// (client, discovery, session secret, redirect_uri `/callback`).
    async fn start(op: ProviderSettings, plugin: Value) -> Rig {
        let listener = free_port();
        let app = format!("http://127.0.0.1:{listener}");
        let client = ClientSettings::confidential(CLIENT_ID, CLIENT_SECRET)
            .redirect_uri(&format!("{app}/callback"))
            .redirect_uri(&format!("{app}/app/.apisix/redirect"))
            .post_logout_redirect_uri(&format!("{app}/logged-out"));
        let op = OidcProvider::start(&op.client(client));
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
            stack: Stack {
                envoy,
                portcullis,
                upstream,
                client: http_client(),
            },
            op,
            app,
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
    let _ = Duration::from_secs(1);
}
