//! openid-connect's bearer-only path, end to end: a client calls real Envoy
//! (`envoy/envoy.yaml`) with an access token minted by a real OpenID Provider (panva's
//! `oidc-provider`, `tests/oidc/provider.mjs`), portcullis proves it — by the OP's JWKS, by a
//! configured public key or by asking the OP's introspection endpoint — and the echo upstream
//! shows what got through. The refusals are asserted as APISIX answers them: status,
//! `WWW-Authenticate` and body.
mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::oidc_provider::{
    ClientSettings, OidcProvider, ProviderSettings, ResourceSettings, TokenFormat,
};
use common::{Reply, Stack};
use reqwest::Method;
use serde_json::{Value, json};

/// The relying party portcullis acts as (introspection authenticates as it).
const RP_ID: &str = "portcullis";
const RP_SECRET: &str = "portcullis-secret-0123456789abcdef";
/// Resource servers: JWT access tokens for portcullis, for someone else, short-lived ones,
/// ES256-signed ones, and opaque (introspectable) ones.
const JWT_API: &str = "https://api.test/jwt";
const OTHER_API: &str = "https://api.test/other";
const SHORT_API: &str = "https://api.test/short";
const ES_API: &str = "https://api.test/es256";
const OPAQUE_API: &str = "https://api.test/opaque";

fn rp() -> ClientSettings {
    ClientSettings::confidential(RP_ID, RP_SECRET).grant_types(&["client_credentials"])
}

fn service() -> ClientSettings {
    ClientSettings::confidential("svc", "svc-secret-0123456789abcdef")
        .grant_types(&["client_credentials"])
}

/// A started OP whose discovery and JWKS endpoints have answered once, so that its
/// first-request warm-up on a loaded machine does not count against portcullis's timeout.
async fn provider() -> OidcProvider {
    let op = OidcProvider::start(
        &ProviderSettings::default()
            .client(rp())
            .client(service())
            .resource(
                JWT_API,
                ResourceSettings::new(TokenFormat::Jwt, "read write").audience(RP_ID),
            )
            .resource(
                OTHER_API,
                ResourceSettings::new(TokenFormat::Jwt, "read").audience("someone-else"),
            )
            .resource(
                SHORT_API,
                ResourceSettings::new(TokenFormat::Jwt, "read")
                    .audience(RP_ID)
                    .ttl(1),
            )
            .resource(
                ES_API,
                ResourceSettings::new(TokenFormat::Jwt, "read")
                    .audience(RP_ID)
                    .alg("ES256"),
            )
            .resource(
                OPAQUE_API,
                ResourceSettings::new(TokenFormat::Opaque, "read write"),
            ),
    );
    op.discovery().await;
    op.jwks().await;
    op
}

async fn token(op: &OidcProvider, resource: &str, scope: &str) -> String {
    op.client_credentials_token(&service(), Some(resource), scope)
        .await
}

/// One route `uri` with the openid-connect settings `extra` on top of a bearer-only base.
fn route(op: &OidcProvider, uri: &str, extra: Value) -> Value {
    let mut conf = json!({
        "client_id": RP_ID,
        "client_secret": RP_SECRET,
        "discovery": op.discovery_url(),
        "bearer_only": true,
    });
    for (k, v) in extra.as_object().expect("settings object") {
        conf[k] = v.clone();
    }
    json!({ "id": uri.trim_start_matches('/'), "uri": uri, "plugins": { "openid-connect": conf } })
}

/// The route without `client_secret`, which `public_key` and `use_jwks` do not need.
fn without_secret(mut route: Value) -> Value {
    route["plugins"]["openid-connect"]
        .as_object_mut()
        .expect("settings")
        .remove("client_secret");
    route
}

async fn stack(routes: Vec<Value>) -> Stack {
    Stack::start(&json!({ "routes": routes }).to_string()).await
}

async fn bearer(stack: &Stack, path: &str, token: &str) -> Reply {
    stack
        .send(
            stack
                .request(Method::GET, path)
                .header("Authorization", format!("Bearer {token}")),
        )
        .await
}

/// The claims portcullis passed upstream in `X-Userinfo`.
fn userinfo(reply: &Reply) -> Value {
    let echoed = reply.echoed();
    let encoded = echoed.header("x-userinfo").expect("X-Userinfo upstream");
    serde_json::from_slice(&STANDARD.decode(encoded).expect("base64 X-Userinfo"))
        .expect("JSON X-Userinfo")
}

/// A 401 for a presented but unacceptable token: the upstream never saw it, and the
/// challenge is APISIX's `invalid_token` one.
#[track_caller]
fn assert_invalid_token(reply: &Reply, description_contains: &str) {
    assert_eq!(reply.status, 401, "{reply:?}");
    assert!(!reply.reached_upstream());
    let challenge = reply.header("www-authenticate").expect("WWW-Authenticate");
    assert!(
        challenge
            .starts_with(r#"Bearer realm="apisix", error="invalid_token", error_description=""#),
        "{challenge}"
    );
    assert!(
        challenge.contains(description_contains),
        "{challenge} should mention {description_contains:?}"
    );
    assert_eq!(reply.body, "", "APISIX answers these without a body");
}

#[track_caller]
fn assert_forbidden(reply: &Reply, error: &str) {
    assert_eq!(reply.status, 403, "{reply:?}");
    assert!(!reply.reached_upstream());
    assert_eq!(reply.json(), json!({ "error": error }));
    assert_eq!(reply.header("www-authenticate"), None);
}

/// Replaces one segment of a compact JWS.
fn with_segment(token: &str, index: usize, segment: &str) -> String {
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[index] = segment;
    parts.join(".")
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

/// The OP's current RS256 key as the PEM an operator would paste into `public_key`.
async fn rs256_pem(op: &OidcProvider) -> String {
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    let jwks = op.jwks().await;
    let jwk = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["alg"] == "RS256")
        .expect("an RS256 key");
    let int = |name: &str| {
        rsa::BigUint::from_bytes_be(
            &URL_SAFE_NO_PAD
                .decode(jwk[name].as_str().expect("n and e"))
                .expect("base64url"),
        )
    };
    rsa::RsaPublicKey::new(int("n"), int("e"))
        .expect("RSA public key")
        .to_public_key_pem(LineEnding::LF)
        .expect("PEM")
}

#[tokio::test]
async fn jwt_access_tokens_verified_by_jwks_reach_the_upstream() {
    let op = provider().await;
    let stack = stack(vec![
        route(&op, "/jwks", json!({ "use_jwks": true })),
        route(
            &op,
            "/in-authorization",
            json!({ "use_jwks": true, "access_token_in_authorization_header": true,
                    "set_userinfo_header": false, "realm": "orders" }),
        ),
    ])
    .await;
    let token = token(&op, JWT_API, "read write").await;

    let reply = bearer(&stack, "/jwks", &token).await;
    let seen = reply.echoed();
    assert_eq!(seen.header_all("x-access-token"), [token.as_str()]);
    let claims = userinfo(&reply);
    assert_eq!(claims, claims_of(&token));
    assert_eq!(claims["iss"], op.issuer.as_str());
    assert_eq!(claims["scope"], "read write");

    // The scheme is matched in any case; without Authorization, the client's own
    // X-Access-Token is the bearer token (as APISIX reads it).
    let lower = stack
        .send(
            stack
                .request(Method::GET, "/jwks")
                .header("Authorization", format!("bEaReR {token}")),
        )
        .await;
    assert_eq!(
        lower.echoed().header("x-access-token"),
        Some(token.as_str())
    );
    let header_only = stack
        .send(
            stack
                .request(Method::GET, "/jwks")
                .header("X-Access-Token", &token),
        )
        .await;
    assert_eq!(
        header_only.echoed().header_all("x-access-token"),
        [token.as_str()]
    );

    // Identity headers a client sends are never what the upstream sees.
    let spoofed = stack
        .send(
            stack
                .request(Method::GET, "/jwks")
                .header("Authorization", format!("Bearer {token}"))
                .header("X-Access-Token", "forged-token")
                .header("X-Userinfo", STANDARD.encode(r#"{"sub":"admin"}"#))
                .header("X-ID-Token", "forged-id")
                .header("X-Refresh-Token", "forged-refresh")
                .header("X-Raw-ID-Token", "forged-raw")
                .header("X_Userinfo", "forged-underscore"),
        )
        .await;
    assert_eq!(userinfo(&spoofed), claims_of(&token));
    let seen = spoofed.echoed();
    assert_eq!(seen.header_all("x-access-token"), [token.as_str()]);
    assert_eq!(seen.header_all("x-userinfo").len(), 1);
    for forged in [
        "x-id-token",
        "x-refresh-token",
        "x-raw-id-token",
        "x_userinfo",
    ] {
        assert_eq!(seen.header(forged), None, "{forged} reached the upstream");
    }

    // access_token_in_authorization_header: the token travels as Authorization; no
    // X-Userinfo when set_userinfo_header is off.
    let reply = stack
        .send(
            stack
                .request(Method::GET, "/in-authorization")
                .header("Authorization", format!("bearer {token}"))
                .header("X-Userinfo", "forged"),
        )
        .await;
    let seen = reply.echoed();
    assert_eq!(
        seen.header_all("authorization"),
        [format!("Bearer {token}").as_str()]
    );
    assert_eq!(seen.header("x-access-token"), None);
    assert_eq!(seen.header("x-userinfo"), None);

    // No token at all: APISIX's bare challenge with the route's realm, no body.
    for path in ["/jwks", "/in-authorization"] {
        let none = stack.get(path).await;
        assert_eq!(none.status, 401);
        assert!(!none.reached_upstream());
        let realm = if path == "/jwks" { "apisix" } else { "orders" };
        assert_eq!(
            none.header("www-authenticate"),
            Some(format!(r#"Bearer realm="{realm}""#).as_str())
        );
        assert_eq!(none.body, "");
    }
    // Another scheme is no bearer token; a bare scheme is a malformed header (400).
    let basic = stack
        .send(
            stack
                .request(Method::GET, "/jwks")
                .header("Authorization", "Basic YWxpY2U6c2VjcmV0"),
        )
        .await;
    assert_eq!(basic.status, 401);
    assert_eq!(
        basic.header("www-authenticate"),
        Some(r#"Bearer realm="apisix""#)
    );
    let malformed = stack
        .send(
            stack
                .request(Method::GET, "/jwks")
                .header("Authorization", "Bearer"),
        )
        .await;
    assert_eq!(malformed.status, 400);
    assert!(!malformed.reached_upstream());
}

#[tokio::test]
async fn bad_jwts_are_refused_as_invalid_tokens() {
    let op = provider().await;
    let elsewhere = provider().await;
    let stack = stack(vec![
        route(
            &op,
            "/jwks",
            json!({ "use_jwks": true, "token_signing_alg_values_expected": "RS256" }),
        ),
        route(
            &op,
            "/audience",
            json!({ "use_jwks": true,
                    "claim_validator": { "audience": { "match_with_client_id": true } } }),
        ),
        route(
            &op,
            "/other-issuer",
            json!({ "use_jwks": true,
                    "claim_validator": { "issuer": { "valid_issuers": ["https://issuer.example"] } } }),
        ),
    ])
    .await;
    let good = token(&op, JWT_API, "read").await;
    assert_eq!(bearer(&stack, "/jwks", &good).await.status, 200);
    assert_eq!(bearer(&stack, "/audience", &good).await.status, 200);

    // Expired: the OP's own token, one second of life, checked without leeway.
    let short = token(&op, SHORT_API, "read").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_invalid_token(&bearer(&stack, "/jwks", &short).await, "token expired");

    // Another OP's token: its key is not in our OP's JWKS.
    let foreign = token(&elsewhere, JWT_API, "read").await;
    assert_invalid_token(&bearer(&stack, "/jwks", &foreign).await, "no key");
    // Our OP's token where only another issuer is trusted.
    assert_invalid_token(
        &bearer(&stack, "/other-issuer", &good).await,
        "issuer is not trusted",
    );

    // alg none, in any case, with or without a signature.
    for alg in ["none", "None", "NONE"] {
        let header = URL_SAFE_NO_PAD.encode(json!({ "alg": alg, "typ": "JWT" }).to_string());
        let unsigned = with_segment(&with_segment(&good, 0, &header), 2, "");
        assert_invalid_token(&bearer(&stack, "/jwks", &unsigned).await, "alg none");
    }
    // Tampered claims under the original signature, and a flipped signature.
    let mut claims = claims_of(&good);
    claims["scope"] = "read write admin".into();
    let tampered = with_segment(&good, 1, &URL_SAFE_NO_PAD.encode(claims.to_string()));
    assert_invalid_token(
        &bearer(&stack, "/jwks", &tampered).await,
        "signature verification failed",
    );
    let signature = good.split('.').nth(2).unwrap();
    let flipped_first = if signature.starts_with('A') { "B" } else { "A" };
    let flipped = with_segment(&good, 2, &format!("{flipped_first}{}", &signature[1..]));
    assert_invalid_token(
        &bearer(&stack, "/jwks", &flipped).await,
        "signature verification failed",
    );
    // An algorithm outside token_signing_alg_values_expected, even correctly signed.
    let es = token(&op, ES_API, "read").await;
    assert_invalid_token(&bearer(&stack, "/jwks", &es).await, "unexpected algorithm");
    // Not a JWT at all.
    assert_invalid_token(&bearer(&stack, "/jwks", "not-a-jwt").await, "invalid jwt");
    // Two Authorization headers reach portcullis joined by a comma: never split, refused.
    let twice = stack
        .send(
            stack
                .request(Method::GET, "/jwks")
                .header("Authorization", format!("Bearer {good}"))
                .header("Authorization", format!("Bearer {good}")),
        )
        .await;
    assert_invalid_token(&twice, "invalid token format");

    // A verified token for someone else: APISIX's audience answer is a 403.
    let other = token(&op, OTHER_API, "read").await;
    assert_eq!(bearer(&stack, "/jwks", &other).await.status, 200);
    assert_forbidden(
        &bearer(&stack, "/audience", &other).await,
        "mismatched audience",
    );
}

#[tokio::test]
async fn required_scopes_missing_is_forbidden() {
    let op = provider().await;
    let stack = stack(vec![
        route(
            &op,
            "/jwt",
            json!({ "use_jwks": true, "required_scopes": ["read", "write"] }),
        ),
        route(
            &op,
            "/opaque",
            json!({ "introspection_endpoint": op.url("/token/introspection"),
                    "required_scopes": ["write"] }),
        ),
    ])
    .await;
    let both = token(&op, JWT_API, "read write").await;
    assert_eq!(bearer(&stack, "/jwt", &both).await.status, 200);
    let read = token(&op, JWT_API, "read").await;
    assert_forbidden(
        &bearer(&stack, "/jwt", &read).await,
        "required scopes read, write not present",
    );

    // The same plugin configured through the Admin API, as APISIX users do; a config
    // APISIX would refuse is refused with its message.
    let admin = stack.admin();
    let mut added = without_secret(route(&op, "/admin-added", json!({ "use_jwks": true })));
    added["id"] = "admin-added".into();
    let (status, body) = admin.put("routes/admin-added", added).await;
    assert!(status == 200 || status == 201, "{status} {body}");
    assert_eq!(bearer(&stack, "/admin-added", &read).await.status, 200);
    let (status, body) = admin
        .put(
            "routes/no-secret",
            json!({ "uri": "/no-secret", "plugins": { "openid-connect": {
                "client_id": RP_ID, "discovery": op.discovery_url(), "bearer_only": true } } }),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error_msg"].as_str().unwrap_or_default();
    assert!(
        message.contains("openid-connect") && message.contains("client_secret"),
        "{body}"
    );

    let opaque_write = token(&op, OPAQUE_API, "write").await;
    assert_eq!(bearer(&stack, "/opaque", &opaque_write).await.status, 200);
    let opaque_read = token(&op, OPAQUE_API, "read").await;
    assert_forbidden(
        &bearer(&stack, "/opaque", &opaque_read).await,
        "required scopes write not present",
    );
}

#[tokio::test]
async fn a_public_key_built_from_the_jwks_verifies_tokens() {
    let op = provider().await;
    let pem = rs256_pem(&op).await;
    let stack = stack(vec![
        without_secret(route(
            &op,
            "/pem",
            json!({ "public_key": pem, "token_signing_alg_values_expected": "RS256" }),
        )),
        route(
            &op,
            "/pem-pinned-issuer",
            json!({ "public_key": pem,
                    "claim_validator": { "issuer": { "valid_issuers": [op.issuer] } } }),
        ),
    ])
    .await;
    let jwt = token(&op, JWT_API, "read").await;
    let reply = bearer(&stack, "/pem", &jwt).await;
    assert_eq!(reply.echoed().header("x-access-token"), Some(jwt.as_str()));
    assert_eq!(userinfo(&reply)["client_id"], "svc");
    assert_eq!(bearer(&stack, "/pem-pinned-issuer", &jwt).await.status, 200);

    // After a rotation the pasted key no longer verifies new tokens: the key is fixed.
    op.rotate_keys(false).await;
    let rotated = token(&op, JWT_API, "read").await;
    assert_invalid_token(
        &bearer(&stack, "/pem", &rotated).await,
        "signature verification failed",
    );
    // With the OP gone, a pinned issuer needs no discovery, and the discovered one
    // stays cached.
    drop(op);
    assert_eq!(bearer(&stack, "/pem-pinned-issuer", &jwt).await.status, 200);
    assert_eq!(
        bearer(&stack, "/pem", &jwt).await.status,
        200,
        "discovery is cached"
    );
}

#[tokio::test]
async fn key_rotation_is_followed_without_a_restart() {
    let op = provider().await;
    let stack = stack(vec![route(&op, "/jwks", json!({ "use_jwks": true }))]).await;
    let before = token(&op, JWT_API, "read").await;
    let baseline = op.requests_to("/jwks").await;
    assert_eq!(bearer(&stack, "/jwks", &before).await.status, 200);
    assert_eq!(bearer(&stack, "/jwks", &before).await.status, 200);
    assert_eq!(
        op.requests_to("/jwks").await,
        baseline + 1,
        "the JWKS is cached"
    );

    // A burst of tokens naming kids nobody published costs at most one refetch.
    for n in 0..5 {
        let forged = with_segment(
            &before,
            0,
            &URL_SAFE_NO_PAD
                .encode(json!({ "alg": "RS256", "kid": format!("forged-{n}") }).to_string()),
        );
        assert_invalid_token(&bearer(&stack, "/jwks", &forged).await, "no key");
    }
    assert!(op.requests_to("/jwks").await <= baseline + 2);

    // New keys only: the unknown kid makes portcullis fetch the JWKS again (refetches are
    // at most one a second).
    let kids = op.rotate_keys(false).await;
    let after = token(&op, JWT_API, "read").await;
    assert_eq!(
        jsonwebtoken::decode_header(&after).unwrap().kid.as_deref(),
        Some(kids[0].as_str())
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fetched = op.requests_to("/jwks").await;
    let reply = bearer(&stack, "/jwks", &after).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(userinfo(&reply), claims_of(&after));
    assert_eq!(op.requests_to("/jwks").await, fetched + 1);
    // The old key was dropped from the JWKS, so tokens it signed are refused now.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_invalid_token(&bearer(&stack, "/jwks", &before).await, "no key");
    assert_eq!(bearer(&stack, "/jwks", &after).await.status, 200);
}

#[tokio::test]
async fn opaque_tokens_are_introspected_and_the_answer_is_cached() {
    let op = provider().await;
    let endpoint = op.url("/token/introspection");
    let stack = stack(vec![
        route(&op, "/basic", json!({ "introspection_endpoint": endpoint })),
        route(
            &op,
            "/post",
            json!({ "introspection_endpoint": endpoint,
                    "introspection_endpoint_auth_method": "client_secret_post",
                    "introspection_interval": 1 }),
        ),
        route(
            &op,
            "/wrong-secret",
            json!({ "introspection_endpoint": endpoint, "client_secret": "not-the-secret" }),
        ),
        // No endpoint configured: the discovery document names it.
        route(&op, "/discovered", json!({})),
    ])
    .await;
    let introspection = "/token/introspection";
    let opaque = token(&op, OPAQUE_API, "read").await;
    assert_eq!(opaque.split('.').count(), 1, "opaque: {opaque}");

    let reply = bearer(&stack, "/basic", &opaque).await;
    assert_eq!(
        reply.echoed().header("x-access-token"),
        Some(opaque.as_str())
    );
    let claims = userinfo(&reply);
    assert_eq!(claims["active"], true);
    assert_eq!(claims["scope"], "read");
    assert_eq!(claims["client_id"], "svc");
    assert_eq!(claims["iss"], op.issuer.as_str());
    assert_eq!(op.requests_to(introspection).await, 1);
    // The second request is answered from the cache: the OP is not asked again.
    let again = bearer(&stack, "/basic", &opaque).await;
    assert_eq!(userinfo(&again), claims);
    assert_eq!(op.requests_to(introspection).await, 1);

    // client_secret_post, and the endpoint named by the discovery document, each with a
    // token of its own so that each really asks the OP.
    let posted = token(&op, OPAQUE_API, "read").await;
    assert_eq!(bearer(&stack, "/post", &posted).await.status, 200);
    assert_eq!(op.requests_to(introspection).await, 2);
    let discovered = token(&op, OPAQUE_API, "read").await;
    assert_eq!(bearer(&stack, "/discovered", &discovered).await.status, 200);
    assert_eq!(op.requests_to(introspection).await, 3);

    // active:false and a refused client both mean an invalid token; a route with other
    // credentials never rides on another route's cached answer.
    assert_invalid_token(
        &bearer(&stack, "/basic", "no-such-token").await,
        "invalid token",
    );
    assert_invalid_token(
        &bearer(&stack, "/wrong-secret", &opaque).await,
        "introspection failed",
    );
    assert_eq!(op.requests_to(introspection).await, 5);

    // The OP goes away: the answers already given are still served from the cache,
    // until introspection_interval runs out on the route that sets one.
    drop(op);
    let started = Instant::now();
    let cached = bearer(&stack, "/basic", &opaque).await;
    assert_eq!(userinfo(&cached), claims, "served from the cache");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(bearer(&stack, "/discovered", &discovered).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let expired = bearer(&stack, "/post", &posted).await;
    assert_invalid_token(&expired, "introspection failed");
    assert_eq!(bearer(&stack, "/basic", &opaque).await.status, 200);

    // A token never seen before cannot be checked: a quick 401.
    let started = Instant::now();
    assert_invalid_token(
        &bearer(&stack, "/basic", "another-opaque-token").await,
        "introspection failed",
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // The cache and the failed calls show in the metrics.
    let metrics = stack
        .client
        .get(stack.portcullis.http_url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let line = |parts: &[&str]| metrics.lines().any(|l| parts.iter().all(|p| l.contains(p)));
    assert!(
        line(&[
            "portcullis_cache_total{",
            r#"cache="openid-connect-introspection""#,
            r#"result="hit""#
        ]),
        "{metrics}"
    );
    assert!(
        line(&[
            "portcullis_outbound_errors_total{",
            r#"plugin="openid-connect""#,
            r#"kind="connect""#
        ]),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_unreachable_or_silent_provider_is_a_quick_401() {
    // A port nobody listens on, and a listener that accepts but never answers.
    let dead_port = common::free_port();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().unwrap().port();
    let conf = |port: u16, extra: Value| {
        let mut conf = json!({
            "client_id": RP_ID, "client_secret": RP_SECRET, "bearer_only": true,
            "discovery": format!("http://127.0.0.1:{port}/.well-known/openid-configuration"),
            "timeout": 1,
        });
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        conf
    };
    let routes = vec![
        json!({ "id": "dead", "uri": "/dead",
                "plugins": { "openid-connect": conf(dead_port, json!({ "use_jwks": true, "timeout": 3 })) } }),
        json!({ "id": "silent", "uri": "/silent",
                "plugins": { "openid-connect": conf(silent_port, json!({ "use_jwks": true })) } }),
        json!({ "id": "silent-introspection", "uri": "/silent-introspection",
                "plugins": { "openid-connect": conf(silent_port, json!({
                    "introspection_endpoint":
                        format!("http://127.0.0.1:{silent_port}/token/introspection") })) } }),
    ];
    let stack = stack(routes).await;
    // Any well-formed token will do: the OP cannot be asked about it.
    let token = format!(
        "{}.{}.c2ln",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k"}"#),
        URL_SAFE_NO_PAD.encode(r#"{"iss":"x","exp":4102444800}"#)
    );

    let started = Instant::now();
    assert_invalid_token(
        &bearer(&stack, "/dead", &token).await,
        "issuer validation unavailable",
    );
    // A refused connection is answered at once, not after the 3 s timeout.
    assert!(started.elapsed() < Duration::from_millis(1500));

    for path in ["/silent", "/silent-introspection"] {
        let started = Instant::now();
        let reply = bearer(&stack, path, &token).await;
        let took = started.elapsed();
        // 401 from portcullis, not Envoy's own 403 after its 4 s ext_authz timeout.
        assert_eq!(reply.status, 401, "{path}: {reply:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(3500),
            "{path}: denied after {took:?}, expected about the 1 s timeout"
        );
    }
    let log = stack.portcullis.output();
    assert!(
        log.contains("openid-connect: discovery failed") && log.contains("timed out"),
        "{log}"
    );
    drop(silent);
}
