//! `logout_path`: the session ends here, then at the OP.
//!
//! Every chunk of the session cookie is expired, the tokens are revoked when
//! `revoke_tokens_on_logout` asks, and the browser goes to the OP's `end_session_endpoint`
//! with `id_token_hint` and the configured `post_logout_redirect_uri` — or straight to that
//! URI when the OP has no end-session endpoint (lua-resty-openidc's order). Where the
//! browser goes is only ever configuration or discovery, never the request's query.
use super::super::provider::transport;
use super::super::session;
use super::super::{AuthMethod, Plugin};
use super::{OpFailure, Sessions, discovery, forget_opened, forget_session, load_session};
use crate::decision::Deny;
use crate::plugins::{Ctx, Outcome};

pub(super) async fn logout(
    plugin: &Plugin,
    sessions: &Sessions,
    cx: &mut Ctx<'_>,
    http: &reqwest::Client,
) -> Result<Outcome, OpFailure> {
    let cfg = &sessions.cfg;
    let doc = discovery(plugin, cx, http).await?;
    let opened = load_session(plugin, sessions, cx.req).await?;
    let sess = opened.as_ref().map(|o| &o.sess);
    if let Some(sess) = sess {
        forget_session(cfg, sess).await;
        forget_opened(sessions, cx.req);
    }
    let s = &plugin.settings;
    if s.revoke_tokens_on_logout
        && let (Some(sess), Some(endpoint)) = (sess, &doc.revocation_endpoint)
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
                if let Some(sess) = sess {
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
