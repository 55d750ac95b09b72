//! Tokens whose signature has already been checked against a given key.
//!
//! An RSA or ECDSA verification costs ~0.3 ms of CPU (RustCrypto), sixty times a
//! whole HS256 Check, and clients send the same token on every request until it
//! expires. Envoy's own `jwt_authn` filter caches verified tokens for the same reason
//! (`jwt_cache_config`). Only the signature check is skipped on a hit: the caller
//! still checks `alg`, `exp`, `nbf` and every other claim on every request.
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

pub struct VerifiedTokens<K> {
    cache: moka::sync::Cache<Arc<str>, Weak<K>, foldhash::fast::RandomState>,
}

impl<K: Send + Sync + 'static> VerifiedTokens<K> {
    pub fn new(capacity_bytes: u64, ttl: Duration) -> Self {
        VerifiedTokens {
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity_bytes)
                .weigher(|token: &Arc<str>, _| {
                    u32::try_from(token.len())
                        .unwrap_or(u32::MAX)
                        .saturating_add(ENTRY_OVERHEAD)
                })
                .time_to_live(ttl)
                .build_with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    /// True when exactly this token was verified with exactly `key`.
    pub fn contains(&self, token: &str, key: &Arc<K>) -> bool {
        self.cache
            .get(token)
            .and_then(|weak| weak.upgrade())
            .is_some_and(|verified_with| Arc::ptr_eq(&verified_with, key))
    }

    /// Remembers that the token's signature verified with `key`.
    pub fn insert(&self, token: &str, key: &Arc<K>) {
        self.cache.insert(Arc::from(token), Arc::downgrade(key));
    }
}

impl<K: Send + Sync + 'static> Default for VerifiedTokens<K> {
    fn default() -> Self {
        Self::new(CAPACITY_BYTES, TTL)
    }
}

impl<K> std::fmt::Debug for VerifiedTokens<K> {
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
}
