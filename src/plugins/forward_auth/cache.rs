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

/// SHA-256 of the identifying headers' values. Keyed by the digest, not the values: a
/// `Cookie` header can be tens of KiB, and a signed-in client adding a new junk cookie
/// to each request would make each a new entry, so the cache's entry bound would not
/// bound its bytes. Each value is length-prefixed and an absent header differs from
/// an empty one, so no two header lists share a key.
pub type Key = [u8; 32];

pub fn key<'a>(values: impl Iterator<Item = Option<&'a str>>) -> Key {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for value in values {
        match value {
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

#[cfg(test)]
mod tests {
    use super::key;

    #[test]
    fn keys_tell_every_header_list_apart() {
        let k = |v: &[Option<&str>]| key(v.iter().copied());
        assert_eq!(k(&[Some("a"), Some("b")]), k(&[Some("a"), Some("b")]));
        assert_ne!(
            k(&[Some("a\u{1f}b"), Some("")]),
            k(&[Some("a"), Some("b\u{1f}")])
        );
        assert_ne!(k(&[Some("ab"), Some("")]), k(&[Some("a"), Some("b")]));
        assert_ne!(k(&[None, Some("x")]), k(&[Some(""), Some("x")]));
        assert_ne!(k(&[Some("x")]), k(&[Some("x"), None]));
    }
}
