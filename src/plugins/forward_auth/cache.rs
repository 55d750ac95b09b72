//! The opt-in decision cache: successful auth answers, keyed by the request headers
//! that identify a session (e.g. `Cookie`, `Authorization`), kept for a TTL and
//! bounded in size, as Authgear recommends in front of its resolver. Denials are
//! never cached, so a login or a revocation takes effect on the next request once
//! the entry expires.
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

/// What a cached success applies: headers for the upstream and for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAllow {
    pub upstream: Vec<(String, Option<String>)>,
    pub client: Vec<(String, String)>,
}

pub type Cache = moka::sync::Cache<Key, Arc<CachedAllow>>;

/// `plugins::digest` of the identifying headers' values. Keyed by the digest, not the
/// values: a `Cookie` header can be tens of KiB, and a signed-in client adding a new
/// junk cookie to each request would make each a new entry, so the cache's entry bound
/// would not bound its bytes.
pub type Key = [u8; 32];

/// Caches by plugin settings, so a config swap that keeps them keeps the entries.
#[derive(Debug, Default)]
pub struct Caches {
    caches: DashMap<String, Cache>,
}

impl Caches {
    pub fn get(&self, identity: String, ttl: Duration, max_entries: u64) -> Cache {
        self.caches
            .entry(identity)
            .or_insert_with(|| {
                Cache::builder()
                    .time_to_live(ttl)
                    .max_capacity(max_entries)
                    .build()
            })
            .clone()
    }
}
