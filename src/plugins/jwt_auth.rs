//! jwt-auth: APISIX's JWT consumer authentication, decided for Envoy.
//!
//! A route's plugin finds the token (header, then query, then cookie), reads the
//! key claim to find the credential, and verifies the token against that
//! credential's pre-decoded key with APISIX's rules (`token::verify`). Success
//! attaches the consumer (identity headers upstream, the consumer's own plugins run
//! next); failure is a 401 with APISIX's short message and `WWW-Authenticate`, or,
//! with `anonymous_consumer`, continues as that consumer. Detailed reasons go to the
//! log only.
mod credential;
pub(crate) mod token;

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::verified::VerifiedTokens;
use super::{BuildContext, ConsumerAuth, Ctx, Outcome};
use crate::decision::{Deny, is_safe_header_name};
use crate::snapshot::{self, Consumer};

pub use credential::Credential;
pub use token::{Claim, ClaimRule, MAX_TOKEN_LEN, Signature, Token};

pub(crate) const PLUGIN: &str = "jwt-auth";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    #[serde(default = "default_header")]
    header: String,
    #[serde(default = "default_jwt")]
    query: String,
    #[serde(default = "default_jwt")]
    cookie: String,
    #[serde(default)]
    hide_credentials: bool,
    #[serde(default = "default_key_claim_name")]
    key_claim_name: String,
    #[serde(default)]
    store_in_ctx: bool,
    #[serde(default = "default_jwt")]
    realm: String,
    anonymous_consumer: Option<String>,
    claims_to_verify: Option<Vec<String>>,
}

fn default_header() -> String {
    "authorization".into()
}

fn default_jwt() -> String {
    "jwt".into()
}

fn default_key_claim_name() -> String {
    "key".into()
}

/// jwt-auth as configured on a route.
#[derive(Debug)]
pub struct Plugin {
    /// Lower case, as request headers are.
    header: String,
    query: String,
    cookie: String,
    hide_credentials: bool,
    key_claim_name: String,
    store_in_ctx: bool,
    /// `Bearer realm="<realm>"`, built once.
    www_authenticate: String,
    anonymous_consumer: Option<Arc<str>>,
    claims: ClaimRule,
    /// RS/PS/ES/EdDSA tokens already verified, by the credential they verified with.
    verified: VerifiedTokens<snapshot::Credential>,
}

/// Why authentication failed: what the client is told, and what the log says.
struct Failure {
    message: &'static str,
    reason: Cow<'static, str>,
}

impl Failure {
    fn new(message: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Failure {
            message,
            reason: reason.into(),
        }
    }
}

/// The consumer a valid token names.
struct Authenticated {
    consumer: Arc<Consumer>,
    credential_id: Option<String>,
    claims: Option<Value>,
}

impl Plugin {
    pub fn compile(conf: &Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let conf: Conf = serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
        let header = conf.header.to_ascii_lowercase();
        if !is_safe_header_name(&header) {
            return Err(format!(
                "property \"header\" validation failed: {:?} is not an HTTP header name",
                conf.header
            ));
        }
        if conf.key_claim_name.is_empty() {
            return Err("property \"key_claim_name\" validation failed: string too short".into());
        }
        check_realm(&conf.realm)?;
        if conf.anonymous_consumer.as_deref() == Some("") {
            return Err(
                "property \"anonymous_consumer\" validation failed: string too short".into(),
            );
        }
        let claims = match conf.claims_to_verify.as_deref() {
            None | Some([]) => ClaimRule::WhenPresent,
            Some(list) => {
                let mut claims = Vec::with_capacity(list.len());
                for name in list {
                    let claim = match name.as_str() {
                        "exp" => Claim::Exp,
                        "nbf" => Claim::Nbf,
                        other => {
                            return Err(format!(
                                "property \"claims_to_verify\" validation failed: \
                                 {other:?} is not one of exp, nbf"
                            ));
                        }
                    };
                    if claims.contains(&claim) {
                        return Err("property \"claims_to_verify\" validation failed: \
                                    expected unique items but items are not unique"
                            .into());
                    }
                    claims.push(claim);
                }
                ClaimRule::Required(claims)
            }
        };
        Ok(Plugin {
            header,
            query: conf.query,
            cookie: conf.cookie,
            hide_credentials: conf.hide_credentials,
            key_claim_name: conf.key_claim_name,
            store_in_ctx: conf.store_in_ctx,
            www_authenticate: format!("Bearer realm=\"{}\"", conf.realm),
            anonymous_consumer: conf.anonymous_consumer.map(Arc::from),
            claims,
            verified: VerifiedTokens::default(),
        })
    }

    pub async fn run(&self, cx: &mut Ctx<'_>) -> Outcome {
        let failure = match self.authenticate(cx, now()) {
            Ok(found) => {
                if let Some(claims) = found.claims {
                    cx.allow.metadata.push((PLUGIN, claims));
                }
                cx.attach_consumer(found.consumer, found.credential_id);
                return Outcome::Continue;
            }
            Err(failure) => failure,
        };
        let Some(anonymous) = &self.anonymous_consumer else {
            return Outcome::Deny(self.unauthorized(failure.message, failure.reason));
        };
        match cx.snapshot.consumers.get(anonymous) {
            Some(consumer) => {
                tracing::debug!(reason = %failure.reason, consumer = %anonymous, "jwt-auth: continuing as the anonymous consumer");
                cx.attach_consumer(consumer, None);
                Outcome::Continue
            }
            None => Outcome::Deny(self.unauthorized(
                "Invalid user authorization",
                format!(
                    "{}; anonymous consumer {anonymous:?} does not exist",
                    failure.reason
                ),
            )),
        }
    }

    fn unauthorized(&self, message: &'static str, reason: impl Into<Cow<'static, str>>) -> Deny {
        Deny::message(401, message)
            .header("www-authenticate", self.www_authenticate.clone())
            .because(reason)
    }

    /// APISIX's `find_consumer`: token → key claim → credential → verification.
    fn authenticate(&self, cx: &mut Ctx<'_>, now: i64) -> Result<Authenticated, Failure> {
        let raw = self.fetch_token(cx).ok_or_else(|| {
            Failure::new(
                "Missing JWT token in request",
                "no token in header, query or cookie",
            )
        })?;
        let mut token = Token::parse(&raw, &self.key_claim_name, self.store_in_ctx)
            .map_err(|e| Failure::new("JWT token invalid", format!("JWT token invalid: {e}")))?;
        let key = match &token.claims.key {
            None | Some(Value::Bool(false)) => {
                return Err(Failure::new(
                    "missing user key in JWT token",
                    format!("no {:?} claim in the token", self.key_claim_name),
                ));
            }
            Some(Value::String(key)) => key,
            Some(_) => {
                return Err(Failure::new(
                    "Invalid user key in JWT token",
                    format!("the {:?} claim is not a string", self.key_claim_name),
                ));
            }
        };
        let Some(found) = cx.snapshot.consumers.credential(PLUGIN, key) else {
            return Err(Failure::new(
                "Invalid user key in JWT token",
                format!("no jwt-auth credential has key {key:?}"),
            ));
        };
        let ConsumerAuth::JwtAuth(cred) = &found.auth;
        let cacheable = cred.key.is_asymmetric();
        let signature = if cacheable && self.verified.contains(&raw, &found) {
            Signature::AlreadyVerified
        } else {
            Signature::Unchecked
        };
        token::verify(&token, cred, &self.claims, now, signature).map_err(|e| {
            Failure::new("failed to verify jwt", format!("failed to verify jwt: {e}"))
        })?;
        if cacheable && matches!(signature, Signature::Unchecked) {
            self.verified.insert(&raw, &found);
        }
        let Some(consumer) = cx.snapshot.consumers.get(&found.username) else {
            return Err(Failure::new(
                "Invalid user key in JWT token",
                format!("credential for key {key:?} belongs to no consumer"),
            ));
        };
        Ok(Authenticated {
            consumer,
            credential_id: found.credential_id.as_deref().map(str::to_owned),
            claims: token.claims.all.take().map(Value::Object),
        })
    }

    /// Header (a leading `Bearer `/`bearer ` dropped), then query, then cookie; with
    /// `hide_credentials`, the place it came from is removed from the upstream
    /// request.
    fn fetch_token<'r>(&self, cx: &mut Ctx<'r>) -> Option<Cow<'r, str>> {
        let req = cx.req;
        if let Some(value) = req.headers.get(&self.header) {
            if self.hide_credentials {
                cx.allow.remove_upstream(&self.header);
            }
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .unwrap_or(value);
            return Some(Cow::Borrowed(token));
        }
        let occurrences = query_occurrences(req.query, &self.query);
        if occurrences > 0 {
            if self.hide_credentials {
                cx.allow.query_remove.push(self.query.clone());
            }
            // A repeated parameter is a list in nginx, never a token.
            if occurrences > 1 {
                return Some(Cow::Borrowed(""));
            }
            return req.query_param(&self.query);
        }
        let value = req.cookie(&self.cookie)?;
        if self.hide_credentials {
            let rest: Vec<String> = req
                .cookies()
                .filter(|(name, _)| *name != self.cookie)
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            if rest.is_empty() {
                cx.allow.remove_upstream("cookie");
            } else {
                cx.allow.set_upstream("cookie", rest.join("; "));
            }
        }
        Some(Cow::Borrowed(value))
    }
}

/// How many times query parameter `name` appears (names compared percent-decoded).
fn query_occurrences(query: &str, name: &str) -> usize {
    if query.is_empty() {
        return 0;
    }
    query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            if key.contains(['%', '+']) {
                let plus = key.replace('+', " ");
                percent_encoding::percent_decode_str(&plus).decode_utf8_lossy() == name
            } else {
                key == name
            }
        })
        .count()
}

/// APISIX's realm schema: 1–128 printable ASCII characters without `"` or `\`.
fn check_realm(realm: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&realm.len())
        && realm
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(
            "property \"realm\" validation failed: 1 to 128 printable ASCII characters, \
             without '\"' or '\\'"
                .into(),
        )
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
pub(crate) mod tests;
