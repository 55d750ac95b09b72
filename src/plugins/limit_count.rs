//! limit-count: APISIX's fixed-window request quota, with the `local` policy.
//!
//! Counters live in [`Shared`], outside any snapshot, so a config reload or an
//! Admin API write elsewhere keeps them. A counter is keyed as APISIX keys it: by
//! the resource the plugin is configured on (the route, or the consumer when it is a
//! consumer plugin, so a consumer's quota spans every route it uses), a fingerprint
//! of the plugin's own settings (changing `count` or `time_window` starts afresh, as
//! APISIX's per-plugin conf version does), and the value of `key` for this request
//! (the client address by default). With `group`, every route of the group shares
//! `group:key`. As in `resty.limit.count`, a window opens with the first request
//! it counts and lasts `time_window` seconds.
//!
//! With `policy: redis` ([`redis`]) the same counter lives in Redis, shared by every
//! replica; when Redis cannot answer, `allow_degradation` lets the request through,
//! else it is denied with APISIX's 500 `{"error_msg":"failed to limit count"}`.
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Deserialize;
use serde_json::Value;

use super::{BuildContext, Ctx, Outcome};
use crate::decision::Deny;

/// Expired windows are swept at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// What the local counters may hold, keys included. A key carries a client's header,
/// argument or cookie (up to Envoy's header limit), and a window lives as long as
/// `time_window`, so a client sending a new value each time would otherwise grow the
/// map without end. APISIX bounds them the same way, in its `plugin-limit-count`
/// shared dict (10 MiB by default), whose fullest moments evict the oldest counters.
const MAX_BYTES: usize = 32 * 1024 * 1024;
/// What a window costs besides its key's bytes (the map's slot, the `String`, `Window`).
const ENTRY_OVERHEAD: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    count: Option<Value>,
    time_window: Option<Value>,
    #[serde(default = "default_window_type")]
    window_type: String,
    rules: Option<Value>,
    group: Option<String>,
    #[serde(default = "default_key")]
    key: String,
    #[serde(default = "default_key_type")]
    key_type: String,
    #[serde(default = "default_rejected_code")]
    rejected_code: i64,
    rejected_msg: Option<String>,
    #[serde(default = "default_policy")]
    policy: String,
    #[serde(default)]
    allow_degradation: bool,
    #[serde(default = "default_true")]
    show_limit_quota_header: bool,
    /// Only meaningful with the redis policies; accepted as APISIX does.
    #[serde(default)]
    #[allow(dead_code)]
    sync_interval: Option<f64>,
    redis_host: Option<String>,
    #[serde(default = "default_redis_port")]
    redis_port: u16,
    redis_username: Option<String>,
    redis_password: Option<String>,
    #[serde(default)]
    redis_database: u32,
    #[serde(default = "default_redis_timeout")]
    redis_timeout: u64,
    #[serde(default)]
    redis_ssl: bool,
}

fn default_redis_port() -> u16 {
    6379
}
fn default_redis_timeout() -> u64 {
    1000
}

fn default_window_type() -> String {
    "fixed".into()
}
fn default_key() -> String {
    "remote_addr".into()
}
fn default_key_type() -> String {
    "var".into()
}
fn default_rejected_code() -> i64 {
    503
}
fn default_policy() -> String {
    "local".into()
}
fn default_true() -> bool {
    true
}

/// What identifies the client a counter belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum KeySpec {
    /// One APISIX variable (`remote_addr`, `http_x_api_key`, `consumer_name`, ...).
    Var(String),
    /// Variables inside a string: `$remote_addr $http_x_user`.
    Combination(String),
    Constant(String),
}

#[derive(Debug)]
pub struct Plugin {
    count: u64,
    window: Duration,
    key: KeySpec,
    group: Option<String>,
    rejected_code: u16,
    /// `{"error_msg": rejected_msg}`, serialised once.
    rejected_body: Option<Value>,
    show_limit_quota_header: bool,
    /// Changes whenever the settings that shape a counter change.
    fingerprint: u64,
    /// `policy: redis`: where the shared counter lives.
    redis: Option<redis::Target>,
    /// With Redis unreachable: let requests through (true) or deny with 500.
    allow_degradation: bool,
}

/// Counters shared by every snapshot.
#[derive(Debug)]
pub struct Shared {
    windows: DashMap<String, Window>,
    /// What `windows` holds, by [`cost`].
    bytes: AtomicUsize,
    /// Held by whoever sweeps or evicts.
    last_sweep: Mutex<Instant>,
    /// Connections of the redis policy, one per Redis target.
    redis: redis::Pool,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            windows: DashMap::new(),
            bytes: AtomicUsize::new(0),
            last_sweep: Mutex::new(Instant::now()),
            redis: redis::Pool::default(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    ends: Instant,
    used: u64,
}

/// The state of a counter after one request was counted.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tally {
    allowed: bool,
    remaining: u64,
    /// Seconds until the window ends.
    reset: f64,
}

impl Shared {
    /// Counts one request against `key`, opening a new window when none is open.
    fn incoming(&self, key: String, limit: u64, window: Duration, now: Instant) -> Tally {
        self.sweep(now);
        let cost = cost(&key);
        let mut entry = self.windows.entry(key).or_insert_with(|| {
            self.bytes.fetch_add(cost, Ordering::Relaxed);
            Window {
                ends: now + window,
                used: 0,
            }
        });
        if entry.ends <= now {
            *entry = Window {
                ends: now + window,
                used: 0,
            };
        }
        entry.used = entry.used.saturating_add(1);
        let reset = if entry.used == 1 {
            window.as_secs_f64()
        } else {
            entry.ends.saturating_duration_since(now).as_secs_f64()
        };
        let tally = Tally {
            allowed: entry.used <= limit,
            remaining: limit.saturating_sub(entry.used),
            reset: (reset * 100.0).floor() / 100.0,
        };
        drop(entry);
        if self.bytes.load(Ordering::Relaxed) > MAX_BYTES {
            self.evict(now);
        }
        tally
    }

    /// Drops windows that have ended, at most once per [`SWEEP_EVERY`].
    fn sweep(&self, now: Instant) {
        let Ok(mut last) = self.last_sweep.try_lock() else {
            return;
        };
        if now.saturating_duration_since(*last) < SWEEP_EVERY {
            return;
        }
        *last = now;
        drop(last);
        self.retain(|w| w.ends > now);
    }

    /// Makes room when the counters outgrow [`MAX_BYTES`]: the windows that have
    /// ended go, then the quarter that end soonest (the oldest of each length), whose
    /// clients start counting afresh, as APISIX's evicted counters do. Amortised: one
    /// pass over the map frees room for a quarter of it.
    fn evict(&self, now: Instant) {
        let Ok(mut last) = self.last_sweep.try_lock() else {
            return;
        };
        *last = now;
        self.retain(|w| w.ends > now);
        if self.bytes.load(Ordering::Relaxed) <= MAX_BYTES {
            return;
        }
        let mut ends: Vec<Instant> = self.windows.iter().map(|e| e.ends).collect();
        if ends.is_empty() {
            return;
        }
        let quarter = ends.len() / 4;
        let (_, &mut cutoff, _) = ends.select_nth_unstable(quarter);
        drop(ends);
        let before = self.windows.len();
        self.retain(|w| w.ends > cutoff);
        tracing::warn!(
            evicted = before - self.windows.len(),
            kept = self.windows.len(),
            "limit-count: local counters reached {} MiB; the windows ending soonest were dropped",
            MAX_BYTES >> 20
        );
    }

    /// Keeps the windows `keep` says to, and their bytes' account with them.
    fn retain(&self, keep: impl Fn(&Window) -> bool) {
        self.windows.retain(|key, w| {
            let kept = keep(w);
            if !kept {
                self.bytes.fetch_sub(cost(key), Ordering::Relaxed);
            }
            kept
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.windows.len()
    }
}

fn cost(key: &str) -> usize {
    key.len() + ENTRY_OVERHEAD
}

impl Plugin {
    pub fn compile(conf: &Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let conf: Conf = serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
        let redis = match conf.policy.as_str() {
            "local" => None,
            "redis" => Some(redis::Target::new(&redis::Settings {
                redis_host: conf.redis_host.clone(),
                redis_port: conf.redis_port,
                redis_username: conf.redis_username.clone(),
                redis_password: conf.redis_password.clone(),
                redis_database: conf.redis_database,
                redis_timeout: conf.redis_timeout,
                redis_ssl: conf.redis_ssl,
            })?),
            "redis-cluster" | "redis-sentinel" => {
                return Err(format!(
                    "policy \"{}\" is not supported; use \"redis\" (one shared Redis) or \
                     \"local\"",
                    conf.policy
                ));
            }
            other => {
                return Err(format!(
                    "property \"policy\" validation failed: {other:?} is not one of local, \
                     redis, redis-cluster, redis-sentinel"
                ));
            }
        };
        if conf.rules.is_some() {
            return Err("\"rules\" is not supported; use count, time_window and key".into());
        }
        match conf.window_type.as_str() {
            "fixed" => {}
            "sliding" => {
                return Err("window_type \"sliding\" is not supported; use \"fixed\"".into());
            }
            other => {
                return Err(format!(
                    "property \"window_type\" validation failed: {other:?} is not one of fixed, sliding"
                ));
            }
        }
        let count = positive("count", conf.count.as_ref())?;
        let time_window = positive("time_window", conf.time_window.as_ref())?;
        if !(200..=599).contains(&conf.rejected_code) {
            return Err("property \"rejected_code\" validation failed: expected 200 to 599".into());
        }
        if conf.rejected_msg.as_deref() == Some("") {
            return Err("property \"rejected_msg\" validation failed: string too short".into());
        }
        let key = match conf.key_type.as_str() {
            "var" => KeySpec::Var(conf.key.clone()),
            "var_combination" => KeySpec::Combination(conf.key.clone()),
            "constant" => KeySpec::Constant(conf.key.clone()),
            other => {
                return Err(format!(
                    "property \"key_type\" validation failed: {other:?} is not one of var, \
                     var_combination, constant"
                ));
            }
        };
        // A stable digest (not std's hasher, which may change between Rust
        // releases): replicas of different builds share Redis counters.
        let digest = <sha2::Sha256 as sha2::Digest>::digest(
            format!("{count}:{time_window}:{key:?}:{:?}", conf.group).as_bytes(),
        );
        let fingerprint = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        Ok(Plugin {
            count,
            window: Duration::from_secs(time_window),
            key,
            group: conf.group,
            rejected_code: conf.rejected_code as u16,
            rejected_body: conf
                .rejected_msg
                .map(|msg| serde_json::json!({ "error_msg": msg })),
            show_limit_quota_header: conf.show_limit_quota_header,
            fingerprint,
            redis,
            allow_degradation: conf.allow_degradation,
        })
    }

    pub async fn run(&self, cx: &mut Ctx<'_>) -> Outcome {
        let key = self.counter_key(cx);
        let tally = match &self.redis {
            None => cx
                .shared
                .limit_count
                .incoming(key, self.count, self.window, Instant::now()),
            Some(target) => {
                match cx
                    .shared
                    .limit_count
                    .redis
                    .incoming(target, &key, self.window)
                    .await
                {
                    Ok(counted) => Tally {
                        allowed: counted.used <= self.count,
                        remaining: self.count.saturating_sub(counted.used),
                        reset: (counted.reset * 100.0).floor() / 100.0,
                    },
                    Err(error) => {
                        tracing::error!(
                            redis = target.shown(),
                            %error,
                            allow_degradation = self.allow_degradation,
                            "limit-count: failed to limit count"
                        );
                        metrics::counter!(
                            "portcullis_limit_count_redis_errors_total",
                            "allowed" => if self.allow_degradation { "true" } else { "false" }
                        )
                        .increment(1);
                        if self.allow_degradation {
                            return Outcome::Continue;
                        }
                        return Outcome::Deny(
                            Deny::new(500)
                                .json(&serde_json::json!({"error_msg": "failed to limit count"}))
                                .because("limit-count: Redis unreachable"),
                        );
                    }
                }
            }
        };
        let reset = format_reset(tally.reset);
        if tally.allowed {
            if self.show_limit_quota_header {
                cx.allow
                    .add_client_header("x-ratelimit-limit", self.count.to_string());
                cx.allow
                    .add_client_header("x-ratelimit-remaining", tally.remaining.to_string());
                cx.allow.add_client_header("x-ratelimit-reset", reset);
            }
            return Outcome::Continue;
        }
        let mut deny = Deny::new(self.rejected_code);
        if let Some(body) = &self.rejected_body {
            deny = deny.json(body);
        }
        if self.show_limit_quota_header {
            deny = deny
                .header("x-ratelimit-limit", self.count.to_string())
                .header("x-ratelimit-remaining", "0")
                .header("x-ratelimit-reset", reset);
        }
        Outcome::Deny(deny.because(format!(
            "limit-count: more than {} requests in {} s",
            self.count,
            self.window.as_secs()
        )))
    }

    /// `group:<group>:<key>`, or `<owner>:<fingerprint>:<key>` where the owner is the
    /// consumer for a consumer plugin and the route otherwise.
    fn counter_key(&self, cx: &Ctx<'_>) -> String {
        let value = self.key_value(cx);
        if let Some(group) = &self.group {
            return format!("group:{group}:{value}");
        }
        let on_consumer = cx.identity.as_ref().filter(|id| {
            id.consumer
                .plugins
                .iter()
                .any(|p| matches!(p, super::Plugin::LimitCount(lc) if std::ptr::eq(lc, self)))
        });
        match on_consumer {
            Some(id) => format!(
                "consumer:{}:{:x}:{value}",
                id.consumer.username, self.fingerprint
            ),
            None => format!("route:{}:{:x}:{value}", cx.route.id, self.fingerprint),
        }
    }

    /// The key's value for this request; the client address when it resolves to
    /// nothing, as APISIX falls back to `remote_addr`.
    fn key_value(&self, cx: &Ctx<'_>) -> String {
        let resolved = match &self.key {
            KeySpec::Constant(k) => Some(k.clone()),
            KeySpec::Var(name) => var(cx, name),
            KeySpec::Combination(template) => combine(cx, template),
        };
        resolved.unwrap_or_else(|| cx.req.source_ip.unwrap_or_default().to_owned())
    }
}

fn positive(name: &str, value: Option<&Value>) -> Result<u64, String> {
    match value {
        None => Err(format!("property \"{name}\" is required")),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v > 0 => Ok(v),
            _ => Err(format!(
                "property \"{name}\" validation failed: expected an integer greater than 0"
            )),
        },
        Some(Value::String(_)) => Err(format!(
            "property \"{name}\": variables are not supported; use an integer"
        )),
        Some(_) => Err(format!("property \"{name}\" validation failed: wrong type")),
    }
}

/// An APISIX (nginx) variable, as far as a Check request can tell it.
fn var(cx: &Ctx<'_>, name: &str) -> Option<String> {
    let req = cx.req;
    let found = match name {
        "remote_addr" => req.source_ip.map(str::to_owned),
        "consumer_name" => cx
            .identity
            .as_ref()
            .map(|i| i.consumer.username.to_string()),
        "route_id" => Some(cx.route.id.to_string()),
        "host" => Some(req.host.to_owned()),
        "uri" => Some(req.path.to_owned()),
        "request_uri" => Some(req.request_uri.to_owned()),
        "request_method" => Some(req.method.to_owned()),
        "scheme" => Some(req.scheme.to_owned()),
        "args" | "query_string" => (!req.query.is_empty()).then(|| req.query.to_owned()),
        _ => {
            if let Some(header) = name.strip_prefix("http_") {
                let header = header.replace('_', "-").to_ascii_lowercase();
                req.headers.get(&header).map(str::to_owned)
            } else if let Some(arg) = name.strip_prefix("arg_") {
                req.query_param(arg).map(|v| v.into_owned())
            } else if let Some(cookie) = name.strip_prefix("cookie_") {
                req.cookie(cookie).map(str::to_owned)
            } else {
                None
            }
        }
    };
    found.filter(|v| !v.is_empty())
}

/// Replaces `$name` and `${name}` with variables; `None` when none resolved.
fn combine(cx: &Ctx<'_>, template: &str) -> Option<String> {
    let mut out = String::with_capacity(template.len());
    let mut resolved = 0;
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, consumed) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() {
            out.push('$');
            rest = after;
            continue;
        }
        if let Some(value) = var(cx, name) {
            out.push_str(&value);
            resolved += 1;
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    (resolved > 0).then_some(out)
}

/// Lua prints the floored reset like `%.14g`: `30`, `29.87`.
fn format_reset(reset: f64) -> String {
    let text = format!("{reset:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

pub mod redis;
#[cfg(test)]
mod tests;
