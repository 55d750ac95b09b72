//! The one view of an HTTP request that routing and plugins see.
//!
//! Envoy's `CheckRequest` (or the HTTP auth_request front) is decoded once into a
//! [`Request`] that borrows from the message: plugins never touch protobuf types,
//! and nothing on the hot path copies a header it only needs to read.
//!
//! Every attribute here comes from what the proxy itself observed (`:path`,
//! `:authority`, method, the peer address). Client-sent `X-Forwarded-*` headers are
//! only headers; they never decide a route or a forwarded URI on the gRPC path.
use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{Address, address};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;

/// Request headers with lower-case names. Envoy already lower-cases names and joins
/// duplicates with `,`; the HTTP front hands over pairs it lower-cased itself.
#[derive(Debug, Clone, Copy)]
pub enum Headers<'a> {
    Map(&'a HashMap<String, String>),
    Pairs(&'a [(String, String)]),
}

impl<'a> Headers<'a> {
    /// The value of `name`, which must be given in lower case.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        match self {
            Headers::Map(map) => map.get(name).map(String::as_str),
            Headers::Pairs(pairs) => pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
        }
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = (&'a str, &'a str)> + 'a> {
        match *self {
            Headers::Map(map) => Box::new(map.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
            Headers::Pairs(pairs) => Box::new(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        }
    }

    /// Calls `f` for every header name, without boxing (the identity-header scrub runs
    /// this on every allowed request).
    pub fn for_each_name(&self, mut f: impl FnMut(&'a str)) {
        match *self {
            Headers::Map(map) => map.keys().for_each(|k| f(k.as_str())),
            Headers::Pairs(pairs) => pairs.iter().for_each(|(k, _)| f(k.as_str())),
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            Headers::Map(map) => map.is_empty(),
            Headers::Pairs(pairs) => pairs.is_empty(),
        }
    }
}

static NO_EXTENSIONS: std::sync::LazyLock<HashMap<String, String>> =
    std::sync::LazyLock::new(HashMap::new);

/// A decoded request, borrowed from the message it came from.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    /// `:authority` as the client sent it, port included.
    pub authority: &'a str,
    /// The authority without its port, for host matching.
    pub host: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    /// The query string without `?` (empty when absent).
    pub query: &'a str,
    /// Path and query exactly as the client sent them (nginx's `$request_uri`).
    pub request_uri: &'a str,
    pub headers: Headers<'a>,
    /// The downstream peer's IP address as the proxy saw it.
    pub source_ip: Option<&'a str>,
    /// Envoy per-route `context_extensions` (e.g. `route_id`).
    pub context_extensions: &'a HashMap<String, String>,
    pub body: &'a [u8],
    /// True when the proxy only sent part of the body (`allow_partial_message`).
    pub body_truncated: bool,
    /// Declared body size (`Content-Length`), when the proxy knows it.
    pub body_size: Option<u64>,
}

/// Why a `CheckRequest` could not be turned into a [`Request`]; answered with a deny.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("CheckRequest has no attributes.request.http")]
    MissingHttp,
    #[error("CheckRequest has an empty :path")]
    EmptyPath,
}

impl<'a> Request<'a> {
    /// Decodes Envoy's attribute context. Missing pieces are errors only where a safe
    /// decision would be impossible without them.
    pub fn from_check(check: &'a CheckRequest) -> Result<Self, DecodeError> {
        let attrs = check.attributes.as_ref().ok_or(DecodeError::MissingHttp)?;
        let http = attrs
            .request
            .as_ref()
            .and_then(|r| r.http.as_ref())
            .ok_or(DecodeError::MissingHttp)?;
        if http.path.is_empty() {
            return Err(DecodeError::EmptyPath);
        }
        let source_ip = attrs
            .source
            .as_ref()
            .and_then(|p| p.address.as_ref())
            .and_then(socket_ip);
        let body: &[u8] = if !http.raw_body.is_empty() {
            &http.raw_body
        } else {
            http.body.as_bytes()
        };
        let headers = Headers::Map(&http.headers);
        let body_truncated = headers.get("x-envoy-auth-partial-body") == Some("true");
        let body_size = u64::try_from(http.size).ok().filter(|_| http.size >= 0);
        Ok(Self::assemble(Parts {
            method: &http.method,
            scheme: &http.scheme,
            authority: &http.host,
            request_uri: &http.path,
            headers,
            source_ip,
            context_extensions: &attrs.context_extensions,
            body,
            body_truncated,
            body_size,
        }))
    }

    /// Builds a request from parts gathered by another front (the HTTP auth_request
    /// endpoint), splitting path and query the same way for both.
    pub fn assemble(p: Parts<'a>) -> Self {
        let without_fragment = p.request_uri.split('#').next().unwrap_or_default();
        let (path, query) = match without_fragment.split_once('?') {
            Some((path, query)) => (path, query),
            None => (without_fragment, ""),
        };
        Request {
            method: p.method,
            scheme: if p.scheme.is_empty() {
                "http"
            } else {
                p.scheme
            },
            authority: p.authority,
            host: strip_port(p.authority),
            path,
            query,
            request_uri: p.request_uri,
            headers: p.headers,
            source_ip: p.source_ip,
            context_extensions: p.context_extensions,
            body: p.body,
            body_truncated: p.body_truncated,
            body_size: p.body_size,
        }
    }

    /// The value of query parameter `name` (first occurrence), percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<std::borrow::Cow<'a, str>> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_component(k) == name).then(|| decode_component(v))
        })
    }

    /// The value of cookie `name` from the `Cookie` header.
    pub fn cookie(&self, name: &str) -> Option<&'a str> {
        self.cookies().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// All cookies of the `Cookie` header as (name, value) pairs.
    pub fn cookies(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.headers
            .get("cookie")
            .unwrap_or_default()
            .split(';')
            .filter_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                Some((k.trim(), v.trim()))
            })
    }
}

/// The fields [`Request::assemble`] takes.
pub struct Parts<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub request_uri: &'a str,
    pub headers: Headers<'a>,
    pub source_ip: Option<&'a str>,
    pub context_extensions: &'a HashMap<String, String>,
    pub body: &'a [u8],
    pub body_truncated: bool,
    pub body_size: Option<u64>,
}

impl Parts<'_> {
    pub fn no_extensions() -> &'static HashMap<String, String> {
        &NO_EXTENSIONS
    }
}

fn decode_component(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let plus = s.replace('+', " ");
    std::borrow::Cow::Owned(
        percent_encoding::percent_decode_str(&plus)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

fn socket_ip(addr: &Address) -> Option<&str> {
    match addr.address.as_ref()? {
        address::Address::SocketAddress(sa) => Some(sa.address.as_str()),
        _ => None,
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::SocketAddress;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};

    pub(crate) fn check(
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(attribute_context::Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "10.1.2.3".into(),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        method: method.into(),
                        host: host.into(),
                        path: path.into(),
                        scheme: "https".into(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        size: -1,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn decodes_path_query_host_and_peer() {
        let msg = check(
            "GET",
            "api.example.com:8443",
            "/a/b?x=1&jwt=t%2Bk#frag",
            &[("cookie", "a=1; jwt=c")],
        );
        let req = Request::from_check(&msg).unwrap();
        assert_eq!(req.path, "/a/b");
        assert_eq!(req.query, "x=1&jwt=t%2Bk");
        assert_eq!(req.request_uri, "/a/b?x=1&jwt=t%2Bk#frag");
        assert_eq!(req.host, "api.example.com");
        assert_eq!(req.source_ip, Some("10.1.2.3"));
        assert_eq!(req.query_param("jwt").as_deref(), Some("t+k"));
        assert_eq!(req.cookie("jwt"), Some("c"));
        assert_eq!(req.body_size, None);
    }

    #[test]
    fn refuses_a_request_without_http_attributes() {
        let msg = CheckRequest::default();
        assert_eq!(
            Request::from_check(&msg).unwrap_err(),
            DecodeError::MissingHttp
        );
    }

    #[test]
    fn strips_ports_from_ipv6_and_names() {
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("a.b:99"), "a.b");
    }
}
