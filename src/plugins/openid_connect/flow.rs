//! The relying party: login redirect, callback, session use and renewal, logout.
//!
//! A login in progress is a short-lived encrypted cookie (`<cookie_name>_login`) holding
//! the `state`, `nonce`, PKCE verifier and the URL to return to; the callback accepts a
//! code only when its `state` matches that cookie, and consumes the cookie, so a forged or
//! replayed callback never reaches the token endpoint. A stale state restarts the login
//! (at most [`MAX_RESTARTS`] times, as APISIX). Redirects only ever go to the OP's
//! endpoints, the configured URIs, or a path on the same host that the proxy itself saw.
//! The token endpoint and ID token validation go through `openidconnect` ([`tokens`]).
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use openidconnect::CsrfToken;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

use super::provider::{Discovery, FetchError};
use super::session::{self, Age, Sealer};
use super::{Plugin, Settings, now};
use crate::decision::Deny;
use crate::plugins::verified::VerifiedTokens;
use crate::plugins::{Ctx, Outcome};

mod login;
mod logout;
mod tokens;

use login::unauthenticated;

pub use session::SessionConfig;

/// Restarts of the login from stale callbacks before giving up.
const MAX_RESTARTS: u8 = 3;
/// How long a login may take at the OP.
const LOGIN_TTL: u64 = 600;

/// What the session cookie holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoginSession {
    sid: String,
    created: i64,
    /// Last time the cookie was re-sent (idle and rolling clocks).
    saved: i64,
    id_token: String,
    sub: String,
    access_token: Option<String>,
    access_exp: Option<i64>,
    refresh_token: Option<String>,
    /// The OP's userinfo answer as JSON text: only ever passed on (`X-Userinfo`).
    userinfo: Option<Box<serde_json::value::RawValue>>,
    scope: Option<String>,
}

/// What the login cookie holds while the user is at the OP.
#[derive(Debug, Serialize, Deserialize)]
struct PendingLogin {
    state: String,
    nonce: Option<String>,
    verifier: Option<String>,
    original: String,
    redirect_uri: String,
    created: i64,
    restarts: u8,
}

/// A route's compiled `session.*` settings, and the session cookies it opened lately.
#[derive(Debug)]
pub struct Sessions {
    pub cfg: SessionConfig,
    /// Cookie sessions by their sealed value. A browser sends the same cookie on every
    /// request until the session is renewed (about a minute later), and opening it —
    /// base64, AES-GCM, JSON, then re-encoding `X-ID-Token` and `X-Userinfo` — was
    /// three quarters of the plugin's work on a session Check (callgrind: 34k of 46k
    /// instructions). Remembering a new value costs about what opening it does, so
    /// the cache has paid for itself once a cookie was sent three to five times
    /// (`cargo bench --bench check -- session`). A hit needs the very same
    /// sealed text under the very same `session.secret`, so it can only return what
    /// opening that text returns; the session's clocks and the access token's expiry
    /// are still checked on every request. Sessions kept in Redis are not cached:
    /// there the store, which a logout empties, is the authority.
    opened: VerifiedTokens<Sealer, Arc<Opened>>,
    /// The path of a configured `redirect_uri`, parsed once.
    redirect_path: Option<String>,
}

/// How long an opened session is remembered: a session in use gets a new cookie at
/// least once a minute (`Lifetime::renew_interval`), after which its old value is
/// rarely sent again.
const OPENED_TTL: Duration = Duration::from_secs(120);
/// Bytes of opened sessions remembered per route: a few thousand sessions, the least
/// recently used out first (a renewed session's new cookie is the one sent next).
const OPENED_BYTES: u64 = 8 * 1024 * 1024;

impl Sessions {
    pub fn compile(settings: &Settings) -> Result<Option<Self>, String> {
        let Some(session) = &settings.session else {
            return Ok(None);
        };
        Ok(Some(Sessions {
            cfg: SessionConfig::compile(session)?,
            opened: VerifiedTokens::new_lru(OPENED_BYTES, OPENED_TTL),
            redirect_path: settings
                .redirect_uri
                .as_deref()
                .map(|uri| url::Url::parse(uri).map(|u| u.path().to_owned()))
                .transpose()
                .map_err(|e| format!("property \"redirect_uri\" is not a URL: {e}"))?,
        }))
    }
}

/// A session as opened from its cookie, with the upstream header values it gives
/// every request while the cookie stays the same.
#[derive(Debug)]
struct Opened {
    sess: LoginSession,
    /// `X-ID-Token`: the ID token's payload JSON as it came, base64.
    id_token_header: Option<String>,
    /// `X-Userinfo`: the OP's userinfo answer, base64.
    userinfo_header: Option<String>,
}

impl Opened {
    fn new(sess: LoginSession, s: &Settings) -> Self {
        let id_token_header = s
            .set_id_token_header
            .then(|| payload_json(&sess.id_token))
            .flatten()
            .map(|claims| STANDARD.encode(claims));
        let userinfo_header = s
            .set_userinfo_header
            .then_some(sess.userinfo.as_ref())
            .flatten()
            .map(|user| STANDARD.encode(user.get()));
        Opened {
            sess,
            id_token_header,
            userinfo_header,
        }
    }

    /// Heap bytes held, for the cache's bound.
    fn heap_bytes(&self) -> usize {
        let s = &self.sess;
        let text = |v: &Option<String>| v.as_ref().map_or(0, String::len);
        std::mem::size_of::<Self>()
            + s.sid.len()
            + s.id_token.len()
            + s.sub.len()
            + text(&s.access_token)
            + text(&s.refresh_token)
            + s.userinfo.as_ref().map_or(0, |u| u.get().len())
            + text(&s.scope)
            + text(&self.id_token_header)
            + text(&self.userinfo_header)
    }
}

fn random_token() -> String {
    CsrfToken::new_random().secret().clone()
}

/// Why the OP's answer ended the flow: its own refusal (401) or its absence (503).
#[derive(Debug)]
enum OpFailure {
    Refused(String),
    Unavailable(String),
}

impl From<FetchError> for OpFailure {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Status { status, .. } if (400..500).contains(&status) => {
                OpFailure::Refused(e.to_string())
            }
            other => OpFailure::Unavailable(other.to_string()),
        }
    }
}

impl OpFailure {
    fn deny(self) -> Deny {
        match self {
            OpFailure::Refused(reason) => {
                tracing::warn!(%reason, "openid-connect: login refused");
                Deny::new(401).because(format!("openid-connect: {reason}"))
            }
            OpFailure::Unavailable(reason) => {
                tracing::error!(%reason, "openid-connect: provider unavailable");
                Deny::message(503, "OpenID Provider unavailable")
                    .because(format!("openid-connect: {reason}"))
            }
        }
    }
}

pub async fn run(
    plugin: &Plugin,
    sessions: &Sessions,
    cx: &mut Ctx<'_>,
    http: &reqwest::Client,
) -> Outcome {
    let is_callback = match &sessions.redirect_path {
        Some(path) => cx.req.path == path,
        // The default redirect_uri is this very path plus the suffix: only a path that
        // already ends with it can be the callback.
        None => {
            cx.req.path.ends_with(REDIRECT_SUFFIX)
                && url::Url::parse(&redirect_uri(plugin, cx)).is_ok_and(|u| u.path() == cx.req.path)
        }
    };
    let result = if cx.req.path == plugin.settings.logout_path {
        logout::logout(plugin, sessions, cx, http).await
    } else if is_callback {
        login::callback(plugin, &sessions.cfg, cx, http).await
    } else {
        use_session(plugin, sessions, cx, http).await
    };
    match result {
        Ok(outcome) => outcome,
        Err(failure) => Outcome::Deny(failure.deny()),
    }
}

/// No usable session: a new login, with this request's redirect_uri (built only here,
/// not on every request that has a session).
async fn no_session(
    plugin: &Plugin,
    cfg: &SessionConfig,
    cx: &mut Ctx<'_>,
    http: &reqwest::Client,
) -> Result<Outcome, OpFailure> {
    let redirect_uri = redirect_uri(plugin, cx);
    unauthenticated(plugin, cfg, cx, http, &redirect_uri, 0, None).await
}

/// What APISIX appends to a request's path to make the default `redirect_uri`.
const REDIRECT_SUFFIX: &str = "/.apisix/redirect";

/// The configured redirect_uri, or APISIX's default: this path + `/.apisix/redirect`.
fn redirect_uri(plugin: &Plugin, cx: &Ctx<'_>) -> String {
    if let Some(uri) = &plugin.settings.redirect_uri {
        return uri.clone();
    }
    let path = cx.req.path;
    let path = if path.ends_with(REDIRECT_SUFFIX) {
        path.to_owned()
    } else {
        format!(
            "{}{REDIRECT_SUFFIX}",
            path.strip_suffix('/').unwrap_or(path)
        )
    };
    format!("{}://{}{path}", cx.req.scheme, cx.req.authority)
}

/// The OP's discovery document, refused unless its `issuer` is the one the discovery URL
/// was built from (OpenID Connect Discovery §4.3): a document served elsewhere cannot
/// make portcullis trust another issuer's ID tokens.
async fn discovery(
    plugin: &Plugin,
    cx: &Ctx<'_>,
    http: &reqwest::Client,
) -> Result<std::sync::Arc<Discovery>, OpFailure> {
    let url = &plugin.settings.discovery;
    let doc = cx
        .shared
        .openid_connect
        .discovery(http, url)
        .await
        .map_err(|e| OpFailure::Unavailable(e.to_string()))?;
    if !issuer_matches(&doc.issuer, url) {
        return Err(OpFailure::Unavailable(format!(
            "the discovery document at {url} names issuer {}, not the one it was fetched for",
            doc.issuer
        )));
    }
    Ok(doc)
}

fn issuer_matches(issuer: &str, discovery_url: &str) -> bool {
    discovery_url
        .strip_prefix(issuer.trim_end_matches('/'))
        .is_some_and(|rest| rest.starts_with("/.well-known/"))
}

async fn use_session(
    plugin: &Plugin,
    sessions: &Sessions,
    cx: &mut Ctx<'_>,
    http: &reqwest::Client,
) -> Result<Outcome, OpFailure> {
    let cfg = &sessions.cfg;
    let now = now();
    let found = load_session(plugin, sessions, cx.req).await?;
    let Some(mut opened) = found else {
        return no_session(plugin, cfg, cx, http).await;
    };
    let mut save = match cfg
        .lifetime
        .age(opened.sess.created, opened.sess.saved, now)
    {
        Age::Live { renew } => renew,
        Age::Expired(which) => {
            tracing::debug!(timeout = which, "openid-connect: session expired");
            return no_session(plugin, cfg, cx, http).await;
        }
    };
    let leeway = i64::try_from(plugin.settings.access_token_expires_leeway).unwrap_or(i64::MAX);
    let mut access_valid = true;
    if opened
        .sess
        .access_exp
        .is_some_and(|exp| exp.saturating_sub(leeway) <= now)
    {
        if plugin.settings.renew_access_token_on_expiry {
            let mut sess = opened.sess.clone();
            let renewed = match sess.refresh_token.clone() {
                Some(rt) => refresh(plugin, cx, http, &mut sess, &rt).await,
                None => false,
            };
            if !renewed {
                return no_session(plugin, cfg, cx, http).await;
            }
            opened = Arc::new(Opened::new(sess, &plugin.settings));
            save = true;
        } else {
            // lua-resty-openidc keeps such a session and only stops passing the token on.
            access_valid = false;
        }
    }
    let sess = &opened.sess;
    // The granted scopes come from decoding the tokens' payloads: only worth it when
    // the route requires some (a session Check decoded the ID token twice before).
    if plugin.settings.required_scopes.is_some()
        && let Some(deny) = plugin.check_scopes(session_scope(sess).as_deref())
    {
        return Ok(Outcome::Deny(deny));
    }
    if let Some(token) = sess.access_token.as_deref().filter(|_| access_valid) {
        plugin.set_access_token(cx, token);
    }
    let s = &plugin.settings;
    if let Some(v) = &opened.id_token_header {
        cx.allow.set_upstream("x-id-token", v.clone());
    }
    if let Some(v) = &opened.userinfo_header {
        cx.allow.set_upstream("x-userinfo", v.clone());
    }
    if s.set_refresh_token_header
        && let Some(rt) = sess
            .refresh_token
            .as_deref()
            .filter(|v| crate::decision::is_safe_header_value(v))
    {
        cx.allow.set_upstream("x-refresh-token", rt.to_owned());
    }
    if s.set_raw_id_token_header && crate::decision::is_safe_header_value(&sess.id_token) {
        cx.allow
            .set_upstream("x-raw-id-token", sess.id_token.clone());
    }
    hide_own_cookies(cfg, cx);
    if save {
        let mut sess = sess.clone();
        sess.saved = now;
        for c in session_cookies(cfg, cx.req, &sess, now).await? {
            cx.allow.add_client_header("set-cookie", c);
        }
    }
    Ok(Outcome::Continue)
}

/// Redis connections for `session.storage: redis`, shared by every snapshot.
static REDIS: std::sync::LazyLock<crate::plugins::limit_count::redis::Pool> =
    std::sync::LazyLock::new(Default::default);

/// What the cookie holds with `storage: redis`: only the session's id.
#[derive(Serialize, Deserialize)]
struct StoredRef {
    sid: String,
}

fn redis_key(prefix: &str, sid: &str) -> String {
    format!("{prefix}:{sid}")
}

fn store_failed(e: String) -> OpFailure {
    tracing::error!(error = %e, "openid-connect: session store (redis) failed");
    OpFailure::Unavailable(format!("session store unavailable: {e}"))
}

/// The request's session: from its cookies, or (with `storage: redis`) from Redis
/// by the id its cookie holds. A missing or tampered cookie, or an id Redis no
/// longer has, is no session; Redis not answering is a 503.
async fn load_session(
    plugin: &Plugin,
    sessions: &Sessions,
    req: &crate::request::Request<'_>,
) -> Result<Option<Arc<Opened>>, OpFailure> {
    let cfg = &sessions.cfg;
    let Some((target, prefix)) = &cfg.redis else {
        let Some(sealed) = session::sealed_value(req, &cfg.cookie_name) else {
            return Ok(None);
        };
        if let Some(opened) = sessions.opened.get(&sealed, &cfg.sealer) {
            return Ok(Some(opened));
        }
        let Some(sess) = cfg.sealer.open(&cfg.cookie_name, &sealed) else {
            return Ok(None);
        };
        let opened = Arc::new(Opened::new(sess, &plugin.settings));
        let bytes = opened.heap_bytes();
        sessions
            .opened
            .insert_with(&sealed, &cfg.sealer, opened.clone(), bytes);
        return Ok(Some(opened));
    };
    let Some(r) = session::read::<StoredRef>(&cfg.sealer, req, &cfg.cookie_name) else {
        return Ok(None);
    };
    let json = REDIS
        .get(target, &redis_key(prefix, &r.sid))
        .await
        .map_err(store_failed)?;
    Ok(json
        .and_then(|j| serde_json::from_str::<LoginSession>(&j).ok())
        .filter(|s| s.sid == r.sid)
        .map(|sess| Arc::new(Opened::new(sess, &plugin.settings))))
}

/// Forgets the request's session cookie as opened (logout): its decrypted tokens
/// need not stay in memory once the browser has been told to drop the cookie.
fn forget_opened(sessions: &Sessions, req: &crate::request::Request<'_>) {
    if let Some(sealed) = session::sealed_value(req, &sessions.cfg.cookie_name) {
        sessions.opened.remove(&sealed);
    }
}

/// The `Set-Cookie` values that store `sess`, replacing the chunks the request
/// carries; with `storage: redis` the session goes to Redis for its remaining
/// lifetime and the cookie carries only its id.
async fn session_cookies(
    cfg: &SessionConfig,
    req: &crate::request::Request<'_>,
    sess: &LoginSession,
    now: i64,
) -> Result<Vec<String>, OpFailure> {
    let max_age = cfg.lifetime.max_age(sess.created, now);
    let previous = session::present_chunks(req, &cfg.cookie_name);
    let Some((target, prefix)) = &cfg.redis else {
        return Ok(session::write(
            &cfg.sealer,
            &cfg.cookie_name,
            sess,
            &cfg.attrs,
            max_age,
            previous,
        ));
    };
    let json = serde_json::to_string(sess).expect("a session serialises");
    // Without an absolute timeout the session still may not outlive a day unused.
    let ttl = max_age.unwrap_or(86_400);
    REDIS
        .set_ex(target, &redis_key(prefix, &sess.sid), &json, ttl)
        .await
        .map_err(store_failed)?;
    Ok(session::write(
        &cfg.sealer,
        &cfg.cookie_name,
        &StoredRef {
            sid: sess.sid.clone(),
        },
        &cfg.attrs,
        max_age,
        previous,
    ))
}

/// Deletes a session kept in Redis (logout); cookie sessions end with their cookies.
async fn forget_session(cfg: &SessionConfig, sess: &LoginSession) {
    if let Some((target, prefix)) = &cfg.redis
        && let Err(e) = REDIS.del(target, &redis_key(prefix, &sess.sid)).await
    {
        tracing::error!(error = %e, "openid-connect: could not delete the session from redis");
    }
}

/// The session cookies are ours: the upstream gets the client's other cookies only.
fn hide_own_cookies(cfg: &SessionConfig, cx: &mut Ctx<'_>) {
    let Some(header) = cx.req.headers.get("cookie") else {
        return;
    };
    // One pass over the header (a session cookie makes it kilobytes long).
    let mut all = 0;
    let kept: Vec<&str> = header
        .split(';')
        .inspect(|_| all += 1)
        .map(str::trim)
        .filter(|c| {
            let name = c.split('=').next().unwrap_or_default().trim();
            !session::is_chunk_of(name, &cfg.cookie_name) && name != cfg.login_cookie
        })
        .collect();
    if kept.len() == all {
        return;
    }
    if kept.is_empty() {
        cx.allow.unset_upstream("cookie");
    } else {
        cx.allow.set_upstream("cookie", kept.join("; "));
    }
}

/// Scopes granted to the session: from a JWT access token, the ID token, or the token
/// response.
fn session_scope(sess: &LoginSession) -> Option<String> {
    let from = |claims: Option<Value>| {
        claims.and_then(|c| c.get("scope").and_then(Value::as_str).map(str::to_owned))
    };
    from(sess.access_token.as_deref().and_then(payload))
        .or_else(|| from(payload(&sess.id_token)))
        .or_else(|| sess.scope.clone())
}

/// The payload of a JWT whose integrity was proven earlier (it sits in our sealed
/// session).
fn payload(jwt: &str) -> Option<Value> {
    serde_json::from_slice(&payload_bytes(jwt)?).ok()
}

/// The payload's JSON text, as `X-ID-Token` passes it on: checked to be JSON, not
/// parsed into a tree and printed again on every Check.
fn payload_json(jwt: &str) -> Option<Vec<u8>> {
    let json = payload_bytes(jwt)?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&json).ok()?;
    Some(json)
}

fn payload_bytes(jwt: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(jwt.split('.').nth(1)?).ok()
}

/// When the access token stops being used: the OP's `expires_in`, else the route's
/// `access_token_expires_in`, else an hour (lua-resty-openidc's defaults).
fn access_exp(plugin: &Plugin, expires_in: Option<i64>, now: i64) -> i64 {
    let lifetime = expires_in
        .or(plugin
            .settings
            .access_token_expires_in
            .map(|v| i64::try_from(v).unwrap_or(i64::MAX)))
        .unwrap_or(3600);
    // The OP's `expires_in` is any JSON number: an absurd one means "never", not an
    // overflow into the past (a refresh on every request, or a login loop).
    now.saturating_add(lifetime)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Renews the session's tokens with its refresh token; false means log in again.
async fn refresh(
    plugin: &Plugin,
    cx: &Ctx<'_>,
    http: &reqwest::Client,
    sess: &mut LoginSession,
    refresh_token: &str,
) -> bool {
    let Ok(doc) = discovery(plugin, cx, http).await else {
        return false;
    };
    let tokens = match tokens::refresh(plugin, &doc, http, refresh_token, &sess.sub).await {
        Ok(t) => t,
        Err(OpFailure::Refused(reason) | OpFailure::Unavailable(reason)) => {
            tracing::info!(%reason, "openid-connect: refresh failed, login again");
            return false;
        }
    };
    let now = now();
    if let Some((id_token, _, _)) = tokens.id_token {
        sess.id_token = id_token;
    }
    sess.access_exp = Some(access_exp(plugin, tokens.expires_in, now));
    sess.access_token = Some(tokens.access_token);
    if tokens.refresh_token.is_some() {
        sess.refresh_token = tokens.refresh_token;
    }
    if tokens.scope.is_some() {
        sess.scope = tokens.scope;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::session::browser::{cookie_header, request};
    use super::*;

    #[test]
    fn the_discovered_issuer_must_be_the_configured_one() {
        let d = "https://op.test/realms/a/.well-known/openid-configuration";
        assert!(issuer_matches("https://op.test/realms/a", d));
        assert!(issuer_matches("https://op.test/realms/a/", d));
        assert!(!issuer_matches("https://op.test/realms/b", d));
        assert!(!issuer_matches("https://op.test/realms", d));
        assert!(!issuer_matches("https://evil.test", d));
    }

    fn session_plugin(secret: &str, headers: bool) -> Plugin {
        let shared = crate::plugins::Shared::default();
        let conf = serde_json::json!({
            "client_id": "c", "client_secret": "s",
            "discovery": "http://op.test/.well-known/openid-configuration",
            "redirect_uri": "http://app.test/cb/x?y=1",
            "set_id_token_header": headers, "set_userinfo_header": headers,
            "session": { "secret": secret },
        });
        Plugin::compile(&conf, &crate::plugins::BuildContext { shared: &shared }).unwrap()
    }

    #[test]
    fn an_absurd_expires_in_means_never_not_an_overflow() {
        let plugin = session_plugin("0123456789abcdef0123456789abcdef", false);
        let now = 1_700_000_000;
        assert_eq!(access_exp(&plugin, Some(300), now), now + 300);
        assert_eq!(access_exp(&plugin, None, now), now + 3600);
        assert_eq!(access_exp(&plugin, Some(i64::MAX), now), i64::MAX);
    }

    fn sample_session() -> LoginSession {
        let claims = r#"{"sub":"u1","exp":4102444800}"#;
        LoginSession {
            sid: "sid-1".into(),
            created: 1,
            saved: 1,
            id_token: format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(claims)),
            sub: "u1".into(),
            access_token: Some("at".into()),
            access_exp: None,
            refresh_token: None,
            userinfo: serde_json::value::RawValue::from_string(r#"{"sub":"u1"}"#.into()).ok(),
            scope: None,
        }
    }

    fn seal(plugin: &Plugin, sess: &LoginSession) -> Vec<String> {
        let cfg = &plugin.session.as_ref().unwrap().cfg;
        session::write(&cfg.sealer, &cfg.cookie_name, sess, &cfg.attrs, None, 0)
    }

    #[tokio::test]
    async fn an_opened_session_is_reused_only_for_the_same_cookie_under_the_same_secret() {
        let secret = "0123456789abcdef-secret";
        let plugin = session_plugin(secret, true);
        let sessions = plugin.session.as_ref().unwrap();
        let headers = cookie_header(&seal(&plugin, &sample_session()));
        let req = request(&headers);
        let load = || load_session(&plugin, sessions, &req);
        let first = load().await.unwrap().expect("opens");
        assert_eq!(first.sess.sid, "sid-1");
        assert_eq!(
            first.id_token_header.as_deref(),
            Some(STANDARD.encode(r#"{"sub":"u1","exp":4102444800}"#).as_str())
        );
        assert_eq!(
            first.userinfo_header.as_deref(),
            Some(STANDARD.encode(r#"{"sub":"u1"}"#).as_str())
        );
        let again = load().await.unwrap().expect("opens");
        assert!(
            Arc::ptr_eq(&first, &again),
            "the same cookie is opened once"
        );

        // Another value of the same session (sealed again: a new nonce) is opened afresh.
        let resealed = cookie_header(&seal(&plugin, &sample_session()));
        let other = load_session(&plugin, sessions, &request(&resealed))
            .await
            .unwrap()
            .expect("opens");
        assert!(!Arc::ptr_eq(&first, &other));

        // A cookie that fails authentication is no session, and is not remembered.
        let mut tampered = headers.clone();
        let at = tampered[0].1.len() - 2;
        tampered[0].1.insert(at, 'A');
        for _ in 0..2 {
            let found = load_session(&plugin, sessions, &request(&tampered)).await;
            assert!(found.unwrap().is_none());
        }

        // A reloaded route has its own secret's cache: the old cookie opens there only
        // if the secret is the same, and never from the old route's memory.
        let same = session_plugin(secret, true);
        let reopened = load_session(&same, same.session.as_ref().unwrap(), &req)
            .await
            .unwrap()
            .expect("same secret");
        assert!(!Arc::ptr_eq(&first, &reopened));
        let rotated = session_plugin("another-secret-0123456789", true);
        let found = load_session(&rotated, rotated.session.as_ref().unwrap(), &req).await;
        assert!(found.unwrap().is_none(), "a new secret opens no old cookie");

        // Logout forgets the opened session.
        forget_opened(sessions, &req);
        let after = load().await.unwrap().expect("still a valid cookie");
        assert!(!Arc::ptr_eq(&first, &after));
    }

    #[tokio::test]
    async fn an_opened_session_keeps_only_the_headers_the_route_sends() {
        let plugin = session_plugin("0123456789abcdef-secret", false);
        let headers = cookie_header(&seal(&plugin, &sample_session()));
        let opened = load_session(
            &plugin,
            plugin.session.as_ref().unwrap(),
            &request(&headers),
        )
        .await
        .unwrap()
        .expect("opens");
        assert_eq!(opened.id_token_header, None);
        assert_eq!(opened.userinfo_header, None);
    }

    #[test]
    fn a_configured_redirect_uri_is_parsed_once() {
        let plugin = session_plugin("0123456789abcdef-secret", true);
        let sessions = plugin.session.as_ref().unwrap();
        assert_eq!(sessions.redirect_path.as_deref(), Some("/cb/x"));
    }

    #[test]
    fn states_compare_in_constant_time_and_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn id_token_and_userinfo_headers_carry_the_json_as_it_came() {
        let claims = r#"{"sub":"u1","name":"Zo\u00eb","aud":["a","b"],"exp":4102444800}"#;
        let jwt = format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(claims));
        assert_eq!(payload_json(&jwt).as_deref(), Some(claims.as_bytes()));
        assert_eq!(payload(&jwt).unwrap()["name"], "Zo\u{eb}");
        for bad in ["e30.bm90IGpzb24.sig", "e30.%%%.sig", "e30"] {
            assert_eq!(payload_json(bad), None, "{bad}");
        }

        // A session sealed before userinfo was kept as text reads the same.
        let stored = r#"{"sid":"s","created":1,"saved":1,"id_token":"h.p.s","sub":"u1",
            "access_token":null,"access_exp":null,"refresh_token":null,
            "userinfo":{"sub":"u1","groups":["x"]},"scope":null}"#;
        let sess: LoginSession = serde_json::from_str(stored).unwrap();
        assert_eq!(
            sess.userinfo.as_ref().map(|u| u.get()),
            Some(r#"{"sub":"u1","groups":["x"]}"#)
        );
        let again: LoginSession =
            serde_json::from_str(&serde_json::to_string(&sess).unwrap()).unwrap();
        assert_eq!(
            again.userinfo.unwrap().get(),
            r#"{"sub":"u1","groups":["x"]}"#
        );
    }
}
