//! jwt-auth rules, one test per rule, through the real pipeline (route match,
//! plugin order, consumer plugins, identity-header scrub) on an in-memory snapshot.
use std::sync::{Arc, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;
use crate::config::Unmatched;
use crate::decision::{Decision, Deny};
use crate::pipeline;
use crate::plugins::Shared;
use crate::request::Request;
use crate::resources::{ConsumerSpec, CredentialSpec, RouteSpec};
use crate::router::Router;
use crate::snapshot::{self, Consumers, Snapshot};

/// The APISIX docs' token for `jack-key` (HS256, only `nbf`).
pub(crate) const DOC_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJrZXkiOiJqYWNrLWtleSIsIm5iZiI6MTcyOTEzMjI3MX0.UEPXy5jpid624T1XpfjM0PLY73LZPjV3Qt8yZ92kVuU";
pub(crate) const DOC_SECRET: &str = "jack-hs256-secret-that-is-very-long";

const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIAYy5kZKuTEr081roE7Mb8s/fuCEtZV3bFiejRQGpXgN
-----END PRIVATE KEY-----
";
const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAJM6REoyhqWmnwM7WkVL/7uKEhpoDwRO9secke2xVdlw=
-----END PUBLIC KEY-----
";
const P384_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDCK2pE/h0qVL+Xo0mfP
ITdE5par3JBfAg70jF4CrxpKHNgTQYdN8SQqntfE8WFUrdShZANiAARF+bOCw0qG
TpslO+iTtK5K1VDgt79O+awdlXVhoOFqUbugZnnZhTy1QO8n8QKTlU+/GuLra69X
qeaFM0ffh3gERSr2PmGpC/SberZMPT4FOUF76HuXidg0TQbL+SOqf7s=
-----END PRIVATE KEY-----
";
const P384_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAERfmzgsNKhk6bJTvok7SuStVQ4Le/Tvms
HZV1YaDhalG7oGZ52YU8tUDvJ/ECk5VPvxri62uvV6nmhTNH34d4BEUq9j5hqQv0
m3q2TD0+BTlBe+h7l4nYNE0Gy/kjqn+7
-----END PUBLIC KEY-----
";

/// A 2048-bit RSA key pair (private PKCS#1 PEM, public SPKI PEM), made once.
pub(crate) fn rsa_keys() -> &'static (String, String) {
    static KEYS: OnceLock<(String, String)> = OnceLock::new();
    KEYS.get_or_init(|| {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::EncodePublicKey;
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let public = private.to_public_key();
        (
            private
                .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
                .unwrap()
                .to_string(),
            public
                .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
                .unwrap(),
        )
    })
}

/// A P-256 key pair (private PKCS#8 PEM, public SPKI PEM).
fn p256_keys() -> (String, String) {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let signing = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
    let private = signing.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let public = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    (private, public)
}

fn now_secs() -> i64 {
    super::now()
}

pub(crate) fn hs256(claims: &Value, secret: &str) -> String {
    sign(
        Algorithm::HS256,
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

fn sign(alg: Algorithm, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A token with any header, HMAC-signed with `secret` over exactly what is given.
fn raw_hs256(header: &Value, payload: &Value, secret: &str) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let sig = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_secret(secret.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{input}.{sig}")
}

/// An in-memory snapshot built from Admin API shaped JSON, the way the store builds
/// one. Each consumer may carry `credentials: [{id, plugins}]`.
pub(crate) struct World {
    pub snapshot: Snapshot,
    pub shared: Shared,
}

impl World {
    pub(crate) fn new(routes: Value, consumers: Value) -> Self {
        let shared = Shared::default();
        Self::with_shared(routes, consumers, shared)
    }

    pub(crate) fn with_shared(routes: Value, consumers: Value, shared: Shared) -> Self {
        let snapshot = build_snapshot(&routes, &consumers, &shared).unwrap();
        World { snapshot, shared }
    }

    /// Rebuilds the snapshot from new specs, keeping the shared state.
    pub(crate) fn swap(&mut self, routes: Value, consumers: Value) {
        self.snapshot = build_snapshot(&routes, &consumers, &self.shared).unwrap();
    }

    pub(crate) async fn check(&self, path: &str, headers: &[(&str, &str)]) -> Decision {
        let msg = crate::request::tests::check("GET", "example.com", path, headers);
        let req = Request::from_check(&msg).unwrap();
        pipeline::decide(&self.snapshot, &self.shared, &req)
            .await
            .decision
    }
}

pub(crate) fn build_snapshot(
    routes: &Value,
    consumers: &Value,
    shared: &Shared,
) -> Result<Snapshot, String> {
    let cx = BuildContext { shared };
    let mut compiled = Vec::new();
    for r in routes.as_array().unwrap() {
        let spec: RouteSpec = serde_json::from_value(r.clone()).unwrap();
        let id = r["id"].as_str().unwrap();
        compiled.push(Arc::new(
            snapshot::compile_route(id, &spec, &cx).map_err(|e| e.to_string())?,
        ));
    }
    let all = Consumers::default();
    for c in consumers.as_array().unwrap() {
        let mut body = c.clone();
        let creds = body
            .as_object_mut()
            .unwrap()
            .remove("credentials")
            .unwrap_or(json!([]));
        let spec: ConsumerSpec = serde_json::from_value(body).unwrap();
        let done = snapshot::compile_consumer(spec.username.as_str().into(), &spec, &cx)
            .map_err(|e| e.to_string())?;
        for (key, cred) in done.inline_credentials {
            all.insert_credential(key, cred);
        }
        for cred in creds.as_array().unwrap() {
            let cspec: CredentialSpec = serde_json::from_value(cred.clone()).unwrap();
            let id = cred["id"].as_str().unwrap();
            let (key, compiled_cred) =
                snapshot::compile_credential(spec.username.as_str(), id, &cspec, &cx)
                    .map_err(|e| e.to_string())?;
            all.insert_credential(key, compiled_cred);
        }
        all.by_name
            .insert(done.consumer.username.clone(), done.consumer);
    }
    Ok(Snapshot {
        router: Router::new(compiled),
        consumers: Arc::new(all),
        unmatched: Unmatched::Deny,
    })
}

fn jack(jwt: Value) -> Value {
    json!([{
        "username": "jack",
        "labels": {"custom_id": "495aec6a"},
        "credentials": [{"id": "cred-jack-jwt-auth", "plugins": {"jwt-auth": jwt}}]
    }])
}

fn doc_world(route_conf: Value) -> World {
    World::new(
        json!([{"id": "jwt-route", "uri": "/headers", "plugins": {"jwt-auth": route_conf}}]),
        jack(json!({"key": "jack-key", "secret": DOC_SECRET})),
    )
}

#[track_caller]
fn allowed(d: &Decision) -> &crate::decision::Allow {
    match d {
        Decision::Allow(a) => a,
        Decision::Deny(d) => panic!("expected allow, got {} {} ({})", d.status, d.body, d.reason),
    }
}

#[track_caller]
fn denied(d: &Decision) -> &Deny {
    match d {
        Decision::Deny(d) => d,
        Decision::Allow(a) => panic!("expected deny, got allow {a:?}"),
    }
}

fn upstream<'a>(a: &'a crate::decision::Allow, name: &str) -> Option<&'a str> {
    a.upstream_set
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A 401 with APISIX's message and the realm challenge.
#[track_caller]
fn assert_401(d: &Decision, message: &str) {
    let deny = denied(d);
    assert_eq!(deny.status, 401, "{}", deny.reason);
    assert_eq!(
        serde_json::from_str::<Value>(&deny.body).unwrap(),
        json!({ "message": message }),
        "reason: {}",
        deny.reason
    );
    assert!(
        deny.headers
            .iter()
            .any(|(n, v)| n == "www-authenticate" && v == "Bearer realm=\"jwt\""),
        "{:?}",
        deny.headers
    );
}

async fn auth(world: &World, token: &str) -> Decision {
    world.check("/headers", &[("authorization", token)]).await
}

// ---- the docs' walkthrough ------------------------------------------------------

#[tokio::test]
async fn the_docs_token_authenticates_jack() {
    let w = doc_world(json!({}));
    let d = auth(&w, DOC_TOKEN).await;
    let a = allowed(&d);
    assert_eq!(upstream(a, "x-consumer-username"), Some("jack"));
    assert_eq!(
        upstream(a, "x-credential-identifier"),
        Some("cred-jack-jwt-auth")
    );
    assert_eq!(upstream(a, "x-consumer-custom-id"), Some("495aec6a"));
    assert!(a.metadata.is_empty(), "store_in_ctx is off by default");
}

#[tokio::test]
async fn the_docs_invalid_token_fails_verification() {
    let w = doc_world(json!({}));
    let bad = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJleHAiOjE3MjY2NDk2NDAsImtleSI6ImphY2sta2V5In0.kdhumNWrZFxjU_random_random";
    assert_401(&auth(&w, bad).await, "failed to verify jwt");
}

#[tokio::test]
async fn bearer_prefix_is_dropped_in_either_case_only() {
    let w = doc_world(json!({}));
    allowed(&auth(&w, &format!("Bearer {DOC_TOKEN}")).await);
    allowed(&auth(&w, &format!("bearer {DOC_TOKEN}")).await);
    assert_401(
        &auth(&w, &format!("BEARER {DOC_TOKEN}")).await,
        "JWT token invalid",
    );
}

#[tokio::test]
async fn token_is_looked_up_in_header_then_query_then_cookie() {
    let w = doc_world(
        json!({"header": "jwt-auth-header", "query": "jwt-query", "cookie": "jwt-cookie"}),
    );
    allowed(&w.check("/headers", &[("jwt-auth-header", DOC_TOKEN)]).await);
    allowed(
        &w.check(&format!("/headers?jwt-query={DOC_TOKEN}"), &[])
            .await,
    );
    let cookie = format!("a=1; jwt-cookie={DOC_TOKEN}");
    allowed(&w.check("/headers", &[("cookie", &cookie)]).await);
    // The header wins even when it is wrong: no fallback to the valid query.
    let d = w
        .check(
            &format!("/headers?jwt-query={DOC_TOKEN}"),
            &[("jwt-auth-header", "x.y.z")],
        )
        .await;
    assert_401(&d, "JWT token invalid");
    // The default `authorization` header is not read when another is configured.
    assert_401(
        &w.check("/headers", &[("authorization", DOC_TOKEN)]).await,
        "Missing JWT token in request",
    );
}

#[tokio::test]
async fn a_repeated_query_parameter_is_not_a_token() {
    let w = doc_world(json!({}));
    let d = w
        .check(&format!("/headers?jwt={DOC_TOKEN}&jwt={DOC_TOKEN}"), &[])
        .await;
    assert_401(&d, "JWT token invalid");
}

// ---- failure messages -------------------------------------------------------------

#[tokio::test]
async fn apisix_messages_for_each_failure() {
    let w = doc_world(json!({}));
    assert_401(
        &w.check("/headers", &[]).await,
        "Missing JWT token in request",
    );
    assert_401(&auth(&w, "not-a-jwt").await, "JWT token invalid");
    let no_key = hs256(&json!({"sub": "x"}), DOC_SECRET);
    assert_401(&auth(&w, &no_key).await, "missing user key in JWT token");
    let unknown = hs256(&json!({"key": "rose-key"}), DOC_SECRET);
    assert_401(&auth(&w, &unknown).await, "Invalid user key in JWT token");
    let numeric = hs256(&json!({"key": 42}), DOC_SECRET);
    assert_401(&auth(&w, &numeric).await, "Invalid user key in JWT token");
    let listed = hs256(&json!({"key": ["jack-key"]}), DOC_SECRET);
    assert_401(&auth(&w, &listed).await, "Invalid user key in JWT token");
    let wrong_secret = hs256(&json!({"key": "jack-key"}), "another-secret-of-some-length");
    assert_401(&auth(&w, &wrong_secret).await, "failed to verify jwt");
}

#[tokio::test]
async fn the_detailed_reason_stays_in_the_log() {
    let w = doc_world(json!({}));
    let wrong_secret = hs256(&json!({"key": "jack-key"}), "another-secret-of-some-length");
    let d = auth(&w, &wrong_secret).await;
    let deny = denied(&d);
    assert!(
        deny.reason.contains("signature mismatch"),
        "{}",
        deny.reason
    );
    assert!(!deny.body.contains("signature"));
}

#[tokio::test]
async fn custom_key_claim_and_realm() {
    let w = doc_world(json!({"key_claim_name": "iss", "realm": "api"}));
    let t = hs256(&json!({"iss": "jack-key"}), DOC_SECRET);
    allowed(&auth(&w, &t).await);
    let d = auth(&w, DOC_TOKEN).await;
    let deny = denied(&d);
    assert_eq!(deny.body, r#"{"message":"missing user key in JWT token"}"#);
    assert!(
        deny.headers
            .contains(&("www-authenticate".into(), "Bearer realm=\"api\"".into()))
    );
}

// ---- security cases ------------------------------------------------------------------

#[tokio::test]
async fn alg_none_in_any_case_is_refused() {
    let w = doc_world(json!({}));
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({"alg": alg, "typ": "JWT"});
        let body = json!({"key": "jack-key"});
        for token in [
            format!("{}.{}.", b64(&header), b64(&body)),
            raw_hs256(&header, &body, DOC_SECRET),
        ] {
            assert_401(&auth(&w, &token).await, "failed to verify jwt");
        }
    }
}

#[tokio::test]
async fn token_alg_must_equal_the_credential_alg() {
    let w = doc_world(json!({}));
    let t = sign(
        Algorithm::HS384,
        &json!({"key": "jack-key"}),
        &EncodingKey::from_secret(DOC_SECRET.as_bytes()),
    );
    assert_401(&auth(&w, &t).await, "failed to verify jwt");
    // A header without alg, or with a non-string alg.
    for header in [json!({"typ": "JWT"}), json!({"alg": ["HS256"]})] {
        let t = raw_hs256(&header, &json!({"key": "jack-key"}), DOC_SECRET);
        assert_401(&auth(&w, &t).await, "failed to verify jwt");
    }
}

#[tokio::test]
async fn rs256_credential_refuses_hs256_signed_with_its_public_key() {
    let (_, public) = rsa_keys();
    let w2 = World::new(
        json!([{"id": "jwt-route", "uri": "/headers", "plugins": {"jwt-auth": {}}}]),
        jack(json!({"key": "jack-key", "algorithm": "RS256", "public_key": public})),
    );
    let confused = hs256(&json!({"key": "jack-key"}), public);
    assert_401(&auth(&w2, &confused).await, "failed to verify jwt");
    let header = json!({"alg": "RS256", "typ": "JWT"});
    let input = format!("{}.{}", b64(&header), b64(&json!({"key": "jack-key"})));
    let mac = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_secret(public.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    assert_401(
        &auth(&w2, &format!("{input}.{mac}")).await,
        "failed to verify jwt",
    );
}

#[tokio::test]
async fn tampered_truncated_or_missing_signatures_fail() {
    let w = doc_world(json!({}));
    let (head, rest) = DOC_TOKEN.split_once('.').unwrap();
    let sig = rest.split_once('.').unwrap().1;
    let tampered = format!(
        "{head}.{}.{sig}",
        b64(&json!({"key": "jack-key", "nbf": 1729132271, "admin": true}))
    );
    assert_401(&auth(&w, &tampered).await, "failed to verify jwt");
    let truncated = &DOC_TOKEN[..DOC_TOKEN.len() - 4];
    assert_401(&auth(&w, truncated).await, "failed to verify jwt");
    let empty = &DOC_TOKEN[..DOC_TOKEN.len() - sig.len()];
    assert_401(&auth(&w, empty).await, "failed to verify jwt");
    let not_b64 = format!("{}!!", &DOC_TOKEN[..DOC_TOKEN.len() - 2]);
    assert_401(&auth(&w, &not_b64).await, "failed to verify jwt");
}

#[tokio::test]
async fn malformed_tokens_are_invalid() {
    let w = doc_world(json!({}));
    let parts: Vec<&str> = DOC_TOKEN.split('.').collect();
    let cases = [
        format!("{}.{}", parts[0], parts[1]),
        format!("{DOC_TOKEN}.{}", parts[2]),
        format!("{DOC_TOKEN}.a.b"),
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}+.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}", b64(&json!("header")), parts[1], parts[2]),
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode("{not json"),
            parts[1],
            parts[2]
        ),
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
            parts[1],
            parts[2]
        ),
        format!("{}.{}.{}", parts[0], b64(&json!(["key"])), parts[2]),
        "..".to_string(),
        String::new(),
    ];
    for token in cases {
        assert_401(&auth(&w, &token).await, "JWT token invalid");
    }
}

#[tokio::test]
async fn an_oversized_token_is_refused_before_decoding() {
    let w = doc_world(json!({}));
    let huge = format!(
        "{}.{}.{}",
        "a".repeat(32 * 1024),
        "b".repeat(32 * 1024),
        "c"
    );
    let started = std::time::Instant::now();
    let d = auth(&w, &huge).await;
    assert!(started.elapsed() < std::time::Duration::from_millis(50));
    assert_401(&d, "JWT token invalid");
    assert!(denied(&d).reason.contains("exceeds"));
    assert!(
        Token::parse(&huge, "key", false)
            .unwrap_err()
            .contains("8192")
    );
}

#[tokio::test]
async fn a_critical_extension_is_refused() {
    let w = doc_world(json!({}));
    let header = json!({"alg": "HS256", "crit": ["exp-v2"], "exp-v2": 1});
    let t = raw_hs256(&header, &json!({"key": "jack-key"}), DOC_SECRET);
    assert_401(&auth(&w, &t).await, "failed to verify jwt");
}

#[tokio::test]
async fn keys_in_the_token_header_are_never_used() {
    let (_, public) = rsa_keys();
    let w = World::new(
        json!([{"id": "r", "uri": "/headers", "plugins": {"jwt-auth": {}}}]),
        jack(json!({"key": "jack-key", "algorithm": "ES256", "public_key": p256_keys().1})),
    );
    // Signed with another P-256 key that the header offers as jwk / x5u / jku.
    let attacker = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
    use p256::pkcs8::EncodePrivateKey;
    let pem = attacker.to_pkcs8_pem(p256::pkcs8::LineEnding::LF).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.jku = Some("http://127.0.0.1:1/jwks".into());
    header.x5u = Some("http://127.0.0.1:1/cert".into());
    header.x5c = Some(vec![public.clone()]);
    let t = jsonwebtoken::encode(
        &header,
        &json!({"key": "jack-key"}),
        &EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_401(&auth(&w, &t).await, "failed to verify jwt");
}

#[tokio::test]
async fn es256_psychic_signature_is_refused() {
    let w = World::new(
        json!([{"id": "r", "uri": "/headers", "plugins": {"jwt-auth": {}}}]),
        jack(json!({"key": "jack-key", "algorithm": "ES256", "public_key": p256_keys().1})),
    );
    let header = json!({"alg": "ES256", "typ": "JWT"});
    let input = format!("{}.{}", b64(&header), b64(&json!({"key": "jack-key"})));
    for sig in [
        vec![0u8; 64],
        vec![0u8; 63],
        vec![0u8; 65],
        vec![0xffu8; 64],
    ] {
        let t = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&sig));
        assert_401(&auth(&w, &t).await, "failed to verify jwt");
    }
}

#[tokio::test]
async fn claims_follow_apisix_rules() {
    let w = doc_world(json!({}));
    let now = now_secs();
    let ok = |v: Value| hs256(&v, DOC_SECRET);
    // Neither claim, or only nbf in the past (the docs' token): accepted.
    allowed(&auth(&w, &ok(json!({"key": "jack-key"}))).await);
    allowed(&auth(&w, &ok(json!({"key": "jack-key", "exp": now + 60}))).await);
    for bad in [
        json!({"key": "jack-key", "exp": now - 1}),
        json!({"key": "jack-key", "exp": now - 3600}),
        json!({"key": "jack-key", "nbf": now + 3600}),
        json!({"key": "jack-key", "exp": (now + 60).to_string()}),
        json!({"key": "jack-key", "nbf": "0"}),
        json!({"key": "jack-key", "exp": null}),
    ] {
        assert_401(&auth(&w, &ok(bad)).await, "failed to verify jwt");
    }
}

#[test]
fn claim_boundaries_are_strict_and_grace_applies() {
    let p = |v: Value| token::Claims::from_map(v.as_object().unwrap().clone(), "key");
    let rule = ClaimRule::WhenPresent;
    let now = 1_000_000;
    assert!(token::check_claims(&p(json!({"exp": now})), &rule, 0, now).is_err());
    assert!(token::check_claims(&p(json!({"exp": now + 1})), &rule, 0, now).is_ok());
    assert!(token::check_claims(&p(json!({"exp": now as f64 + 0.5})), &rule, 0, now).is_ok());
    assert!(token::check_claims(&p(json!({"nbf": now})), &rule, 0, now).is_err());
    assert!(token::check_claims(&p(json!({"nbf": now - 1})), &rule, 0, now).is_ok());
    // lifetime_grace_period widens both, still strictly.
    assert!(token::check_claims(&p(json!({"exp": now - 9})), &rule, 10, now).is_ok());
    assert!(token::check_claims(&p(json!({"exp": now - 10})), &rule, 10, now).is_err());
    assert!(token::check_claims(&p(json!({"nbf": now + 9})), &rule, 10, now).is_ok());
    assert!(token::check_claims(&p(json!({"nbf": now + 10})), &rule, 10, now).is_err());
    // No 60 s default leeway.
    assert!(token::check_claims(&p(json!({"exp": now - 30})), &rule, 0, now).is_err());
}

#[test]
fn listed_claims_are_required_and_only_they_are_checked() {
    let p = |v: Value| token::Claims::from_map(v.as_object().unwrap().clone(), "key");
    let now = 1_000_000;
    let exp_only = ClaimRule::Required(vec![Claim::Exp]);
    let err = token::check_claims(&p(json!({})), &exp_only, 0, now).unwrap_err();
    assert_eq!(err, "claim exp is missing");
    assert!(
        token::check_claims(
            &p(json!({"exp": now + 5, "nbf": now + 50})),
            &exp_only,
            0,
            now
        )
        .is_ok()
    );
    let both = ClaimRule::Required(vec![Claim::Exp, Claim::Nbf]);
    assert!(token::check_claims(&p(json!({"exp": now + 5})), &both, 0, now).is_err());
}

#[tokio::test]
async fn claims_to_verify_requires_the_claim() {
    let w = doc_world(json!({"claims_to_verify": ["exp"]}));
    assert_401(&auth(&w, DOC_TOKEN).await, "failed to verify jwt");
    let t = hs256(
        &json!({"key": "jack-key", "exp": now_secs() + 60}),
        DOC_SECRET,
    );
    allowed(&auth(&w, &t).await);
    // An empty list is the same as none.
    let w = doc_world(json!({"claims_to_verify": []}));
    allowed(&auth(&w, DOC_TOKEN).await);
}

#[tokio::test]
async fn grace_period_comes_from_the_credential() {
    let w = World::new(
        json!([{"id": "r", "uri": "/headers", "plugins": {"jwt-auth": {}}}]),
        jack(json!({"key": "jack-key", "secret": DOC_SECRET, "lifetime_grace_period": 120})),
    );
    let t = hs256(
        &json!({"key": "jack-key", "exp": now_secs() - 60}),
        DOC_SECRET,
    );
    allowed(&auth(&w, &t).await);
    let t = hs256(
        &json!({"key": "jack-key", "exp": now_secs() - 600}),
        DOC_SECRET,
    );
    assert_401(&auth(&w, &t).await, "failed to verify jwt");
}

// ---- algorithms ------------------------------------------------------------------

async fn roundtrip(alg: Algorithm, cred: Value, key: EncodingKey) {
    let w = World::new(
        json!([{"id": "r", "uri": "/headers", "plugins": {"jwt-auth": {}}}]),
        jack(cred),
    );
    let t = sign(
        alg,
        &json!({"key": "jack-key", "exp": now_secs() + 60}),
        &key,
    );
    let d = auth(&w, &t).await;
    assert_eq!(
        upstream(allowed(&d), "x-consumer-username"),
        Some("jack"),
        "{alg:?}"
    );
}

#[tokio::test]
async fn every_supported_algorithm_verifies() {
    let (rsa_private, rsa_public) = rsa_keys();
    let rsa = || EncodingKey::from_rsa_pem(rsa_private.as_bytes()).unwrap();
    for (name, alg) in [
        ("RS256", Algorithm::RS256),
        ("RS384", Algorithm::RS384),
        ("RS512", Algorithm::RS512),
        ("PS256", Algorithm::PS256),
        ("PS384", Algorithm::PS384),
        ("PS512", Algorithm::PS512),
    ] {
        roundtrip(
            alg,
            json!({"key": "jack-key", "algorithm": name, "public_key": rsa_public}),
            rsa(),
        )
        .await;
    }
    let (ec_private, ec_public) = p256_keys();
    roundtrip(
        Algorithm::ES256,
        json!({"key": "jack-key", "algorithm": "ES256", "public_key": ec_public}),
        EncodingKey::from_ec_pem(ec_private.as_bytes()).unwrap(),
    )
    .await;
    roundtrip(
        Algorithm::ES384,
        json!({"key": "jack-key", "algorithm": "ES384", "public_key": P384_PUBLIC}),
        EncodingKey::from_ec_pem(P384_PRIVATE.as_bytes()).unwrap(),
    )
    .await;
    roundtrip(
        Algorithm::EdDSA,
        json!({"key": "jack-key", "algorithm": "EdDSA", "public_key": ED_PUBLIC}),
        EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap(),
    )
    .await;
    for (name, alg) in [("HS384", Algorithm::HS384), ("HS512", Algorithm::HS512)] {
        roundtrip(
            alg,
            json!({"key": "jack-key", "algorithm": name, "secret": DOC_SECRET}),
            EncodingKey::from_secret(DOC_SECRET.as_bytes()),
        )
        .await;
    }
    // base64_secret: the key is the decoded bytes.
    roundtrip(
        Algorithm::HS256,
        json!({"key": "jack-key", "secret": "c2VjcmV0LWJ5dGVz", "base64_secret": true}),
        EncodingKey::from_secret(b"secret-bytes"),
    )
    .await;
}

// ---- configuration ------------------------------------------------------------------

fn cred_err(conf: Value) -> String {
    Credential::compile(&conf).unwrap_err()
}

#[test]
fn credential_defaults_and_checks() {
    let (key, c) = Credential::compile(&json!({"key": "k", "secret": "s"})).unwrap();
    assert_eq!(
        (
            key.as_str(),
            c.algorithm_name().unwrap(),
            c.exp,
            c.lifetime_grace_period
        ),
        ("k", "HS256", 86400, 0)
    );
    assert!(cred_err(json!({"secret": "s"})).contains("key"));
    assert!(cred_err(json!({"key": "", "secret": "s"})).contains("key"));
    assert_eq!(
        cred_err(json!({"key": "k"})),
        "property \"secret\" is required when using HS based algorithms"
    );
    assert!(cred_err(json!({"key": "k", "secret": ""})).contains("too short"));
    assert_eq!(
        cred_err(json!({"key": "k", "secret": "%%%", "base64_secret": true})),
        "base64_secret required but the secret is not in base64 format"
    );
    Credential::compile(&json!({"key": "k", "secret": "==", "base64_secret": true})).unwrap_err();
    assert!(cred_err(json!({"key": "k", "secret": "s", "exp": 0})).contains("exp"));
    assert!(
        cred_err(json!({"key": "k", "secret": "s", "lifetime_grace_period": -1}))
            .contains("lifetime")
    );
    assert!(cred_err(json!({"key": "k", "secret": "s", "algorithm": "HS1024"})).contains("enum"));
    assert!(cred_err(json!({"key": "k", "secret": "s", "nickname": "x"})).contains("nickname"));
    // Written for APISIX < 3.9: accepted, never used.
    Credential::compile(&json!({"key": "k", "secret": "s", "private_key": "x"})).unwrap();
}

#[test]
fn asymmetric_credentials_need_a_matching_public_key() {
    let (_, rsa_public) = rsa_keys();
    assert_eq!(
        cred_err(json!({"key": "k", "algorithm": "RS256"})),
        "missing valid public key"
    );
    assert!(
        cred_err(json!({"key": "k", "algorithm": "RS256", "public_key": "garbage"}))
            .contains("invalid public_key")
    );
    // An EC key for an RSA algorithm and the reverse, a P-384 key for ES256.
    assert!(
        cred_err(json!({"key": "k", "algorithm": "RS256", "public_key": p256_keys().1}))
            .contains("invalid")
    );
    assert!(
        cred_err(json!({"key": "k", "algorithm": "ES256", "public_key": rsa_public}))
            .contains("invalid")
    );
    assert!(
        cred_err(json!({"key": "k", "algorithm": "ES256", "public_key": P384_PUBLIC}))
            .contains("invalid")
    );
    assert!(
        cred_err(json!({"key": "k", "algorithm": "EdDSA", "public_key": P384_PUBLIC}))
            .contains("invalid")
    );
    assert!(
        cred_err(json!({"key": "k", "algorithm": "ES512", "public_key": P384_PUBLIC}))
            .contains("expected a P-521 key")
    );
    // A secret is not a substitute for the public key.
    assert_eq!(
        cred_err(json!({"key": "k", "algorithm": "RS256", "secret": "s"})),
        "missing valid public key"
    );
}

fn route_err(conf: Value) -> String {
    let shared = Shared::default();
    Plugin::compile(&conf, &BuildContext { shared: &shared }).unwrap_err()
}

#[test]
fn route_config_is_checked() {
    let shared = Shared::default();
    let p = Plugin::compile(&json!({}), &BuildContext { shared: &shared }).unwrap();
    assert_eq!(
        (p.header.as_str(), p.query.as_str(), p.cookie.as_str()),
        ("authorization", "jwt", "jwt")
    );
    assert_eq!(p.www_authenticate, "Bearer realm=\"jwt\"");
    assert_eq!(p.claims, ClaimRule::WhenPresent);
    assert!(route_err(json!({"realm": "a\"b"})).contains("realm"));
    assert!(route_err(json!({"realm": ""})).contains("realm"));
    assert!(route_err(json!({"realm": "x".repeat(129)})).contains("realm"));
    assert!(route_err(json!({"claims_to_verify": ["exp", "exp"]})).contains("unique"));
    assert!(route_err(json!({"claims_to_verify": ["iat"]})).contains("iat"));
    assert!(route_err(json!({"key_claim_name": ""})).contains("key_claim_name"));
    assert!(route_err(json!({"anonymous_consumer": ""})).contains("anonymous_consumer"));
    assert!(route_err(json!({"header": "bad header"})).contains("header"));
    assert!(route_err(json!({"hide_credential": true})).contains("hide_credential"));
}

// ---- what the upstream sees -------------------------------------------------------------

#[tokio::test]
async fn hide_credentials_removes_the_header() {
    let w = doc_world(json!({"hide_credentials": true}));
    let d = auth(&w, DOC_TOKEN).await;
    assert!(
        allowed(&d)
            .upstream_remove
            .contains(&"authorization".to_string())
    );
    let w = doc_world(json!({}));
    let d = auth(&w, DOC_TOKEN).await;
    assert!(
        !allowed(&d)
            .upstream_remove
            .contains(&"authorization".to_string())
    );
}

#[tokio::test]
async fn hide_credentials_removes_the_query_parameter() {
    let w = doc_world(json!({"hide_credentials": true}));
    let d = w.check(&format!("/headers?a=1&jwt={DOC_TOKEN}"), &[]).await;
    assert_eq!(allowed(&d).query_remove, vec!["jwt".to_string()]);
}

#[tokio::test]
async fn hide_credentials_removes_only_that_cookie() {
    let w = doc_world(json!({"hide_credentials": true}));
    let cookie = format!("a=1; jwt={DOC_TOKEN}; b=2");
    let d = w.check("/headers", &[("cookie", &cookie)]).await;
    assert_eq!(upstream(allowed(&d), "cookie"), Some("a=1; b=2"));
    let cookie = format!("jwt={DOC_TOKEN}");
    let d = w.check("/headers", &[("cookie", &cookie)]).await;
    let a = allowed(&d);
    assert!(a.upstream_remove.contains(&"cookie".to_string()));
    assert_eq!(upstream(a, "cookie"), None);
}

#[tokio::test]
async fn store_in_ctx_exposes_the_claims_as_metadata() {
    let w = doc_world(json!({"store_in_ctx": true}));
    let d = auth(&w, DOC_TOKEN).await;
    assert_eq!(
        allowed(&d).metadata,
        vec![("jwt-auth", json!({"key": "jack-key", "nbf": 1729132271}))]
    );
}

#[tokio::test]
async fn a_client_can_never_claim_an_identity() {
    let w = doc_world(json!({}));
    let d = w
        .check(
            "/headers",
            &[
                ("authorization", DOC_TOKEN),
                ("x-consumer-username", "admin"),
                ("x-credential-identifier", "root"),
                ("x-consumer-custom-id", "0"),
            ],
        )
        .await;
    let a = allowed(&d);
    assert_eq!(upstream(a, "x-consumer-username"), Some("jack"));
    assert_eq!(upstream(a, "x-consumer-custom-id"), Some("495aec6a"));
    assert_eq!(
        upstream(a, "x-credential-identifier"),
        Some("cred-jack-jwt-auth")
    );
}

// ---- anonymous consumer ------------------------------------------------------------------

fn anonymous_world(anonymous_exists: bool) -> World {
    let mut consumers = jack(json!({"key": "jack-key", "secret": DOC_SECRET}));
    if anonymous_exists {
        consumers
            .as_array_mut()
            .unwrap()
            .push(json!({"username": "anonymous"}));
    }
    World::new(
        json!([{"id": "r", "uri": "/anything", "plugins": {"jwt-auth": {"anonymous_consumer": "anonymous"}}}]),
        consumers,
    )
}

#[tokio::test]
async fn failed_authentication_continues_as_the_anonymous_consumer() {
    let w = anonymous_world(true);
    for headers in [
        vec![],
        vec![("authorization", "garbage")],
        vec![
            ("authorization", "Bearer a.b.c"),
            ("x-consumer-username", "admin"),
            ("x-credential-identifier", "admin-cred"),
        ],
    ] {
        let d = w.check("/anything", &headers).await;
        let a = allowed(&d);
        assert_eq!(upstream(a, "x-consumer-username"), Some("anonymous"));
        assert_eq!(upstream(a, "x-credential-identifier"), None);
        // The anonymous consumer has no credential: a client's copy is removed, and
        // Envoy is asked to remove nothing the client did not send.
        let sent = headers.iter().any(|(n, _)| *n == "x-credential-identifier");
        assert_eq!(
            a.upstream_remove
                .contains(&"x-credential-identifier".to_string()),
            sent,
            "{headers:?}"
        );
    }
    // A valid token still authenticates as its consumer.
    let d = w.check("/anything", &[("authorization", DOC_TOKEN)]).await;
    assert_eq!(upstream(allowed(&d), "x-consumer-username"), Some("jack"));
}

#[tokio::test]
async fn a_missing_anonymous_consumer_is_invalid_user_authorization() {
    let w = anonymous_world(false);
    let d = w.check("/anything", &[]).await;
    assert_401(&d, "Invalid user authorization");
    assert!(denied(&d).reason.contains("anonymous"));
}

#[test]
fn es512_verifies_with_p521_and_refuses_forged_signatures() {
    use base64::Engine as _;
    use p521::ecdsa::signature::Signer as _;
    use p521::pkcs8::EncodePublicKey as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signing = p521::ecdsa::SigningKey::random(&mut p521::elliptic_curve::rand_core::OsRng);
    let public = p521::PublicKey::from_sec1_bytes(
        &p521::ecdsa::VerifyingKey::from(&signing)
            .to_encoded_point(false)
            .to_bytes(),
    )
    .unwrap()
    .to_public_key_pem(Default::default())
    .unwrap();
    let (_, cred) =
        Credential::compile(&json!({"key": "k", "algorithm": "ES512", "public_key": public}))
            .expect("a P-521 key compiles");
    let input = format!(
        "{}.{}",
        b64.encode(r#"{"alg":"ES512"}"#),
        b64.encode(r#"{"key":"k"}"#)
    );
    let sig: p521::ecdsa::Signature = signing.sign(input.as_bytes());
    let sig = b64.encode(sig.to_bytes());
    assert_eq!(cred.key.verify(&sig, input.as_bytes()), Ok(true));
    assert_eq!(cred.key.verify(&sig, b"tampered.input"), Ok(false));
    // The psychic signature: r = s = 0.
    assert!(
        cred.key
            .verify(&b64.encode([0u8; 132]), input.as_bytes())
            .is_err()
    );
    assert!(
        cred.key
            .verify(&b64.encode([1u8; 64]), input.as_bytes())
            .is_err()
    );
}

fn p256_pair(seed: u8) -> (EncodingKey, String) {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let signing = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap();
    let private = signing.to_pkcs8_pem(LineEnding::LF).unwrap();
    let public = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    (
        EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
        public,
    )
}

#[tokio::test]
async fn a_verified_token_is_verified_again_after_the_key_rotates() {
    let route = json!([{"id": "jwt-route", "uri": "/headers", "plugins": {"jwt-auth": {}}}]);
    let (old_private, old_public) = p256_pair(7);
    let (_, new_public) = p256_pair(9);
    let mut w = World::new(
        route.clone(),
        jack(json!({"key": "jack-key", "algorithm": "ES256", "public_key": old_public})),
    );
    let token = sign(Algorithm::ES256, &json!({"key": "jack-key"}), &old_private);
    allowed(&auth(&w, &token).await);
    // Served from the verified-token cache this time.
    allowed(&auth(&w, &token).await);
    // Rotate only the credential, keeping the route (and its cache), as an Admin
    // API credential write does.
    let rotated = build_snapshot(
        &route,
        &jack(json!({"key": "jack-key", "algorithm": "ES256", "public_key": new_public})),
        &w.shared,
    )
    .unwrap();
    // A Check still running on the old snapshot keeps the old key alive.
    let in_flight = std::mem::replace(&mut w.snapshot.consumers, rotated.consumers);
    assert_401(&auth(&w, &token).await, "failed to verify jwt");
    drop(in_flight);
    assert_401(&auth(&w, &token).await, "failed to verify jwt");
}

#[test]
fn an_already_verified_signature_still_has_its_claims_checked() {
    let (private, public) = p256_pair(7);
    let (_, cred) =
        Credential::compile(&json!({"key": "k", "algorithm": "ES256", "public_key": public}))
            .unwrap();
    let raw = sign(
        Algorithm::ES256,
        &json!({"key": "k", "exp": 1_000, "nbf": 10}),
        &private,
    );
    let token = Token::parse(&raw, "key", false).unwrap();
    let rule = ClaimRule::WhenPresent;
    assert!(token::verify(&token, &cred, &rule, 500, Signature::AlreadyVerified).is_ok());
    assert!(token::verify(&token, &cred, &rule, 1_000, Signature::AlreadyVerified).is_err());
    assert!(token::verify(&token, &cred, &rule, 5, Signature::AlreadyVerified).is_err());
    // The algorithm is checked whatever the cache says.
    let hs = hs256(&json!({"key": "k"}), "secret");
    let hs = Token::parse(&hs, "key", false).unwrap();
    assert!(token::verify(&hs, &cred, &rule, 500, Signature::AlreadyVerified).is_err());
}
