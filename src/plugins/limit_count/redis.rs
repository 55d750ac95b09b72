//! limit-count `policy: redis`: one counter for every replica.
//!
//! Each Check runs one Lua script on Redis, so counting and opening a window are a
//! single atomic step however many replicas count at once: `INCR` the key, give it
//! the window as its time to live when the increment created it, and answer the count
//! with the time left. The key is `portcullis:limit-count:` followed by the same
//! counter key the local policy uses (owner, settings fingerprint, key value), so
//! replicas running the same config share it.
//!
//! Connections are pooled per Redis target in [`Pool`], which outlives snapshots: a
//! [`ConnectionManager`] multiplexes every Check on one connection and reconnects in
//! the background. Every call is bounded by `redis_timeout`. When Redis cannot answer,
//! the caller applies `allow_degradation` as APISIX does.
use std::sync::LazyLock;
use std::time::Duration;

use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Count and open the window in one step; `{count, milliseconds left}`. A key that
/// somehow lost its expiry gets the window again instead of counting forever.
const SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return {n, tonumber(ARGV[1])}
end
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  left = tonumber(ARGV[1])
end
return {n, left}
";

static COUNT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SCRIPT));

/// The Redis fields of APISIX's limit-count schema.
#[derive(Debug, Clone)]
pub struct Settings {
    pub redis_host: Option<String>,
    pub redis_port: u16,
    pub redis_username: Option<String>,
    pub redis_password: Option<String>,
    pub redis_database: u32,
    /// Milliseconds.
    pub redis_timeout: u64,
    pub redis_ssl: bool,
}

/// Where and how to reach Redis, checked once at compile time.
#[derive(Debug, Clone)]
pub struct Target {
    url: String,
    /// For logs: the URL without credentials.
    shown: String,
    timeout: Duration,
}

impl Target {
    pub fn new(s: &Settings) -> Result<Self, String> {
        let host = s
            .redis_host
            .as_deref()
            .filter(|h| !h.is_empty())
            .ok_or("property \"redis_host\" is required with policy \"redis\"")?;
        if s.redis_ssl {
            return Err(
                "redis_ssl is not supported; reach Redis over a trusted network \
                        or a TLS sidecar"
                    .into(),
            );
        }
        if s.redis_timeout == 0 {
            return Err("property \"redis_timeout\" validation failed: expected at least 1".into());
        }
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let shown = format!("redis://{host}:{}/{}", s.redis_port, s.redis_database);
        let mut url = url::Url::parse(&shown)
            .map_err(|e| format!("property \"redis_host\" validation failed: {e}"))?;
        if let Some(password) = s.redis_password.as_deref().filter(|p| !p.is_empty()) {
            let _ = url.set_username(s.redis_username.as_deref().unwrap_or_default());
            let _ = url.set_password(Some(password));
        }
        Ok(Target {
            url: url.into(),
            shown,
            timeout: Duration::from_millis(s.redis_timeout),
        })
    }

    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// One connection manager per Redis target, shared by every snapshot.
#[derive(Default)]
pub struct Pool {
    managers: DashMap<String, ConnectionManager>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("targets", &self.managers.len())
            .finish()
    }
}

/// What Redis answered for one counted request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counted {
    pub used: u64,
    /// Seconds until the window ends.
    pub reset: f64,
}

impl Pool {
    async fn manager(&self, target: &Target) -> Result<ConnectionManager, String> {
        if let Some(m) = self.managers.get(&target.url) {
            return Ok(m.clone());
        }
        let client = redis::Client::open(target.url.as_str()).map_err(|e| e.to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(target.timeout))
            .set_response_timeout(Some(target.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| e.to_string())?;
        Ok(self
            .managers
            .entry(target.url.clone())
            .or_insert(manager)
            .clone())
    }

    /// Runs `call` on this target's connection, bounded by the target's timeout.
    async fn bounded<T>(
        &self,
        target: &Target,
        call: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        let run = async {
            let mut con = self.manager(target).await?;
            call(&mut con).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(target.timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {:?}", target.timeout)),
        }
    }

    /// `GET key` (openid-connect's Redis session storage).
    pub async fn get(&self, target: &Target, key: &str) -> Result<Option<String>, String> {
        self.bounded(target, async |con| {
            redis::cmd("GET").arg(key).query_async(con).await
        })
        .await
    }

    /// `SET key value EX ttl`.
    pub async fn set_ex(
        &self,
        target: &Target,
        key: &str,
        value: &str,
        ttl: u64,
    ) -> Result<(), String> {
        self.bounded(target, async |con| {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("EX")
                .arg(ttl.max(1))
                .query_async(con)
                .await
        })
        .await
    }

    /// `DEL key`.
    pub async fn del(&self, target: &Target, key: &str) -> Result<(), String> {
        self.bounded(target, async |con| {
            redis::cmd("DEL").arg(key).query_async(con).await
        })
        .await
    }

    /// Counts one request against `key` in a window of `window`.
    pub async fn incoming(
        &self,
        target: &Target,
        key: &str,
        window: Duration,
    ) -> Result<Counted, String> {
        let call = async {
            let mut con = self.manager(target).await?;
            let (used, left_ms): (u64, i64) = COUNT
                .key(format!("portcullis:limit-count:{key}"))
                .arg(window.as_millis() as u64)
                .invoke_async(&mut con)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Counted {
                used,
                reset: left_ms.max(0) as f64 / 1000.0,
            })
        };
        match tokio::time::timeout(target.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {:?}", target.timeout)),
        }
    }
}
