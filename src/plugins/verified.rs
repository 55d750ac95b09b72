//! Tokens whose signature has already been checked against a given key.
//!
//! An RSA or ECDSA verification costs ~0.3 ms of CPU (RustCrypto), sixty times a
//! whole HS256 Check, and clients send the same token on every request until it
//! expires. Envoy's own `jwt_authn` filter caches verified tokens for the same reason
//! (`jwt_cache_config`). A hit skips the signature check (and, where an entry keeps
//! them, the token's decoding), never the claims: the caller still checks `alg`,
//! `exp`, `nbf` and every other claim on every request.
//!
//! An entry is keyed by the whole token and remembers the key it was verified with as
//! a `Weak` pointer. A hit needs the very same bytes (the map compares the stored
//! token with the presented one, so no hash collision can ever make a hit) and that
//! very key still in force: a rotated secret or public key is a new allocation, so
//! tokens signed for the old key are verified afresh. Holding the `Weak` keeps the
//! old allocation's address from being reused, so a new key can never be mistaken
//! for the one an entry names.
//!
//! Keying by the token rather than its SHA-256 costs memory (the token's bytes, so
//! the cache is bounded in bytes) but saves the digest: without SHA extensions in
//! the CPU, hashing a 700-byte RS256 token was a third of a cached Check's
//! instructions. The map hashes with foldhash rather than SipHash (1.5k instructions
//! per lookup of such a token): SipHash's defence is against an attacker who chooses
//! the keys, and only tokens whose signature verified are ever inserted.
//! Envoy's own `jwt_authn` cache keeps the token strings as well.
//!
//! An entry may also keep what was learnt from the token when it verified (`V`): the
//! openid-connect bearer path keeps the parsed claims and their `X-Userinfo`, so a
//! cached token is not decoded, parsed and re-encoded on every request. What `V` holds
//! is weighed with the token, so the cache stays bounded in bytes.
//!
//! openid-connect's session cookies use the same map: there the "token" is a sealed
//! cookie value, the key the session secret's cipher, and "verified" means AES-GCM
//! authenticated it (`flow::Sessions`).
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How many bytes of verified tokens are remembered (per cache): about ten thousand
/// RS256 tokens with a 2048-bit key.
pub const CAPACITY_BYTES: u64 = 8 * 1024 * 1024;
/// How long an entry lives, whatever the token's own `exp` (which is still checked
/// on every request).
pub const TTL: Duration = Duration::from_secs(300);
/// What an entry costs beyond its token's bytes (the `Arc`, the `Weak`, moka's entry).
const ENTRY_OVERHEAD: u32 = 128;

pub struct VerifiedTokens<K, V = ()> {
    cache: moka::sync::Cache<Arc<str>, Entry<K, V>, foldhash::fast::RandomState>,
}

struct Entry<K, V> {
    verified_with: Weak<K>,
    value: V,
    /// The heap bytes `value` holds, as its owner estimated them.
    value_bytes: u32,
}

impl<K, V: Clone> Clone for Entry<K, V> {
    fn clone(&self) -> Self {
        Entry {
            verified_with: self.verified_with.clone(),
            value: self.value.clone(),
            value_bytes: self.value_bytes,
        }
    }
}

impl<K, V> VerifiedTokens<K, V>
where
    K: Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(capacity_bytes: u64, ttl: Duration) -> Self {
        Self::with_policy(
            capacity_bytes,
            ttl,
            moka::policy::EvictionPolicy::tiny_lfu(),
        )
    }

    /// For values that are replaced rather than reused: a cache that keeps the most
    /// recently inserted ones, where TinyLFU's admission would keep the old ones that
    /// had been used often and turn new ones away.
    pub fn new_lru(capacity_bytes: u64, ttl: Duration) -> Self {
        Self::with_policy(capacity_bytes, ttl, moka::policy::EvictionPolicy::lru())
    }

    fn with_policy(
        capacity_bytes: u64,
        ttl: Duration,
        policy: moka::policy::EvictionPolicy,
    ) -> Self {
        VerifiedTokens {
            cache: moka::sync::Cache::builder()
                .eviction_policy(policy)
                .max_capacity(capacity_bytes)
                .weigher(|token: &Arc<str>, entry: &Entry<K, V>| {
                    u32::try_from(token.len())
                        .unwrap_or(u32::MAX)
                        .saturating_add(entry.value_bytes)
                        .saturating_add(ENTRY_OVERHEAD)
                })
                .time_to_live(ttl)
                .build_with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    /// What was kept for exactly this token verified with exactly `key`.
    pub fn get(&self, token: &str, key: &Arc<K>) -> Option<V> {
        let entry = self.cache.get(token)?;
        let verified_with = entry.verified_with.upgrade()?;
        Arc::ptr_eq(&verified_with, key).then_some(entry.value)
    }

    /// Remembers that the token's signature verified with `key`, with `value` and the
    /// heap bytes it holds.
    pub fn insert_with(&self, token: &str, key: &Arc<K>, value: V, value_bytes: usize) {
        let entry = Entry {
            verified_with: Arc::downgrade(key),
            value,
            value_bytes: u32::try_from(value_bytes).unwrap_or(u32::MAX),
        };
        self.cache.insert(Arc::from(token), entry);
    }

    /// Forgets the token, whatever key it was verified with.
    pub fn remove(&self, token: &str) {
        self.cache.invalidate(token);
    }
}

impl<K: Send + Sync + 'static> VerifiedTokens<K> {
    /// True when exactly this token was verified with exactly `key`.
    pub fn contains(&self, token: &str, key: &Arc<K>) -> bool {
        self.get(token, key).is_some()
    }

    /// Remembers that the token's signature verified with `key`.
    pub fn insert(&self, token: &str, key: &Arc<K>) {
        self.insert_with(token, key, (), 0);
    }
}

impl<K, V> Default for VerifiedTokens<K, V>
where
    K: Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new(CAPACITY_BYTES, TTL)
    }
}

impl<K, V> std::fmt::Debug for VerifiedTokens<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedTokens")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_needs_the_same_token_and_the_same_key_still_in_force() {
        let cache = VerifiedTokens::<String>::default();
        let key = Arc::new("key-1".to_string());
        let token = "header.payload.sig";
        assert!(!cache.contains(token, &key));
        cache.insert(token, &key);
        assert!(cache.contains(token, &key));
        assert!(
            cache.contains(&String::from(token), &key),
            "compared by bytes"
        );
        assert!(!cache.contains("header.payload.other", &key));
        assert!(!cache.contains("header.payload.si", &key));

        // A rotated key with equal contents is still another key.
        let rotated = Arc::new("key-1".to_string());
        assert!(!cache.contains(token, &rotated));

        // Once the verifying key is gone, nothing can hit on it.
        drop(key);
        let after = Arc::new("key-1".to_string());
        assert!(!cache.contains(token, &after));
    }

    #[test]
    fn the_cache_is_bounded_in_bytes() {
        let cache = VerifiedTokens::<String>::new(64 * 1024, TTL);
        let key = Arc::new("key".to_string());
        let big = "x".repeat(8 * 1024);
        for i in 0..64 {
            cache.insert(&format!("{i}.{big}"), &key);
        }
        cache.cache.run_pending_tasks();
        let kept = cache.cache.iter().map(|(t, _)| t.len() as u64).sum::<u64>();
        assert!(kept <= 64 * 1024, "{kept} bytes of tokens kept");
    }

    #[test]
    fn an_lru_cache_keeps_the_newest_even_against_often_used_old_ones() {
        let cache = VerifiedTokens::<String>::new_lru(64 * 1024, TTL);
        let key = Arc::new("key".to_string());
        let big = "x".repeat(8 * 1024);
        for i in 0..7 {
            let old = format!("old-{i}.{big}");
            cache.insert(&old, &key);
            for _ in 0..20 {
                assert!(cache.contains(&old, &key));
            }
        }
        cache.cache.run_pending_tasks();
        for i in 0..7 {
            cache.insert(&format!("new-{i}.{big}"), &key);
            cache.cache.run_pending_tasks();
        }
        for i in 0..7 {
            assert!(
                cache.contains(&format!("new-{i}.{big}"), &key),
                "new-{i} kept"
            );
        }
    }

    #[test]
    fn what_an_entry_keeps_is_weighed_with_its_token() {
        let cache = VerifiedTokens::<String, Arc<str>>::new(64 * 1024, TTL);
        let key = Arc::new("key".to_string());
        let kept_value: Arc<str> = Arc::from("claims");
        for i in 0..64 {
            cache.insert_with(&format!("token-{i}"), &key, kept_value.clone(), 8 * 1024);
        }
        cache.cache.run_pending_tasks();
        let entries = cache.cache.entry_count();
        assert!(entries <= 8, "{entries} entries of 8 KiB kept in 64 KiB");
        let (token, _) = cache.cache.iter().next().expect("some kept");
        assert_eq!(cache.get(&token, &key).as_deref(), Some("claims"));
        let other = Arc::new("key".to_string());
        assert_eq!(cache.get(&token, &other), None, "another key");
    }
}
