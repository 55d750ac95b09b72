//! Starting a login and finishing it on the callback.
//!
//! The start is a `302` to the OP's authorization endpoint plus the login cookie that
//! remembers `state`, `nonce`, the PKCE verifier and where the user was; the callback
//! checks `state` against that cookie before anything else, so no forged, stale or
//! replayed callback reaches the token endpoint, then exchanges the code ([`super::tokens`]),
//! fetches userinfo and sets the session cookie. Both answers are ext_authz denials.
use openidconnect::{CsrfToken, Nonce, PkceCodeChallenge};
use serde_json::Value;

use super::super::provider::{read_json, transport};
use super::super::session::{self, SessionConfig};
use super::super::{Plugin, UnauthAction, now};
use super::{
    LOGIN_TTL, LoginSession, MAX_RESTARTS, OpFailure, PendingLogin, access_exp, constant_time_eq,
    discovery, hide_own_cookies, random_token, session_cookies, tokens,
};
use crate::decision::Deny;
use crate::plugins::{Ctx, Outcome};

/// Logins one browser may have in progress at once (tabs opened together), as
/// lua-resty-openidc keeps several authorization states; older ones are dropped.
const MAX_LOGINS: usize = 3;

/// No usable session: start a login, deny or pass, per `unauth_action`.
pub(super) async fn unauthenticated(
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
    let mut logins = logins_in_progress(cfg, cx);
    logins.insert(0, pending);
    logins.truncate(MAX_LOGINS);
    for c in remember_logins(cfg, cx, &logins) {
        deny = deny.header("set-cookie", c);
    }
    Ok(Outcome::Deny(deny))
}

/// The unexpired logins the browser has in progress, newest first.
fn logins_in_progress(cfg: &SessionConfig, cx: &Ctx<'_>) -> Vec<PendingLogin> {
    let logins: Vec<PendingLogin> =
        session::read(&cfg.sealer, cx.req, &cfg.login_cookie).unwrap_or_default();
    let now = now();
    logins
        .into_iter()
        .filter(|p| now - p.created <= LOGIN_TTL as i64)
        .take(MAX_LOGINS)
        .collect()
}

/// `Set-Cookie`s that store `logins` in the login cookie, or delete it when none is left.
fn remember_logins(cfg: &SessionConfig, cx: &Ctx<'_>, logins: &[PendingLogin]) -> Vec<String> {
    if logins.is_empty() {
        return session::clear(cx.req, &cfg.login_cookie, &cfg.attrs);
    }
    let previous = session::present_chunks(cx.req, &cfg.login_cookie);
    session::write(
        &cfg.sealer,
        &cfg.login_cookie,
        &logins,
        &cfg.attrs,
        Some(LOGIN_TTL),
        previous,
    )
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

pub(super) async fn callback(
    plugin: &Plugin,
    cfg: &SessionConfig,
    cx: &mut Ctx<'_>,
    http: &reqwest::Client,
) -> Result<Outcome, OpFailure> {
    let mut logins = logins_in_progress(cfg, cx);
    let state = cx.req.query_param("state");
    let Some(newest) = logins.first() else {
        return Ok(Outcome::Deny(
            Deny::new(401).because("openid-connect: callback without a login in progress"),
        ));
    };
    let found = state.as_deref().and_then(|s| {
        logins
            .iter()
            .position(|p| constant_time_eq(s.as_bytes(), p.state.as_bytes()))
    });
    let Some(index) = found else {
        if newest.restarts < MAX_RESTARTS && cx.req.method == "GET" {
            tracing::warn!("openid-connect: state mismatch, restarting the login");
            let (redirect_uri, original) = (newest.redirect_uri.clone(), newest.original.clone());
            let restarts = newest.restarts + 1;
            return unauthenticated(
                plugin,
                cfg,
                cx,
                http,
                &redirect_uri,
                restarts,
                Some(original),
            )
            .await;
        }
        return Ok(Outcome::Deny(
            Deny::new(401).because("openid-connect: state mismatch"),
        ));
    };
    let pending = logins.remove(index);
    let login_cookies = remember_logins(cfg, cx, &logins);
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
        for c in login_cookies {
            deny = deny.header("set-cookie", c);
        }
        return Ok(Outcome::Deny(deny));
    }
    // Whatever happens from here on, this login is over: the browser forgets it.
    let mut deny = match complete(plugin, cfg, cx, http, &pending).await {
        Ok(deny) => deny,
        Err(failure) => failure.deny(),
    };
    for c in login_cookies {
        deny = deny.header("set-cookie", c);
    }
    Ok(Outcome::Deny(deny))
}

/// The code for tokens, the tokens for a session: the `302` back to where the user was.
async fn complete(
    plugin: &Plugin,
    cfg: &SessionConfig,
    cx: &Ctx<'_>,
    http: &reqwest::Client,
    pending: &PendingLogin,
) -> Result<Deny, OpFailure> {
    let Some(code) = cx.req.query_param("code") else {
        return Err(OpFailure::Refused("callback without a code".into()));
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
            // Kept as the JSON text it re-serialises to: every Check sends it on as
            // `X-Userinfo`, and text needs no parsing or printing per request.
            Some(serde_json::value::to_raw_value(&user).map_err(|e| {
                OpFailure::Refused(format!("the userinfo answer cannot be kept: {e}"))
            })?)
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
    for c in session_cookies(cfg, cx.req, &sess, now).await? {
        deny = deny.header("set-cookie", c);
    }
    Ok(deny)
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
}
