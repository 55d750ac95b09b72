//! The APISIX jwt-auth documentation's examples, replayed through real Envoy with the
//! Admin API calls exactly as the docs write them, then the attacks a JWT gateway
//! must refuse. Every request goes client → Envoy (`envoy/envoy.yaml`) → portcullis
//! over ext_authz → the echo upstream, which shows what was let through.
mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Admin, Reply, Stack};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{Value, json};

/// The docs' token for `jack-key` (HS256, only `nbf`).
const DOC_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJrZXkiOiJqYWNrLWtleSIsIm5iZiI6MTcyOTEzMjI3MX0.UEPXy5jpid624T1XpfjM0PLY73LZPjV3Qt8yZ92kVuU";
/// The docs' "invalid token" example.
const DOC_INVALID_TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJleHAiOjE3MjY2NDk2NDAsImtleSI6ImphY2sta2V5In0.kdhumNWrZFxjU_random_random";
const DOC_SECRET: &str = "jack-hs256-secret-that-is-very-long";

/// "Sign JWT with RS256 Algorithm": the docs' public key and the token they signed
/// with its private key.
const DOC_RS256_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAoTxe7ZPycrEP0SK4OBA2\n0OUQsDN9gSFSHVvx/t++nZNrFxzZnV6q6/TRsihNXUIgwaOu5icFlIcxPL9Mf9UJ\na5/XCQExp1TxpuSmjkhIFAJ/x5zXrC8SGTztP3SjkhYnQO9PKVXI6ljwgakVCfpl\numuTYqI+ev7e45NdK8gJoJxPp8bPMdf8/nHfLXZuqhO/btrDg1x+j7frDNrEw+6B\nCK2SsuypmYN+LwHfaH4Of7MQFk3LNIxyBz0mdbsKJBzp360rbWnQeauWtDymZxLT\nATRNBVyl3nCNsURRTkc7eyknLaDt2N5xTIoUGHTUFYSdE68QWmukYMVGcEHEEPkp\naQIDAQAB\n-----END PUBLIC KEY-----";
const DOC_RS256_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJrZXkiOiJqYWNrLWtleSIsIm5iZiI6MTcyOTEzMjI3MX0.K-I13em84kAcyH1jfIJl7ls_4jlwg1GzEzo5_xrDu-3wt3Xa3irS6naUsWpxX-a-hmcZZxRa9zqunqQjUP4kvn5e3xg2f_KyCR-_ZbwqYEPk3bXeFV1l4iypv6z5L7W1Niharun-dpMU03b1Tz64vhFx6UwxNL5UIZ7bunDAo_BXZ7Xe8rFhNHvIHyBFsDEXIBgx8lNYMq8QJk3iKxZhZZ5Om7lgYjOOKRgew4WkhBAY0v1AkO77nTlvSK0OEeeiwhkROyntggyx-S-U222ykMQ6mBLxkP4Cq5qHwXD8AUcLk5mhEij-3QhboYnt7yhKeZ3wDSpcjDvvL2aasC25ng";

#[track_caller]
fn ok(answer: (u16, Value)) -> Value {
    assert!(
        answer.0 == 200 || answer.0 == 201,
        "Admin API: {} {}",
        answer.0,
        answer.1
    );
    answer.1
}

/// A 401 from portcullis with APISIX's body and challenge; the upstream never saw it.
#[track_caller]
fn assert_401(reply: &Reply, message: &str) {
    assert_eq!(reply.status, 401, "{:?}", reply.body);
    assert!(!reply.reached_upstream());
    assert_eq!(reply.json(), json!({ "message": message }));
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer realm=\"jwt\"")
    );
}

async fn with_auth(stack: &Stack, path: &str, token: &str) -> Reply {
    stack
        .send(
            stack
                .request(Method::GET, path)
                .header("Authorization", token),
        )
        .await
}

/// The docs' first three calls: consumer `jack`, its credential, a route.
async fn docs_setup(admin: &Admin, credential: Value, route: Value) {
    ok(admin.put("consumers", json!({"username": "jack"})).await);
    ok(admin.put("consumers/jack/credentials", credential).await);
    ok(admin.put("routes", route).await);
}

fn httpbin() -> Value {
    json!({"type": "roundrobin", "nodes": {"httpbin.org:80": 1}})
}

fn jack_credential(jwt_auth: Value) -> Value {
    json!({"id": "cred-jack-jwt-auth", "plugins": {"jwt-auth": jwt_auth}})
}

#[tokio::test]
async fn docs_use_jwt_for_consumer_authentication() {
    let stack = Stack::start("").await;
    docs_setup(
        &stack.admin(),
        jack_credential(json!({"key": "jack-key", "secret": DOC_SECRET})),
        json!({"id": "jwt-route", "uri": "/headers", "plugins": {"jwt-auth": {}}, "upstream": httpbin()}),
    )
    .await;

    let seen = with_auth(&stack, "/headers", DOC_TOKEN).await.echoed();
    assert_eq!(seen.header_all("x-consumer-username"), ["jack"]);
    assert_eq!(
        seen.header_all("x-credential-identifier"),
        ["cred-jack-jwt-auth"]
    );
    assert_eq!(seen.header("authorization"), Some(DOC_TOKEN));
    assert_eq!(
        seen.header("x-consumer-custom-id"),
        None,
        "no custom_id label"
    );

    assert_401(
        &with_auth(&stack, "/headers", DOC_INVALID_TOKEN).await,
        "failed to verify jwt",
    );
    assert_401(&stack.get("/headers").await, "Missing JWT token in request");
    let reply = with_auth(&stack, "/headers", &format!("Bearer {DOC_TOKEN}")).await;
    assert_eq!(reply.echoed().header("x-consumer-username"), Some("jack"));
}

#[tokio::test]
async fn docs_carry_jwt_in_header_query_or_cookie() {
    let stack = Stack::start("").await;
    let admin = stack.admin();
    docs_setup(
        &admin,
        jack_credential(json!({"key": "jack-key", "secret": DOC_SECRET})),
        json!({"id": "jwt-route", "uri": "/get", "plugins": {"jwt-auth": {
            "header": "jwt-auth-header", "query": "jwt-query", "cookie": "jwt-cookie"}},
            "upstream": httpbin()}),
    )
    .await;

    let header = stack
        .send(
            stack
                .request(Method::GET, "/get")
                .header("jwt-auth-header", DOC_TOKEN),
        )
        .await
        .echoed();
    assert_eq!(header.header("jwt-auth-header"), Some(DOC_TOKEN));
    assert_eq!(header.header("x-consumer-username"), Some("jack"));

    let query = stack
        .get(&format!("/get?jwt-query={DOC_TOKEN}"))
        .await
        .echoed();
    assert_eq!(query.query, Some(format!("jwt-query={DOC_TOKEN}")));
    assert_eq!(query.header("x-consumer-username"), Some("jack"));

    let cookie = stack
        .send(
            stack
                .request(Method::GET, "/get")
                .header("cookie", format!("jwt-cookie={DOC_TOKEN}")),
        )
        .await
        .echoed();
    assert_eq!(
        cookie.header("cookie"),
        Some(format!("jwt-cookie={DOC_TOKEN}").as_str())
    );
    assert_eq!(cookie.header("x-consumer-username"), Some("jack"));

    // hide_credentials: the token never reaches the upstream, other parts do.
    ok(admin
        .patch(
            "routes/jwt-route",
            json!({"plugins": {"jwt-auth": {"header": "jwt-auth-header", "query": "jwt-query",
                   "cookie": "jwt-cookie", "hide_credentials": true}}}),
        )
        .await);
    let header = stack
        .send(
            stack
                .request(Method::GET, "/get")
                .header("jwt-auth-header", DOC_TOKEN),
        )
        .await
        .echoed();
    assert_eq!(header.header("jwt-auth-header"), None);
    assert_eq!(header.header("x-consumer-username"), Some("jack"));
    let query = stack
        .get(&format!("/get?a=1&jwt-query={DOC_TOKEN}&b=2"))
        .await
        .echoed();
    assert_eq!(query.query.as_deref(), Some("a=1&b=2"));
    let cookie = stack
        .send(
            stack
                .request(Method::GET, "/get")
                .header("cookie", format!("a=1; jwt-cookie={DOC_TOKEN}; b=2")),
        )
        .await
        .echoed();
    assert_eq!(cookie.header("cookie"), Some("a=1; b=2"));
    let only = stack
        .send(
            stack
                .request(Method::GET, "/get")
                .header("cookie", format!("jwt-cookie={DOC_TOKEN}")),
        )
        .await
        .echoed();
    assert_eq!(only.header("cookie"), None);
    assert_eq!(only.header("x-consumer-username"), Some("jack"));
}

#[tokio::test]
async fn docs_manage_secrets_in_environment_variables() {
    // portcullis reads `$env://JACK_JWT_SECRET` from its own environment.
    let stack = Stack::start_with_env("", &[("JACK_JWT_SECRET", DOC_SECRET)]).await;
    let admin = stack.admin();
    docs_setup(
        &admin,
        jack_credential(json!({"key": "jack-key", "secret": "$env://JACK_JWT_SECRET"})),
        json!({"id": "jwt-route", "uri": "/get", "plugins": {"jwt-auth": {}}, "upstream": httpbin()}),
    )
    .await;
    let seen = with_auth(&stack, "/get", DOC_TOKEN).await.echoed();
    assert_eq!(seen.header("x-consumer-username"), Some("jack"));
    // The stored credential keeps the reference, never the secret.
    let stored = ok(admin
        .get("consumers/jack/credentials/cred-jack-jwt-auth")
        .await);
    assert_eq!(
        stored["value"]["plugins"]["jwt-auth"]["secret"],
        "$env://JACK_JWT_SECRET"
    );
}

/// A fresh 2048-bit RSA pair: private PKCS#1 PEM, public SPKI PEM.
fn rsa_pair() -> (String, String) {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
    let public = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("public PEM");
    let private = private.to_pkcs1_pem(LineEnding::LF).expect("private PEM");
    (private.to_string(), public)
}

#[tokio::test]
async fn docs_sign_jwt_with_rs256_algorithm() {
    let stack = Stack::start("").await;
    let admin = stack.admin();
    docs_setup(
        &admin,
        jack_credential(json!({"key": "jack-key", "algorithm": "RS256", "public_key": DOC_RS256_PUBLIC_KEY})),
        json!({"id": "jwt-route", "uri": "/headers", "plugins": {"jwt-auth": {}}, "upstream": httpbin()}),
    )
    .await;
    let seen = with_auth(&stack, "/headers", DOC_RS256_TOKEN)
        .await
        .echoed();
    assert_eq!(seen.header("x-consumer-username"), Some("jack"));
    // The HS256 docs token names the same key but not the credential's algorithm.
    assert_401(
        &with_auth(&stack, "/headers", DOC_TOKEN).await,
        "failed to verify jwt",
    );

    // A key pair generated here, as the docs' openssl step does.
    let (private, public) = rsa_pair();
    ok(admin
        .put(
            "consumers/jack/credentials",
            jack_credential(json!({"key": "jack-key", "algorithm": "RS256", "public_key": public})),
        )
        .await);
    let claims = json!({"key": "jack-key", "exp": now() + 60});
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(private.as_bytes()).unwrap(),
    )
    .unwrap();
    let seen = with_auth(&stack, "/headers", &token).await.echoed();
    assert_eq!(seen.header("x-consumer-username"), Some("jack"));
    // The docs' token is not signed by the new key.
    assert_401(
        &with_auth(&stack, "/headers", DOC_RS256_TOKEN).await,
        "failed to verify jwt",
    );
    // Key confusion: HS256 "signed" with the public key everybody has.
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(public.as_bytes()),
    )
    .unwrap();
    assert_401(
        &with_auth(&stack, "/headers", &confused).await,
        "failed to verify jwt",
    );
}

#[tokio::test]
async fn docs_add_consumer_custom_id_to_header() {
    let stack = Stack::start("").await;
    let admin = stack.admin();
    ok(admin
        .put(
            "consumers",
            json!({"username": "jack", "labels": {"custom_id": "495aec6a"}}),
        )
        .await);
    ok(admin
        .put(
            "consumers/jack/credentials",
            jack_credential(json!({"key": "jack-key", "secret": DOC_SECRET})),
        )
        .await);
    ok(admin
        .put(
            "routes",
            json!({"id": "jwt-auth-route", "uri": "/anything", "plugins": {"jwt-auth": {}},
                   "upstream": httpbin()}),
        )
        .await);
    let seen = with_auth(&stack, "/anything", DOC_TOKEN).await.echoed();
    assert_eq!(seen.header_all("x-consumer-custom-id"), ["495aec6a"]);
    assert_eq!(seen.header_all("x-consumer-username"), ["jack"]);
    assert_eq!(
        seen.header_all("x-credential-identifier"),
        ["cred-jack-jwt-auth"]
    );
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn hs256(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(DOC_SECRET.as_bytes()),
    )
    .unwrap()
}

/// An HS256 MAC with the docs' secret over exactly the given header and payload.
fn forged(header: &Value, payload: &Value) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let sig = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_secret(DOC_SECRET.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{input}.{sig}")
}

const SECURITY_CONFIG: &str = r#"
routes:
  - { id: jwt, uri: /headers, plugins: { jwt-auth: {} } }
  - { id: open, uri: /open }
consumers:
  - username: jack
    credentials:
      - id: cred-jack-jwt-auth
        plugins: { jwt-auth: { key: jack-key, secret: jack-hs256-secret-that-is-very-long } }
"#;

#[tokio::test]
async fn attacks_are_401_never_200() {
    let stack = Stack::start(SECURITY_CONFIG).await;
    let (rsa_private, rsa_public) = rsa_pair();
    ok(stack
        .admin()
        .put(
            "consumers",
            json!({"username": "rose", "plugins": {"jwt-auth": {
                "key": "rose-key", "algorithm": "RS256", "public_key": rsa_public}}}),
        )
        .await);
    let rose = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &json!({"key": "rose-key"}),
        &EncodingKey::from_rsa_pem(rsa_private.as_bytes()).unwrap(),
    )
    .unwrap();
    let seen = with_auth(&stack, "/headers", &rose).await.echoed();
    assert_eq!(seen.header("x-consumer-username"), Some("rose"));
    assert_eq!(
        seen.header("x-credential-identifier"),
        None,
        "inline: no credential id"
    );

    let jack = json!({"key": "jack-key"});
    let parts: Vec<&str> = DOC_TOKEN.split('.').collect();
    let unsigned = |alg: &str| {
        format!(
            "{}.{}.",
            b64(&json!({"alg": alg, "typ": "JWT"})),
            b64(&jack)
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", unsigned("none"), "failed to verify jwt"),
        ("alg None", unsigned("None"), "failed to verify jwt"),
        (
            "alg NONE, MAC'd",
            forged(&json!({"alg": "NONE"}), &jack),
            "failed to verify jwt",
        ),
        (
            "alg HS512 for an HS256 credential",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS512),
                &jack,
                &EncodingKey::from_secret(DOC_SECRET.as_bytes()),
            )
            .unwrap(),
            "failed to verify jwt",
        ),
        (
            "RS256 credential, HS256 token MAC'd with its public key",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &json!({"key": "rose-key"}),
                &EncodingKey::from_secret(rsa_public.as_bytes()),
            )
            .unwrap(),
            "failed to verify jwt",
        ),
        (
            "tampered payload",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(&json!({"key": "jack-key", "admin": true})),
                parts[2]
            ),
            "failed to verify jwt",
        ),
        (
            "truncated signature",
            DOC_TOKEN[..DOC_TOKEN.len() - 5].to_string(),
            "failed to verify jwt",
        ),
        (
            "empty signature",
            format!("{}.{}.", parts[0], parts[1]),
            "failed to verify jwt",
        ),
        (
            "non-base64url payload",
            format!("{}.{}*.{}", parts[0], parts[1], parts[2]),
            "JWT token invalid",
        ),
        (
            "two segments",
            format!("{}.{}", parts[0], parts[1]),
            "JWT token invalid",
        ),
        (
            "four segments",
            format!("{DOC_TOKEN}.{}", parts[2]),
            "JWT token invalid",
        ),
        (
            "five segments (JWE)",
            format!("{DOC_TOKEN}.a.b"),
            "JWT token invalid",
        ),
        (
            "non-JSON header",
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode("alg=HS256"),
                parts[1],
                parts[2]
            ),
            "JWT token invalid",
        ),
        (
            "exp in the past",
            hs256(&json!({"key": "jack-key", "exp": now() - 1})),
            "failed to verify jwt",
        ),
        (
            "nbf in the future",
            hs256(&json!({"key": "jack-key", "nbf": now() + 60})),
            "failed to verify jwt",
        ),
        (
            "exp as a string",
            hs256(&json!({"key": "jack-key", "exp": (now() + 3600).to_string()})),
            "failed to verify jwt",
        ),
        (
            "key claim a number",
            hs256(&json!({"key": 1})),
            "Invalid user key in JWT token",
        ),
        (
            "key claim an object",
            hs256(&json!({"key": {"$ne": ""}})),
            "Invalid user key in JWT token",
        ),
        (
            "no key claim",
            hs256(&json!({"sub": "jack"})),
            "missing user key in JWT token",
        ),
        (
            "crit extension",
            forged(
                &json!({"alg": "HS256", "crit": ["b64"], "b64": false}),
                &jack,
            ),
            "failed to verify jwt",
        ),
        (
            "16 KiB token",
            format!("{}.{}.{}", parts[0], "A".repeat(16 * 1024), parts[2]),
            "JWT token invalid",
        ),
    ];
    for (what, token, message) in &cases {
        let reply = with_auth(&stack, "/headers", token).await;
        assert_eq!(reply.status, 401, "{what}: {:?}", reply.body);
        assert_eq!(reply.json(), json!({ "message": message }), "{what}");
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer realm=\"jwt\""),
            "{what}"
        );
        assert!(!reply.reached_upstream(), "{what}");
    }
    // The same tokens in the query string and the cookie.
    for (what, token, message) in &cases[..cases.len() - 1] {
        let reply = stack.get(&format!("/headers?jwt={token}")).await;
        assert_eq!(
            (reply.status, reply.json()),
            (401, json!({ "message": message })),
            "query: {what}"
        );
        let reply = stack
            .send(
                stack
                    .request(Method::GET, "/headers")
                    .header("cookie", format!("jwt={token}")),
            )
            .await;
        assert_eq!(
            (reply.status, reply.json()),
            (401, json!({ "message": message })),
            "cookie: {what}"
        );
    }

    // A 64 KiB token is refused fast and never reaches the upstream (Envoy itself may
    // refuse a header that large before asking portcullis).
    let huge = format!("{}.{}.{}", parts[0], "A".repeat(64 * 1024), parts[2]);
    let started = Instant::now();
    let reply = with_auth(&stack, "/headers", &huge).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(matches!(reply.status, 401 | 431), "{}", reply.status);
    assert!(!reply.reached_upstream());
    // Two Authorization headers are joined by Envoy and refused, never split.
    let reply = stack
        .send(
            stack
                .request(Method::GET, "/headers")
                .header("authorization", DOC_TOKEN)
                .header("authorization", "x"),
        )
        .await;
    assert_eq!(reply.status, 401);
    assert!(!reply.reached_upstream());
}

#[tokio::test]
async fn a_client_sent_identity_never_reaches_the_upstream() {
    let stack = Stack::start(SECURITY_CONFIG).await;
    let spoof = |path: &str, token: Option<&str>| {
        let mut req = stack
            .request(Method::GET, path)
            .header("X-Consumer-Username", "admin")
            .header("X-Credential-Identifier", "root")
            .header("X-Consumer-Custom-Id", "0");
        if let Some(token) = token {
            req = req.header("Authorization", token);
        }
        stack.send(req)
    };
    // Authenticated: ours replaces theirs, one value only.
    let seen = spoof("/headers", Some(DOC_TOKEN)).await.echoed();
    assert_eq!(seen.header_all("x-consumer-username"), ["jack"]);
    assert_eq!(
        seen.header_all("x-credential-identifier"),
        ["cred-jack-jwt-auth"]
    );
    assert!(seen.header_all("x-consumer-custom-id").is_empty());
    // Not authenticated: denied before the upstream.
    let hits = stack.upstream.hits();
    assert_401(
        &spoof("/headers", None).await,
        "Missing JWT token in request",
    );
    assert_eq!(stack.upstream.hits(), hits);
    // A route without auth: the forged identity is removed, nothing replaces it.
    let seen = spoof("/open", None).await.echoed();
    assert!(
        seen.header_all("x-consumer-username").is_empty(),
        "{:?}",
        seen.header_list
    );
    assert!(seen.header_all("x-credential-identifier").is_empty());
    assert!(seen.header_all("x-consumer-custom-id").is_empty());
}

#[tokio::test]
async fn anonymous_consumer_and_its_absence() {
    let stack = Stack::start(
        r#"
routes:
  - { id: anon, uri: /anything, plugins: { jwt-auth: { anonymous_consumer: anonymous } } }
  - { id: ghost, uri: /ghost, plugins: { jwt-auth: { anonymous_consumer: nobody, realm: ghost } } }
consumers:
  - username: anonymous
    labels: { custom_id: anon-1 }
  - username: jack
    credentials:
      - id: cred-jack-jwt-auth
        plugins: { jwt-auth: { key: jack-key, secret: jack-hs256-secret-that-is-very-long } }
"#,
    )
    .await;
    let seen = stack
        .send(
            stack
                .request(Method::GET, "/anything")
                .header("X-Consumer-Username", "admin")
                .header("X-Credential-Identifier", "root"),
        )
        .await
        .echoed();
    assert_eq!(seen.header_all("x-consumer-username"), ["anonymous"]);
    assert!(seen.header_all("x-credential-identifier").is_empty());
    let seen = with_auth(&stack, "/anything", "garbage").await.echoed();
    assert_eq!(seen.header_all("x-consumer-username"), ["anonymous"]);
    let seen = with_auth(&stack, "/anything", DOC_TOKEN).await.echoed();
    assert_eq!(seen.header_all("x-consumer-username"), ["jack"]);

    let reply = stack.get("/ghost").await;
    assert_eq!(reply.status, 401);
    assert_eq!(
        reply.json(),
        json!({"message": "Invalid user authorization"})
    );
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer realm=\"ghost\"")
    );
}

/// The README's "Five minutes with real Envoy", step by step, on the shipped seed.
#[tokio::test]
async fn the_readme_walkthrough_works_on_the_seed_example() {
    let seed = std::fs::read_to_string("examples/portcullis.yaml").expect("read the seed");
    let stack = Stack::start(&seed).await;
    let admin = stack.admin();
    assert_eq!(stack.get("/headers").await.status, 404);
    ok(admin
        .put("routes/r1", json!({"uri": "/headers", "plugins": {}}))
        .await);
    assert!(stack.get("/headers").await.reached_upstream());
    ok(admin.put("consumers", json!({"username": "jack"})).await);
    ok(admin
        .put(
            "consumers/jack/credentials",
            jack_credential(json!({"key": "jack-key", "secret": DOC_SECRET})),
        )
        .await);
    ok(admin
        .patch("routes/r1", json!({"plugins": {"jwt-auth": {}}}))
        .await);
    assert_401(&stack.get("/headers").await, "Missing JWT token in request");
    let seen = with_auth(&stack, "/headers", DOC_TOKEN).await.echoed();
    assert_eq!(seen.header_all("x-consumer-username"), ["jack"]);
}

/// `encode_raw_headers: true` on Envoy's ext_authz filter sends the headers as
/// `header_map` (one entry per header line, values as raw bytes) instead of the
/// default map: the same requests must get the same decisions either way.
#[tokio::test]
async fn raw_header_encoding_gets_the_same_decisions() {
    let raw = |shipped: &str| {
        let edited = shipped.replace(
            "transport_api_version: V3\n",
            "transport_api_version: V3\n                      encode_raw_headers: true\n",
        );
        assert_ne!(
            edited, shipped,
            "envoy.yaml no longer has the line edited here"
        );
        edited
    };
    let default = Stack::start(SECURITY_CONFIG).await;
    let raw = Stack::start_edited(SECURITY_CONFIG, raw).await;
    for (form, stack) in [("headers", &default), ("header_map", &raw)] {
        // The identity a client sends is replaced by the consumer's.
        let seen = stack
            .send(
                stack
                    .request(Method::GET, "/headers")
                    .header("authorization", DOC_TOKEN)
                    .header("x-consumer-username", "admin"),
            )
            .await
            .echoed();
        assert_eq!(seen.header_all("x-consumer-username"), ["jack"], "{form}");
        // Repeated lines are one value joined with `,` (a bad one before a good one is
        // not overruled by the good one), as Envoy's default encoding joins them.
        let reply = stack
            .send(
                stack
                    .request(Method::GET, "/headers")
                    .header("authorization", "x")
                    .header("authorization", DOC_TOKEN),
            )
            .await;
        assert_eq!(reply.status, 401, "{form}");
        assert!(!reply.reached_upstream(), "{form}");
        // A header value that is not UTF-8 does not make the Check unreadable.
        let latin1 = reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap();
        let reply = stack
            .send(
                stack
                    .request(Method::GET, "/headers")
                    .header("authorization", DOC_TOKEN)
                    .header("x-note", latin1),
            )
            .await;
        assert_eq!(reply.status, 200, "{form}");
    }
}
