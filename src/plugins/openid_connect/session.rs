//! The login session, kept only in the browser: encrypted, authenticated cookies.
//!
//! Nothing is stored server-side, so every replica configured with the same
//! `session.secret` reads every session. The cookie value is AES-256-GCM over the JSON
//! session, keyed by HKDF-SHA256 from the secret, with the cookie name as associated data
//! (a value moved to another cookie name does not open). A value larger than one cookie
//! can hold is split into numbered chunks: the first cookie says how many there are, and
//! a missing, extra or reordered chunk fails authentication like any tampering — the user
//! simply logs in again, the Check never fails with a 5xx.
//!
//! The lifetime rules are lua-resty-session 4's, as APISIX configures them: a session
//! ends `absolute_timeout` after the login whatever happens, and earlier when it was not
//! used for `idling_timeout` or not renewed for `rolling_timeout`. Only the browser can
//! hold the clocks, so a session in use is re-sent (renewed) now and then; [`Lifetime`]
//! decides both from an explicit `now`, which is what its tests inject.
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use rand::RngCore;
use serde::{Serialize, de::DeserializeOwned};
use sha2::Sha256;
use std::borrow::Cow;
use std::sync::Arc;

use crate::request::Request;

/// Bytes of encoded value per cookie; with name and attributes each `Set-Cookie` stays
/// under browsers' 4096-byte limit.
const CHUNK: usize = 3800;
/// At most this many chunks are read or written (about 60 KB of session).
const MAX_CHUNKS: usize = 16;

/// Cookie attributes from `session.*`.
#[derive(Debug, Clone)]
pub struct CookieAttrs {
    pub path: String,
    pub domain: Option<String>,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: Option<String>,
}

/// Seals and opens cookie values with a key derived from `session.secret`.
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    pub fn new(secret: &str) -> Self {
        let hk = Hkdf::<Sha256>::new(
            Some(b"portcullis openid-connect session"),
            secret.as_bytes(),
        );
        let mut key = [0u8; 32];
        hk.expand(b"aes-256-gcm v1", &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Sealer {
            cipher: Aes256Gcm::new(&key.into()),
        }
    }

    pub fn seal<T: Serialize>(&self, name: &str, value: &T) -> String {
        let plain = serde_json::to_vec(value).expect("session serialises");
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: name.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of a bounded message");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        URL_SAFE_NO_PAD.encode(out)
    }

    pub fn open<T: DeserializeOwned>(&self, name: &str, value: &str) -> Option<T> {
        let bytes = URL_SAFE_NO_PAD.decode(value).ok()?;
        if bytes.len() < 12 + 16 {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().ok()?;
        let plain = self
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: name.as_bytes(),
                },
            )
            .ok()?;
        serde_json::from_slice(&plain).ok()
    }
}

fn chunk_name(name: &str, index: usize) -> String {
    if index == 1 {
        name.to_owned()
    } else {
        format!("{name}_{index}")
    }
}

/// `Set-Cookie` values that store `value` under `name`, chunked, and expire chunks of a
/// previous, longer value (`previous_chunks` as read from the request).
pub fn write(
    sealer: &Sealer,
    name: &str,
    value: &impl Serialize,
    attrs: &CookieAttrs,
    max_age: Option<u64>,
    previous_chunks: usize,
) -> Vec<String> {
    let sealed = sealer.seal(name, value);
    let parts: Vec<&str> = sealed
        .as_bytes()
        .chunks(CHUNK)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    let count = parts.len().min(MAX_CHUNKS);
    let mut cookies: Vec<String> = parts
        .iter()
        .take(count)
        .enumerate()
        .map(|(i, part)| {
            let v = if i == 0 {
                format!("{count}.{part}")
            } else {
                (*part).to_owned()
            };
            set_cookie(&chunk_name(name, i + 1), &v, attrs, max_age)
        })
        .collect();
    for index in count + 1..=previous_chunks.max(count) {
        cookies.push(set_cookie(&chunk_name(name, index), "", attrs, Some(0)));
    }
    cookies
}

/// `Set-Cookie` values that delete every chunk of `name` the request carries.
pub fn clear(req: &Request<'_>, name: &str, attrs: &CookieAttrs) -> Vec<String> {
    let present = present_chunks(req, name).max(1);
    (1..=present)
        .map(|i| set_cookie(&chunk_name(name, i), "", attrs, Some(0)))
        .collect()
}

/// How many chunk cookies of `name` the request carries (for clean-up).
pub fn present_chunks(req: &Request<'_>, name: &str) -> usize {
    (1..=MAX_CHUNKS)
        .take_while(|i| req.cookie(&chunk_name(name, *i)).is_some())
        .count()
}

/// Reassembles and opens the value of `name`; `None` for anything missing or tampered.
pub fn read<T: DeserializeOwned>(sealer: &Sealer, req: &Request<'_>, name: &str) -> Option<T> {
    sealer.open(name, &sealed_value(req, name)?)
}

/// The sealed text of `name` as [`Sealer::open`] takes it, chunks joined: borrowed from
/// the `Cookie` header when the value fits one cookie (the usual case), so a caller
/// can look it up before paying for the decryption.
pub fn sealed_value<'a>(req: &Request<'a>, name: &str) -> Option<Cow<'a, str>> {
    let first = req.cookie(name)?;
    let (count, head) = first.split_once('.')?;
    let count: usize = count.parse().ok()?;
    if count == 0 || count > MAX_CHUNKS {
        return None;
    }
    if count == 1 {
        return Some(Cow::Borrowed(head));
    }
    let mut sealed = head.to_owned();
    for i in 2..=count {
        sealed.push_str(req.cookie(&chunk_name(name, i))?);
    }
    Some(Cow::Owned(sealed))
}

/// Is this cookie name one of the chunks of `name`?
pub fn is_chunk_of(cookie: &str, name: &str) -> bool {
    cookie == name
        || cookie
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('_'))
            .is_some_and(|n| {
                n.parse::<usize>()
                    .is_ok_and(|n| (2..=MAX_CHUNKS).contains(&n))
            })
}

fn set_cookie(name: &str, value: &str, attrs: &CookieAttrs, max_age: Option<u64>) -> String {
    let mut c = format!("{name}={value}; Path={}", attrs.path);
    if let Some(domain) = &attrs.domain {
        c.push_str("; Domain=");
        c.push_str(domain);
    }
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
        if age == 0 {
            c.push_str("; Expires=Thu, 01 Jan 1970 00:00:00 GMT");
        }
    }
    if attrs.secure {
        c.push_str("; Secure");
    }
    if attrs.http_only {
        c.push_str("; HttpOnly");
    }
    if let Some(same_site) = &attrs.same_site {
        c.push_str("; SameSite=");
        c.push_str(same_site);
    }
    c
}

/// Compiled `session.*` settings: the sealer, the cookie's name and attributes, and the
/// lifetime rules.
#[derive(Debug)]
pub struct SessionConfig {
    /// Shared so that a cache of opened sessions can tell this key from a later one.
    pub sealer: Arc<Sealer>,
    /// With `storage: redis`: where sessions live, and their key prefix.
    pub redis: Option<(crate::plugins::limit_count::redis::Target, String)>,
    pub cookie_name: String,
    /// The short-lived cookie of a login in progress.
    pub login_cookie: String,
    pub attrs: CookieAttrs,
    pub lifetime: Lifetime,
}

impl SessionConfig {
    pub fn compile(s: &super::SessionSettings) -> Result<Self, String> {
        if s.secret.chars().count() < 16 {
            return Err("property \"session.secret\" must be at least 16 characters".into());
        }
        let cookie_name = s.cookie_name.clone().unwrap_or_else(|| "session".into());
        if !crate::decision::is_safe_header_name(&cookie_name) || cookie_name.contains(['=', ';']) {
            return Err("property \"session.cookie_name\" is not a valid cookie name".into());
        }
        let same_site = match s.cookie_same_site.as_deref() {
            None => Some("Lax".to_owned()),
            Some("Default") => None,
            Some(v @ ("Strict" | "Lax" | "None")) => Some(v.to_owned()),
            Some(other) => {
                return Err(format!(
                    "property \"session.cookie_same_site\" must be Strict, Lax, None or Default, got \"{other}\""
                ));
            }
        };
        let path = s.cookie_path.clone().unwrap_or_else(|| "/".into());
        let domain = s.cookie_domain.clone();
        for (field, value) in [
            ("cookie_path", Some(&path)),
            ("cookie_domain", domain.as_ref()),
        ] {
            if value.is_some_and(|v| {
                v.is_empty() || v.contains([';', ',']) || !crate::decision::is_safe_header_value(v)
            }) {
                return Err(format!(
                    "property \"session.{field}\" is not a valid cookie attribute"
                ));
            }
        }
        let secure = s
            .cookie_secure
            .unwrap_or(same_site.as_deref() == Some("None"));
        let seconds = |v: Option<u64>, default: u64| v.unwrap_or(default) as i64;
        let redis = match (&s.storage, &s.redis) {
            (super::SessionStorage::Cookie, _) => None,
            (super::SessionStorage::Redis, None) => {
                return Err(
                    "property \"session.redis\" is required when \"session.storage\" is redis"
                        .into(),
                );
            }
            (super::SessionStorage::Redis, Some(r)) => {
                let timeout = [r.connect_timeout, r.send_timeout, r.read_timeout]
                    .into_iter()
                    .map(|t| t.unwrap_or(1000))
                    .max()
                    .unwrap_or(1000);
                let target = crate::plugins::limit_count::redis::Target::new(
                    &crate::plugins::limit_count::redis::Settings {
                        redis_host: Some(r.host.clone()),
                        redis_port: r.port,
                        redis_username: r.username.clone(),
                        redis_password: r.password.clone(),
                        redis_database: r.database,
                        redis_timeout: timeout,
                        redis_ssl: r.ssl,
                    },
                )
                .map_err(|e| format!("session.redis: {}", e.replace("redis_", "")))?;
                Some((target, r.prefix.clone()))
            }
        };
        Ok(SessionConfig {
            redis,
            sealer: Arc::new(Sealer::new(&s.secret)),
            login_cookie: format!("{cookie_name}_login"),
            cookie_name,
            attrs: CookieAttrs {
                path,
                domain,
                secure,
                http_only: s.cookie_http_only.unwrap_or(true),
                same_site,
            },
            lifetime: Lifetime {
                idling: seconds(s.idling_timeout, 900),
                rolling: seconds(s.rolling_timeout, 3600),
                absolute: seconds(
                    s.absolute_timeout
                        .or(s.cookie.as_ref().and_then(|c| c.lifetime)),
                    86400,
                ),
            },
        })
    }
}

/// lua-resty-session 4's three timeouts, in seconds; 0 switches one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub idling: i64,
    pub rolling: i64,
    pub absolute: i64,
}

/// What a session's clocks say at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Age {
    /// Valid; `renew` asks for the cookie to be re-sent to move the idle and rolling clocks.
    Live { renew: bool },
    /// Over one of its timeouts: log in again.
    Expired(&'static str),
}

impl Lifetime {
    /// `created`: the login; `renewed`: the last time the cookie was re-sent.
    pub fn age(&self, created: i64, renewed: i64, now: i64) -> Age {
        if self.absolute > 0 && now - created >= self.absolute {
            return Age::Expired("absolute_timeout");
        }
        if self.idling > 0 && now - renewed >= self.idling {
            return Age::Expired("idling_timeout");
        }
        if self.rolling > 0 && now - renewed >= self.rolling {
            return Age::Expired("rolling_timeout");
        }
        Age::Live {
            renew: now - renewed >= self.renew_interval(),
        }
    }

    /// How often a session in use is re-sent: often enough that a user who keeps
    /// clicking never meets the idle or rolling limit, rarely enough that most requests
    /// carry no `Set-Cookie`.
    fn renew_interval(&self) -> i64 {
        [self.idling, self.rolling]
            .into_iter()
            .filter(|t| *t > 0)
            .map(|t| t / 4)
            .fold(60, i64::min)
            .max(1)
    }

    /// `Max-Age` of a cookie saved at `now`: what is left of the absolute lifetime.
    pub fn max_age(&self, created: i64, now: i64) -> Option<u64> {
        (self.absolute > 0).then(|| (created + self.absolute - now).max(0) as u64)
    }
}

/// What a browser sends back, for the tests of this module and of the login flow.
#[cfg(test)]
pub(super) mod browser {
    use crate::request::{Headers, Parts, Request};

    /// The `Cookie` header a browser sends back for these `Set-Cookie`s.
    pub fn cookie_header(set_cookies: &[String]) -> Vec<(String, String)> {
        let pairs: Vec<&str> = set_cookies
            .iter()
            .map(|c| c.split(';').next().unwrap())
            .collect();
        vec![("cookie".to_owned(), pairs.join("; "))]
    }

    /// `GET /` on app.test with these headers.
    pub fn request(headers: &[(String, String)]) -> Request<'_> {
        Request::assemble(Parts {
            method: "GET",
            scheme: "http",
            authority: "app.test",
            request_uri: "/",
            headers: Headers::Pairs(headers),
            source_ip: None,
            context_extensions: &[],
            body: b"",
            body_truncated: false,
            body_size: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::browser::{cookie_header, request};
    use super::*;

    fn attrs() -> CookieAttrs {
        CookieAttrs {
            path: "/".into(),
            domain: None,
            secure: true,
            http_only: true,
            same_site: Some("Lax".into()),
        }
    }

    #[test]
    fn large_values_round_trip_through_chunks() {
        let sealer = Sealer::new("a-secret-of-sixteen+");
        let value = serde_json::json!({ "big": "x".repeat(9000) });
        let cookies = write(&sealer, "session", &value, &attrs(), None, 0);
        assert_eq!(cookies.len(), 4);
        assert!(cookies.iter().all(|c| c.len() < 4096));
        assert!(cookies[1].starts_with("session_2="));
        let h = cookie_header(&cookies);
        let back: serde_json::Value = read(&sealer, &request(&h), "session").unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn tampered_missing_reordered_or_foreign_chunks_open_nothing() {
        let sealer = Sealer::new("a-secret-of-sixteen+");
        let value = serde_json::json!({ "big": "y".repeat(5000) });
        let cookies = write(&sealer, "session", &value, &attrs(), None, 0);
        assert_eq!(cookies.len(), 2);

        let h = cookie_header(&cookies[..1]);
        assert!(read::<serde_json::Value>(&sealer, &request(&h), "session").is_none());

        let swapped = vec![
            cookies[0].replacen("session=2.", "session=2.A", 1),
            cookies[1].clone(),
        ];
        let h = cookie_header(&swapped);
        assert!(read::<serde_json::Value>(&sealer, &request(&h), "session").is_none());

        let other = Sealer::new("another-secret-16+");
        let h = cookie_header(&cookies);
        assert!(read::<serde_json::Value>(&other, &request(&h), "session").is_none());

        let renamed: Vec<String> = cookies
            .iter()
            .map(|c| c.replacen("session", "sess", 1))
            .collect();
        let h = cookie_header(&renamed);
        assert!(read::<serde_json::Value>(&sealer, &request(&h), "sess").is_none());
    }

    #[test]
    fn replicas_with_the_same_secret_share_sessions() {
        let cookies = write(
            &Sealer::new("shared-by-every-replica"),
            "session",
            &"alice",
            &attrs(),
            None,
            0,
        );
        let h = cookie_header(&cookies);
        let other_replica = Sealer::new("shared-by-every-replica");
        let back: String = read(&other_replica, &request(&h), "session").unwrap();
        assert_eq!(back, "alice");
    }

    #[test]
    fn shrinking_a_session_expires_the_extra_chunks() {
        let sealer = Sealer::new("a-secret-of-sixteen+");
        let cookies = write(&sealer, "s", &"small", &attrs(), Some(60), 3);
        assert_eq!(cookies.len(), 3);
        assert!(cookies[1].starts_with("s_2=; Path=/; Max-Age=0"));
        assert!(cookies[0].contains("Max-Age=60; Secure; HttpOnly; SameSite=Lax"));
        assert!(is_chunk_of("s_2", "s") && is_chunk_of("s", "s") && !is_chunk_of("s_x", "s"));
    }

    fn lifetime() -> Lifetime {
        Lifetime {
            idling: 900,
            rolling: 3600,
            absolute: 86400,
        }
    }

    #[test]
    fn idle_sessions_expire_and_used_ones_are_renewed() {
        let l = lifetime();
        let t0 = 1_000_000;
        assert_eq!(l.age(t0, t0, t0), Age::Live { renew: false });
        assert_eq!(l.age(t0, t0, t0 + 59), Age::Live { renew: false });
        assert_eq!(l.age(t0, t0, t0 + 60), Age::Live { renew: true });
        assert_eq!(l.age(t0, t0, t0 + 899), Age::Live { renew: true });
        assert_eq!(l.age(t0, t0, t0 + 900), Age::Expired("idling_timeout"));
        // Renewed a minute ago: the idle clock restarted.
        assert_eq!(l.age(t0, t0 + 880, t0 + 940), Age::Live { renew: true });
    }

    #[test]
    fn rolling_and_absolute_timeouts_bound_even_a_busy_session() {
        let busy = Lifetime {
            idling: 0,
            rolling: 600,
            absolute: 3000,
        };
        let t0 = 5_000;
        assert_eq!(busy.age(t0, t0, t0 + 599), Age::Live { renew: true });
        assert_eq!(busy.age(t0, t0, t0 + 600), Age::Expired("rolling_timeout"));
        // Renewed every few minutes, it still ends at the absolute limit.
        assert_eq!(
            busy.age(t0, t0 + 2950, t0 + 2999),
            Age::Live { renew: false }
        );
        assert_eq!(
            busy.age(t0, t0 + 2950, t0 + 3000),
            Age::Expired("absolute_timeout")
        );
        assert_eq!(busy.max_age(t0, t0 + 1000), Some(2000));
        assert_eq!(busy.max_age(t0, t0 + 4000), Some(0));
        let off = Lifetime {
            idling: 0,
            rolling: 0,
            absolute: 0,
        };
        assert_eq!(off.age(0, 0, 10_000_000), Age::Live { renew: true });
        assert_eq!(off.max_age(0, 5), None);
    }

    #[test]
    fn short_timeouts_renew_sooner() {
        let short = Lifetime {
            idling: 20,
            rolling: 3600,
            absolute: 86400,
        };
        assert_eq!(short.age(0, 0, 4), Age::Live { renew: false });
        assert_eq!(short.age(0, 0, 5), Age::Live { renew: true });
    }

    #[test]
    fn session_settings_compile_with_apisix_defaults() {
        let settings: super::super::SessionSettings =
            serde_json::from_value(serde_json::json!({ "secret": "0123456789abcdef" })).unwrap();
        let cfg = SessionConfig::compile(&settings).unwrap();
        assert_eq!(cfg.cookie_name, "session");
        assert_eq!(cfg.lifetime, lifetime());
        assert!(cfg.attrs.http_only && !cfg.attrs.secure);
        assert_eq!(cfg.attrs.same_site.as_deref(), Some("Lax"));
        let legacy: super::super::SessionSettings = serde_json::from_value(
            serde_json::json!({ "secret": "0123456789abcdef", "cookie": { "lifetime": 42 },
                                "cookie_same_site": "None" }),
        )
        .unwrap();
        let cfg = SessionConfig::compile(&legacy).unwrap();
        assert_eq!(cfg.lifetime.absolute, 42);
        assert!(cfg.attrs.secure, "SameSite=None needs Secure");
        let bad: super::super::SessionSettings = serde_json::from_value(
            serde_json::json!({ "secret": "0123456789abcdef", "cookie_path": "/; Domain=evil" }),
        )
        .unwrap();
        assert!(SessionConfig::compile(&bad).is_err());
    }
}
