//! The one view of an HTTP request that routing and plugins see.
//!
//! Envoy's `CheckRequest` (or the HTTP auth_request front) is decoded once into a
//! [`Request`] that borrows from the message: plugins never touch protobuf types,
//! and nothing on the hot path copies a header it only needs to read.
//!
//! Every attribute here comes from what the proxy itself observed (`:path`,
//! `:authority`, method, the peer address). Client-sent `X-Forwarded-*` headers are
//! only headers; they never decide a route or a forwarded URI on the gRPC path.
use crate::wire::{CheckRequest, Entry};

/// Request headers with lower-case names. Envoy already lower-cases names and joins
/// duplicates with `,`; the HTTP front hands over pairs it lower-cased itself.
#[derive(Debug, Clone, Copy)]
pub enum Headers<'a> {
    /// Entries of a Check, already checked to be UTF-8 (`Request::from_check`).
    Wire(&'a [Entry]),
    Pairs(&'a [(String, String)]),
}

impl<'a> Headers<'a> {
    /// The value of `name`, which must be given in lower case.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        match self {
            Headers::Wire(entries) => lookup(entries, name),
            Headers::Pairs(pairs) => pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
        }
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = (&'a str, &'a str)> + 'a> {
        match *self {
            Headers::Wire(entries) => {
                Box::new(entries.iter().map(|e| (text(&e.key), text(&e.value))))
            }
            Headers::Pairs(pairs) => Box::new(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        }
    }

    /// Calls `f` for every header name, without boxing (the identity-header scrub runs
    /// this on every allowed request).
    pub fn for_each_name(&self, mut f: impl FnMut(&'a str)) {
        match *self {
            Headers::Wire(entries) => entries.iter().for_each(|e| f(text(&e.key))),
            Headers::Pairs(pairs) => pairs.iter().for_each(|(k, _)| f(k.as_str())),
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            Headers::Wire(entries) => entries.is_empty(),
            Headers::Pairs(pairs) => pairs.is_empty(),
        }
    }
}

/// A map entry's value by key; a later entry wins, as in the map Envoy encoded.
fn lookup<'a>(entries: &'a [Entry], key: &str) -> Option<&'a str> {
    entries
        .iter()
        .rev()
        .find(|e| e.key == key.as_bytes())
        .map(|e| text(&e.value))
}

/// Text of a field `Request::from_check` has checked to be UTF-8.
fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// `field` as text: protobuf strings are UTF-8, and a message that says otherwise
/// is not decided on.
fn utf8<'a>(bytes: &'a [u8], field: &'static str) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8(field))
}

/// A decoded request, borrowed from the message it came from: the [`Parts`] a
/// front gathered (read through `Deref`, e.g. `req.method`) and what is derived
/// from them once, the same way for every front.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    parts: Parts<'a>,
    /// The host name as nginx's `$host` has it, for host matching and `host` keys:
    /// the authority without its port or a trailing dot (`api.test.` is `api.test`,
    /// so a route for `api.test` cannot be sidestepped by the absolute form).
    pub host: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    /// The query string without `?` (empty when absent).
    pub query: &'a str,
}

impl<'a> std::ops::Deref for Request<'a> {
    type Target = Parts<'a>;

    fn deref(&self) -> &Parts<'a> {
        &self.parts
    }
}

/// Why a `CheckRequest` could not be turned into a [`Request`]; answered with a deny.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("CheckRequest has no attributes.request.http")]
    MissingHttp,
    #[error("CheckRequest has an empty :path")]
    EmptyPath,
    #[error("CheckRequest field {0} is not UTF-8")]
    NotUtf8(&'static str),
    /// A front forgot `CheckRequest::adopt_header_map`: deciding without the headers
    /// would deny every request for want of a token, or worse, decide on half of them.
    #[error("CheckRequest header_map was not read (a bug in portcullis)")]
    HeaderMapNotAdopted,
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
        if http.header_map.is_some() {
            return Err(DecodeError::HeaderMapNotAdopted);
        }
        let source_ip = match attrs
            .source
            .as_ref()
            .and_then(|p| p.address.as_ref())
            .and_then(|a| a.socket_address.as_ref())
        {
            Some(sa) => Some(utf8(&sa.address, "source.address")?),
            None => None,
        };
        for e in &http.headers {
            utf8(&e.key, "headers")?;
            utf8(&e.value, "headers")?;
        }
        for e in &attrs.context_extensions {
            utf8(&e.key, "context_extensions")?;
            utf8(&e.value, "context_extensions")?;
        }
        let body: &[u8] = if !http.raw_body.is_empty() {
            &http.raw_body
        } else {
            utf8(&http.body, "body")?.as_bytes()
        };
        let headers = Headers::Wire(&http.headers);
        let body_truncated = headers.get("x-envoy-auth-partial-body") == Some("true");
        let body_size = u64::try_from(http.size).ok().filter(|_| http.size >= 0);
        Ok(Self::assemble(Parts {
            method: utf8(&http.method, "method")?,
            scheme: utf8(&http.scheme, "scheme")?,
            authority: utf8(&http.host, "host")?,
            request_uri: utf8(&http.path, "path")?,
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
    pub fn assemble(mut parts: Parts<'a>) -> Self {
        let without_fragment = parts.request_uri.split('#').next().unwrap_or_default();
        let (path, query) = match without_fragment.split_once('?') {
            Some((path, query)) => (path, query),
            None => (without_fragment, ""),
        };
        if parts.scheme.is_empty() {
            parts.scheme = "http";
        }
        Request {
            parts,
            host: host_of(parts.authority),
            path,
            query,
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

/// What a front (gRPC Check, HTTP auth_request) knows of a request.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    pub method: &'a str,
    /// `http` when the front did not say.
    pub scheme: &'a str,
    /// `:authority` as the client sent it, port included.
    pub authority: &'a str,
    /// Path and query exactly as the client sent them (nginx's `$request_uri`).
    pub request_uri: &'a str,
    pub headers: Headers<'a>,
    /// The downstream peer's IP address as the proxy saw it.
    pub source_ip: Option<&'a str>,
    /// Envoy per-route `context_extensions` (e.g. `route_id`); checked UTF-8.
    pub context_extensions: &'a [Entry],
    pub body: &'a [u8],
    /// True when the proxy only sent part of the body (`allow_partial_message`).
    pub body_truncated: bool,
    /// Declared body size (`Content-Length`), when the proxy knows it.
    pub body_size: Option<u64>,
}

impl<'a> Parts<'a> {
    /// The per-route context extension `name` (e.g. `route_id`).
    pub fn context_extension(&self, name: &str) -> Option<&'a str> {
        lookup(self.context_extensions, name)
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

/// `example.com.:8080` → `example.com`.
fn host_of(authority: &str) -> &str {
    let host = strip_port(authority);
    host.strip_suffix('.').unwrap_or(host)
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
    use crate::wire;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::service::auth::v3::{
        AttributeContext, CheckRequest as FullCheck, attribute_context,
    };

    pub(crate) fn check(
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> CheckRequest {
        CheckRequest::from(&FullCheck {
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
        })
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
    fn refuses_text_fields_that_are_not_utf8() {
        fn http(msg: &mut CheckRequest) -> &mut wire::HttpRequest {
            let attrs = msg.attributes.as_mut().unwrap();
            attrs.request.as_mut().unwrap().http.as_mut().unwrap()
        }
        let mut msg = check("GET", "h", "/", &[("x-a", "b")]);
        http(&mut msg).headers.push(wire::Entry {
            key: "x-bin".into(),
            value: bytes::Bytes::from_static(b"\xff\xfe"),
        });
        assert_eq!(
            Request::from_check(&msg).unwrap_err(),
            DecodeError::NotUtf8("headers")
        );
        http(&mut msg).headers.pop();
        http(&mut msg).path = bytes::Bytes::from_static(b"/\xc3");
        assert_eq!(
            Request::from_check(&msg).unwrap_err(),
            DecodeError::NotUtf8("path")
        );
    }

    #[test]
    fn a_later_map_entry_wins() {
        let mut msg = check("GET", "h", "/", &[("x-a", "first")]);
        let attrs = msg.attributes.as_mut().unwrap();
        attrs
            .context_extensions
            .push(wire::Entry::new("route_id", "a"));
        attrs
            .context_extensions
            .push(wire::Entry::new("route_id", "b"));
        let http = attrs.request.as_mut().unwrap().http.as_mut().unwrap();
        http.headers.push(wire::Entry::new("x-a", "second"));
        let req = Request::from_check(&msg).unwrap();
        assert_eq!(req.headers.get("x-a"), Some("second"));
        assert_eq!(req.context_extension("route_id"), Some("b"));
    }

    #[test]
    fn strips_ports_from_ipv6_and_names() {
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("a.b:99"), "a.b");
        assert_eq!(host_of("a.b.:99"), "a.b");
        assert_eq!(host_of("a.b."), "a.b");
        assert_eq!(host_of("[::1]:80"), "[::1]");
    }
}
