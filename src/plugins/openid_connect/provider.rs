//! What portcullis learns from the OpenID Provider, and remembers.
//!
//! Discovery documents, JWKS and introspection answers are fetched over one pooled
//! `reqwest` client per (timeout, TLS verification) pair and cached in [`Shared`], so a
//! configuration swap keeps them. Every fetch is bounded by the route's `timeout`; a
//! failure is returned as an error for the caller to turn into a decision and is never
//! cached, so an OP that comes back is used again at once. An unknown `kid` refetches the
//! JWKS, at most once per [`JWKS_REFETCH_INTERVAL`] per JWKS URL, which is how key
//! rotation works without a restart and without letting forged `kid`s hammer the OP.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::Jwk;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::plugins::verified::VerifiedTokens;

/// How long a discovery document is trusted (lua-resty-openidc's default is a day).
const DISCOVERY_TTL: Duration = Duration::from_secs(24 * 3600);
/// The least time between two JWKS fetches caused by an unknown `kid`.
pub const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(1);
/// Bound of the introspection cache (entries); the oldest go first.
const INTROSPECTION_CACHE_SIZE: u64 = 10_000;
/// Largest document accepted from the OP.
const MAX_BODY: usize = 1 << 20;

/// The parts of an OpenID Provider's discovery document portcullis uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: Option<String>,
    pub userinfo_endpoint: Option<String>,
    pub jwks_uri: Option<String>,
    pub introspection_endpoint: Option<String>,
    pub end_session_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
}

/// One verification key from a JWKS.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    /// The `alg` the JWK is restricted to, if it says.
    pub alg: Option<String>,
    pub key: DecodingKey,
}

pub struct KeySet {
    pub keys: Vec<Key>,
    /// SHA-256 of the document's `keys` as fetched. A fetch that finds the same keys
    /// renews this set instead of replacing it: tokens verified with a set stay
    /// verified only while that very set is in force (`plugins::verified`), and a
    /// client sending forged `kid`s forces a fetch every second.
    digest: [u8; 32],
    born: Instant,
    /// When a fetch last returned these keys, in nanoseconds after `born`.
    renewed: AtomicU64,
}

impl KeySet {
    fn new(keys: Vec<Key>, digest: [u8; 32]) -> KeySet {
        KeySet {
            keys,
            digest,
            born: Instant::now(),
            renewed: AtomicU64::new(0),
        }
    }

    /// Time since a fetch last returned these keys.
    fn age(&self) -> Duration {
        let renewed = Duration::from_nanos(self.renewed.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(renewed)
    }

    fn renew(&self) {
        let now = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.renewed.store(now, Ordering::Relaxed);
    }
}

/// Cached introspection answer for one token.
#[derive(Clone)]
struct Introspected {
    claims: Arc<super::bearer::Claims>,
    fetched: Instant,
    until: Instant,
}

/// Per-process state of the plugin, shared by every route and every snapshot.
pub struct Shared {
    clients: DashMap<(u64, bool), reqwest::Client>,
    discovery: DashMap<String, (Arc<Discovery>, Instant)>,
    jwks: DashMap<String, Arc<KeySet>>,
    /// Serialises JWKS fetches per URL so a burst of unknown `kid`s costs one fetch.
    jwks_fetch: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    introspection: moka::sync::Cache<[u8; 32], Introspected>,
    /// JWTs whose signature verified against a JWKS, by the key set they verified
    /// with: a rotated JWKS is a new set, so its tokens verify afresh.
    pub verified: VerifiedTokens<KeySet, super::bearer::Verified>,
    /// JWTs whose signature verified against a route's `public_key`, by that key: a
    /// config change compiles a new key, so its tokens verify afresh.
    pub verified_by_key: VerifiedTokens<DecodingKey, super::bearer::Verified>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            clients: DashMap::new(),
            discovery: DashMap::new(),
            jwks: DashMap::new(),
            jwks_fetch: DashMap::new(),
            introspection: moka::sync::Cache::builder()
                .max_capacity(INTROSPECTION_CACHE_SIZE)
                .time_to_live(Duration::from_secs(24 * 3600))
                .build(),
            verified: Default::default(),
            verified_by_key: Default::default(),
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("openid_connect::Shared")
            .field("discovery_documents", &self.discovery.len())
            .field("jwks", &self.jwks.len())
            .field("introspection_entries", &self.introspection.entry_count())
            .finish()
    }
}

/// Why the OP could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} answered an invalid document: {reason}")]
    Document { url: String, reason: String },
}

impl FetchError {
    /// The `kind` label of `portcullis_outbound_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::Transport { reason, .. } if reason == "timed out" => "timeout",
            FetchError::Transport { reason, .. } if reason == "connection failed" => "connect",
            _ => "other",
        }
    }
}

impl Shared {
    /// The pooled client for a route's `timeout` and `ssl_verify`.
    pub fn client(&self, timeout: Duration, ssl_verify: bool) -> reqwest::Client {
        let key = (timeout.as_millis() as u64, ssl_verify);
        if let Some(c) = self.clients.get(&key) {
            return c.clone();
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            // APISIX reaches the OP through a proxy only with `proxy_opts`, which
            // portcullis refuses: never take one from the environment.
            .no_proxy()
            .danger_accept_invalid_certs(!ssl_verify)
            .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        self.clients.entry(key).or_insert(client).clone()
    }

    pub async fn discovery(
        &self,
        http: &reqwest::Client,
        url: &str,
    ) -> Result<Arc<Discovery>, FetchError> {
        if let Some(entry) = self.discovery.get(url)
            && entry.1.elapsed() < DISCOVERY_TTL
        {
            return Ok(entry.0.clone());
        }
        let doc: Discovery = serde_json::from_value(get_json(http, url).await?).map_err(|e| {
            FetchError::Document {
                url: url.to_owned(),
                reason: e.to_string(),
            }
        })?;
        let doc = Arc::new(doc);
        self.discovery
            .insert(url.to_owned(), (doc.clone(), Instant::now()));
        Ok(doc)
    }

    /// The key set held for `url` if it is younger than `ttl`; never fetches.
    pub fn current_jwks(&self, url: &str, ttl: Duration) -> Option<Arc<KeySet>> {
        let set = self.jwks.get(url)?;
        (set.age() < ttl).then(|| set.value().clone())
    }

    /// The JWKS at `url`; `ttl` is the route's `jwk_expires_in`. With `refresh`, fetch again
    /// unless the cached copy is younger than [`JWKS_REFETCH_INTERVAL`].
    pub async fn jwks(
        &self,
        http: &reqwest::Client,
        url: &str,
        ttl: Duration,
        refresh: bool,
    ) -> Result<Arc<KeySet>, FetchError> {
        let fresh = |set: &KeySet| {
            let age = set.age();
            age < ttl && (!refresh || age < JWKS_REFETCH_INTERVAL)
        };
        if let Some(set) = self.jwks.get(url)
            && fresh(&set)
        {
            return Ok(set.clone());
        }
        let lock = self
            .jwks_fetch
            .entry(url.to_owned())
            .or_default()
            .value()
            .clone();
        let _guard = lock.lock().await;
        // Only this lock's holder replaces the set. Someone else may have fetched while
        // we waited.
        let current = self.jwks.get(url).map(|set| set.value().clone());
        if let Some(set) = &current
            && set.age() < JWKS_REFETCH_INTERVAL
        {
            return Ok(set.clone());
        }
        let doc = get_json(http, url).await?;
        let digest: [u8; 32] =
            Sha256::digest(doc.get("keys").unwrap_or(&Value::Null).to_string()).into();
        if let Some(set) = current
            && set.digest == digest
        {
            set.renew();
            return Ok(set);
        }
        let keys = parse_jwks(&doc).ok_or_else(|| FetchError::Document {
            url: url.to_owned(),
            reason: "no usable verification key".into(),
        })?;
        let set = Arc::new(KeySet::new(keys, digest));
        self.jwks.insert(url.to_owned(), set.clone());
        Ok(set)
    }

    /// A cached answer younger than `max_age` (a route's `introspection_interval`, so
    /// routes with different intervals sharing one answer each get their own bound).
    pub fn cached_introspection(
        &self,
        key: &[u8; 32],
        max_age: Option<Duration>,
    ) -> Option<Arc<super::bearer::Claims>> {
        let hit = self.introspection.get(key)?;
        if max_age.is_some_and(|max| hit.fetched.elapsed() >= max) {
            return None;
        }
        if hit.until > Instant::now() {
            Some(hit.claims)
        } else {
            self.introspection.invalidate(key);
            None
        }
    }

    pub fn remember_introspection(
        &self,
        key: [u8; 32],
        claims: Arc<super::bearer::Claims>,
        ttl: Duration,
    ) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let Some(until) = now.checked_add(ttl) else {
            return;
        };
        self.introspection.insert(
            key,
            Introspected {
                claims,
                fetched: now,
                until,
            },
        );
    }
}

/// The keys of a JWKS that can verify signatures; keys marked for encryption or of a
/// type we cannot use are skipped rather than failing the whole set.
fn parse_jwks(doc: &Value) -> Option<Vec<Key>> {
    let keys: Vec<Key> = doc
        .get("keys")?
        .as_array()?
        .iter()
        .filter(|k| k.get("use").and_then(Value::as_str).unwrap_or("sig") == "sig")
        .filter(|k| !matches!(k.get("kty").and_then(Value::as_str), Some("oct")))
        .filter_map(|k| {
            let jwk: Jwk = serde_json::from_value(k.clone()).ok()?;
            Some(Key {
                kid: k.get("kid").and_then(Value::as_str).map(str::to_owned),
                alg: k.get("alg").and_then(Value::as_str).map(str::to_owned),
                key: DecodingKey::from_jwk(&jwk).ok()?,
            })
        })
        .collect();
    (!keys.is_empty()).then_some(keys)
}

pub async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, FetchError> {
    let started = Instant::now();
    let result = async {
        let response = http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| transport(url, &e))?;
        read_json(url, response).await
    }
    .await;
    record_outbound(started, &result);
    result
}

/// `portcullis_outbound_duration_seconds` and `portcullis_outbound_errors_total` for one
/// call to the OP, labelled as forward-auth labels its calls.
pub fn record_outbound<T>(started: Instant, result: &Result<T, FetchError>) {
    metrics::histogram!("portcullis_outbound_duration_seconds", "plugin" => "openid-connect")
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        metrics::counter!("portcullis_outbound_errors_total", "plugin" => "openid-connect", "kind" => e.kind())
            .increment(1);
    }
}

/// `portcullis_cache_total{cache, result}` for the plugin's caches.
pub fn record_cache(cache: &'static str, hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!("portcullis_cache_total", "cache" => cache, "result" => result).increment(1);
}

/// Reads a JSON answer of bounded size; any status other than 2xx is an error.
pub async fn read_json(url: &str, response: reqwest::Response) -> Result<Value, FetchError> {
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status {
            url: url.to_owned(),
            status: status.as_u16(),
        });
    }
    let body = read_limited(url, response).await?;
    serde_json::from_slice(&body).map_err(|e| FetchError::Document {
        url: url.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads a body of any status, bounded in size.
pub async fn read_limited(
    url: &str,
    mut response: reqwest::Response,
) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport(url, &e))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(FetchError::Document {
                url: url.to_owned(),
                reason: "larger than 1 MiB".into(),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub fn transport(url: &str, e: &reqwest::Error) -> FetchError {
    let reason = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        e.to_string()
    };
    FetchError::Transport {
        url: url.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_keeps_signing_keys_and_skips_the_rest() {
        let doc = serde_json::json!({ "keys": [
            { "kty": "oct", "k": "c2VjcmV0", "kid": "hmac" },
            { "kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc",
              "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
              "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0" },
            { "kty": "EC", "crv": "P-256", "kid": "sig", "alg": "ES256",
              "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
              "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0" },
            { "kty": "unknown", "kid": "odd" }
        ]});
        let keys = parse_jwks(&doc).expect("one usable key");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("sig"));
        assert_eq!(keys[0].alg.as_deref(), Some("ES256"));
        assert!(parse_jwks(&serde_json::json!({ "keys": [] })).is_none());
    }

    /// A forged `kid` makes portcullis fetch the JWKS again (once a second at most);
    /// finding the same keys must keep the set, and with it every token verified
    /// with it, or each forged token would cost every client an RSA check again.
    #[tokio::test]
    async fn a_fetch_that_finds_the_same_keys_keeps_the_set() {
        use std::sync::Mutex;
        use std::sync::atomic::AtomicUsize;
        let jwk = |x: &str| {
            serde_json::json!({ "keys": [{ "kty": "EC", "crv": "P-256", "kid": "sig",
                "x": x, "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0" }] })
        };
        let served = Arc::new(Mutex::new(jwk(
            "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        )));
        let fetches = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get({
                let (served, fetches) = (served.clone(), fetches.clone());
                move || async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    axum::Json(served.lock().unwrap().clone())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let shared = Shared::default();
        let http = shared.client(Duration::from_secs(3), true);
        let ttl = Duration::from_secs(3600);
        let first = shared.jwks(&http, &url, ttl, false).await.unwrap();
        tokio::time::sleep(JWKS_REFETCH_INTERVAL + Duration::from_millis(100)).await;
        let again = shared.jwks(&http, &url, ttl, true).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 2, "fetched again");
        assert!(Arc::ptr_eq(&first, &again), "the same keys keep the set");
        assert!(first.age() < JWKS_REFETCH_INTERVAL, "renewed by the fetch");

        // Rotated keys are a new set, so tokens verified with the old one are not
        // taken as verified by the new one.
        *served.lock().unwrap() = jwk("MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4");
        tokio::time::sleep(JWKS_REFETCH_INTERVAL + Duration::from_millis(100)).await;
        let rotated = shared.jwks(&http, &url, ttl, true).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        assert!(!Arc::ptr_eq(&first, &rotated), "rotated keys are a new set");
    }
}
