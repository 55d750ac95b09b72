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
use openidconnect::{CsrfToken, Nonce, PkceCodeChallenge};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::provider::{Discovery, FetchError, read_json, transport};
use super::session::{self, Age};
use super::{AuthMethod, Plugin, UnauthAction, now};
use crate::decision::Deny;
use crate::plugins::{Ctx, Outcome};

mod tokens;

pub use session::SessionConfig;

/// Restarts of the login from stale callbacks before giving up.
const MAX_RESTARTS: u8 = 3;
/// How long a login may take at the OP.
const LOGIN_TTL: u64 = 600;

/// What the session cookie holds.
#[derive(Debug, Serialize, Deserialize)]
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
    userinfo: Option<Value>,
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

fn random_token() -> String {
    CsrfToken::new_random().secret().clone()
}

/// Why the OP's answer ended the flow: its own refusal (401) or its absence (503).
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
    cfg: &SessionConfig,
    cx: &mut Ctx<'_>,
    http: &reqwest::Client,
) -> Outcome {
    let redirect_uri = redirect_uri(plugin, cx);
    let redirect_path = url::Url::parse(&redirect_uri)
        .map(|u| u.path().to_owned())
        .unwrap_or_default();
    let result = if cx.req.path == plugin.settings.logout_path {
        logout(plugin, cfg, cx, http).await
    } else if cx.req.path == redirect_path {
        callback(plugin, cfg, cx, http).await
    } else {
        use_session(plugin, cfg, cx, http, &redirect_uri).await
    };
    match result {
        Ok(outcome) => outcome,
        Err(failure) => Outcome::Deny(failure.deny()),
    }
}

/// The configured redirect_uri, or APISIX's default: this path + `/.apisix/redirect`.
fn redirect_uri(plugin: &Plugin, cx: &Ctx<'_>) -> String {
    if let Some(uri) = &plugin.settings.redirect_uri {
        return uri.clone();
    }
    const SUFFIX: &str = "/.apisix/redirect";
    let path = cx.req.path;
    let path = if path.ends_with(SUFFIX) {
        path.to_owned()
    } else {
        format!("{}{SUFFIX}", path.strip_suffix('/').unwrap_or(path))
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
    cfg: &SessionConfig,
    cx: &mut Ctx<'_>,
    http: &reqwest::Client,
    redirect_uri: &str,
) -> Result<Outcome, OpFailure> {
    let now = now();
    let found: Option<LoginSession> = session::read(&cfg.sealer, cx.req, &cfg.cookie_name);
    let Some(mut sess) = found else {
        return unauthenticated(plugin, cfg, cx, http, redirect_uri, 0, None).await;
    };
    let mut save = match cfg.lifetime.age(sess.created, sess.saved, now) {
        Age::Live { renew } => renew,
        Age::Expired(which) => {
            tracing::debug!(timeout = which, "openid-connect: session expired");
            return unauthenticated(plugin, cfg, cx, http, redirect_uri, 0, None).await;
        }
    };
    let leeway = plugin.settings.access_token_expires_leeway as i64;
    let mut access_valid = true;
    if sess.access_exp.is_some_and(|exp| exp - leeway <= now) {
        if plugin.settings.renew_access_token_on_expiry {
            let renewed = match sess.refresh_token.clone() {
                Some(rt) => refresh(plugin, cx, http, &mut sess, &rt).await,
                None => false,
            };
            if !renewed {
                return unauthenticated(plugin, cfg, cx, http, redirect_uri, 0, None).await;
            }
            save = true;
        } else {
            // lua-resty-openidc keeps such a session and only stops passing the token on.
            access_valid = false;
        }
    }
    let granted = session_scope(&sess);
    if let Some(deny) = plugin.check_scopes(granted.as_deref()) {
        return Ok(Outcome::Deny(deny));
    }
    if let Some(token) = sess.access_token.as_deref().filter(|_| access_valid) {
        plugin.set_access_token(cx, token);
    }
    let s = &plugin.settings;
    if s.set_id_token_header
        && let Some(claims) = payload(&sess.id_token)
    {
        cx.allow
            .set_upstream("x-id-token", STANDARD.encode(claims.to_string()));
    }
    if s.set_userinfo_header
        && let Some(user) = &sess.userinfo
    {
        cx.allow
            .set_upstream("x-userinfo", STANDARD.encode(user.to_string()));
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
        sess.saved = now;
        let previous = session::present_chunks(cx.req, &cfg.cookie_name);
        for c in session::write(
            &cfg.sealer,
            &cfg.cookie_name,
            &sess,
            &cfg.attrs,
            cfg.lifetime.max_age(sess.created, now),
            previous,
        ) {
            cx.allow.add_client_header("set-cookie", c);
        }
    }
    Ok(Outcome::Continue)
}

/// The session cookies are ours: the upstream gets the client's other cookies only.
fn hide_own_cookies(cfg: &SessionConfig, cx: &mut Ctx<'_>) {
    let Some(header) = cx.req.headers.get("cookie") else {
        return;
    };
    let kept: Vec<&str> = header
        .split(';')
        .map(str::trim)
        .filter(|c| {
            let name = c.split('=').next().unwrap_or_default().trim();
            !session::is_chunk_of(name, &cfg.cookie_name) && name != cfg.login_cookie
        })
        .collect();
    if kept.len() == header.split(';').count() {
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
    let part = jwt.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

/// No usable session: start a login, deny or pass, per `unauth_action`.
async fn unauthenticated(
    plugin: &Plugin,
    cfg: &SessionConfig,
    cx: &mut Ctx<'_>,
    http: &reqwest::Client,
    redirect_uri: &str,
    restarts: u8,
    original: Option<String>,
) -> Result<Outcome, OpFailure> {
    match plugin.settings.unauth_action {
        UnauthAction::Pass => {
            hide_own_cookies(cfg, cx);
            return Ok(Outcome::Continue);
        }
        UnauthAction::Deny => {
            return Ok(Outcome::Deny(
                Deny::new(401).because("openid-connect: no session (unauth_action deny)"),
            ));
        }
        UnauthAction::Auth if wants_json(cx.req.headers.get("accept")) => {
            return Ok(Outcome::Deny(
                Deny::new(401)
                    .header(
                        "www-authenticate",
                        format!("Bearer realm=\"{}\"", plugin.settings.realm),
                    )
                    .because("openid-connect: no session, and the client asked for JSON"),
            ));
        }
        UnauthAction::Auth => {}
    }
    let doc = discovery(plugin, cx, http).await?;
    let Some(endpoint) = &doc.authorization_endpoint else {
        return Err(OpFailure::Unavailable(
            "the provider publishes no authorization_endpoint".into(),
        ));
    };
    let s = &plugin.settings;
    let pkce = s.use_pkce.then(PkceCodeChallenge::new_random_sha256);
    let pending = PendingLogin {
        state: CsrfToken::new_random().secret().clone(),
        nonce: s.use_nonce.then(|| Nonce::new_random().secret().clone()),
        verifier: pkce.as_ref().map(|(_, v)| v.secret().clone()),
        original: original.unwrap_or_else(|| same_site_target(cx.req.request_uri)),
        redirect_uri: redirect_uri.to_owned(),
        created: now(),
        restarts,
    };
    let mut location = url::Url::parse(endpoint)
        .map_err(|e| OpFailure::Unavailable(format!("bad authorization_endpoint: {e}")))?;
    {
        let mut q = location.query_pairs_mut();
        const OURS: &[&str] = &[
            "response_type",
            "client_id",
            "redirect_uri",
            "state",
            "nonce",
            "code_challenge",
            "code_challenge_method",
        ];
        for (k, v) in s.authorization_params.iter().flatten() {
            if OURS.contains(&k.as_str()) || k == "scope" {
                continue;
            }
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            q.append_pair(k, &v);
        }
        q.append_pair("response_type", "code")
            .append_pair("client_id", &s.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &s.scope)
            .append_pair("state", &pending.state);
        if let Some(nonce) = &pending.nonce {
            q.append_pair("nonce", nonce);
        }
        if let Some((challenge, _)) = &pkce {
            q.append_pair("code_challenge", challenge.as_str())
                .append_pair("code_challenge_method", challenge.method().as_str());
        }
    }
    let mut deny = Deny::new(302)
        .header("location", location.to_string())
        .header("cache-control", "no-store")
        .because("openid-connect: login required");
    for c in session::write(
        &cfg.sealer,
        &cfg.login_cookie,
        &pending,
        &cfg.attrs,
        Some(LOGIN_TTL),
        0,
    ) {
        deny = deny.header("set-cookie", c);
    }
    Ok(Outcome::Deny(deny))
}

/// An API client (one that asks for JSON and not for a page) cannot follow a login
/// redirect to the OP's HTML forms: it gets a 401 instead. Browsers navigating always
/// list `text/html`. (A portcullis addition: APISIX redirects every client.)
fn wants_json(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let types: Vec<String> = accept
        .split(',')
        .filter_map(|t| {
            let (media, params) = t.split_once(';').unwrap_or((t, ""));
            let refused = params.split(';').any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f32>() == Ok(0.0))
            });
            (!refused).then(|| media.trim().to_ascii_lowercase())
        })
        .collect();
    let json = types
        .iter()
        .any(|t| t == "application/json" || t.ends_with("+json"));
    let html = types
        .iter()
        .any(|t| t == "text/html" || t == "application/xhtml+xml" || t == "text/*");
    json && !html
}

/// Only a path on this host is a place to return to: `//host`, `/\host` and anything
/// that is not a path become `/`.
fn same_site_target(request_uri: &str) -> String {
    let ok = request_uri.starts_with('/')
        && !request_uri.starts_with("//")
        && !request_uri.starts_with("/\\")
        && !request_uri.bytes().any(|b| b < 0x20 || b == 0x7f);
    if ok {
        request_uri.to_owned()
    } else {
        "/".to_owned()
    }
}

async fn callback(
    plugin: &Plugin,
    cfg: &SessionConfig,
    cx: &mut Ctx<'_>,
    http: &reqwest::Client,
) -> Result<Outcome, OpFailure> {
    let pending: Option<PendingLogin> = session::read(&cfg.sealer, cx.req, &cfg.login_cookie);
    let pending = pending.filter(|p| now() - p.created <= LOGIN_TTL as i64);
    let state = cx.req.query_param("state");
    let Some(pending) = pending else {
        return Ok(Outcome::Deny(
            Deny::new(401).because("openid-connect: callback without a login in progress"),
        ));
    };
    let matches = state
        .as_deref()
        .is_some_and(|s| constant_time_eq(s.as_bytes(), pending.state.as_bytes()));
    if !matches {
        if pending.restarts < MAX_RESTARTS && cx.req.method == "GET" {
            tracing::warn!("openid-connect: state mismatch, restarting the login");
            let redirect_uri = pending.redirect_uri.clone();
            return unauthenticated(
                plugin,
                cfg,
                cx,
                http,
                &redirect_uri,
                pending.restarts + 1,
                Some(pending.original),
            )
            .await;
        }
        return Ok(Outcome::Deny(
            Deny::new(401).because("openid-connect: state mismatch"),
        ));
    }
    if let Some(error) = cx.req.query_param("error") {
        // APISIX restarts a login the OP could not serve for a moment; any other error
        // (access_denied, login_required, …) is the OP's answer and ends here.
        if error == "temporarily_unavailable"
            && pending.restarts < MAX_RESTARTS
            && cx.req.method == "GET"
        {
            let redirect_uri = pending.redirect_uri.clone();
            return unauthenticated(
                plugin,
                cfg,
                cx,
                http,
                &redirect_uri,
                pending.restarts + 1,
                Some(pending.original),
            )
            .await;
        }
        let error: String = error
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect();
        let mut deny = Deny::message(401, "the OpenID Provider refused the login")
            .header("cache-control", "no-store")
            .because(format!(
                "openid-connect: the provider answered error={error}"
            ));
        for c in session::clear(cx.req, &cfg.login_cookie, &cfg.attrs) {
            deny = deny.header("set-cookie", c);
        }
        return Ok(Outcome::Deny(deny));
    }
    let Some(code) = cx.req.query_param("code") else {
        return Ok(Outcome::Deny(
            Deny::new(401).because("openid-connect: callback without a code"),
        ));
    };
    let doc = discovery(plugin, cx, http).await?;
    let tokens = tokens::exchange_code(
        plugin,
        &doc,
        http,
        code.into_owned(),
        &pending.redirect_uri,
        pending.verifier.as_deref(),
        pending.nonce.as_deref(),
    )
    .await?;
    let Some((id_token, sub, _)) = tokens.id_token else {
        return Err(OpFailure::Refused(
            "the token response has no id_token".into(),
        ));
    };
    let userinfo = match &doc.userinfo_endpoint {
        Some(endpoint) => {
            let response = http
                .get(endpoint)
                .bearer_auth(&tokens.access_token)
                .header("accept", "application/json")
                .send()
                .await
                .map_err(|e| OpFailure::from(transport(endpoint, &e)))?;
            let user = read_json(endpoint, response).await?;
            if user.get("sub").and_then(Value::as_str) != Some(sub.as_str()) {
                return Err(OpFailure::Refused(
                    "userinfo sub differs from the ID token's".into(),
                ));
            }
            Some(user)
        }
        None => None,
    };
    let now = now();
    let sess = LoginSession {
        sid: random_token(),
        created: now,
        saved: now,
        id_token,
        sub,
        access_exp: Some(access_exp(plugin, tokens.expires_in, now)),
        access_token: Some(tokens.access_token),
        refresh_token: tokens.refresh_token,
        userinfo,
        scope: tokens.scope,
    };
    let mut deny = Deny::new(302)
        .header("location", pending.original.clone())
        .header("cache-control", "no-store")
        .because("openid-connect: login completed");
    let previous = session::present_chunks(cx.req, &cfg.cookie_name);
    for c in session::write(
        &cfg.sealer,
        &cfg.cookie_name,
        &sess,
        &cfg.attrs,
        cfg.lifetime.max_age(sess.created, now),
        previous,
    ) {
        deny = deny.header("set-cookie", c);
    }
    for c in session::clear(cx.req, &cfg.login_cookie, &cfg.attrs) {
        deny = deny.header("set-cookie", c);
    }
    Ok(Outcome::Deny(deny))
}

/// When the access token stops being used: the OP's `expires_in`, else the route's
/// `access_token_expires_in`, else an hour (lua-resty-openidc's defaults).
fn access_exp(plugin: &Plugin, expires_in: Option<i64>, now: i64) -> i64 {
    let lifetime = expires_in
        .or(plugin.settings.access_token_expires_in.map(|v| v as i64))
        .unwrap_or(3600);
    now + lifetime
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

async fn logout(
    plugin: &Plugin,
    cfg: &SessionConfig,
    cx: &mut Ctx<'_>,
    http: &reqwest::Client,
) -> Result<Outcome, OpFailure> {
    let doc = discovery(plugin, cx, http).await?;
    let sess: Option<LoginSession> = session::read(&cfg.sealer, cx.req, &cfg.cookie_name);
    let s = &plugin.settings;
    if s.revoke_tokens_on_logout
        && let (Some(sess), Some(endpoint)) = (&sess, &doc.revocation_endpoint)
    {
        for (token, hint) in [
            (&sess.refresh_token, "refresh_token"),
            (&sess.access_token, "access_token"),
        ] {
            if let Some(token) = token {
                revoke(plugin, http, endpoint, token, hint).await;
            }
        }
    }
    let mut deny = match (&doc.end_session_endpoint, &s.post_logout_redirect_uri) {
        (Some(endpoint), post) => {
            let mut url = url::Url::parse(endpoint)
                .map_err(|e| OpFailure::Unavailable(format!("bad end_session_endpoint: {e}")))?;
            {
                let mut q = url.query_pairs_mut();
                if let Some(sess) = &sess {
                    q.append_pair("id_token_hint", &sess.id_token);
                }
                if let Some(post) = post {
                    q.append_pair("post_logout_redirect_uri", post);
                }
            }
            Deny::new(302).header("location", url.to_string())
        }
        (None, Some(post)) => Deny::new(302).header("location", post.clone()),
        (None, None) => {
            let mut page = Deny::new(200).header("content-type", "text/html; charset=utf-8");
            page.body = "<html><body><p>Logged out</p></body></html>\n".to_owned();
            page
        }
    };
    deny = deny
        .header("cache-control", "no-store")
        .because("openid-connect: logout");
    for c in session::clear(cx.req, &cfg.cookie_name, &cfg.attrs) {
        deny = deny.header("set-cookie", c);
    }
    Ok(Outcome::Deny(deny))
}

/// RFC 7009 revocation, best effort: a failure is logged, the logout goes on.
async fn revoke(plugin: &Plugin, http: &reqwest::Client, endpoint: &str, token: &str, hint: &str) {
    let s = &plugin.settings;
    let mut form = vec![("token", token), ("token_type_hint", hint)];
    let mut request = http.post(endpoint);
    match (&s.client_secret, s.token_endpoint_auth_method) {
        (Some(secret), AuthMethod::ClientSecretBasic) => {
            request = request.basic_auth(&s.client_id, Some(secret));
        }
        (Some(secret), AuthMethod::ClientSecretPost) => {
            form.push(("client_id", &s.client_id));
            form.push(("client_secret", secret));
        }
        (None, _) => form.push(("client_id", &s.client_id)),
    }
    match request.form(&form).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::warn!(
            status = r.status().as_u16(),
            "openid-connect: token revocation refused"
        ),
        Err(e) => {
            tracing::warn!(error = %transport(endpoint, &e), "openid-connect: token revocation failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_same_host_paths_are_return_targets() {
        assert_eq!(same_site_target("/app/page?x=1"), "/app/page?x=1");
        for evil in [
            "//evil.com",
            "/\\evil.com",
            "https://evil.com",
            "javascript:alert(1)",
            "/a\r\nb",
        ] {
            assert_eq!(same_site_target(evil), "/", "{evil}");
        }
    }

    #[test]
    fn the_discovered_issuer_must_be_the_configured_one() {
        let d = "https://op.test/realms/a/.well-known/openid-configuration";
        assert!(issuer_matches("https://op.test/realms/a", d));
        assert!(issuer_matches("https://op.test/realms/a/", d));
        assert!(!issuer_matches("https://op.test/realms/b", d));
        assert!(!issuer_matches("https://op.test/realms", d));
        assert!(!issuer_matches("https://evil.test", d));
    }

    #[test]
    fn api_clients_get_a_401_and_browsers_a_redirect() {
        assert!(wants_json(Some("application/json")));
        assert!(wants_json(Some("application/problem+json, */*;q=0.1")));
        assert!(!wants_json(Some(
            "text/html,application/xhtml+xml,application/json;q=0.9,*/*;q=0.8"
        )));
        assert!(!wants_json(Some("*/*")));
        assert!(!wants_json(None));
        assert!(!wants_json(Some("application/json;q=0, text/html")));
    }

    #[test]
    fn states_compare_in_constant_time_and_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
