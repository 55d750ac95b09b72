//! One pooled HTTP client per distinct (origin, TLS, keep-alive) setting, shared by
//! every route that uses it and kept across config swaps, so a reload never drops
//! warm connections to an auth service.
use std::time::Duration;

use dashmap::DashMap;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub origin: String,
    pub ssl_verify: bool,
    pub keepalive: bool,
    pub keepalive_timeout_ms: u64,
    pub keepalive_pool: usize,
}

#[derive(Debug, Default)]
pub struct Clients {
    clients: DashMap<ClientKey, reqwest::Client>,
}

impl Clients {
    /// The client for `key`, built on first use. Redirects are never followed: a
    /// login redirect from the auth service is the answer, for the browser.
    pub fn get(&self, key: ClientKey) -> Result<reqwest::Client, String> {
        if let Some(c) = self.clients.get(&key) {
            return Ok(c.clone());
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .danger_accept_invalid_certs(!key.ssl_verify);
        builder = if key.keepalive {
            builder
                .pool_idle_timeout(Duration::from_millis(key.keepalive_timeout_ms))
                .pool_max_idle_per_host(key.keepalive_pool)
        } else {
            builder.pool_max_idle_per_host(0)
        };
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(self.clients.entry(key).or_insert(client).clone())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.clients.len()
    }
}
