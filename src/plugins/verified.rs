//! Tokens whose signature has already been checked against a given key.
//!
//! An RSA or ECDSA verification costs ~0.3 ms of CPU (RustCrypto), sixty times a
//! whole HS256 Check, and clients send the same token on every request until it
//! expires. Envoy's own `jwt_authn` filter caches verified tokens for the same reason
//! (`jwt_cache_config`). Only the signature check is skipped on a hit: the caller
//! still checks `alg`, `exp`, `nbf` and every other claim on every request.
//!
//! An entry is keyed by the SHA-256 of the whole token and remembers the key it was
//! verified with as a `Weak` pointer. A hit needs that very key to be the one in
//! force now: a rotated secret or public key is a new allocation, so tokens signed
//! for the old key are verified afresh. Holding the `Weak` keeps the old
//! allocation's address from being reused, so a new key can never be mistaken for
//! the one an entry names.
use std::sync::{Arc, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// How many verified tokens are remembered (per cache).
pub const CAPACITY: u64 = 10_000;
/// How long an entry lives, whatever the token's own `exp` (which is still checked
/// on every request).
pub const TTL: Duration = Duration::from_secs(300);

pub type TokenDigest = [u8; 32];

pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

pub struct VerifiedTokens<K> {
    cache: moka::sync::Cache<TokenDigest, Weak<K>>,
}

impl<K: Send + Sync + 'static> VerifiedTokens<K> {
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        VerifiedTokens {
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// True when the token with this digest was verified with exactly `key`.
    pub fn contains(&self, digest: &TokenDigest, key: &Arc<K>) -> bool {
        self.cache
            .get(digest)
            .and_then(|weak| weak.upgrade())
            .is_some_and(|verified_with| Arc::ptr_eq(&verified_with, key))
    }

    /// Remembers that the token's signature verified with `key`.
    pub fn insert(&self, digest: TokenDigest, key: &Arc<K>) {
        self.cache.insert(digest, Arc::downgrade(key));
    }
}

impl<K: Send + Sync + 'static> Default for VerifiedTokens<K> {
    fn default() -> Self {
        Self::new(CAPACITY, TTL)
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
    fn a_hit_needs_the_same_key_still_in_force() {
        let cache = VerifiedTokens::<String>::default();
        let key = Arc::new("key-1".to_string());
        let d = digest("header.payload.sig");
        assert!(!cache.contains(&d, &key));
        cache.insert(d, &key);
        assert!(cache.contains(&d, &key));
        assert!(!cache.contains(&digest("header.payload.other"), &key));

        // A rotated key with equal contents is still another key.
        let rotated = Arc::new("key-1".to_string());
        assert!(!cache.contains(&d, &rotated));

        // Once the verifying key is gone, nothing can hit on it.
        drop(key);
        let after = Arc::new("key-1".to_string());
        assert!(!cache.contains(&d, &after));
    }
}
