//! Envoy's `CheckRequest` as portcullis reads it off the wire.
//!
//! `envoy-types` decodes every header into a `String` in a SipHash `HashMap`, and
//! every other string field into its own `String`: a quarter of the CPU a Check
//! costs portcullis (one allocation per string, a hash per header, and as many frees
//! when the message is dropped), for values that are only read. These messages are
//! the subset of `proto/envoy/service/auth/v3/attribute_context.proto` a decision
//! reads, with the same field numbers, so they decode the very bytes Envoy sends:
//!
//! - string fields are `Bytes`: slices of the received gRPC frame, not copies
//!   (`Request::from_check` checks they are UTF-8, as protobuf requires);
//! - `map<string, string>` fields are their wire form, a repeated key/value entry
//!   (a later entry for the same key wins, as with a map);
//! - every field not declared here (timestamps, TLS session, metadata, peer
//!   labels/certificates, ...) is skipped by prost without being stored;
//! - `header_map`, which Envoy sends instead of `headers` when its ext_authz filter
//!   sets `encode_raw_headers: true`, is rewritten into the `headers` form before any
//!   decision reads it ([`CheckRequest::adopt_header_map`]).
//!
//! Responses still use `envoy-types`' `CheckResponse`. The tests below check the
//! subset against `envoy-types`' full messages.
use bytes::Bytes;

#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequest {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    #[prost(message, optional, tag = "1")]
    pub source: Option<Peer>,
    #[prost(message, optional, tag = "4")]
    pub request: Option<Request>,
    #[prost(message, repeated, tag = "10")]
    pub context_extensions: Vec<Entry>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Peer {
    #[prost(message, optional, tag = "1")]
    pub address: Option<Address>,
}

/// `config.core.v3.Address`: only its `socket_address` member of the oneof (a pipe
/// or internal address leaves it empty).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddress>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SocketAddress {
    #[prost(bytes = "bytes", tag = "2")]
    pub address: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    #[prost(bytes = "bytes", tag = "2")]
    pub method: Bytes,
    #[prost(message, repeated, tag = "3")]
    pub headers: Vec<Entry>,
    #[prost(bytes = "bytes", tag = "4")]
    pub path: Bytes,
    #[prost(bytes = "bytes", tag = "5")]
    pub host: Bytes,
    #[prost(bytes = "bytes", tag = "6")]
    pub scheme: Bytes,
    #[prost(int64, tag = "9")]
    pub size: i64,
    #[prost(bytes = "bytes", tag = "11")]
    pub body: Bytes,
    #[prost(bytes = "bytes", tag = "12")]
    pub raw_body: Bytes,
    #[prost(message, optional, tag = "13")]
    pub header_map: Option<HeaderMap>,
}

/// `config.core.v3.HeaderMap`: one entry per header line, in the order Envoy holds them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMap {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<HeaderValue>,
}

/// `config.core.v3.HeaderValue`: the value is `value` (text) or `raw_value` (bytes);
/// Envoy's ext_authz filter fills `raw_value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValue {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    pub raw_value: Bytes,
}

/// One entry of a `map<string, string>`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

impl Entry {
    pub fn new(key: &str, value: &str) -> Self {
        Entry {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
        }
    }
}

impl CheckRequest {
    /// Rewrites `header_map` (Envoy's `encode_raw_headers: true`) into `headers` as
    /// Envoy's default encoding would have written them, so a decision never depends
    /// on which of the two the filter was configured to send: a repeated header's
    /// values joined with `,` in arrival order, and each byte that breaks UTF-8
    /// replaced by `!` (Envoy sanitises `headers` values so; raw values are not).
    /// The common case, no repeats and no such bytes, copies nothing.
    ///
    /// Envoy sends one form or the other; a message carrying both is read by its
    /// `headers`. Every front that decodes a Check calls this before deciding
    /// (`Request::from_check` refuses a message that still has a `header_map`).
    pub fn adopt_header_map(&mut self) {
        let Some(http) = self
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
        else {
            return;
        };
        let Some(map) = http.header_map.take() else {
            return;
        };
        if !http.headers.is_empty() {
            return;
        }
        let mut headers: Vec<Entry> = Vec::with_capacity(map.headers.len());
        for line in map.headers {
            let key = utf8_or_sanitised(line.key);
            let raw = if line.raw_value.is_empty() {
                line.value
            } else {
                line.raw_value
            };
            let value = utf8_or_sanitised(raw);
            match headers.iter_mut().find(|e| e.key == key) {
                Some(earlier) => {
                    let mut joined = Vec::with_capacity(earlier.value.len() + 1 + value.len());
                    joined.extend_from_slice(&earlier.value);
                    joined.push(b',');
                    joined.extend_from_slice(&value);
                    earlier.value = Bytes::from(joined);
                }
                None => headers.push(Entry { key, value }),
            }
        }
        http.headers = headers;
    }
}

/// `bytes` unchanged when they are UTF-8; otherwise a copy with every byte that breaks
/// UTF-8 replaced by `!`, one at a time, as Envoy's `MessageUtil::sanitizeUtf8String`
/// does for the values it writes into `headers`.
fn utf8_or_sanitised(bytes: Bytes) -> Bytes {
    if std::str::from_utf8(&bytes).is_ok() {
        return bytes;
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest: &[u8] = &bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                out.extend_from_slice(valid.as_bytes());
                return Bytes::from(out);
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                out.extend_from_slice(valid);
                out.push(b'!');
                rest = &after[1..];
            }
        }
    }
}

/// The same message as `envoy-types` builds it (tests, benchmarks, tools): encoded
/// and read back exactly as a Check from Envoy would be.
impl From<&envoy_types::pb::envoy::service::auth::v3::CheckRequest> for CheckRequest {
    fn from(msg: &envoy_types::pb::envoy::service::auth::v3::CheckRequest) -> Self {
        use prost::Message as _;
        let mut check = CheckRequest::decode(msg.encode_to_vec().as_slice())
            .expect("a message encoded by prost decodes");
        check.adopt_header_map();
        check
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3::{
        Address as FullAddress, HeaderValue as FullHeaderValue, Metadata, Pipe,
        SocketAddress as FullSocketAddress, address::Address as AddressKind,
    };
    use envoy_types::pb::envoy::service::auth::v3::{
        AttributeContext as FullAttributes, CheckRequest as FullCheck, attribute_context as full,
    };
    use envoy_types::pb::google::protobuf::{Struct, Timestamp};
    use prost::Message as _;

    use super::*;

    fn full_check() -> FullCheck {
        let socket = |ip: &str, port| {
            FullAddress {
            address: Some(AddressKind::SocketAddress(FullSocketAddress {
                address: ip.into(),
                port_specifier: Some(
                    envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port),
                ),
                ..Default::default()
            })),
        }
        };
        FullCheck {
            attributes: Some(FullAttributes {
                source: Some(full::Peer {
                    address: Some(socket("10.1.2.3", 40000)),
                    service: "client".into(),
                    labels: HashMap::from([("l".into(), "v".into())]),
                    principal: "spiffe://x".into(),
                    certificate: "PEM".into(),
                }),
                destination: Some(full::Peer {
                    address: Some(socket("10.9.9.9", 8080)),
                    ..Default::default()
                }),
                request: Some(full::Request {
                    time: Some(Timestamp {
                        seconds: 1,
                        nanos: 2,
                    }),
                    http: Some(full::HttpRequest {
                        id: "123".into(),
                        method: "POST".into(),
                        headers: HashMap::from([
                            (":path".into(), "/a?b=1".into()),
                            ("authorization".into(), "Bearer x.y.z".into()),
                            ("x-ünïcode".into(), "välue".into()),
                        ]),
                        path: "/a?b=1".into(),
                        host: "api.test:8443".into(),
                        scheme: "https".into(),
                        query: "b=1".into(),
                        fragment: "f".into(),
                        size: 12,
                        protocol: "HTTP/2".into(),
                        body: "hello".into(),
                        raw_body: b"\x00\xffraw".to_vec(),
                        ..Default::default()
                    }),
                }),
                context_extensions: HashMap::from([("route_id".into(), "r1".into())]),
                metadata_context: Some(Metadata {
                    filter_metadata: HashMap::from([("ns".into(), Struct::default())]),
                    ..Default::default()
                }),
                tls_session: Some(full::TlsSession {
                    sni: "api.test".into(),
                }),
                ..Default::default()
            }),
        }
    }

    fn s(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn reads_what_envoy_types_writes_and_skips_the_rest() {
        let bytes = full_check().encode_to_vec();
        let msg = CheckRequest::decode(bytes.as_slice()).unwrap();
        let attrs = msg.attributes.unwrap();
        let peer = attrs
            .source
            .unwrap()
            .address
            .unwrap()
            .socket_address
            .unwrap();
        assert_eq!(s(&peer.address), "10.1.2.3");
        let http = attrs.request.unwrap().http.unwrap();
        assert_eq!(s(&http.method), "POST");
        assert_eq!(s(&http.path), "/a?b=1");
        assert_eq!(s(&http.host), "api.test:8443");
        assert_eq!(s(&http.scheme), "https");
        assert_eq!(http.size, 12);
        assert_eq!(s(&http.body), "hello");
        assert_eq!(&http.raw_body[..], b"\x00\xffraw");
        let mut headers: Vec<(&str, &str)> = http
            .headers
            .iter()
            .map(|e| (s(&e.key), s(&e.value)))
            .collect();
        headers.sort();
        assert_eq!(
            headers,
            [
                (":path", "/a?b=1"),
                ("authorization", "Bearer x.y.z"),
                ("x-ünïcode", "välue")
            ]
        );
        assert_eq!(attrs.context_extensions, [Entry::new("route_id", "r1")]);
    }

    /// What Envoy sends with `encode_raw_headers: true`.
    fn raw_check(lines: &[(&str, &[u8])]) -> CheckRequest {
        CheckRequest::decode(
            full_check_with_header_map(
                lines
                    .iter()
                    .map(|(k, v)| FullHeaderValue {
                        key: (*k).into(),
                        raw_value: v.to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            )
            .encode_to_vec()
            .as_slice(),
        )
        .unwrap()
    }

    /// The full message with its headers sent as `header_map` instead of `headers`.
    fn full_check_with_header_map(lines: Vec<FullHeaderValue>) -> FullCheck {
        let mut check = full_check();
        let http = check
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.headers.clear();
        http.header_map =
            Some(envoy_types::pb::envoy::config::core::v3::HeaderMap { headers: lines });
        check
    }

    fn headers_of(check: &CheckRequest) -> Vec<(&str, &str)> {
        let http = check.attributes.as_ref().unwrap().request.as_ref();
        let http = http.unwrap().http.as_ref().unwrap();
        assert!(http.header_map.is_none());
        http.headers
            .iter()
            .map(|e| (s(&e.key), s(&e.value)))
            .collect()
    }

    #[test]
    fn a_header_map_becomes_the_headers_envoys_default_encoding_writes() {
        let mut check = raw_check(&[
            (":path", b"/a"),
            ("authorization", b"x"),
            ("cookie", b"a=1"),
            ("authorization", b"Bearer t"),
            ("x-note", b"caf\xe9 \xe2\x82 ok"),
        ]);
        check.adopt_header_map();
        assert_eq!(
            headers_of(&check),
            [
                (":path", "/a"),
                ("authorization", "x,Bearer t"),
                ("cookie", "a=1"),
                ("x-note", "caf! !! ok"),
            ]
        );
        assert!(crate::request::Request::from_check(&check).is_ok());
    }

    #[test]
    fn a_header_value_sent_as_text_is_read_as_well() {
        let full = full_check_with_header_map(vec![FullHeaderValue {
            key: "authorization".into(),
            value: "Bearer t".into(),
            ..Default::default()
        }]);
        let check = CheckRequest::from(&full);
        assert_eq!(headers_of(&check), [("authorization", "Bearer t")]);
    }

    #[test]
    fn a_message_with_both_forms_is_read_by_its_headers() {
        let mut check = CheckRequest::decode(full_check().encode_to_vec().as_slice()).unwrap();
        let raw = raw_check(&[("authorization", b"Bearer other")]);
        let http = check.attributes.as_mut().unwrap().request.as_mut();
        let http = http.unwrap().http.as_mut().unwrap();
        http.header_map = raw
            .attributes
            .unwrap()
            .request
            .unwrap()
            .http
            .unwrap()
            .header_map;
        check.adopt_header_map();
        let mut headers = headers_of(&check);
        headers.sort();
        assert_eq!(headers[1], ("authorization", "Bearer x.y.z"));
    }

    #[test]
    fn a_header_map_left_unread_is_refused_not_decided_without_headers() {
        let check = raw_check(&[("authorization", b"Bearer t")]);
        assert_eq!(
            crate::request::Request::from_check(&check).unwrap_err(),
            crate::request::DecodeError::HeaderMapNotAdopted
        );
    }

    #[test]
    fn a_pipe_address_is_no_socket_address() {
        let mut check = full_check();
        check.attributes.as_mut().unwrap().source = Some(full::Peer {
            address: Some(FullAddress {
                address: Some(AddressKind::Pipe(Pipe {
                    path: "/run/x.sock".into(),
                    mode: 0,
                })),
            }),
            ..Default::default()
        });
        let msg = CheckRequest::from(&check);
        let peer = msg.attributes.unwrap().source.unwrap().address.unwrap();
        assert!(peer.socket_address.is_none());
    }

    #[test]
    fn a_string_field_is_a_slice_of_the_frame_not_a_copy() {
        let frame = Bytes::from(full_check().encode_to_vec());
        let msg = CheckRequest::decode(frame.clone()).unwrap();
        let path = msg.attributes.unwrap().request.unwrap().http.unwrap().path;
        let range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
        assert!(range.contains(&(path.as_ptr() as usize)));
    }
}
