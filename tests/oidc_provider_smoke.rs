//! The test OpenID Provider itself works as the openid-connect tests rely on: discovery, JWKS,
//! JWT and opaque access tokens, introspection, the whole authorization-code login scripted
//! without a browser, refresh, RP-initiated logout and key rotation. When this suite fails,
//! the plugin's end-to-end failures are about the OP, not about portcullis.

#[path = "common/oidc_provider.rs"]
mod oidc_provider;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use oidc_provider::{
    ClientSettings, OidcProvider, ProviderSettings, ResourceSettings, TokenFormat, browser,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const JWT_API: &str = "https://api.test/jwt";
const ES_API: &str = "https://api.test/es256";
const OPAQUE_API: &str = "https://api.test/opaque";
const CALLBACK: &str = "http://127.0.0.1:9/app/callback";
const LOGGED_OUT: &str = "http://127.0.0.1:9/app/logged-out";

fn app() -> ClientSettings {
    ClientSettings::confidential("app", "app-secret-0123456789abcdef")
        .redirect_uri(CALLBACK)
        .post_logout_redirect_uri(LOGGED_OUT)
}

fn service() -> ClientSettings {
    ClientSettings::confidential("svc", "svc-secret-0123456789abcdef")
        .grant_types(&["client_credentials"])
}

fn settings() -> ProviderSettings {
    ProviderSettings::default()
        .client(app())
        .client(service())
        .resource(
            JWT_API,
            ResourceSettings::new(TokenFormat::Jwt, "read write").audience("svc"),
        )
        .resource(
            ES_API,
            ResourceSettings::new(TokenFormat::Jwt, "read").alg("ES256"),
        )
        .resource(
            OPAQUE_API,
            ResourceSettings::new(TokenFormat::Opaque, "read"),
        )
        .account("alice", json!({ "department": "engineering" }))
}

/// Verifies `token` against the OP's JWKS as a relying party would.
async fn verify(op: &OidcProvider, token: &str, alg: Algorithm, audience: &str) -> Value {
    let jwks: JwkSet = serde_json::from_value(op.jwks().await).expect("JWKS parses");
    let header = jsonwebtoken::decode_header(token).expect("JWT header");
    let kid = header.kid.expect("kid in the header");
    let jwk = jwks
        .find(&kid)
        .unwrap_or_else(|| panic!("kid {kid} in the JWKS"));
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[&op.issuer]);
    validation.set_audience(&[audience]);
    let key = DecodingKey::from_jwk(jwk).expect("decoding key from JWK");
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .expect("token verifies with the OP's JWKS")
        .claims
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("JWT header")
        .kid
        .expect("kid")
}

fn query_param(url: &str, name: &str) -> Option<String> {
    url::Url::parse(url)
        .expect("URL")
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[tokio::test]
async fn discovery_and_jwks_describe_the_provider() {
    let op = OidcProvider::start(&settings());
    assert!(op.issuer.starts_with("http://127.0.0.1:"));
    assert_eq!(op.issuer, format!("http://127.0.0.1:{}", op.port));

    let discovery = op.discovery().await;
    assert_eq!(discovery["issuer"], op.issuer.as_str());
    for endpoint in [
        "authorization_endpoint",
        "token_endpoint",
        "userinfo_endpoint",
        "jwks_uri",
        "introspection_endpoint",
        "end_session_endpoint",
    ] {
        let url = discovery[endpoint].as_str().unwrap_or_default();
        assert!(url.starts_with(&op.issuer), "{endpoint}: {url}");
    }

    let jwks = op.jwks().await;
    let algs: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["alg"].as_str().expect("alg"))
        .collect();
    assert_eq!(algs, ["RS256", "ES256"]);
    assert!(
        jwks["keys"][0].get("d").is_none(),
        "private parts are not published"
    );
}

#[tokio::test]
async fn client_credentials_mint_jwt_and_opaque_tokens() {
    let op = OidcProvider::start(&settings());

    let jwt = op
        .client_credentials_token(&service(), Some(JWT_API), "read")
        .await;
    let claims = verify(&op, &jwt, Algorithm::RS256, "svc").await;
    assert_eq!(claims["scope"], "read");
    assert_eq!(claims["client_id"], "svc");

    let es = op
        .client_credentials_token(&service(), Some(ES_API), "read")
        .await;
    let claims = verify(&op, &es, Algorithm::ES256, ES_API).await;
    assert_eq!(claims["aud"], ES_API);

    let opaque = op
        .client_credentials_token(&service(), Some(OPAQUE_API), "read")
        .await;
    assert_eq!(opaque.split('.').count(), 1, "opaque, not a JWT: {opaque}");
    let introspection = op.introspect(&service(), &opaque).await;
    assert_eq!(introspection["active"], true);
    assert_eq!(introspection["scope"], "read");
    assert_eq!(introspection["iss"], op.issuer.as_str());
    assert_eq!(introspection["aud"], OPAQUE_API);

    let unknown = op.introspect(&service(), "not-a-token").await;
    assert_eq!(unknown, json!({ "active": false }));
}

#[tokio::test]
async fn short_ttl_makes_tokens_expire() {
    // Long enough that minting and the first introspection fit in it on a loaded
    // 2-core CI machine (a 1 s lifetime once expired before it was first asked about).
    const TTL: u64 = 4;
    let op = OidcProvider::start(&settings().resource(
        "https://api.test/short",
        ResourceSettings::new(TokenFormat::Opaque, "read").ttl(TTL),
    ));
    let token = op
        .client_credentials_token(&service(), Some("https://api.test/short"), "read")
        .await;
    assert_eq!(op.introspect(&service(), &token).await["active"], true);
    tokio::time::sleep(std::time::Duration::from_millis(TTL * 1000 + 1100)).await;
    assert_eq!(op.introspect(&service(), &token).await["active"], false);
}

#[tokio::test]
async fn authorization_code_login_refresh_and_logout() {
    let op = OidcProvider::start(&settings());
    let discovery = op.discovery().await;
    let browser = browser();

    let verifier = "a-pkce-code-verifier-that-is-long-enough-0123456789";
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier));
    let mut authorize = url::Url::parse(discovery["authorization_endpoint"].as_str().unwrap())
        .expect("authorization endpoint");
    authorize
        .query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", "app")
        .append_pair("redirect_uri", CALLBACK)
        .append_pair("scope", "openid email profile offline_access")
        .append_pair("state", "state-123")
        .append_pair("nonce", "nonce-456")
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");

    let callback = op.log_in(&browser, authorize.as_str(), "alice").await;
    assert!(callback.starts_with(CALLBACK), "back at the RP: {callback}");
    assert_eq!(
        query_param(&callback, "state").as_deref(),
        Some("state-123")
    );
    let code = query_param(&callback, "code").expect("code in the callback");

    let exchange = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", CALLBACK),
        ("code_verifier", verifier),
    ];
    let (status, tokens) = op.token_request(&app(), &exchange).await;
    assert_eq!(status, 200, "{tokens}");
    let id_token = tokens["id_token"].as_str().expect("id_token");
    let access_token = tokens["access_token"].as_str().expect("access_token");
    let refresh_token = tokens["refresh_token"].as_str().expect("refresh_token");
    let id_claims = verify(&op, id_token, Algorithm::RS256, "app").await;
    assert_eq!(id_claims["sub"], "alice");
    assert_eq!(id_claims["nonce"], "nonce-456");

    let userinfo_endpoint = discovery["userinfo_endpoint"].as_str().unwrap();
    let userinfo: Value = browser
        .get(userinfo_endpoint)
        .bearer_auth(access_token)
        .send()
        .await
        .expect("userinfo")
        .json()
        .await
        .expect("userinfo JSON");
    assert_eq!(userinfo["sub"], "alice", "{userinfo}");
    assert_eq!(userinfo["email"], "alice@example.test");
    assert_eq!(userinfo["department"], "engineering");

    let (status, refreshed) = op
        .token_request(
            &app(),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ],
        )
        .await;
    assert_eq!(status, 200, "{refreshed}");
    let new_access = refreshed["access_token"]
        .as_str()
        .expect("new access token");
    assert_ne!(new_access, access_token);
    let new_id = refreshed["id_token"].as_str().expect("new id token");
    assert_eq!(
        verify(&op, new_id, Algorithm::RS256, "app").await["sub"],
        "alice"
    );

    // A replayed code fails and, as OAuth 2.0 asks, revokes what the code had granted.
    let (status, replay) = op.token_request(&app(), &exchange).await;
    assert_eq!(status, 400, "a code is single-use: {replay}");
    assert_eq!(replay["error"], "invalid_grant");
    let revoked = browser
        .get(userinfo_endpoint)
        .bearer_auth(new_access)
        .send()
        .await
        .expect("userinfo after the replay");
    assert_eq!(revoked.status(), 401);

    let mut end_session = url::Url::parse(discovery["end_session_endpoint"].as_str().unwrap())
        .expect("end_session endpoint");
    end_session
        .query_pairs_mut()
        .append_pair("id_token_hint", id_token)
        .append_pair("post_logout_redirect_uri", LOGGED_OUT)
        .append_pair("state", "bye");
    let after = op.log_out(&browser, end_session.as_str()).await;
    assert!(after.starts_with(LOGGED_OUT), "back at the RP: {after}");
    assert_eq!(query_param(&after, "state").as_deref(), Some("bye"));

    // Signed out at the OP: the next authorization asks for the login again.
    let again = browser
        .get(authorize.as_str())
        .send()
        .await
        .expect("authorize again");
    let interaction = again.headers()["location"].to_str().unwrap().to_owned();
    let page = browser
        .get(
            url::Url::parse(&op.issuer)
                .unwrap()
                .join(&interaction)
                .unwrap(),
        )
        .send()
        .await
        .expect("interaction page")
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"name="prompt" value="login""#), "{page}");
}

#[tokio::test]
async fn rotated_keys_sign_new_tokens_and_old_keys_can_be_dropped() {
    let op = OidcProvider::start(&settings());
    let before = op
        .client_credentials_token(&service(), Some(JWT_API), "read")
        .await;
    let old_kid = kid_of(&before);

    let kids = op.rotate_keys(true).await;
    assert_eq!(kids.len(), 2);
    assert_ne!(kids[0], old_kid);
    assert_eq!(op.jwks().await["keys"].as_array().unwrap().len(), 4);
    let after = op
        .client_credentials_token(&service(), Some(JWT_API), "read")
        .await;
    assert_eq!(kid_of(&after), kids[0], "the new key signs");
    verify(&op, &before, Algorithm::RS256, "svc").await;
    verify(&op, &after, Algorithm::RS256, "svc").await;

    // State survives a rotation: an opaque token minted before is still active.
    let opaque = op
        .client_credentials_token(&service(), Some(OPAQUE_API), "read")
        .await;
    let newest = op.rotate_keys(false).await;
    let jwks = op.jwks().await;
    let published: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(published, newest);
    assert!(!published.contains(&old_kid.as_str()));
    assert_eq!(op.introspect(&service(), &opaque).await["active"], true);
}
