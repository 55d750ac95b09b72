//! The compiled configuration one Check reads from start to end.
//!
//! Specs are compiled once (keys decoded, matchers built, HTTP clients chosen) into
//! runtime types and published as an immutable [`Snapshot`] behind an `ArcSwap`.
//! Routes live in the snapshot's [`Router`]. Consumers and the credential index
//! live in [`Consumers`], concurrent maps shared by successive snapshots: one Admin
//! API write to a consumer updates just that entry, so with 100k consumers a write
//! costs one compile, not 100k. A full reload (file change, store resync) builds a
//! fresh `Consumers` and swaps the whole snapshot.
use std::collections::BTreeMap;
use std::sync::Arc;

use compact_str::CompactString;
use dashmap::DashMap;
use serde_json::Value;

use crate::config::{Unmatched, resolve_env};
use crate::plugins::{self, BuildContext, ConsumerAuth, ConsumerPlugin, Plugin, PluginError};
use crate::resources::{ConsumerSpec, CredentialSpec, HttpMethod, RouteSpec, SpecError};
use crate::router::{HostPattern, Router, UriPattern};

#[derive(Debug)]
pub struct Route {
    pub id: Arc<str>,
    pub priority: i64,
    pub enabled: bool,
    pub uris: Vec<UriPattern>,
    pub hosts: Vec<HostPattern>,
    pub methods: Vec<HttpMethod>,
    /// In execution order: higher plugin priority first.
    pub plugins: Vec<Plugin>,
    /// Upstream headers this route's plugins own beyond the global identity headers
    /// (e.g. forward-auth's `upstream_headers`); scrubbed from client requests.
    pub owned_headers: Vec<String>,
}

#[derive(Debug)]
pub struct Consumer {
    pub username: Arc<str>,
    /// `labels.custom_id`, sent upstream as `X-Consumer-Custom-Id`. The other labels
    /// stay in the store's spec only: nothing at request time reads them, and a
    /// second map per consumer is most of a consumer's memory at 100k consumers.
    /// Inline up to 24 bytes: a boxed id was a 32-byte heap chunk per consumer.
    pub custom_id: Option<CompactString>,
    /// Non-auth plugins (e.g. limit-count), in execution order. A boxed slice, not a
    /// `Vec`: it never grows, and the 8 bytes keep a consumer in an 80-byte chunk.
    pub plugins: Box<[Plugin]>,
}

/// One way to authenticate as a consumer: a credential, or auth plugin settings
/// written directly on the consumer (APISIX 2.x style; no credential id then).
#[derive(Debug)]
pub struct Credential {
    pub username: Arc<str>,
    /// Shared with the store's key for the credential.
    pub credential_id: Option<Arc<str>>,
    pub auth: ConsumerAuth,
}

/// Lookup key of a credential: the auth plugin and its key (e.g. jwt-auth `key`).
pub type AuthKey = (&'static str, CompactString);

/// One auth plugin's credentials by their key. Keys up to 24 bytes (APISIX's docs
/// use `user-key`, `jack-key`) sit in the map's slot: a boxed key was one more heap
/// chunk, 32 bytes, for each of 100k credentials.
type KeyIndex = DashMap<CompactString, Arc<Credential>>;

/// Whose auth keys [`Consumers::drop_keys`] removes.
#[derive(Debug, Clone, Copy)]
pub enum KeyOwner<'a> {
    /// Auth plugins written directly on the consumer (APISIX 2.x style).
    Inline(&'a str),
    /// One credential: consumer name and credential id.
    Credential(&'a str, &'a str),
    /// Everything the consumer authenticates with.
    Consumer(&'a str),
}

impl KeyOwner<'_> {
    fn owns(self, cred: &Credential) -> bool {
        let user = &*cred.username;
        match self {
            KeyOwner::Inline(owner) => user == owner && cred.credential_id.is_none(),
            KeyOwner::Credential(owner, id) => {
                user == owner && cred.credential_id.as_deref() == Some(id)
            }
            KeyOwner::Consumer(owner) => user == owner,
        }
    }
}

/// Consumers by name, and the credential index: one map per auth plugin, keyed by
/// the plugin's key alone, so a Check looks its key up borrowed (no owned
/// `(plugin, key)` tuple per request) and an entry is a boxed key and a pointer
/// (100k of them at scale).
#[derive(Debug, Default)]
pub struct Consumers {
    pub by_name: DashMap<Arc<str>, Arc<Consumer>>,
    jwt_auth: KeyIndex,
}

impl Consumers {
    pub fn get(&self, username: &str) -> Option<Arc<Consumer>> {
        self.by_name.get(username).map(|c| c.value().clone())
    }

    /// `username` as its consumer's own `Arc` when the consumer is known, so a
    /// consumer and its credentials share one allocation (100k of them at scale).
    pub fn shared_name(&self, username: &str) -> Arc<str> {
        self.by_name
            .get(username)
            .map(|e| e.key().clone())
            .unwrap_or_else(|| username.into())
    }

    /// Drops the keys `owner` holds from the credential index, except `keep` (the ones
    /// just inserted for it, so an updated credential is never missing for a moment).
    /// Ownership is read from the indexed credentials themselves: an Admin write scans
    /// the index (about a millisecond at 100k credentials) instead of the store keeping a
    /// second map of every credential's key, which cost ~200 bytes per credential.
    pub fn drop_keys(&self, owner: KeyOwner<'_>, keep: &[AuthKey]) {
        for (plugin, index) in self.indexes() {
            index.retain(|key, cred| {
                !owner.owns(cred) || keep.iter().any(|(p, k)| *p == plugin && k == key)
            });
        }
    }

    /// Every auth plugin's index, with the plugin's name.
    fn indexes(&self) -> [(&'static str, &KeyIndex); 1] {
        [(plugins::jwt_auth::PLUGIN, &self.jwt_auth)]
    }

    fn index(&self, plugin: &str) -> Option<&KeyIndex> {
        self.indexes()
            .into_iter()
            .find_map(|(name, index)| (name == plugin).then_some(index))
    }

    pub fn credential(&self, plugin: &str, key: &str) -> Option<Arc<Credential>> {
        self.index(plugin)?.get(key).map(|c| c.value().clone())
    }

    /// Whether a credential other than `owner`'s holds `key`: as in APISIX, a key
    /// identifies one consumer, so a write that would share it is refused.
    pub fn taken(&self, (plugin, key): &AuthKey, owner: KeyOwner<'_>) -> bool {
        self.index(plugin)
            .and_then(|index| index.get(key.as_str()))
            .is_some_and(|other| !owner.owns(&other))
    }

    /// Indexes `cred` under its key; returns the credential that held the key before.
    pub fn insert_credential(
        &self,
        (_, key): AuthKey,
        cred: Arc<Credential>,
    ) -> Option<Arc<Credential>> {
        // The index follows from the credential's type, so every auth plugin has one.
        let index = match cred.auth {
            ConsumerAuth::JwtAuth(_) => &self.jwt_auth,
        };
        index.insert(key, cred)
    }
}

#[derive(Debug)]
pub struct Snapshot {
    pub router: Router,
    pub consumers: Arc<Consumers>,
    pub unmatched: Unmatched,
}

/// Why a spec could not be compiled; `path` is relative to the resource.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("invalid configuration: {0}")]
    Spec(#[from] SpecError),
    #[error("invalid plugins configuration: {0}")]
    Plugin(#[from] PluginError),
}

impl CompileError {
    pub fn path(&self) -> String {
        match self {
            CompileError::Spec(e) => e.path.clone(),
            CompileError::Plugin(e) => format!("plugins.{}", e.plugin),
        }
    }
}

fn resolved(plugins: &BTreeMap<String, Value>) -> Result<BTreeMap<String, Value>, CompileError> {
    plugins
        .iter()
        .map(|(name, conf)| {
            let mut conf = conf.clone();
            resolve_env(&mut conf).map_err(|e| PluginError::new(name, format!("{e}")))?;
            Ok((name.clone(), conf))
        })
        .collect()
}

pub fn compile_route(
    id: &str,
    spec: &RouteSpec,
    cx: &BuildContext<'_>,
) -> Result<Route, CompileError> {
    spec.check()?;
    let mut plugins = Vec::new();
    for (name, conf) in resolved(spec.plugins.as_ref().unwrap_or(&BTreeMap::new()))? {
        if plugins::is_disabled(&conf) {
            continue;
        }
        plugins.push(Plugin::compile(&name, &conf, cx)?);
    }
    plugins.sort_by_key(|p| std::cmp::Reverse(p.priority()));
    let owned_headers = plugins.iter().flat_map(Plugin::owned_headers).collect();
    Ok(Route {
        id: id.into(),
        priority: spec.priority.unwrap_or(0),
        enabled: spec.status.unwrap_or(1) == 1,
        uris: spec
            .uri
            .iter()
            .chain(spec.uris.iter().flatten())
            .map(|u| UriPattern::parse(u))
            .collect(),
        hosts: spec
            .host
            .iter()
            .chain(spec.hosts.iter().flatten())
            .map(|h| HostPattern::parse(h))
            .collect(),
        methods: spec.methods.clone().unwrap_or_default(),
        plugins,
        owned_headers,
    })
}

/// A compiled consumer with the credentials written directly in its `plugins`.
pub struct CompiledConsumer {
    pub consumer: Arc<Consumer>,
    pub inline_credentials: Vec<(AuthKey, Arc<Credential>)>,
}

/// `username` is `spec.username` as the caller keeps it, so the store's key, the
/// compiled consumer and its credentials share one allocation (100k of them at scale).
pub fn compile_consumer(
    username: Arc<str>,
    spec: &ConsumerSpec,
    cx: &BuildContext<'_>,
) -> Result<CompiledConsumer, CompileError> {
    spec.check()?;
    debug_assert_eq!(&*username, spec.username);
    let mut plugins = Vec::new();
    let mut inline_credentials = Vec::new();
    for (name, conf) in resolved(spec.plugins.as_ref().unwrap_or(&BTreeMap::new()))? {
        if plugins::is_disabled(&conf) {
            continue;
        }
        match plugins::compile_consumer_plugin(&name, &conf, cx)? {
            ConsumerPlugin::Auth(key, auth) => inline_credentials.push((
                key,
                Arc::new(Credential {
                    username: username.clone(),
                    credential_id: None,
                    auth,
                }),
            )),
            ConsumerPlugin::Plugin(p) => plugins.push(*p),
        }
    }
    plugins.sort_by_key(|p| std::cmp::Reverse(p.priority()));
    let custom_id = spec
        .labels
        .as_ref()
        .and_then(|l| l.get("custom_id"))
        .map(|v| CompactString::from(v.as_str()));
    Ok(CompiledConsumer {
        consumer: Arc::new(Consumer {
            username,
            custom_id,
            plugins: plugins.into_boxed_slice(),
        }),
        inline_credentials,
    })
}

pub fn compile_credential(
    username: impl Into<Arc<str>>,
    id: impl Into<Arc<str>>,
    spec: &CredentialSpec,
    cx: &BuildContext<'_>,
) -> Result<(AuthKey, Arc<Credential>), CompileError> {
    spec.check()?;
    let (name, conf) = resolved(&spec.plugins)?
        .into_iter()
        .next()
        .expect("checked: exactly one plugin");
    match plugins::compile_consumer_plugin(&name, &conf, cx)? {
        ConsumerPlugin::Auth(key, auth) => Ok((
            key,
            Arc::new(Credential {
                username: username.into(),
                credential_id: Some(id.into()),
                auth,
            }),
        )),
        ConsumerPlugin::Plugin(_) => Err(PluginError::new(
            &name,
            "only supports auth type plugins in consumer credential",
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer with a credential is kept 100k times at scale (docs/benchmarks.md):
    /// each of these is one heap chunk per consumer, and glibc rounds a chunk (value,
    /// `Arc` counts, 8-byte header) up to 16 bytes. A field that pushes one into the
    /// next size costs 1.5 MiB there.
    #[test]
    fn per_consumer_values_stay_in_their_chunk_sizes() {
        let chunk = |value: usize| (2 * size_of::<usize>() + value + 8).next_multiple_of(16);
        assert_eq!(chunk(size_of::<Consumer>()), 80);
        assert_eq!(chunk(size_of::<Credential>()), 96);
        assert_eq!(
            size_of::<Option<CompactString>>(),
            size_of::<CompactString>()
        );
        // Keys and custom ids as long as APISIX's docs' examples (and scale.sh's) need
        // no chunk of their own.
        for short in ["user-key", "jack-key", "key99999", "c99999"] {
            assert!(!CompactString::from(short).is_heap_allocated(), "{short}");
        }
    }
}
