//! openid-connect: APISIX's OpenID Connect plugin as ext_authz answers.
//!
//! Two ways through, chosen as APISIX chooses them. With `bearer_only`,
//! `introspection_endpoint`, `public_key` or `use_jwks` set, a bearer token in the request
//! is verified ([`bearer`]) and the upstream learns who called. Otherwise — or when no
//! token came and `bearer_only` is off — the route is a relying party ([`flow`]): the
//! browser is sent to the OP, the callback is a Check on the redirect_uri path, and the
//! login lives in an encrypted cookie ([`session`]). Under ext_authz every redirect and
//! cookie is a denied response; a renewed session is a `Set-Cookie` on the allowed one.
//! What the OP publishes (discovery, JWKS) and answers (introspection) is cached in
//! [`Shared`] ([`provider`]).
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{BuildContext, Ctx, Outcome};
use crate::decision::Deny;

mod bearer;
mod flow;
mod provider;
pub mod session;

pub use provider::Shared;

/// The route's `openid-connect` settings, with APISIX's names and defaults. Fields of
/// APISIX's schema that portcullis does not implement (PAR, DPoP, private_key_jwt,
/// `claim_schema`, `proxy_opts`, Redis sessions) are refused rather than ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub client_id: String,
    pub client_secret: Option<String>,
    pub discovery: String,
    #[serde(default = "default_scope")]
    pub scope: String,
    #[serde(default = "yes")]
    pub ssl_verify: bool,
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    pub introspection_endpoint: Option<String>,
    #[serde(default)]
    pub introspection_endpoint_auth_method: AuthMethod,
    #[serde(default)]
    pub token_endpoint_auth_method: AuthMethod,
    #[serde(default)]
    pub bearer_only: bool,
    pub session: Option<SessionSettings>,
    #[serde(default = "default_realm")]
    pub realm: String,
    pub claim_validator: Option<ClaimValidator>,
    #[serde(default = "default_logout_path")]
    pub logout_path: String,
    pub redirect_uri: Option<String>,
    pub post_logout_redirect_uri: Option<String>,
    #[serde(default)]
    pub unauth_action: UnauthAction,
    pub public_key: Option<String>,
    #[serde(default)]
    pub use_jwks: bool,
    pub token_signing_alg_values_expected: Option<String>,
    #[serde(default)]
    pub use_pkce: bool,
    #[serde(default = "yes")]
    pub set_access_token_header: bool,
    #[serde(default)]
    pub access_token_in_authorization_header: bool,
    #[serde(default = "yes")]
    pub set_id_token_header: bool,
    #[serde(default)]
    pub set_raw_id_token_header: bool,
    #[serde(default = "yes")]
    pub set_userinfo_header: bool,
    #[serde(default)]
    pub set_refresh_token_header: bool,
    pub authorization_params: Option<Map<String, Value>>,
    #[serde(default = "yes")]
    pub renew_access_token_on_expiry: bool,
    pub access_token_expires_in: Option<u64>,
    #[serde(default = "default_iat_slack")]
    pub iat_slack: u64,
    #[serde(default)]
    pub access_token_expires_leeway: u64,
    #[serde(default)]
    pub use_nonce: bool,
    #[serde(default)]
    pub revoke_tokens_on_logout: bool,
    #[serde(default = "default_jwk_expires_in")]
    pub jwk_expires_in: u64,
    #[serde(default)]
    pub introspection_interval: u64,
    pub introspection_expiry_claim: Option<String>,
    pub introspection_addon_headers: Option<Vec<String>>,
    pub required_scopes: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    #[default]
    ClientSecretBasic,
    ClientSecretPost,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnauthAction {
    #[default]
    Auth,
    Deny,
    Pass,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    pub secret: String,
    pub cookie_name: Option<String>,
    pub cookie_path: Option<String>,
    pub cookie_domain: Option<String>,
    pub cookie_secure: Option<bool>,
    pub cookie_http_only: Option<bool>,
    pub cookie_same_site: Option<String>,
    pub idling_timeout: Option<u64>,
    pub rolling_timeout: Option<u64>,
    pub absolute_timeout: Option<u64>,
    /// lua-resty-session 3.x's `cookie.lifetime`, kept by APISIX as an alias of
    /// `absolute_timeout`.
    pub cookie: Option<LegacyCookie>,
    #[serde(default)]
    pub storage: SessionStorage,
    /// APISIX's `session.redis`, required with `storage: redis`.
    pub redis: Option<RedisSessionSettings>,
}

/// APISIX's `session.redis` fields. Timeouts are milliseconds; portcullis bounds each
/// call by the largest of them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSessionSettings {
    #[serde(default = "default_redis_host")]
    pub host: String,
    #[serde(default = "default_redis_port")]
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    #[serde(default)]
    pub database: u32,
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
    #[serde(default)]
    pub ssl: bool,
    pub ssl_verify: Option<bool>,
    pub server_name: Option<String>,
    pub connect_timeout: Option<u64>,
    pub send_timeout: Option<u64>,
    pub read_timeout: Option<u64>,
    pub keepalive_timeout: Option<u64>,
}

fn default_redis_host() -> String {
    "127.0.0.1".into()
}

fn default_redis_port() -> u16 {
    6379
}

fn default_redis_prefix() -> String {
    "sessions".into()
}

#[derive(Debug, Deserialize)]
pub struct LegacyCookie {
    pub lifetime: Option<u64>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SessionStorage {
    #[default]
    Cookie,
    /// The cookie holds only the session's id; the session lives in Redis.
    Redis,
}

#[derive(Debug, Default, Deserialize)]
pub struct ClaimValidator {
    pub issuer: Option<IssuerValidator>,
    pub audience: Option<AudienceValidator>,
}

#[derive(Debug, Default, Deserialize)]
pub struct IssuerValidator {
    pub valid_issuers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct AudienceValidator {
    pub claim: Option<String>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub match_with_client_id: bool,
}

fn yes() -> bool {
    true
}
fn default_scope() -> String {
    "openid".into()
}
fn default_timeout() -> u64 {
    3
}
fn default_realm() -> String {
    "apisix".into()
}
fn default_logout_path() -> String {
    "/logout".into()
}
fn default_iat_slack() -> u64 {
    120
}
fn default_jwk_expires_in() -> u64 {
    86400
}

/// A route's compiled openid-connect plugin.
#[derive(Debug)]
pub struct Plugin {
    settings: Settings,
    /// Shared so that the verified-token cache can tell this key from a later one.
    public_key: Option<std::sync::Arc<DecodingKey>>,
    algorithms: Vec<Algorithm>,
    timeout: Duration,
    session: Option<flow::Sessions>,
}

impl Plugin {
    pub fn compile(conf: &Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let settings: Settings = serde_path_to_error::deserialize(conf.clone())
            .map_err(|e| format!("property \"{}\" {}", e.path(), e.inner()))?;
        check_url("discovery", Some(&settings.discovery))?;
        check_url(
            "introspection_endpoint",
            settings.introspection_endpoint.as_ref(),
        )?;
        check_url("redirect_uri", settings.redirect_uri.as_ref())?;
        check_url(
            "post_logout_redirect_uri",
            settings.post_logout_redirect_uri.as_ref(),
        )?;
        if settings.timeout < 1 {
            return Err("property \"timeout\" must be at least 1".into());
        }
        // Older APISIX stored `timeout` multiplied to milliseconds; it still reads a whole
        // multiple of 1000 as milliseconds.
        let timeout_secs = if settings.timeout >= 1000 && settings.timeout.is_multiple_of(1000) {
            settings.timeout / 1000
        } else {
            settings.timeout
        };
        if settings.realm.is_empty()
            || !settings
                .realm
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            return Err("property \"realm\" must be printable ASCII without '\"' or '\\'".into());
        }
        if !settings.bearer_only && settings.session.is_none() {
            return Err(
                "property \"session.secret\" is required when \"bearer_only\" is false".into(),
            );
        }
        let secret_optional = if settings.bearer_only {
            settings.public_key.is_some() || settings.use_jwks
        } else {
            settings.use_pkce
        };
        if !secret_optional && settings.client_secret.is_none() {
            return Err("property \"client_secret\" is required".into());
        }
        for name in settings.introspection_addon_headers.iter().flatten() {
            if !crate::decision::is_safe_header_name(name) {
                return Err(format!(
                    "property \"introspection_addon_headers\" has an invalid header name \"{name}\""
                ));
            }
        }
        let public_key = settings
            .public_key
            .as_deref()
            .map(parse_public_key)
            .transpose()?
            .map(std::sync::Arc::new);
        let algorithms = match &settings.token_signing_alg_values_expected {
            Some(name) => {
                let alg: Algorithm = name.parse().map_err(|_| {
                    format!("property \"token_signing_alg_values_expected\" names an unknown algorithm \"{name}\"")
                })?;
                if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                    return Err("property \"token_signing_alg_values_expected\": portcullis verifies OpenID Connect tokens with asymmetric keys only".into());
                }
                vec![alg]
            }
            None => vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
                Algorithm::ES256,
                Algorithm::ES384,
                Algorithm::EdDSA,
            ],
        };
        let session = flow::Sessions::compile(&settings)?;
        Ok(Plugin {
            timeout: Duration::from_secs(timeout_secs),
            settings,
            public_key,
            algorithms,
            session,
        })
    }

    fn bearer_configured(&self) -> bool {
        let s = &self.settings;
        s.bearer_only || s.introspection_endpoint.is_some() || s.public_key.is_some() || s.use_jwks
    }

    pub async fn run(&self, cx: &mut Ctx<'_>) -> Outcome {
        let shared = &cx.shared.openid_connect;
        let http = shared.client(self.timeout, self.settings.ssl_verify);
        if self.bearer_configured() {
            let presented = bearer::presented(
                cx.req.headers.get("authorization"),
                cx.req.headers.get("x-access-token"),
            );
            match presented {
                bearer::Presented::Malformed => {
                    return Outcome::Deny(
                        Deny::new(400).because("Invalid Authorization header format."),
                    );
                }
                bearer::Presented::None if self.settings.bearer_only => {
                    return Outcome::Deny(
                        Deny::new(401)
                            .header(
                                "www-authenticate",
                                format!("Bearer realm=\"{}\"", self.settings.realm),
                            )
                            .because("No bearer token found in request."),
                    );
                }
                bearer::Presented::None => {}
                bearer::Presented::Token(token) => {
                    return match self.verify_bearer(cx, &http, token).await {
                        Ok(claims) => self.allow_bearer(cx, token, claims),
                        Err(deny) => Outcome::Deny(deny),
                    };
                }
            }
        }
        match &self.session {
            Some(session) => flow::run(self, session, cx, &http).await,
            None => Outcome::Deny(
                Deny::new(401)
                    .header(
                        "www-authenticate",
                        format!("Bearer realm=\"{}\"", self.settings.realm),
                    )
                    .because("no bearer token and no session configured"),
            ),
        }
    }

    /// Proves a bearer token; a denial carries APISIX's status and header.
    async fn verify_bearer(
        &self,
        cx: &Ctx<'_>,
        http: &reqwest::Client,
        token: &str,
    ) -> Result<std::sync::Arc<bearer::Claims>, Deny> {
        let shared = &cx.shared.openid_connect;
        let s = &self.settings;
        if !bearer::is_token_syntax(token) {
            return Err(self.invalid_token("invalid token format"));
        }
        if self.public_key.is_some() || s.use_jwks {
            let valid_issuers = s
                .claim_validator
                .as_ref()
                .and_then(|c| c.issuer.as_ref())
                .and_then(|i| i.valid_issuers.as_deref());
            // Issuers and the JWKS address are borrowed from the route or the discovery
            // document, not copied for every request.
            let issuer_doc;
            let issuers = match valid_issuers {
                Some(issuers) => issuers,
                // Without its issuer nothing pins who signed: fail closed, as APISIX does.
                None => {
                    issuer_doc = self
                        .discovered(shared, http, "issuer validation unavailable")
                        .await?;
                    std::slice::from_ref(&issuer_doc.issuer)
                }
            };
            let jwks_doc;
            let keys = match &self.public_key {
                Some(key) => bearer::Keys::Fixed { key, shared },
                None => {
                    jwks_doc = self
                        .discovered(shared, http, "discovery document unavailable")
                        .await?;
                    bearer::Keys::Jwks {
                        shared,
                        http,
                        url: jwks_doc.jwks_uri.as_deref().ok_or_else(|| {
                            self.invalid_token("the provider publishes no jwks_uri")
                        })?,
                        ttl: Duration::from_secs(s.jwk_expires_in),
                    }
                }
            };
            return bearer::verify_jwt(token, keys, &self.algorithms, issuers)
                .await
                .map_err(|e| self.invalid_token(&e));
        }
        let endpoint = match &s.introspection_endpoint {
            Some(e) => e.clone(),
            None => self
                .discovered(shared, http, "discovery document unavailable")
                .await?
                .introspection_endpoint
                .clone()
                .ok_or_else(|| self.invalid_token("no introspection endpoint"))?,
        };
        let addon: Vec<(String, String)> = s
            .introspection_addon_headers
            .iter()
            .flatten()
            .filter_map(|name| {
                let value = cx.req.headers.get(&name.to_ascii_lowercase())?;
                Some((name.clone(), value.to_owned()))
            })
            .collect();
        bearer::introspect(s, shared, http, &endpoint, token, &addon)
            .await
            .map_err(|e| self.invalid_token(&e))
    }

    /// The OP's discovery document; when it cannot be had, the failure is logged and the
    /// token is refused with `reason`.
    async fn discovered(
        &self,
        shared: &Shared,
        http: &reqwest::Client,
        reason: &str,
    ) -> Result<std::sync::Arc<provider::Discovery>, Deny> {
        shared
            .discovery(http, &self.settings.discovery)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "openid-connect: discovery failed");
                self.invalid_token(reason)
            })
    }

    fn invalid_token(&self, reason: &str) -> Deny {
        let reason = reason.replace(['"', '\\', '\r', '\n'], "'");
        Deny::new(401)
            .header(
                "www-authenticate",
                format!(
                    "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{reason}\"",
                    self.settings.realm
                ),
            )
            .because(format!("openid-connect: {reason}"))
    }

    /// Scope and audience checks, then the upstream headers of a verified bearer token.
    fn allow_bearer(
        &self,
        cx: &mut Ctx<'_>,
        token: &str,
        claims: std::sync::Arc<bearer::Claims>,
    ) -> Outcome {
        if let Some(deny) = self.check_scopes(claims.value.get("scope").and_then(Value::as_str)) {
            return Outcome::Deny(deny);
        }
        if let Some(deny) = self.check_audience(&claims.value) {
            return Outcome::Deny(deny);
        }
        self.set_access_token(cx, token);
        if self.settings.set_userinfo_header {
            cx.allow
                .set_upstream("x-userinfo", claims.userinfo_header().to_owned());
        }
        Outcome::Continue
    }

    /// APISIX's `required_scopes`: every one must be granted (403 otherwise).
    fn check_scopes(&self, granted: Option<&str>) -> Option<Deny> {
        let required = self.settings.required_scopes.as_ref()?;
        let granted: Vec<&str> = granted.unwrap_or_default().split_whitespace().collect();
        if required.iter().all(|r| granted.contains(&r.as_str())) {
            return None;
        }
        Some(
            Deny::new(403)
                .json(&serde_json::json!({
                    "error": format!("required scopes {} not present", required.join(", "))
                }))
                .because("required scopes not present"),
        )
    }

    fn check_audience(&self, claims: &Value) -> Option<Deny> {
        let audience = self.settings.claim_validator.as_ref()?.audience.as_ref()?;
        let claim = audience.claim.as_deref().unwrap_or("aud");
        let value = claims.get(claim).filter(|v| !v.is_null());
        if (audience.required || audience.match_with_client_id) && value.is_none() {
            return Some(
                Deny::new(403)
                    .json(&serde_json::json!({ "error": "required audience claim not present" }))
                    .because("required audience claim not present"),
            );
        }
        if audience.match_with_client_id {
            let client_id = self.settings.client_id.as_str();
            let matched = match value {
                Some(Value::Array(list)) => list.iter().any(|v| v.as_str() == Some(client_id)),
                Some(v) => v.as_str() == Some(client_id),
                None => false,
            };
            if !matched {
                return Some(
                    Deny::new(403)
                        .json(&serde_json::json!({ "error": "mismatched audience" }))
                        .because("audience does not match the client id"),
                );
            }
        }
        None
    }

    fn set_access_token(&self, cx: &mut Ctx<'_>, token: &str) {
        if !self.settings.set_access_token_header || !crate::decision::is_safe_header_value(token) {
            return;
        }
        if self.settings.access_token_in_authorization_header {
            cx.allow
                .set_upstream("authorization", format!("Bearer {token}"));
        } else {
            cx.allow.set_upstream("x-access-token", token.to_owned());
        }
    }
}

fn check_url(field: &str, value: Option<&String>) -> Result<(), String> {
    let Some(value) = value else { return Ok(()) };
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(format!(
            "property \"{field}\" must be an absolute http(s) URL, got \"{value}\""
        )),
    }
}

/// `public_key`: a PEM RSA or EC public key.
fn parse_public_key(pem: &str) -> Result<DecodingKey, String> {
    DecodingKey::from_rsa_pem(pem.as_bytes())
        .or_else(|_| DecodingKey::from_ec_pem(pem.as_bytes()))
        .or_else(|_| DecodingKey::from_ed_pem(pem.as_bytes()))
        .map_err(|_| "property \"public_key\" is not a PEM RSA, EC or Ed25519 public key".into())
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(conf: Value) -> Result<Plugin, String> {
        let shared = crate::plugins::Shared::default();
        Plugin::compile(&conf, &BuildContext { shared: &shared })
    }

    #[test]
    fn redis_session_storage_needs_its_settings() {
        let conf = |session: Value| {
            serde_json::json!({
                "client_id": "c", "client_secret": "s",
                "discovery": "http://op.test/.well-known/openid-configuration",
                "session": session,
            })
        };
        let secret = "0123456789abcdef-secret";
        let err = compile(conf(
            serde_json::json!({"secret": secret, "storage": "redis"}),
        ))
        .unwrap_err();
        assert!(err.contains("\"session.redis\" is required"), "{err}");
        let err = compile(conf(serde_json::json!({
            "secret": secret, "storage": "redis", "redis": {"ssl": true}
        })))
        .unwrap_err();
        assert!(err.contains("ssl is not supported"), "{err}");
        assert!(
            compile(conf(serde_json::json!({
                "secret": secret, "storage": "redis", "redis": {"port": 6380, "prefix": "s"}
            })))
            .is_ok()
        );
        let err = compile(conf(
            serde_json::json!({"secret": secret, "storage": "memcached"}),
        ))
        .unwrap_err();
        assert!(err.contains("storage"), "{err}");
    }

    #[test]
    fn apisix_requirements_are_enforced_at_load() {
        let base = serde_json::json!({ "client_id": "c", "discovery": "http://op.test/.well-known/openid-configuration" });
        let err = compile(base.clone()).unwrap_err();
        assert_eq!(
            err,
            "property \"session.secret\" is required when \"bearer_only\" is false"
        );

        let mut bearer = base.clone();
        bearer["bearer_only"] = true.into();
        assert_eq!(
            compile(bearer.clone()).unwrap_err(),
            "property \"client_secret\" is required"
        );
        bearer["use_jwks"] = true.into();
        assert!(compile(bearer.clone()).is_ok());

        let mut short = base.clone();
        short["client_secret"] = "s".into();
        short["session"] = serde_json::json!({ "secret": "too-short" });
        assert!(compile(short).unwrap_err().contains("at least 16"));

        let mut pkce = base.clone();
        pkce["use_pkce"] = true.into();
        pkce["session"] = serde_json::json!({ "secret": "sixteen-chars-ok!" });
        assert!(compile(pkce).is_ok());

        let mut millis = bearer.clone();
        millis["timeout"] = 3000.into();
        assert_eq!(compile(millis).unwrap().timeout, Duration::from_secs(3));
        let mut seconds = bearer.clone();
        seconds["timeout"] = 1500.into();
        assert_eq!(compile(seconds).unwrap().timeout, Duration::from_secs(1500));

        let mut unknown = bearer.clone();
        unknown["dpop"] = serde_json::json!({ "enabled": true });
        assert!(compile(unknown).unwrap_err().contains("unknown field"));

        let mut hmac = bearer.clone();
        hmac["token_signing_alg_values_expected"] = "HS256".into();
        assert!(compile(hmac).unwrap_err().contains("asymmetric"));

        let mut bad_url = bearer;
        bad_url["discovery"] = "op.test/.well-known".into();
        assert!(compile(bad_url).unwrap_err().contains("absolute"));
    }

    #[test]
    fn scope_and_audience_checks_answer_as_apisix() {
        let p = compile(serde_json::json!({
            "client_id": "app", "discovery": "http://op.test/d", "bearer_only": true,
            "use_jwks": true, "required_scopes": ["read", "write"],
            "claim_validator": { "audience": { "match_with_client_id": true } }
        }))
        .unwrap();
        let deny = p.check_scopes(Some("read")).unwrap();
        assert_eq!(deny.status, 403);
        assert_eq!(
            deny.body,
            r#"{"error":"required scopes read, write not present"}"#
        );
        assert!(p.check_scopes(Some("write read other")).is_none());

        let deny = p.check_audience(&serde_json::json!({})).unwrap();
        assert_eq!(
            deny.body,
            r#"{"error":"required audience claim not present"}"#
        );
        let deny = p
            .check_audience(&serde_json::json!({ "aud": "other" }))
            .unwrap();
        assert_eq!(deny.body, r#"{"error":"mismatched audience"}"#);
        assert!(
            p.check_audience(&serde_json::json!({ "aud": ["x", "app"] }))
                .is_none()
        );
    }
}
