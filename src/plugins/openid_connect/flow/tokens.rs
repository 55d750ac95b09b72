//! The token endpoint and the ID token, through the `openidconnect` crate.
//!
//! Exchanging a code (with the PKCE verifier and the route's client authentication),
//! refreshing, and validating the ID token as OpenID Connect Core §3.1.3.7 asks (JWKS
//! signature, `iss`, `aud`, `exp`, `iat` within `iat_slack`, `nonce`) are done by
//! `openidconnect`'s client and `IdTokenVerifier` over reqwest 0.12 — the same client and
//! TLS stack as the rest of portcullis, with redirects off. Its `Client` is cheap to build,
//! so one is assembled per call from the cached discovery document instead of being held
//! across configuration swaps. Two things stay outside the crate, on purpose: the
//! authorization URL (openidconnect always adds a `nonce`; APISIX sends one only with
//! `use_nonce`), and userinfo (`X-Userinfo` carries the OP's JSON as it came, while the
//! crate's typed claims drop members it does not know).
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use jsonwebtoken::Algorithm;
use openidconnect::core::{
    CoreClient, CoreErrorResponseType, CoreIdToken, CoreIdTokenVerifier, CoreJsonWebKeySet,
    CoreJwsSigningAlgorithm, CoreTokenResponse,
};
use openidconnect::{
    AuthType, AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, EndpointNotSet,
    EndpointSet, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeVerifier, RedirectUrl,
    RefreshToken, RequestTokenError, SignatureVerificationError, StandardErrorResponse,
    TokenResponse as _, TokenUrl,
};

use super::super::provider::{Discovery, get_json};
use super::super::{AuthMethod, Plugin};
use super::OpFailure;

type Client = CoreClient<
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
    EndpointNotSet,
>;

/// The least time between two JWKS fetches caused by an unknown `kid`.
const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(1);

/// JWKS documents by URL, as openidconnect reads them; process-wide so a configuration
/// swap keeps them (one entry per OP).
static JWKS: LazyLock<DashMap<String, (Arc<CoreJsonWebKeySet>, Instant)>> =
    LazyLock::new(DashMap::new);

/// What a token response gave, the ID token already validated.
#[derive(Debug)]
pub struct Tokens {
    pub access_token: String,
    pub expires_in: Option<i64>,
    pub refresh_token: Option<String>,
    pub scope: Option<String>,
    /// The raw ID token and its subject and issuer, when the response carried one.
    pub id_token: Option<(String, String, String)>,
}

fn client(
    plugin: &Plugin,
    doc: &Discovery,
    redirect_uri: Option<&str>,
) -> Result<Client, OpFailure> {
    let s = &plugin.settings;
    let Some(token_endpoint) = &doc.token_endpoint else {
        return Err(OpFailure::Unavailable(
            "the provider publishes no token_endpoint".into(),
        ));
    };
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        OpFailure::Unavailable(format!("the provider's {what} is not a URL: {e}"))
    };
    let mut client = CoreClient::new(
        ClientId::new(s.client_id.clone()),
        IssuerUrl::new(doc.issuer.clone()).map_err(|e| bad("issuer", &e))?,
        CoreJsonWebKeySet::new(Vec::new()),
    )
    .set_token_uri(TokenUrl::new(token_endpoint.clone()).map_err(|e| bad("token_endpoint", &e))?)
    .set_auth_type(match s.token_endpoint_auth_method {
        AuthMethod::ClientSecretBasic => AuthType::BasicAuth,
        AuthMethod::ClientSecretPost => AuthType::RequestBody,
    });
    if let Some(secret) = &s.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.clone()));
    }
    if let Some(uri) = redirect_uri {
        client = client.set_redirect_uri(
            RedirectUrl::new(uri.to_owned())
                .map_err(|e| OpFailure::Refused(format!("bad redirect_uri: {e}")))?,
        );
    }
    Ok(client)
}

type TokenError<RE> = RequestTokenError<RE, StandardErrorResponse<CoreErrorResponseType>>;

/// The OP's own refusal (`invalid_grant` for a used code, …) is a 401; not reaching it
/// is a 503.
fn failure<RE: std::error::Error>(e: TokenError<RE>) -> OpFailure {
    match e {
        RequestTokenError::ServerResponse(r) => {
            OpFailure::Refused(format!("the token endpoint answered {}", r.error()))
        }
        RequestTokenError::Request(e) => {
            OpFailure::Unavailable(format!("the token endpoint could not be reached: {e}"))
        }
        RequestTokenError::Parse(e, _) => OpFailure::Refused(format!(
            "the token endpoint answered an invalid response: {e}"
        )),
        RequestTokenError::Other(e) => OpFailure::Refused(format!("token request failed: {e}")),
    }
}

/// The authorization-code grant, then the ID token's validation against `nonce`.
pub async fn exchange_code(
    plugin: &Plugin,
    doc: &Discovery,
    http: &reqwest::Client,
    code: String,
    redirect_uri: &str,
    verifier: Option<&str>,
    nonce: Option<&str>,
) -> Result<Tokens, OpFailure> {
    let client = client(plugin, doc, Some(redirect_uri))?;
    let mut request = client.exchange_code(AuthorizationCode::new(code));
    if let Some(v) = verifier {
        request = request.set_pkce_verifier(PkceCodeVerifier::new(v.to_owned()));
    }
    let response = request.request_async(http).await.map_err(failure)?;
    let tokens = validated(plugin, doc, http, &response, Some(nonce)).await?;
    if tokens.id_token.is_none() {
        return Err(OpFailure::Refused(
            "the token response has no id_token".into(),
        ));
    }
    Ok(tokens)
}

/// The refresh-token grant. A new ID token must name the same subject and issuer.
pub async fn refresh(
    plugin: &Plugin,
    doc: &Discovery,
    http: &reqwest::Client,
    refresh_token: &str,
    sub: &str,
) -> Result<Tokens, OpFailure> {
    let client = client(plugin, doc, None)?;
    let token = RefreshToken::new(refresh_token.to_owned());
    let response = client
        .exchange_refresh_token(&token)
        .request_async(http)
        .await
        .map_err(failure)?;
    let tokens = validated(plugin, doc, http, &response, None).await?;
    if let Some((_, new_sub, iss)) = &tokens.id_token
        && (new_sub != sub || *iss != doc.issuer)
    {
        return Err(OpFailure::Refused(
            "the refreshed ID token names another subject or issuer".into(),
        ));
    }
    Ok(tokens)
}

/// `nonce`: `Some(expected)` on a login (`Some(None)` without `use_nonce`), `None` on a
/// refresh, where OpenID Connect Core §12.2 has the OP leave it out.
async fn validated(
    plugin: &Plugin,
    doc: &Discovery,
    http: &reqwest::Client,
    response: &CoreTokenResponse,
    nonce: Option<Option<&str>>,
) -> Result<Tokens, OpFailure> {
    let id_token = match response.id_token() {
        Some(token) => {
            let (sub, iss) = verify_id_token(plugin, doc, http, token, nonce)
                .await
                .map_err(|e| OpFailure::Refused(format!("ID token rejected: {e}")))?;
            Some((token.to_string(), sub, iss))
        }
        None => None,
    };
    Ok(Tokens {
        access_token: response.access_token().secret().clone(),
        expires_in: response
            .expires_in()
            .map(|d| d.as_secs().min(i64::MAX as u64) as i64),
        refresh_token: response.refresh_token().map(|t| t.secret().clone()),
        scope: response.scopes().map(|scopes| {
            scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        }),
        id_token,
    })
}

/// Validates `token` with the OP's JWKS; an unknown `kid` refetches the JWKS once (key
/// rotation), at most once a second per OP. Returns `sub` and `iss`.
async fn verify_id_token(
    plugin: &Plugin,
    doc: &Discovery,
    http: &reqwest::Client,
    token: &CoreIdToken,
    nonce: Option<Option<&str>>,
) -> Result<(String, String), String> {
    let Some(jwks_uri) = &doc.jwks_uri else {
        return Err("the provider publishes no jwks_uri".into());
    };
    let issuer = IssuerUrl::new(doc.issuer.clone()).map_err(|e| e.to_string())?;
    let ttl = Duration::from_secs(plugin.settings.jwk_expires_in);
    let slack = plugin.settings.iat_slack as i64;
    let algorithms: Vec<CoreJwsSigningAlgorithm> = plugin
        .algorithms
        .iter()
        .filter_map(|a| signing_alg(*a))
        .collect();
    for refetch in [false, true] {
        let keys = jwks(http, jwks_uri, ttl, refetch).await?;
        let verifier = CoreIdTokenVerifier::new_public_client(
            ClientId::new(plugin.settings.client_id.clone()),
            issuer.clone(),
            (*keys).clone(),
        )
        .set_allowed_algs(algorithms.clone())
        .set_issue_time_verifier_fn(move |iat| {
            let drift = (unix_now() - iat.timestamp()).abs();
            if drift > slack {
                Err(format!("iat is {drift} s away from now, over iat_slack"))
            } else {
                Ok(())
            }
        });
        let expected = nonce.flatten();
        let nonce_check = |got: Option<&Nonce>| match (nonce, got) {
            // A refresh: no nonce to compare.
            (None, _) => Ok(()),
            (Some(None), _) => Ok(()),
            (Some(Some(_)), None) => Err("the ID token has no nonce".to_owned()),
            (Some(Some(_)), Some(got)) => {
                if super::constant_time_eq(
                    got.secret().as_bytes(),
                    expected.unwrap_or_default().as_bytes(),
                ) {
                    Ok(())
                } else {
                    Err("the ID token's nonce is not the login's".to_owned())
                }
            }
        };
        match token.claims(&verifier, nonce_check) {
            Ok(claims) => {
                return Ok((
                    claims.subject().as_str().to_owned(),
                    claims.issuer().as_str().to_owned(),
                ));
            }
            Err(ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            )) if !refetch => continue,
            Err(ClaimsVerificationError::SignatureVerification(e)) => {
                return Err(format!("signature verification failed: {e}"));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("no key of the provider's JWKS verifies the ID token".into())
}

fn unix_now() -> i64 {
    super::super::now()
}

/// The OP's JWKS; with `refetch`, fetched again unless the copy is under a second old.
async fn jwks(
    http: &reqwest::Client,
    url: &str,
    ttl: Duration,
    refetch: bool,
) -> Result<Arc<CoreJsonWebKeySet>, String> {
    if let Some(entry) = JWKS.get(url) {
        let age = entry.1.elapsed();
        if age < ttl && (!refetch || age < JWKS_REFETCH_INTERVAL) {
            return Ok(entry.0.clone());
        }
    }
    let doc = get_json(http, url).await.map_err(|e| e.to_string())?;
    let set: CoreJsonWebKeySet =
        serde_json::from_value(doc).map_err(|e| format!("the JWKS at {url} is invalid: {e}"))?;
    let set = Arc::new(set);
    JWKS.insert(url.to_owned(), (set.clone(), Instant::now()));
    Ok(set)
}

/// The route's accepted algorithms (`token_signing_alg_values_expected`, else every
/// asymmetric one) in openidconnect's names.
fn signing_alg(alg: Algorithm) -> Option<CoreJwsSigningAlgorithm> {
    use CoreJwsSigningAlgorithm as C;
    Some(match alg {
        Algorithm::RS256 => C::RsaSsaPkcs1V15Sha256,
        Algorithm::RS384 => C::RsaSsaPkcs1V15Sha384,
        Algorithm::RS512 => C::RsaSsaPkcs1V15Sha512,
        Algorithm::PS256 => C::RsaSsaPssSha256,
        Algorithm::PS384 => C::RsaSsaPssSha384,
        Algorithm::PS512 => C::RsaSsaPssSha512,
        Algorithm::ES256 => C::EcdsaP256Sha256,
        Algorithm::ES384 => C::EcdsaP384Sha384,
        Algorithm::EdDSA => C::EdDsa,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header};
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    use serde_json::{Value, json};

    const ISSUER: &str = "https://op.test";
    const CLIENT: &str = "app";

    struct Op {
        key: EncodingKey,
        doc: Discovery,
        plugin: Plugin,
    }

    /// An OP whose JWKS (one RSA key, kid "k1") sits in the cache under a URL of its own.
    fn op(name: &str) -> Op {
        let private = rsa::RsaPrivateKey::new(&mut rand_core_06(), 2048).unwrap();
        let public = private.to_public_key();
        let b64 = |b: Vec<u8>| URL_SAFE_NO_PAD.encode(b);
        let jwks = json!({ "keys": [{
            "kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig",
            "n": b64(public.n().to_bytes_be()), "e": b64(public.e().to_bytes_be()),
        }]});
        // Port 9 (discard) is closed: a JWKS refetch fails fast instead of finding keys.
        let jwks_uri = format!("http://127.0.0.1:9/{name}/jwks");
        JWKS.insert(
            jwks_uri.clone(),
            (
                Arc::new(serde_json::from_value(jwks).unwrap()),
                Instant::now(),
            ),
        );
        let pem = private.to_pkcs1_pem(Default::default()).unwrap();
        let shared = crate::plugins::Shared::default();
        let plugin = Plugin::compile(
            &json!({ "client_id": CLIENT, "client_secret": "s3cr3t-s3cr3t-s3cr3t",
                     "discovery": format!("{ISSUER}/.well-known/openid-configuration"),
                     "session": { "secret": "0123456789abcdef" } }),
            &crate::plugins::BuildContext { shared: &shared },
        )
        .unwrap();
        Op {
            key: EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
            doc: Discovery {
                issuer: ISSUER.into(),
                authorization_endpoint: None,
                token_endpoint: None,
                userinfo_endpoint: None,
                jwks_uri: Some(jwks_uri),
                introspection_endpoint: None,
                end_session_endpoint: None,
                revocation_endpoint: None,
            },
            plugin,
        }
    }

    /// rsa 0.9 takes a rand_core 0.6 RNG; the OS one needs no state.
    fn rand_core_06() -> rsa::rand_core::OsRng {
        rsa::rand_core::OsRng
    }

    fn claims(overrides: Value) -> Value {
        let now = super::super::super::now();
        let mut c = json!({ "iss": ISSUER, "aud": CLIENT, "sub": "alice", "nonce": "n-1",
                            "iat": now, "exp": now + 300 });
        for (k, v) in overrides.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    fn sign(op: &Op, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, claims, &op.key).unwrap()
    }

    async fn verify(op: &Op, token: &str, nonce: Option<Option<&str>>) -> Result<String, String> {
        let token: CoreIdToken = token.parse().map_err(|e| format!("unparsable: {e}"))?;
        let http = reqwest::Client::new();
        verify_id_token(&op.plugin, &op.doc, &http, &token, nonce)
            .await
            .map(|(sub, _)| sub)
    }

    #[tokio::test]
    async fn a_genuine_id_token_passes() {
        let op = op("genuine");
        let token = sign(&op, &claims(json!({})));
        assert_eq!(
            verify(&op, &token, Some(Some("n-1"))).await.unwrap(),
            "alice"
        );
        // Without use_nonce there is nothing to compare; a refresh neither.
        assert!(verify(&op, &token, Some(None)).await.is_ok());
        assert!(verify(&op, &token, None).await.is_ok());
    }

    #[tokio::test]
    async fn wrong_claims_are_refused() {
        let op = op("claims");
        let now = super::super::super::now();
        for (why, overrides, nonce) in [
            ("wrong nonce", json!({}), Some("n-2")),
            ("missing nonce", json!({ "nonce": null }), Some("n-1")),
            (
                "foreign issuer",
                json!({ "iss": "https://evil.test" }),
                Some("n-1"),
            ),
            ("other audience", json!({ "aud": "other-app" }), Some("n-1")),
            ("expired", json!({ "exp": now - 1 }), Some("n-1")),
            (
                "issued an hour ago",
                json!({ "iat": now - 3600, "exp": now + 60 }),
                Some("n-1"),
            ),
            (
                "issued in the future",
                json!({ "iat": now + 3600, "exp": now + 7200 }),
                Some("n-1"),
            ),
            ("no sub", json!({ "sub": null }), Some("n-1")),
        ] {
            let token = sign(&op, &claims(overrides));
            assert!(
                verify(&op, &token, Some(nonce)).await.is_err(),
                "{why} must be refused"
            );
        }
    }

    #[tokio::test]
    async fn forged_signatures_are_refused() {
        let op = op("forged");
        let token = sign(&op, &claims(json!({})));
        let parts: Vec<&str> = token.split('.').collect();
        let other = URL_SAFE_NO_PAD.encode(claims(json!({ "sub": "admin" })).to_string());
        let swapped = format!("{}.{other}.{}", parts[0], parts[2]);
        assert!(verify(&op, &swapped, Some(Some("n-1"))).await.is_err());

        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1"}"#);
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert!(verify(&op, &unsigned, Some(Some("n-1"))).await.is_err());

        // HS256 keyed with the client secret is refused: portcullis only trusts the JWKS.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let hs = jsonwebtoken::encode(
            &header,
            &claims(json!({})),
            &EncodingKey::from_secret(b"s3cr3t-s3cr3t-s3cr3t"),
        )
        .unwrap();
        assert!(verify(&op, &hs, Some(Some("n-1"))).await.is_err());

        // A kid the JWKS does not have: one refetch (which fails here), then refused.
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("unknown".into());
        let unknown = jsonwebtoken::encode(&header, &claims(json!({})), &op.key).unwrap();
        assert!(verify(&op, &unknown, Some(Some("n-1"))).await.is_err());
    }
}
