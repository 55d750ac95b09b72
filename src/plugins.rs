//! The closed set of plugins, behind one enum with static dispatch.
//!
//! Each plugin lives in its own module with its APISIX schema (serde, same field
//! names and defaults), its checks, and one `run` that reads the [`Request`] and
//! either adds to the [`Allow`] being built or ends the Check with a [`Deny`]. The
//! pipeline runs them in APISIX's priority order; adding a plugin means one module
//! and one variant here.
use std::sync::Arc;

use serde_json::Value;

use crate::decision::{Allow, Deny, is_safe_header_value};
use crate::request::Request;
use crate::snapshot::{AuthKey, Consumer, Route, Snapshot};

pub mod forward_auth;
pub mod jwt_auth;
pub mod limit_count;
pub mod openid_connect;
pub mod verified;

/// Plugin names portcullis knows, for error messages.
pub const KNOWN: &[&str] = &["openid-connect", "jwt-auth", "forward-auth", "limit-count"];

#[derive(Debug)]
pub enum Plugin {
    OpenidConnect(Box<openid_connect::Plugin>),
    JwtAuth(jwt_auth::Plugin),
    ForwardAuth(forward_auth::Plugin),
    LimitCount(limit_count::Plugin),
}

/// Auth settings held by a consumer or credential, found through its key.
#[derive(Debug)]
pub enum ConsumerAuth {
    JwtAuth(jwt_auth::Credential),
}

/// What a plugin entry on a consumer compiles to.
pub enum ConsumerPlugin {
    Auth(AuthKey, ConsumerAuth),
    Plugin(Box<Plugin>),
}

/// State that outlives snapshots: counters, caches and pooled clients, keyed so a
/// config swap keeps what is still valid.
#[derive(Debug, Default)]
pub struct Shared {
    pub limit_count: limit_count::Shared,
    pub forward_auth: forward_auth::Shared,
    pub openid_connect: openid_connect::Shared,
}

/// What compiling a plugin may use.
pub struct BuildContext<'a> {
    pub shared: &'a Shared,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("failed to check the configuration of plugin {plugin} err: {reason}")]
pub struct PluginError {
    pub plugin: String,
    pub reason: String,
}

impl PluginError {
    pub fn new(plugin: &str, reason: impl Into<String>) -> Self {
        PluginError {
            plugin: plugin.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Who the request authenticated as.
#[derive(Debug, Clone)]
pub struct Identity {
    pub consumer: Arc<Consumer>,
    pub credential_id: Option<String>,
}

/// Everything a plugin sees while it runs.
pub struct Ctx<'a> {
    pub req: &'a Request<'a>,
    pub route: &'a Route,
    pub snapshot: &'a Snapshot,
    pub shared: &'a Shared,
    pub identity: Option<Identity>,
    pub allow: Allow,
}

impl Ctx<'_> {
    /// Attaches a consumer as APISIX's `consumer.attach_consumer` does: the
    /// consumer's plugins run next, and the upstream learns who it is. Each header is
    /// set only when known; the pipeline scrubs client copies of the rest.
    pub fn attach_consumer(&mut self, consumer: Arc<Consumer>, credential_id: Option<String>) {
        self.allow
            .set_upstream("x-consumer-username", consumer.username.to_string());
        match &credential_id {
            Some(id) => self
                .allow
                .set_upstream("x-credential-identifier", id.clone()),
            None => self.allow.forget_owned_upstream("x-credential-identifier"),
        }
        match consumer
            .custom_id
            .as_deref()
            .filter(|v| is_safe_header_value(v))
        {
            Some(custom) => self
                .allow
                .set_upstream("x-consumer-custom-id", custom.to_owned()),
            None => self.allow.forget_owned_upstream("x-consumer-custom-id"),
        }
        self.identity = Some(Identity {
            consumer,
            credential_id,
        });
    }
}

pub enum Outcome {
    Continue,
    Deny(Deny),
}

/// SHA-256 of a list of strings, for cache keys made of what clients send: each is
/// length-prefixed and an absent one differs from an empty one, so no two lists share
/// a digest, and a key costs 32 bytes however long the values are.
pub fn digest<'a>(parts: impl IntoIterator<Item = Option<&'a str>>) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for part in parts {
        match part {
            Some(v) => {
                h.update([1]);
                h.update((v.len() as u64).to_be_bytes());
                h.update(v.as_bytes());
            }
            None => h.update([0]),
        }
    }
    h.finalize().into()
}

#[cfg(test)]
#[test]
fn digests_tell_every_list_apart() {
    let k = |v: &[Option<&str>]| digest(v.iter().copied());
    assert_eq!(k(&[Some("a"), Some("b")]), k(&[Some("a"), Some("b")]));
    assert_ne!(
        k(&[Some("a\u{1f}b"), Some("")]),
        k(&[Some("a"), Some("b\u{1f}")])
    );
    assert_ne!(k(&[Some("ab"), Some("")]), k(&[Some("a"), Some("b")]));
    assert_ne!(k(&[None, Some("x")]), k(&[Some(""), Some("x")]));
    assert_ne!(k(&[Some("x")]), k(&[Some("x"), None]));
}

/// APISIX's `_meta.disable: true` switches a configured plugin off.
pub fn is_disabled(conf: &Value) -> bool {
    conf.pointer("/_meta/disable").and_then(Value::as_bool) == Some(true)
}

/// The plugin's own settings, without APISIX's `_meta` block.
fn own_settings(conf: &Value) -> Value {
    let mut conf = conf.clone();
    if let Some(map) = conf.as_object_mut() {
        map.remove("_meta");
    }
    conf
}

impl Plugin {
    pub fn compile(name: &str, conf: &Value, cx: &BuildContext<'_>) -> Result<Plugin, PluginError> {
        let conf = own_settings(conf);
        let err = |reason: String| PluginError::new(name, reason);
        Ok(match name {
            "openid-connect" => Plugin::OpenidConnect(Box::new(
                openid_connect::Plugin::compile(&conf, cx).map_err(err)?,
            )),
            "jwt-auth" => Plugin::JwtAuth(jwt_auth::Plugin::compile(&conf, cx).map_err(err)?),
            "forward-auth" => {
                Plugin::ForwardAuth(forward_auth::Plugin::compile(&conf, cx).map_err(err)?)
            }
            "limit-count" => {
                Plugin::LimitCount(limit_count::Plugin::compile(&conf, cx).map_err(err)?)
            }
            other => return Err(unknown(other)),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Plugin::OpenidConnect(_) => "openid-connect",
            Plugin::JwtAuth(_) => "jwt-auth",
            Plugin::ForwardAuth(_) => "forward-auth",
            Plugin::LimitCount(_) => "limit-count",
        }
    }

    /// APISIX's plugin priorities: higher runs first.
    pub fn priority(&self) -> i32 {
        match self {
            Plugin::OpenidConnect(_) => 2599,
            Plugin::JwtAuth(_) => 2510,
            Plugin::ForwardAuth(_) => 2002,
            Plugin::LimitCount(_) => 1002,
        }
    }

    /// Upstream headers this plugin alone decides, beyond the global identity set.
    pub fn owned_headers(&self) -> Vec<String> {
        match self {
            Plugin::ForwardAuth(p) => p.owned_headers(),
            _ => Vec::new(),
        }
    }

    #[warn(clippy::large_futures)]
    pub async fn run(&self, cx: &mut Ctx<'_>) -> Outcome {
        match self {
            // The plugins that call out (an IdP, an auth service, Redis) have futures of
            // 0.7–4.7 KB; inline they set the size of every Check's future, which was
            // allocated and moved whole on every Check, no-plugin and jwt-auth routes
            // included (docs/benchmarks.md, change 37). Boxed, each pays for its own.
            Plugin::OpenidConnect(p) => Box::pin(p.run(cx)).await,
            Plugin::JwtAuth(p) => p.run(cx).await,
            Plugin::ForwardAuth(p) => Box::pin(p.run(cx)).await,
            Plugin::LimitCount(p) => Box::pin(p.run(cx)).await,
        }
    }
}

fn unknown(name: &str) -> PluginError {
    PluginError::new(
        name,
        format!("unknown plugin (portcullis supports {})", KNOWN.join(", ")),
    )
}

/// Compiles a plugin entry of a consumer or credential: auth plugins become a
/// credential, others run after authentication.
pub fn compile_consumer_plugin(
    name: &str,
    conf: &Value,
    cx: &BuildContext<'_>,
) -> Result<ConsumerPlugin, PluginError> {
    let conf = own_settings(conf);
    match name {
        "jwt-auth" => {
            let (key, cred) =
                jwt_auth::Credential::compile(&conf).map_err(|e| PluginError::new(name, e))?;
            Ok(ConsumerPlugin::Auth(
                (jwt_auth::PLUGIN, key.into()),
                ConsumerAuth::JwtAuth(cred),
            ))
        }
        "limit-count" => Ok(ConsumerPlugin::Plugin(Box::new(Plugin::compile(
            name, &conf, cx,
        )?))),
        "openid-connect" | "forward-auth" => Err(PluginError::new(
            name,
            "this plugin is configured on routes, not on consumers",
        )),
        other => Err(unknown(other)),
    }
}
