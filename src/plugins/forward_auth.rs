//! forward-auth: delegate the decision to an external HTTP auth service, with the
//! semantics of APISIX's `forward-auth` plugin.
//!
//! The auth service sees the original request described by `X-Forwarded-*` headers
//! taken from what the proxy observed (never from the client's own `X-Forwarded-*`),
//! then `extra_headers`, then the client headers listed in `request_headers`. Below
//! 300 the request passes and the listed `upstream_headers` are copied from the
//! answer — or removed, so a client cannot inject them. From 300 on, the client gets
//! the auth service's status and body with only the listed `client_headers`. An
//! unreachable or slow service gives `status_on_error`, or a pass with
//! `allow_degradation`.
//!
//! Beyond APISIX, opt-in under `portcullis:` (a key APISIX will not use):
//! `client_headers_on_success` (authentik needs its `Set-Cookie` on allowed
//! requests), a decision `cache`, and `deny_when` for auth services that answer 200
//! for signed-out users (Authgear's resolver).
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::Value;

use super::{BuildContext, Ctx, Outcome};
use crate::decision::{Deny, is_safe_header_value};
use crate::request::Request;

mod cache;
mod pool;

use cache::{Cache, CachedAllow, Caches};
use pool::{ClientKey, Clients};

/// Auth-service bodies beyond this are cut: they are shown to a client as a denial
/// page, never parsed.
const MAX_AUTH_BODY: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct Shared {
    clients: Clients,
    caches: Caches,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    uri: String,
    #[serde(default)]
    allow_degradation: bool,
    #[serde(default = "default_status_on_error")]
    status_on_error: u16,
    #[serde(default = "yes")]
    ssl_verify: bool,
    #[serde(default = "default_method")]
    request_method: String,
    #[serde(default = "default_max_body")]
    max_req_body_size: u64,
    #[serde(default)]
    request_headers: Vec<String>,
    #[serde(default)]
    extra_headers: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    upstream_headers: Vec<String>,
    #[serde(default)]
    client_headers: Vec<String>,
    #[serde(default = "default_timeout")]
    timeout: u64,
    #[serde(default = "yes")]
    keepalive: bool,
    #[serde(default = "default_keepalive_timeout")]
    keepalive_timeout: u64,
    #[serde(default = "default_keepalive_pool")]
    keepalive_pool: usize,
    #[serde(default)]
    portcullis: Extras,
}

/// portcullis's additions, all off unless set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Extras {
    /// Auth-response headers sent to the client when the request is allowed.
    #[serde(default)]
    client_headers_on_success: Vec<String>,
    #[serde(default)]
    cache: Option<CacheConf>,
    #[serde(default)]
    deny_when: Vec<DenyWhenConf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheConf {
    /// Request headers whose values together identify a session.
    key_headers: Vec<String>,
    /// Seconds a successful answer is reused.
    #[serde(default = "default_cache_ttl")]
    ttl: u64,
    #[serde(default = "default_cache_entries")]
    max_entries: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyWhenConf {
    header: String,
    equals: String,
    #[serde(default = "default_deny_when_status")]
    status: u16,
}

fn yes() -> bool {
    true
}
fn default_status_on_error() -> u16 {
    403
}
fn default_method() -> String {
    "GET".into()
}
fn default_max_body() -> u64 {
    64 * 1024 * 1024
}
fn default_timeout() -> u64 {
    3000
}
fn default_keepalive_timeout() -> u64 {
    60000
}
fn default_keepalive_pool() -> usize {
    5
}
fn default_cache_ttl() -> u64 {
    600
}
fn default_cache_entries() -> u64 {
    10_000
}
fn default_deny_when_status() -> u16 {
    401
}

#[derive(Debug)]
struct DenyWhen {
    header: String,
    equals: String,
    status: u16,
}

#[derive(Debug)]
pub struct Plugin {
    uri: reqwest::Url,
    post: bool,
    client: reqwest::Client,
    timeout: Duration,
    allow_degradation: bool,
    status_on_error: u16,
    max_req_body_size: u64,
    extra_headers: Vec<(HeaderName, String)>,
    request_headers: Vec<HeaderName>,
    upstream_headers: Vec<String>,
    client_headers: Vec<String>,
    client_headers_on_success: Vec<String>,
    cache: Option<(Cache, Vec<String>)>,
    deny_when: Vec<DenyWhen>,
}

fn header_name(name: &str, field: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
        format!("property \"{field}\" validation failed: {name:?} is not a header name")
    })
}

fn lower_names(names: &[String], field: &str) -> Result<Vec<String>, String> {
    names
        .iter()
        .map(|n| header_name(n, field).map(|h| h.as_str().to_owned()))
        .collect()
}

impl Plugin {
    pub fn compile(conf: &Value, cx: &BuildContext<'_>) -> Result<Self, String> {
        let c: Conf = serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
        let uri = reqwest::Url::parse(&c.uri)
            .map_err(|e| format!("property \"uri\" validation failed: {e}"))?;
        if !matches!(uri.scheme(), "http" | "https") {
            return Err("property \"uri\" validation failed: must be http:// or https://".into());
        }
        if !(200..=599).contains(&c.status_on_error) {
            return Err("property \"status_on_error\" validation failed: expected 200..599".into());
        }
        let post = match c.request_method.as_str() {
            "GET" => false,
            "POST" => true,
            _ => return Err("property \"request_method\" validation failed: matches none of the enum values (GET, POST)".into()),
        };
        if c.max_req_body_size < 1 {
            return Err("property \"max_req_body_size\" validation failed: expected >= 1".into());
        }
        if !(1..=60000).contains(&c.timeout) {
            return Err(
                "property \"timeout\" validation failed: expected 1..60000 (milliseconds)".into(),
            );
        }
        if c.keepalive_timeout < 1000 {
            return Err(
                "property \"keepalive_timeout\" validation failed: expected >= 1000".into(),
            );
        }
        if c.keepalive_pool < 1 {
            return Err("property \"keepalive_pool\" validation failed: expected >= 1".into());
        }
        let mut extra_headers = Vec::new();
        if let Some(extra) = &c.extra_headers {
            if extra.is_empty() {
                return Err("property \"extra_headers\" validation failed: expect object to have at least 1 properties".into());
            }
            for (name, value) in extra {
                let value = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => {
                        return Err(format!(
                            "property \"extra_headers\" validation failed: {name:?} must be a string"
                        ));
                    }
                };
                if name.contains(':') {
                    return Err(format!(
                        "property \"extra_headers\" validation failed: {name:?} is not a header name"
                    ));
                }
                extra_headers.push((header_name(name, "extra_headers")?, value));
            }
        }
        let request_headers = c
            .request_headers
            .iter()
            .map(|n| header_name(n, "request_headers"))
            .collect::<Result<_, _>>()?;
        let origin = uri.origin().ascii_serialization();
        let client = cx.shared.forward_auth.clients.get(ClientKey {
            origin,
            ssl_verify: c.ssl_verify,
            keepalive: c.keepalive,
            keepalive_timeout_ms: c.keepalive_timeout,
            keepalive_pool: c.keepalive_pool,
        })?;
        let upstream_headers = lower_names(&c.upstream_headers, "upstream_headers")?;
        let client_headers = lower_names(&c.client_headers, "client_headers")?;
        let client_headers_on_success = lower_names(
            &c.portcullis.client_headers_on_success,
            "portcullis.client_headers_on_success",
        )?;
        let cache = match &c.portcullis.cache {
            None => None,
            Some(cc) => {
                if cc.key_headers.is_empty() || cc.ttl == 0 || cc.max_entries == 0 {
                    return Err("property \"portcullis.cache\" validation failed: key_headers, ttl and max_entries must be set and non-zero".into());
                }
                let keys = lower_names(&cc.key_headers, "portcullis.cache.key_headers")?;
                // Entries depend on everything that shapes the request and what is kept.
                let identity = format!(
                    "{}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{}|{}",
                    c.uri,
                    c.request_method,
                    extra_headers,
                    c.request_headers,
                    upstream_headers,
                    client_headers_on_success,
                    keys,
                    cc.ttl,
                    cc.max_entries
                );
                let cache = cx.shared.forward_auth.caches.get(
                    identity,
                    Duration::from_secs(cc.ttl),
                    cc.max_entries,
                );
                Some((cache, keys))
            }
        };
        let deny_when = c
            .portcullis
            .deny_when
            .iter()
            .map(|d| {
                if !(300..=599).contains(&d.status) {
                    return Err("property \"portcullis.deny_when.status\" validation failed: expected 300..599".to_string());
                }
                Ok(DenyWhen {
                    header: header_name(&d.header, "portcullis.deny_when.header")?.as_str().to_owned(),
                    equals: d.equals.clone(),
                    status: d.status,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Plugin {
            uri,
            post,
            client,
            timeout: Duration::from_millis(c.timeout),
            allow_degradation: c.allow_degradation,
            status_on_error: c.status_on_error,
            max_req_body_size: c.max_req_body_size,
            extra_headers,
            request_headers,
            upstream_headers,
            client_headers,
            client_headers_on_success,
            cache,
            deny_when,
        })
    }

    /// Every `upstream_headers` name: only the auth service may set them.
    pub fn owned_headers(&self) -> Vec<String> {
        self.upstream_headers.clone()
    }

    /// The headers the auth service receives, in APISIX's order.
    fn auth_headers(&self, req: &Request<'_>) -> HeaderMap {
        let mut h = HeaderMap::new();
        let put = |h: &mut HeaderMap, name: HeaderName, value: &str| match HeaderValue::from_str(
            value,
        ) {
            Ok(v) => {
                h.insert(name, v);
            }
            Err(_) => {
                tracing::warn!(header = %name, "forward-auth: value is not a valid header value; skipped")
            }
        };
        put(
            &mut h,
            HeaderName::from_static("x-forwarded-proto"),
            req.scheme,
        );
        put(
            &mut h,
            HeaderName::from_static("x-forwarded-method"),
            req.method,
        );
        put(
            &mut h,
            HeaderName::from_static("x-forwarded-host"),
            req.host,
        );
        put(
            &mut h,
            HeaderName::from_static("x-forwarded-uri"),
            req.request_uri,
        );
        if let Some(ip) = req.source_ip {
            put(&mut h, HeaderName::from_static("x-forwarded-for"), ip);
        }
        if self.post
            && let Some(enc) = req.headers.get("content-encoding")
        {
            put(&mut h, HeaderName::from_static("content-encoding"), enc);
        }
        for (name, template) in &self.extra_headers {
            match resolve_vars(template, req) {
                Ok(value) => put(&mut h, name.clone(), &value),
                Err(var) => {
                    tracing::error!(header = %name, variable = %var, "forward-auth: cannot resolve a variable in extra_headers; header skipped")
                }
            }
        }
        for name in &self.request_headers {
            if !h.contains_key(name)
                && let Some(value) = req.headers.get(name.as_str())
            {
                put(&mut h, name.clone(), value);
            }
        }
        h
    }

    pub async fn run(&self, cx: &mut Ctx<'_>) -> Outcome {
        let req = cx.req;
        let body = if self.post {
            let too_big = req.body_truncated
                || req.body_size.is_some_and(|s| s > self.max_req_body_size)
                || req.body.len() as u64 > self.max_req_body_size;
            if too_big {
                return Outcome::Deny(
                    Deny::new(413).because("forward-auth: request body over max_req_body_size"),
                );
            }
            Some(req.body.to_vec())
        } else {
            None
        };

        let cache_key = self
            .cache
            .as_ref()
            .map(|(_, keys)| super::digest(keys.iter().map(|k| req.headers.get(k))));
        if let (Some((cache, _)), Some(key)) = (&self.cache, &cache_key) {
            if let Some(hit) = cache.get(key) {
                metrics::counter!("portcullis_cache_total", "cache" => "forward-auth", "result" => "hit").increment(1);
                apply(cx, &hit);
                return Outcome::Continue;
            }
            metrics::counter!("portcullis_cache_total", "cache" => "forward-auth", "result" => "miss").increment(1);
        }

        let method = if self.post {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let mut request = self
            .client
            .request(method, self.uri.clone())
            .headers(self.auth_headers(req))
            .timeout(self.timeout);
        if let Some(body) = body {
            request = request.body(body);
        }
        let started = Instant::now();
        let answer = match request.send().await {
            Ok(resp) => read_answer(resp).await,
            Err(e) => Err(e),
        };
        metrics::histogram!("portcullis_outbound_duration_seconds", "plugin" => "forward-auth")
            .record(started.elapsed().as_secs_f64());
        let (status, headers, body) = match answer {
            Ok(a) => a,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "other"
                };
                metrics::counter!("portcullis_outbound_errors_total", "plugin" => "forward-auth", "kind" => kind).increment(1);
                tracing::warn!(uri = %self.uri, error = %e, "forward-auth: auth service failed");
                if self.allow_degradation {
                    return Outcome::Continue;
                }
                return Outcome::Deny(
                    Deny::new(self.status_on_error)
                        .because(format!("forward-auth: auth service {kind} error")),
                );
            }
        };

        if status >= 300 {
            let mut deny = Deny::new(status);
            deny.body = body;
            for name in &self.client_headers {
                for value in values(&headers, name) {
                    deny = deny.header(name.clone(), value);
                }
            }
            return Outcome::Deny(
                deny.because(format!("forward-auth: auth service answered {status}")),
            );
        }
        for rule in &self.deny_when {
            if values(&headers, &rule.header)
                .iter()
                .any(|v| v.eq_ignore_ascii_case(&rule.equals))
            {
                return Outcome::Deny(
                    Deny::new(rule.status)
                        .because(format!("forward-auth: {} is {}", rule.header, rule.equals)),
                );
            }
        }
        let allowed = CachedAllow {
            upstream: self
                .upstream_headers
                .iter()
                .map(|name| {
                    let vals = values(&headers, name);
                    (name.clone(), (!vals.is_empty()).then(|| vals.join(", ")))
                })
                .collect(),
            client: self
                .client_headers_on_success
                .iter()
                .flat_map(|name| {
                    values(&headers, name)
                        .into_iter()
                        .map(move |v| (name.clone(), v))
                })
                .collect(),
        };
        apply(cx, &allowed);
        if let (Some((cache, _)), Some(key)) = (&self.cache, cache_key) {
            cache.insert(key, Arc::new(allowed));
        }
        Outcome::Continue
    }
}

/// Status, headers and (bounded) body of the auth service's answer.
async fn read_answer(
    mut resp: reqwest::Response,
) -> Result<(u16, HeaderMap, String), reqwest::Error> {
    let status = resp.status().as_u16();
    let headers = std::mem::take(resp.headers_mut());
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_AUTH_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// Every value of `name` that is safe to put in a header; unsafe ones are logged.
fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| {
            let s = v.to_str().ok()?;
            if is_safe_header_value(s) {
                Some(s.to_owned())
            } else {
                tracing::warn!(
                    header = name,
                    "forward-auth: unsafe header value from the auth service dropped"
                );
                None
            }
        })
        .collect()
}

fn apply(cx: &mut Ctx<'_>, allowed: &CachedAllow) {
    for (name, value) in &allowed.upstream {
        match value {
            Some(v) => cx.allow.set_upstream(name.clone(), v.clone()),
            // An owned header (`upstream_headers`): a client's copy is scrubbed.
            None => cx.allow.forget_owned_upstream(name),
        }
    }
    for (name, value) in &allowed.client {
        cx.allow.add_client_header(name.clone(), value.clone());
    }
}

/// Resolves nginx-style variables (`$host`, `${host}`) in an `extra_headers` value.
/// Returns the name of the first variable that has no value.
fn resolve_vars(template: &str, req: &Request<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], &braced[end + 1..]),
                None => return Err(after.to_owned()),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        if name.is_empty() {
            out.push('$');
            rest = after;
            continue;
        }
        out.push_str(&variable(name, req).ok_or_else(|| name.to_owned())?);
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

fn variable(name: &str, req: &Request<'_>) -> Option<String> {
    Some(match name {
        "remote_addr" => req.source_ip?.to_owned(),
        "request_uri" => req.request_uri.to_owned(),
        "host" => req.host.to_owned(),
        "scheme" => req.scheme.to_owned(),
        "request_method" => req.method.to_owned(),
        "uri" => req.path.to_owned(),
        "args" => req.query.to_owned(),
        _ => {
            if let Some(h) = name.strip_prefix("http_") {
                req.headers
                    .get(&h.replace('_', "-").to_ascii_lowercase())?
                    .to_owned()
            } else if let Some(a) = name.strip_prefix("arg_") {
                req.query_param(a)?.into_owned()
            } else if let Some(c) = name.strip_prefix("cookie_") {
                req.cookie(c)?.to_owned()
            } else {
                return None;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::tests::check;
    use serde_json::json;

    fn compile(conf: Value) -> Result<Plugin, String> {
        let shared = crate::plugins::Shared::default();
        Plugin::compile(&conf, &BuildContext { shared: &shared })
    }

    #[test]
    fn defaults_and_schema_follow_apisix() {
        let p = compile(json!({"uri": "http://127.0.0.1:9999/auth"})).unwrap();
        assert!(!p.post);
        assert_eq!(p.timeout, Duration::from_millis(3000));
        assert_eq!(p.status_on_error, 403);
        assert_eq!(p.max_req_body_size, 64 * 1024 * 1024);
        assert!(compile(json!({})).unwrap_err().contains("uri"));
        assert!(
            compile(json!({"uri": "http://a", "timeout": 0}))
                .unwrap_err()
                .contains("timeout")
        );
        assert!(
            compile(json!({"uri": "http://a", "timeout": 60001}))
                .unwrap_err()
                .contains("timeout")
        );
        assert!(
            compile(json!({"uri": "http://a", "status_on_error": 199}))
                .unwrap_err()
                .contains("status_on_error")
        );
        assert!(
            compile(json!({"uri": "http://a", "request_method": "PUT"}))
                .unwrap_err()
                .contains("request_method")
        );
        assert!(
            compile(json!({"uri": "http://a", "keepalive_timeout": 999}))
                .unwrap_err()
                .contains("keepalive_timeout")
        );
        assert!(
            compile(json!({"uri": "http://a", "extra_headers": {}}))
                .unwrap_err()
                .contains("extra_headers")
        );
        assert!(
            compile(json!({"uri": "http://a", "bogus": 1}))
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(
            compile(json!({"uri": "ftp://a"}))
                .unwrap_err()
                .contains("http")
        );
    }

    #[test]
    fn clients_are_shared_per_origin_and_settings() {
        let shared = crate::plugins::Shared::default();
        let cx = BuildContext { shared: &shared };
        for uri in [
            "http://127.0.0.1:1/a",
            "http://127.0.0.1:1/b",
            "http://127.0.0.1:2/a",
        ] {
            Plugin::compile(&json!({ "uri": uri }), &cx).unwrap();
        }
        Plugin::compile(
            &json!({"uri": "http://127.0.0.1:1/a", "keepalive": false}),
            &cx,
        )
        .unwrap();
        assert_eq!(shared.forward_auth.clients.len(), 3);
    }

    #[test]
    fn auth_headers_come_from_the_proxy_then_extra_then_request_headers() {
        let p = compile(json!({
            "uri": "http://127.0.0.1:1/auth",
            "extra_headers": {"X-Client": "$remote_addr|${request_method}|$args|$http_x_tenant", "X-Missing": "$nope"},
            "request_headers": ["Authorization", "X-Forwarded-Host", "X-Absent"],
        }))
        .unwrap();
        let msg = check(
            "PUT",
            "app.example.com:8443",
            "/a/b?x=1",
            &[
                ("authorization", "123"),
                ("x-forwarded-host", "evil.com"),
                ("x-tenant", "t1"),
            ],
        );
        let req = Request::from_check(&msg).unwrap();
        let h = p.auth_headers(&req);
        let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(get("x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(get("x-forwarded-method").as_deref(), Some("PUT"));
        assert_eq!(
            get("x-forwarded-host").as_deref(),
            Some("app.example.com"),
            "never the client's copy"
        );
        assert_eq!(get("x-forwarded-uri").as_deref(), Some("/a/b?x=1"));
        assert_eq!(get("x-forwarded-for").as_deref(), Some("10.1.2.3"));
        assert_eq!(get("x-client").as_deref(), Some("10.1.2.3|PUT|x=1|t1"));
        assert_eq!(
            get("x-missing"),
            None,
            "an unresolved variable skips the header"
        );
        assert_eq!(get("authorization").as_deref(), Some("123"));
        assert_eq!(get("x-absent"), None);
    }

    #[test]
    fn variables_resolve_like_nginx() {
        let msg = check("GET", "h", "/p?a=1&b=two", &[("cookie", "s=abc")]);
        let req = Request::from_check(&msg).unwrap();
        assert_eq!(resolve_vars("$uri?$args", &req).unwrap(), "/p?a=1&b=two");
        assert_eq!(
            resolve_vars("${arg_b}-$cookie_s-$$", &req).unwrap(),
            "two-abc-$$"
        );
        assert_eq!(
            resolve_vars("$http_x_none", &req).unwrap_err(),
            "http_x_none"
        );
        assert_eq!(
            resolve_vars("${unterminated", &req).unwrap_err(),
            "{unterminated"
        );
    }
}
