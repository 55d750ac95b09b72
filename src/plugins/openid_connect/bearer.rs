//! Bearer tokens: find one in the request and prove it, by a configured public key, by
//! the OP's JWKS, or by asking the OP's introspection endpoint (RFC 7662).
//!
//! Local verification accepts only the asymmetric algorithms the route allows
//! (`token_signing_alg_values_expected`, else RSA/ECDSA ones), never `none` or HMAC, and
//! never a key named by the token itself (`jwk`, `jku`, `x5u`, `x5c` are ignored; `kid`
//! is only a lookup key). `exp` is required and, like `nbf`, checked without leeway as
//! APISIX does; the issuer must be one of `valid_issuers` or the discovered issuer.
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::provider::{Shared, read_json, record_cache, record_outbound, transport};
use super::{AuthMethod, Settings};
use crate::plugins::verified::VerifiedTokens;

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// What the request carries.
pub enum Presented<'a> {
    None,
    Token(&'a str),
    /// An `Authorization` header that is not `scheme credentials` (APISIX: 400).
    Malformed,
}

/// APISIX's `get_bearer_access_token`: `Authorization: Bearer <t>` (scheme in any case),
/// else the client's `X-Access-Token`. Another scheme counts as no token.
pub fn presented<'a>(
    authorization: Option<&'a str>,
    x_access_token: Option<&'a str>,
) -> Presented<'a> {
    match authorization {
        None => match x_access_token {
            Some(t) if !t.is_empty() => Presented::Token(t),
            _ => Presented::None,
        },
        Some(value) => match value.split_once(' ') {
            None => Presented::Malformed,
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                Presented::Token(token)
            }
            Some(_) => Presented::None,
        },
    }
}

/// What a verified bearer token says: its claims, and the `X-Userinfo` value made from
/// them. An introspection answer or a verified JWT is served from its cache for every
/// request that presents its token, so the header is made once per token, not per request
/// (serialising, base64-encoding, and cloning the answer were a quarter of such a
/// Check's instructions).
#[derive(Debug)]
pub struct Claims {
    pub value: Value,
    userinfo: std::sync::OnceLock<String>,
}

impl Claims {
    pub fn new(value: Value) -> Self {
        Claims {
            value,
            userinfo: std::sync::OnceLock::new(),
        }
    }

    /// `X-Userinfo`: the claims as JSON, base64-encoded (APISIX's header).
    pub fn userinfo_header(&self) -> &str {
        self.userinfo.get_or_init(|| userinfo_header(&self.value))
    }
}

fn userinfo_header(claims: &Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(claims.to_string())
}

/// RFC 6750's `b64token` syntax. Anything else (spaces, commas from two `Authorization`
/// headers Envoy joined, control bytes) is refused before the OP is asked or a JWT parsed.
pub fn is_token_syntax(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && body.bytes().all(|b| B64TOKEN[usize::from(b)])
}

/// The bytes of `b64token` before its `=` padding, as a table: tokens are read on every
/// bearer Check and are hundreds of bytes long.
static B64TOKEN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] =
            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        b += 1;
    }
    table
};

/// What the verified-token cache keeps of a bearer JWT: its header's `alg`, which every
/// route checks against its own list, and its claims with their `X-Userinfo`. A client
/// resends the same token until it expires; decoding and parsing its payload and
/// re-encoding it as `X-Userinfo` were a third of such a Check's instructions. The
/// claims are still checked (issuer, `nbf`, `exp`) on every request.
#[derive(Clone)]
pub struct Verified {
    alg: Algorithm,
    claims: Arc<Claims>,
}

impl Verified {
    /// The route's own checks of a token verified before, perhaps for another route.
    fn recheck(self, algorithms: &[Algorithm], issuers: &[String]) -> Result<Arc<Claims>, String> {
        check_algorithm(self.alg, algorithms)?;
        recheck_claims(&self.claims.value, issuers)?;
        Ok(self.claims)
    }

    /// Caches this fresh verification under the key (set) that made it, weighed by the
    /// heap bytes it holds: the claims' tree and `X-Userinfo`, which is made here so
    /// that its size is known (and made once per token anyway).
    fn remember<K: Send + Sync + 'static>(
        &self,
        cache: &VerifiedTokens<K, Verified>,
        token: &str,
        key: &Arc<K>,
    ) {
        let bytes = value_heap_bytes(&self.claims.value) + self.claims.userinfo_header().len();
        cache.insert_with(token, key, self.clone(), bytes);
    }
}

/// Heap bytes a JSON tree holds, near enough to bound a cache in bytes: each member of
/// an object (`preserve_order`: an index map) costs its key, its value, its hash and its
/// slot in the index table.
fn value_heap_bytes(value: &Value) -> usize {
    const MEMBER: usize = size_of::<String>() + size_of::<Value>() + 2 * size_of::<usize>();
    match value {
        Value::String(s) => s.capacity(),
        Value::Array(items) => {
            items.capacity() * size_of::<Value>()
                + items.iter().map(value_heap_bytes).sum::<usize>()
        }
        Value::Object(members) => members
            .iter()
            .map(|(k, v)| MEMBER + k.capacity() + value_heap_bytes(v))
            .sum(),
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
    }
}

/// Where verification keys come from.
pub enum Keys<'a> {
    /// The route's `public_key`.
    Fixed {
        key: &'a Arc<DecodingKey>,
        shared: &'a Shared,
    },
    Jwks {
        shared: &'a Shared,
        http: &'a reqwest::Client,
        url: &'a str,
        ttl: Duration,
    },
}

/// Verifies a signed JWT and returns its claims, or a reason fit for
/// `error_description`.
pub async fn verify_jwt(
    token: &str,
    keys: Keys<'_>,
    algorithms: &[Algorithm],
    issuers: &[String],
) -> Result<Arc<Claims>, String> {
    if token.len() > MAX_TOKEN_LEN {
        return Err("token too large".into());
    }
    if token.split('.').count() != 3 {
        return Err("invalid jwt: not a JWS compact serialization".into());
    }
    // An RSA/ECDSA verification is ~0.3 ms. A token that the key (set) in force verified
    // before skips the signature and the decoding, not the checks of its claims.
    let cached = match &keys {
        Keys::Fixed { key, shared } => shared.verified_by_key.get(token, key),
        Keys::Jwks {
            shared, url, ttl, ..
        } => shared
            .current_jwks(url, *ttl)
            .and_then(|set| shared.verified.get(token, &set)),
    };
    if let Some(verified) = cached {
        return verified.recheck(algorithms, issuers);
    }
    let header = read_header(token)?;
    check_algorithm(header.alg, algorithms)?;
    let decode = |key: &DecodingKey| {
        let mut validation = Validation::new(header.alg);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.required_spec_claims = ["exp".to_owned(), "iss".to_owned()].into();
        validation.set_issuer(issuers);
        let claims = jsonwebtoken::decode::<Value>(token, key, &validation)
            .map_err(decode_failed)?
            .claims;
        strictly_unexpired(&claims)?;
        Ok::<_, String>(Verified {
            alg: header.alg,
            claims: Arc::new(Claims::new(claims)),
        })
    };
    let verified = match keys {
        Keys::Fixed { key, shared } => {
            let verified = decode(key)?;
            verified.remember(&shared.verified_by_key, token, key);
            verified
        }
        Keys::Jwks {
            shared,
            http,
            url,
            ttl,
        } => {
            let kid = header.kid.as_deref();
            let mut set = shared
                .jwks(http, url, ttl, false)
                .await
                .map_err(jwks_failed)?;
            if pick(&set.keys, kid, header.alg).is_none() {
                // A key we have never seen: the OP may have rotated.
                set = shared
                    .jwks(http, url, ttl, true)
                    .await
                    .map_err(jwks_failed)?;
            }
            let key = pick(&set.keys, kid, header.alg)
                .ok_or_else(|| "no key in the JWKS matches the token".to_owned())?;
            let verified = decode(&key.key)?;
            verified.remember(&shared.verified, token, &set);
            verified
        }
    };
    Ok(verified.claims)
}

fn check_algorithm(alg: Algorithm, algorithms: &[Algorithm]) -> Result<(), String> {
    if algorithms.contains(&alg) {
        Ok(())
    } else {
        Err(format!(
            "token is signed by unexpected algorithm \"{alg:?}\""
        ))
    }
}

fn decode_failed(e: jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "token expired".to_owned(),
        ErrorKind::ImmatureSignature => "token not yet valid (nbf)".to_owned(),
        ErrorKind::InvalidIssuer => "token issuer is not trusted".to_owned(),
        ErrorKind::InvalidSignature => "signature verification failed".to_owned(),
        ErrorKind::MissingRequiredClaim(c) => format!("token has no \"{c}\" claim"),
        other => format!("invalid jwt: {other:?}"),
    }
}

/// jsonwebtoken accepts `exp == now`; APISIX's validator wants `exp` strictly ahead.
fn strictly_unexpired(claims: &Value) -> Result<(), String> {
    match claims.get("exp").and_then(Value::as_f64) {
        Some(exp) if exp > super::now() as f64 => Ok(()),
        _ => Err("token expired".into()),
    }
}

/// The claim checks `verify_jwt` has jsonwebtoken make, for a token whose signature
/// was verified before: `iss` required and trusted, `nbf` not ahead, `exp` strictly
/// ahead (no leeway, as there).
fn recheck_claims(claims: &Value, issuers: &[String]) -> Result<(), String> {
    match claims.get("iss") {
        None => return Err("token has no \"iss\" claim".into()),
        Some(Value::String(iss)) if issuers.iter().any(|i| i == iss) => {}
        Some(_) => return Err("token issuer is not trusted".into()),
    }
    if let Some(nbf) = claims.get("nbf") {
        match nbf.as_f64() {
            Some(nbf) if nbf <= super::now() as f64 => {}
            _ => return Err("token not yet valid (nbf)".into()),
        }
    }
    strictly_unexpired(claims)
}

fn jwks_failed(e: super::provider::FetchError) -> String {
    tracing::error!(error = %e, "openid-connect: JWKS fetch failed");
    format!("failed to fetch the JWKS: {e}")
}

/// The key a token names: by `kid`; without one, the only key (or the only one for its
/// algorithm).
fn pick<'k>(
    keys: &'k [super::provider::Key],
    kid: Option<&str>,
    alg: Algorithm,
) -> Option<&'k super::provider::Key> {
    let usable = |k: &&super::provider::Key| {
        k.alg
            .as_deref()
            .is_none_or(|a| a.parse::<Algorithm>().is_ok_and(|a| a == alg))
    };
    match kid {
        Some(kid) => keys
            .iter()
            .filter(usable)
            .find(|k| k.kid.as_deref() == Some(kid)),
        None => {
            let mut candidates = keys.iter().filter(usable);
            let first = candidates.next()?;
            candidates.next().is_none().then_some(first)
        }
    }
}

/// The header members verification uses.
struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

/// Reads the JOSE header once, keeping `alg` and `kid`, and refuses what jsonwebtoken
/// would let through: `crit` (we implement no extension) and any `alg` spelling of
/// "none". Every other member (`jwk`, `jku`, `x5u`, `x5c`…) is parsed, never used.
fn read_header(token: &str) -> Result<Header, String> {
    use crate::plugins::jwt_auth::token::segment_members;
    let head = token.split('.').next().unwrap_or_default();
    let [alg, crit, kid] = segment_members(head, ["alg", "crit", "kid"])
        .map_err(|e| format!("invalid jwt: header {e}"))?;
    let alg = match alg {
        Some(Value::String(alg)) if alg.eq_ignore_ascii_case("none") => {
            return Err("token is not signed (alg none)".into());
        }
        Some(Value::String(alg)) => alg,
        _ => return Err("invalid jwt: no alg".into()),
    };
    if crit.is_some() {
        return Err("token names critical header parameters".into());
    }
    let kid = match kid {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid),
        Some(_) => return Err("invalid jwt: kid is not a string".into()),
    };
    let alg = alg
        .parse()
        .map_err(|_| format!("invalid jwt: unknown algorithm \"{alg}\""))?;
    Ok(Header { alg, kid })
}

/// Asks the introspection endpoint about `token`, through the cache. `active: false`
/// and any failure are errors; an active answer is cached until its expiry, bounded by
/// `introspection_interval` when that is set.
pub async fn introspect(
    settings: &Settings,
    shared: &Shared,
    http: &reqwest::Client,
    endpoint: &str,
    token: &str,
    addon_headers: &[(String, String)],
) -> Result<Arc<Claims>, String> {
    if token.len() > MAX_TOKEN_LEN {
        return Err("token too large".into());
    }
    let secret = settings.client_secret.as_deref().unwrap_or_default();
    // The introspection cache key: an answer is reused only for the same token asked by
    // the same client (id and secret) at the same endpoint, so a route whose credentials
    // the OP refuses never rides on another route's answer. Hashed: tokens are not kept
    // as keys.
    let key = crate::plugins::digest([endpoint, &settings.client_id, secret, token].map(Some));
    let max_age = (settings.introspection_interval > 0)
        .then(|| Duration::from_secs(settings.introspection_interval));
    if let Some(hit) = shared.cached_introspection(&key, max_age) {
        record_cache("openid-connect-introspection", true);
        return Ok(hit);
    }
    record_cache("openid-connect-introspection", false);
    let mut form = vec![("token", token), ("token_type_hint", "access_token")];
    let mut request = http.post(endpoint).header("accept", "application/json");
    match settings.introspection_endpoint_auth_method {
        AuthMethod::ClientSecretBasic => {
            request =
                request.basic_auth(form_encode(&settings.client_id), Some(form_encode(secret)));
        }
        AuthMethod::ClientSecretPost => {
            form.push(("client_id", &settings.client_id));
            form.push(("client_secret", secret));
        }
    }
    for (name, value) in addon_headers {
        request = request.header(name, value);
    }
    let failed = |e: super::provider::FetchError| {
        tracing::error!(error = %e, "openid-connect: introspection failed");
        format!("introspection failed: {e}")
    };
    let started = std::time::Instant::now();
    let answer = async {
        let response = request
            .form(&form)
            .send()
            .await
            .map_err(|e| transport(endpoint, &e))?;
        read_json(endpoint, response).await
    }
    .await;
    record_outbound(started, &answer);
    let answer = answer.map_err(failed)?;
    if answer.get("active").and_then(Value::as_bool) != Some(true) {
        return Err("invalid token".into());
    }
    let claims = Arc::new(Claims::new(answer));
    let expiry_claim = settings
        .introspection_expiry_claim
        .as_deref()
        .unwrap_or("exp");
    let expiry = claims.value.get(expiry_claim).and_then(Value::as_i64);
    if expiry_claim == "exp" && expiry.is_some_and(|exp| exp <= super::now()) {
        // An "active" token whose `exp` has passed is a contradiction: refuse it.
        return Err("token expired".into());
    }
    shared.remember_introspection(
        key,
        claims.clone(),
        introspection_ttl(
            expiry_claim,
            expiry,
            settings.introspection_interval,
            super::now(),
        ),
    );
    Ok(claims)
}

/// How long an active introspection answer is reused, as lua-resty-openidc decides:
/// only an answer that carries the expiry claim is cached; `exp` is a time, any other
/// claim named by `introspection_expiry_claim` is a number of seconds; a positive
/// `introspection_interval` caps the time, and so does [`MAX_INTROSPECTION_TTL`].
fn introspection_ttl(claim: &str, expiry: Option<i64>, interval: u64, now: i64) -> Duration {
    let Some(expiry) = expiry else {
        return Duration::ZERO;
    };
    let seconds = if claim == "exp" {
        expiry.saturating_sub(now)
    } else {
        expiry
    };
    let mut seconds = u64::try_from(seconds).unwrap_or(0);
    if interval > 0 {
        seconds = seconds.min(interval);
    }
    Duration::from_secs(seconds).min(MAX_INTROSPECTION_TTL)
}

/// The longest an introspection answer is reused. The OP's expiry is any JSON number,
/// and one far in the future would overflow the cache's clock; a day of reuse without
/// asking again is already more than any OP means by a token's lifetime.
const MAX_INTROSPECTION_TTL: Duration = Duration::from_secs(24 * 3600);

/// RFC 6749 §2.3.1: client credentials in Basic auth are form-encoded first.
fn form_encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    #[test]
    fn a_cached_signature_still_has_issuer_and_times_checked() {
        let now = super::super::now();
        let trusted = ["https://op.example".to_owned()];
        let ok = serde_json::json!({"iss": "https://op.example", "exp": now + 60});
        assert!(recheck_claims(&ok, &trusted).is_ok());
        for bad in [
            serde_json::json!({"exp": now + 60}),
            serde_json::json!({"iss": "https://evil.example", "exp": now + 60}),
            serde_json::json!({"iss": "https://op.example", "exp": now}),
            serde_json::json!({"iss": "https://op.example"}),
            serde_json::json!({"iss": "https://op.example", "exp": now + 60, "nbf": now + 30}),
            serde_json::json!({"iss": "https://op.example", "exp": "soon"}),
        ] {
            assert!(recheck_claims(&bad, &trusted).is_err(), "{bad}");
        }
    }

    #[test]
    fn bearer_tokens_are_found_as_apisix_finds_them() {
        assert!(matches!(
            presented(Some("Bearer abc"), None),
            Presented::Token("abc")
        ));
        assert!(matches!(
            presented(Some("bEaReR abc"), None),
            Presented::Token("abc")
        ));
        assert!(matches!(
            presented(Some("Basic abc"), Some("x")),
            Presented::None
        ));
        assert!(matches!(
            presented(Some("Bearer"), None),
            Presented::Malformed
        ));
        assert!(matches!(
            presented(None, Some("xyz")),
            Presented::Token("xyz")
        ));
        assert!(matches!(presented(None, None), Presented::None));
    }

    #[test]
    fn only_b64token_syntax_is_a_token() {
        assert!(is_token_syntax("eyJ.eyJ.sig-_"));
        assert!(is_token_syntax("abc+/=="));
        for bad in ["", "==", "a b", "a,Bearer b", "a\tb", "a\u{0}"] {
            assert!(!is_token_syntax(bad), "{bad:?}");
        }
        assert!(!is_token_syntax(&"a".repeat(MAX_TOKEN_LEN + 1)));
    }

    #[test]
    fn unsigned_and_critical_headers_are_refused() {
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"nOnE"}"#),
            URL_SAFE_NO_PAD.encode("{}")
        );
        assert!(read_header(&none).err().unwrap().contains("alg none"));
        let crit = format!(
            "{}.e30.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","crit":["exp"]}"#)
        );
        assert!(read_header(&crit).err().unwrap().contains("critical"));
    }

    #[test]
    fn the_header_is_read_once_for_alg_and_kid() {
        let token = |header: &str| format!("{}.e30.sig", URL_SAFE_NO_PAD.encode(header));
        let h = read_header(&token(
            r#"{"alg":"ES256","kid":"k1","jwk":{"kty":"oct","k":"AA"},"typ":"JWT"}"#,
        ))
        .unwrap();
        assert_eq!((h.alg, h.kid.as_deref()), (Algorithm::ES256, Some("k1")));
        assert_eq!(read_header(&token(r#"{"alg":"RS256"}"#)).unwrap().kid, None);
        for (header, reason) in [
            (r#"{"alg":"RS257"}"#, "unknown algorithm"),
            (r#"{"alg":"RS256","kid":7}"#, "kid is not a string"),
            (r#"{"alg":256}"#, "no alg"),
            (r#"{"kid":"k1"}"#, "no alg"),
            (r#"["RS256"]"#, "not a JSON object"),
            ("{\"alg\":\"RS256\"", "not JSON"),
        ] {
            let err = read_header(&token(header)).err().unwrap();
            assert!(err.contains(reason), "{header}: {err}");
        }
        assert!(
            read_header("%%%.e30.sig")
                .err()
                .unwrap()
                .contains("base64url")
        );
    }

    /// An ES256 key pair from a fixed scalar, as (signing, verifying) keys.
    fn es256(seed: u8) -> (jsonwebtoken::EncodingKey, DecodingKey) {
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let secret = p256::SecretKey::from_slice(&[seed; 32]).expect("scalar");
        let private = secret.to_pkcs8_pem(LineEnding::LF).expect("PKCS#8");
        let public = secret
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("SPKI");
        (
            jsonwebtoken::EncodingKey::from_ec_pem(private.as_bytes()).expect("signing key"),
            DecodingKey::from_ec_pem(public.as_bytes()).expect("verifying key"),
        )
    }

    fn sign(
        header: jsonwebtoken::Header,
        claims: &Value,
        key: &jsonwebtoken::EncodingKey,
    ) -> String {
        jsonwebtoken::encode(&header, claims, key).expect("sign")
    }

    #[tokio::test]
    async fn jwt_claims_are_checked_as_strictly_as_apisix() {
        let (signing, verifying) = es256(7);
        let issuers = ["https://op.test".to_owned()];
        let now = super::super::now();
        let header = || jsonwebtoken::Header::new(Algorithm::ES256);
        static ES: [Algorithm; 1] = [Algorithm::ES256];
        static RS: [Algorithm; 1] = [Algorithm::RS256];
        let verifying = Arc::new(verifying);
        let shared = Shared::default();
        let verify = |token: String, algs: &'static [Algorithm]| {
            let (verifying, shared) = (&verifying, &shared);
            let issuers = issuers.clone();
            async move {
                let keys = Keys::Fixed {
                    key: verifying,
                    shared,
                };
                verify_jwt(&token, keys, algs, &issuers)
                    .await
                    .map(|claims| claims.value.clone())
            }
        };

        let good = serde_json::json!({ "iss": "https://op.test", "exp": now + 60, "sub": "a" });
        let claims = verify(sign(header(), &good, &signing), &ES).await.unwrap();
        assert_eq!(claims["sub"], "a");

        let cases = [
            (
                serde_json::json!({ "iss": "https://op.test", "exp": now }),
                "token expired",
            ),
            (
                serde_json::json!({ "iss": "https://op.test", "exp": now - 1 }),
                "token expired",
            ),
            (
                serde_json::json!({ "iss": "https://op.test" }),
                "no \"exp\" claim",
            ),
            (
                serde_json::json!({ "iss": "https://op.test", "exp": "9999999999" }),
                "\"exp\"",
            ),
            (serde_json::json!({ "exp": now + 60 }), "no \"iss\" claim"),
            (
                serde_json::json!({ "iss": "https://evil.test", "exp": now + 60 }),
                "not trusted",
            ),
            (
                serde_json::json!({ "iss": "https://op.test", "exp": now + 60, "nbf": now + 30 }),
                "not yet valid",
            ),
        ];
        for (claims, reason) in cases {
            let err = verify(sign(header(), &claims, &signing), &ES)
                .await
                .unwrap_err();
            assert!(err.contains(reason), "{claims}: {err}");
        }

        // Another algorithm than the route's, and a key offered by the token itself.
        let err = verify(sign(header(), &good, &signing), &RS)
            .await
            .unwrap_err();
        assert!(err.contains("unexpected algorithm"), "{err}");
        let (other, _) = es256(9);
        let mut offered = header();
        offered.jwk = Some(
            serde_json::from_value(serde_json::json!({
                "kty": "EC", "crv": "P-256",
                "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"
            }))
            .expect("JWK"),
        );
        let err = verify(sign(offered, &good, &other), &ES).await.unwrap_err();
        assert_eq!(err, "signature verification failed");
        let jwe = "a.b.c.d.e".to_owned();
        assert!(verify(jwe, &ES).await.unwrap_err().contains("JWS"));
    }

    #[tokio::test]
    async fn a_verified_token_is_served_from_the_cache_with_the_routes_checks_redone() {
        let (signing, verifying) = es256(7);
        let key = Arc::new(verifying);
        let shared = Shared::default();
        let issuers = ["https://op.test".to_owned()];
        let claims = serde_json::json!({
            "iss": "https://op.test", "exp": super::super::now() + 60, "sub": "a"
        });
        let token = sign(
            jsonwebtoken::Header::new(Algorithm::ES256),
            &claims,
            &signing,
        );
        let with = |key| Keys::Fixed {
            key,
            shared: &shared,
        };
        let es = [Algorithm::ES256];

        let first = verify_jwt(&token, with(&key), &es, &issuers).await.unwrap();
        let again = verify_jwt(&token, with(&key), &es, &issuers).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "parsed once, then served");
        assert!(
            std::ptr::eq(first.userinfo_header(), again.userinfo_header()),
            "X-Userinfo made once"
        );
        assert_eq!(again.value, claims);

        // Another route's algorithms and issuers still apply to the cached token.
        let err = verify_jwt(&token, with(&key), &[Algorithm::RS256], &issuers)
            .await
            .unwrap_err();
        assert!(err.contains("unexpected algorithm"), "{err}");
        let err = verify_jwt(&token, with(&key), &es, &["https://other.test".to_owned()])
            .await
            .unwrap_err();
        assert!(err.contains("not trusted"), "{err}");

        // Other bytes are another token; a new key (a config change) verifies afresh.
        let at = token.len() - 10;
        let flipped = if &token[at..=at] == "A" { "B" } else { "A" };
        let tampered = format!("{}{flipped}{}", &token[..at], &token[at + 1..]);
        let err = verify_jwt(&tampered, with(&key), &es, &issuers)
            .await
            .unwrap_err();
        assert!(err.contains("signature"), "{err}");
        let rotated = Arc::new(es256(7).1);
        let fresh = verify_jwt(&token, with(&rotated), &es, &issuers)
            .await
            .unwrap();
        assert!(
            !Arc::ptr_eq(&first, &fresh),
            "verified again with the new key"
        );
    }

    #[test]
    fn introspection_answers_are_cached_until_expiry_within_the_interval() {
        let now = 1_000_000;
        assert_eq!(
            introspection_ttl("exp", Some(now + 300), 0, now),
            Duration::from_secs(300)
        );
        assert_eq!(
            introspection_ttl("exp", Some(now + 300), 60, now),
            Duration::from_secs(60)
        );
        assert_eq!(
            introspection_ttl("exp", Some(now + 30), 60, now),
            Duration::from_secs(30)
        );
        assert_eq!(introspection_ttl("exp", None, 60, now), Duration::ZERO);
        assert_eq!(
            introspection_ttl("expires_in", Some(90), 0, now),
            Duration::from_secs(90)
        );
        assert_eq!(
            introspection_ttl("exp", Some(now - 5), 0, now),
            Duration::ZERO
        );
        // Whatever number the OP sends, the answer is cached for at most a day and
        // nothing overflows (the cache adds the TTL to the clock).
        for (claim, expiry) in [
            ("exp", i64::MAX),
            ("expires_in", i64::MAX),
            ("exp", i64::MIN),
        ] {
            let ttl = introspection_ttl(claim, Some(expiry), 0, now);
            assert!(ttl <= MAX_INTROSPECTION_TTL, "{claim} {expiry}");
            assert!(std::time::Instant::now().checked_add(ttl).is_some());
        }
    }

    #[test]
    fn a_cached_introspection_answer_is_served_with_its_header_made_once() {
        let shared = Shared::default();
        let answer = serde_json::json!({"active": true, "sub": "jack", "scope": "read"});
        let claims = Arc::new(Claims::new(answer.clone()));
        shared.remember_introspection([7; 32], claims.clone(), Duration::from_secs(60));
        let hit = shared.cached_introspection(&[7; 32], None).expect("cached");
        assert!(Arc::ptr_eq(&hit, &claims), "the answer itself, not a copy");
        let header = hit.userinfo_header();
        assert_eq!(
            header,
            base64::engine::general_purpose::STANDARD.encode(answer.to_string())
        );
        let again = shared.cached_introspection(&[7; 32], None).expect("cached");
        assert!(std::ptr::eq(again.userinfo_header(), header));
        // The same text as claims made afresh from the answer.
        assert_eq!(Claims::new(answer).userinfo_header(), header);
    }

    #[test]
    fn a_key_without_kid_is_used_only_when_it_is_the_only_candidate() {
        let key = |kid: Option<&str>, alg: Option<&str>| super::super::provider::Key {
            kid: kid.map(str::to_owned),
            alg: alg.map(str::to_owned),
            key: DecodingKey::from_secret(b"unused"),
        };
        let one = [key(Some("a"), Some("RS256"))];
        assert!(pick(&one, None, Algorithm::RS256).is_some());
        assert!(pick(&one, Some("b"), Algorithm::RS256).is_none());
        assert!(pick(&one, Some("a"), Algorithm::ES256).is_none());
        let two = [key(Some("a"), None), key(Some("b"), None)];
        assert!(pick(&two, None, Algorithm::RS256).is_none());
        assert_eq!(
            pick(&two, Some("b"), Algorithm::RS256)
                .unwrap()
                .kid
                .as_deref(),
            Some("b")
        );
    }
}
