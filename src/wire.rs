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
//!   labels/certificates, ...) is skipped by prost without being stored.
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

/// The same message as `envoy-types` builds it (tests, benchmarks, tools): encoded
/// and read back exactly as a Check from Envoy would be.
impl From<&envoy_types::pb::envoy::service::auth::v3::CheckRequest> for CheckRequest {
    fn from(msg: &envoy_types::pb::envoy::service::auth::v3::CheckRequest) -> Self {
        use prost::Message as _;
        CheckRequest::decode(msg.encode_to_vec().as_slice())
            .expect("a message encoded by prost decodes")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3::{
        Address as FullAddress, Metadata, Pipe, SocketAddress as FullSocketAddress,
        address::Address as AddressKind,
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
