//! What the micro-benchmarks, the load script's body generator and the load-script
//! smoke test share: CheckRequests shaped like the ones Envoy sends, and gRPC framing.
#![allow(dead_code)] // each including target uses a different part

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use prost::Message;

/// A CheckRequest as Envoy 1.40's ext_authz filter builds it for a plain GET through
/// the front proxy: peer addresses, the usual request headers, no body.
pub fn check_request(path: &str, extra_headers: &[(&str, &str)]) -> CheckRequest {
    let peer = |ip: &str, port: u32| {
        attribute_context::Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(
                    envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port),
                ),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
    };
    let mut headers: HashMap<String, String> = [
        (":authority", "127.0.0.1:9080"),
        (":method", "GET"),
        (":path", path),
        (":scheme", "http"),
        ("user-agent", "wrk"),
        ("accept", "*/*"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "6f1c3f0e-1d2b-4f0a-9a43-5c1e8f1b2a77"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra_headers {
        headers.insert(k.to_string(), v.to_string());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("127.0.0.1", 51234)),
            destination: Some(peer("127.0.0.1", 9080)),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    id: "11829432764312359187".into(),
                    method: "GET".into(),
                    headers,
                    path: path.into(),
                    host: "127.0.0.1:9080".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    size: -1,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// One unary gRPC request body: uncompressed flag, big-endian length, message.
pub fn grpc_frame(msg: &CheckRequest) -> Vec<u8> {
    let bytes = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + bytes.len());
    out.push(0);
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    out
}
