//! The gRPC front as Envoy and operators' tools see it: every Check is answered with
//! a decision (never an RPC error, which Envoy would resolve with
//! `failure_mode_allow`), and server reflection describes the services so grpcurl
//! needs no proto files.
mod common;

use std::collections::HashMap;

use common::Portcullis;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
};
use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const CONFIG: &str = r#"
routes:
  - { id: open, uri: /open/*, plugins: {} }
"#;

fn check(path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    host: "example.com".into(),
                    path: path.into(),
                    scheme: "http".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<HashMap<_, _>>(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// One HTTP/2 connection to portcullis's gRPC front, for any of its services.
async fn channel(p: &Portcullis) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(p.grpc_endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to portcullis gRPC")
}

async fn client(p: &Portcullis) -> AuthorizationClient<tonic::transport::Channel> {
    AuthorizationClient::new(channel(p).await)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

#[tokio::test]
async fn every_check_gets_a_decision_never_an_rpc_error() {
    let p = Portcullis::start(CONFIG).await;
    let mut c = client(&p).await;

    // A message without HTTP attributes is a bad request, answered as a denial.
    let resp = c
        .check(CheckRequest::default())
        .await
        .expect("a decision, not an RPC error")
        .into_inner();
    assert_eq!(resp.status.unwrap().code, 7, "PERMISSION_DENIED");
    let Some(HttpResponse::DeniedResponse(denied)) = resp.http_response else {
        panic!("denied response")
    };
    assert_eq!(denied.status.unwrap().code, 400);

    // Unmatched: APISIX's 404.
    let resp = c.check(check("/nowhere", &[])).await.unwrap().into_inner();
    let Some(HttpResponse::DeniedResponse(denied)) = resp.http_response else {
        panic!("denied response")
    };
    assert_eq!(denied.status.unwrap().code, 404);
    assert_eq!(denied.body, r#"{"message":"404 Route Not Found"}"#);

    // Allowed, and a spoofed identity header (underscore spelling too) is removed.
    let answer = c
        .check(check(
            "/open/x",
            &[
                ("x-consumer-username", "admin"),
                ("x_credential_identifier", "root"),
            ],
        ))
        .await
        .unwrap();
    // Nothing gRPC does not use: Envoy would decode it on every answer.
    assert!(
        answer.metadata().get("date").is_none(),
        "{:?}",
        answer.metadata()
    );
    let resp = answer.into_inner();
    assert_eq!(resp.status.unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!("ok response")
    };
    let mut removed = ok.headers_to_remove.clone();
    removed.sort();
    assert_eq!(
        removed,
        vec!["x-consumer-username", "x_credential_identifier"]
    );

    // Bigger than tonic's 4 MiB default: still a decision.
    let big = "a".repeat(6 << 20);
    let resp = c
        .check(check("/open/big", &[("x-big", &big)]))
        .await
        .expect("large Check answered")
        .into_inner();
    assert_eq!(resp.status.unwrap().code, 0);
}

#[tokio::test]
async fn reflection_lists_ext_authz_and_health() {
    let p = Portcullis::start(CONFIG).await;
    let mut client = ServerReflectionClient::new(channel(&p).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection stream")
        .into_inner();
    let reply = stream.next().await.expect("one answer").expect("no error");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("list services answer: {reply:?}")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in [
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing from {names:?}"
        );
    }

    // The descriptor describes Check's request type, so grpcurl can build one.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "envoy.service.auth.v3.Authorization".into(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.next().await.unwrap().unwrap();
    assert!(
        matches!(reply.message_response, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{reply:?}"
    );
}

/// The gRPC threads' `/proc/PID/task/TID` directories, in thread order.
fn grpc_threads(p: &Portcullis) -> Vec<std::path::PathBuf> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", p.pid())).unwrap() {
        let task = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        if let Some(index) = name.trim().strip_prefix("grpc-") {
            threads.push((index.parse::<usize>().unwrap(), task));
        }
    }
    threads.sort();
    threads.into_iter().map(|(_, task)| task).collect()
}

/// CPU time each gRPC thread has run, by thread (`schedstat`, ns).
fn grpc_thread_cpu(p: &Portcullis) -> Vec<u64> {
    grpc_threads(p)
        .iter()
        .map(|task| {
            let stat = std::fs::read_to_string(task.join("schedstat")).unwrap();
            stat.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect()
}

/// Envoy keeps one HTTP/2 connection per worker: with `listen.grpc_threads: 2`, two
/// such connections are served by both threads, not queued on one.
#[tokio::test]
async fn connections_are_spread_over_the_configured_grpc_threads() {
    let p = Portcullis::start(&format!("listen: {{ grpc_threads: 2 }}\n{CONFIG}")).await;
    let before = grpc_thread_cpu(&p);
    assert_eq!(before.len(), 2, "two gRPC threads");
    let mut clients = vec![client(&p).await, client(&p).await];
    for c in &mut clients {
        for _ in 0..20 {
            let answer = c.check(check("/open/x", &[])).await.unwrap().into_inner();
            assert!(matches!(
                answer.http_response,
                Some(HttpResponse::OkResponse(_))
            ));
        }
    }
    let after = grpc_thread_cpu(&p);
    for (thread, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(
            a > b,
            "gRPC thread {thread} served nothing: {before:?} → {after:?}"
        );
    }
}

/// Write syscalls the gRPC threads have made so far (`syscw` in each thread's `io`).
fn grpc_thread_writes(p: &Portcullis) -> u64 {
    grpc_threads(p)
        .iter()
        .map(|task| common::io_counter(&task.join("io"), "syscw"))
        .sum()
}

/// An answer is written in one piece, trailers included, even when its message is
/// too long for h2 to copy into its write buffer (over 255 bytes: here a consumer's
/// long name and custom id; in production a forwarded access token or `X-Userinfo`).
/// Sent in two writes, the trailers made a second TCP segment that Envoy woke up to
/// read.
#[tokio::test]
async fn a_long_answer_leaves_in_one_write() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let username = "u".repeat(100);
    let custom_id = "c".repeat(200);
    let secret = "one-write-secret-0123456789abcdef";
    let p = Portcullis::start(&format!(
        r#"
listen: {{ grpc_threads: 1 }}
routes:
  - {{ id: jwt, uri: /jwt/*, plugins: {{ jwt-auth: {{}} }} }}
consumers:
  - username: {username}
    labels: {{ custom_id: {custom_id} }}
    credentials:
      - {{ id: one, plugins: {{ jwt-auth: {{ key: one-key, secret: {secret} }} }} }}
"#
    ))
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = encode(
        &Header::default(),
        &serde_json::json!({ "key": "one-key", "exp": exp }),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let request = check("/jwt/x", &[("authorization", &token)]);
    let mut c = client(&p).await;
    let first = c.check(request.clone()).await.unwrap().into_inner();
    assert!(
        prost::Message::encoded_len(&first) > 255,
        "the answer must be longer than h2 copies"
    );
    let Some(HttpResponse::OkResponse(ok)) = &first.http_response else {
        panic!("allowed: {first:?}")
    };
    assert!(
        ok.headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .any(|h| h.key == "x-consumer-username" && h.value == username)
    );

    const CHECKS: u64 = 100;
    let before = grpc_thread_writes(&p);
    for _ in 0..CHECKS {
        let answer = c.check(request.clone()).await.unwrap().into_inner();
        assert_eq!(answer, first);
    }
    let writes = grpc_thread_writes(&p) - before;
    assert!(
        writes < CHECKS + CHECKS / 4,
        "{writes} writes for {CHECKS} answers: the trailers left separately"
    );
}

/// Health and reflection share the connection with Check; any other method is the
/// standard UNIMPLEMENTED, never a broken stream or connection.
#[tokio::test]
async fn an_unknown_method_is_unimplemented() {
    let p = Portcullis::start(CONFIG).await;
    let channel = channel(&p).await;
    for path in [
        "/envoy.service.auth.v3.Authorization/Nope",
        "/envoy.service.auth.v2.Authorization/Check",
        "/no.such.Service/Check",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<CheckRequest, CheckResponse>::default();
        let status = grpc
            .unary(
                tonic::Request::new(check("/open/x", &[])),
                http::uri::PathAndQuery::from_static(path),
                codec,
            )
            .await
            .expect_err(path);
        assert_eq!(
            status.code(),
            tonic::Code::Unimplemented,
            "{path}: {status:?}"
        );
    }
    // The same connection still answers Checks.
    let mut c = AuthorizationClient::new(channel);
    let resp = c.check(check("/open/x", &[])).await.unwrap().into_inner();
    assert_eq!(resp.status.unwrap().code, 0);
}

/// A Check its client gives up on (Envoy's ext_authz timeout resets the stream) is
/// dropped at once, and with it the call it was waiting on: nothing keeps working
/// for an answer nobody will read.
#[tokio::test]
async fn a_check_the_client_gives_up_on_stops_its_outbound_call() {
    let auth = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let auth_addr = auth.local_addr().unwrap();
    let p = Portcullis::start(&format!(
        r#"
routes:
  - id: fwd
    uri: /fwd/*
    plugins:
      forward-auth: {{ uri: "http://{auth_addr}/verify", timeout: 60000 }}
"#
    ))
    .await;
    let mut c = client(&p).await;
    let mut request = tonic::Request::new(check("/fwd/x", &[]));
    request.set_timeout(std::time::Duration::from_millis(300));
    let call = tokio::spawn(async move { c.check(request).await });

    // The auth service takes the request and never answers.
    let (mut socket, _) = tokio::time::timeout(std::time::Duration::from_secs(10), auth.accept())
        .await
        .expect("portcullis calls the auth service")
        .unwrap();
    let status = call.await.unwrap().expect_err("the client gave up");
    assert!(
        matches!(
            status.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{status:?}"
    );

    // Portcullis closes its connection to the auth service well before the plugin's
    // own 60 s timeout.
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the abandoned Check kept its auth call open"
    );
}

/// A request body sent as the given DATA frames.
struct Frames(std::collections::VecDeque<bytes::Bytes>);

impl http_body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|d| Ok(http_body::Frame::data(d))))
    }
}

/// Sends `frames` as the body of a Check call and returns the gRPC status code of the
/// answer (from the headers of a trailers-only answer, else from its trailers) and
/// the answer's bytes.
async fn raw_check(
    channel: &tonic::transport::Channel,
    frames: Vec<Vec<u8>>,
    encoding: Option<&str>,
) -> (String, Vec<u8>) {
    use http_body::Body as _;
    use tower::ServiceExt as _;
    let mut req =
        http::Request::post("http://portcullis/envoy.service.auth.v3.Authorization/Check")
            .header("content-type", "application/grpc")
            .header("te", "trailers");
    if let Some(encoding) = encoding {
        req = req.header("grpc-encoding", encoding);
    }
    let body = Frames(frames.into_iter().map(bytes::Bytes::from).collect());
    let req = req.body(tonic::body::Body::new(body)).unwrap();
    let resp = channel
        .clone()
        .oneshot(req)
        .await
        .expect("an HTTP/2 answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    // As tonic answers: a client that trusts a content-length stops before the trailers.
    assert!(!resp.headers().contains_key("content-length"));
    if let Some(status) = resp.headers().get("grpc-status") {
        return (status.to_str().unwrap().to_owned(), Vec::new());
    }
    let mut body = resp.into_body();
    let (mut bytes, mut status) = (Vec::new(), None);
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        match frame.unwrap().into_data() {
            Ok(data) => bytes.extend_from_slice(&data),
            Err(frame) => {
                status = Some(
                    frame.trailers_ref().unwrap()["grpc-status"]
                        .to_str()
                        .unwrap()
                        .to_owned(),
                )
            }
        }
    }
    (status.expect("trailers with grpc-status"), bytes)
}

fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Check's gRPC framing as a client may send it: the message in several DATA frames
/// is read whole; a body that is not one plain CheckRequest (compressed, cut short,
/// two messages, over the size limit, not protobuf) is an RPC error with the code
/// tonic's server would give, which Envoy turns into `status_on_error`; and none of
/// them breaks the connection for the Checks after it.
#[tokio::test]
async fn a_check_body_is_one_plain_message_or_an_rpc_error() {
    use prost::Message as _;
    let p = Portcullis::start(CONFIG).await;
    let channel = channel(&p).await;
    let message = check("/open/x", &[("x-a", "1")]).encode_to_vec();
    let wire = framed(0, &message);

    let (status, whole) = raw_check(&channel, vec![wire.clone()], None).await;
    assert_eq!(status, "0");
    let answer = CheckResponse::decode(&whole[5..]).unwrap();
    assert_eq!(answer.status.unwrap().code, 0);
    for cut in [1, 4, 5, 6, wire.len() - 1] {
        let (a, b) = wire.split_at(cut);
        let (status, bytes) = raw_check(&channel, vec![a.to_vec(), b.to_vec()], None).await;
        assert_eq!((status.as_str(), &bytes), ("0", &whole), "cut at {cut}");
    }
    let (status, _) = raw_check(&channel, vec![wire.clone()], Some("identity")).await;
    assert_eq!(status, "0");

    let internal = "13";
    let refused = [
        ("empty body", vec![], None, internal),
        (
            "cut short",
            vec![wire[..wire.len() - 1].to_vec()],
            None,
            internal,
        ),
        (
            "two messages",
            vec![wire.clone(), wire.clone()],
            None,
            internal,
        ),
        ("compressed flag", vec![framed(1, &message)], None, internal),
        ("gzip", vec![framed(1, &message)], Some("gzip"), "12"),
        ("not protobuf", vec![framed(0, &[0xff; 12])], None, internal),
        ("over 16 MiB", vec![vec![0, 0x01, 0, 0, 1]], None, "11"),
    ];
    for (what, frames, encoding, code) in refused {
        let (status, _) = raw_check(&channel, frames, encoding).await;
        assert_eq!(status, code, "{what}");
    }
    // The same connection still answers Checks.
    let mut c = AuthorizationClient::new(channel);
    let resp = c.check(check("/open/x", &[])).await.unwrap().into_inner();
    assert_eq!(resp.status.unwrap().code, 0);
}

/// One HTTP/2 frame as read off the wire: type, flags, stream and payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const WINDOW_UPDATE: u8 = 8;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SETTINGS_INITIAL_WINDOW_SIZE: [u8; 2] = [0, 4];
/// What every window is before SETTINGS and WINDOW_UPDATE frames say otherwise.
const DEFAULT_WINDOW: u32 = 65_535;

async fn read_frame(io: &mut tokio::net::TcpStream) -> Frame {
    use tokio::io::AsyncReadExt as _;
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.expect("a frame header");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    io.read_exact(&mut payload).await.expect("a frame payload");
    Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Envoy sends a Check with the request's body (`with_request_body`, 64 KiB by
/// default) and many Checks at once on one connection, so portcullis opens 1 MiB
/// windows from the start: a 300 KB Check goes out in one go, without waiting for
/// window, and portcullis sends no bandwidth-probing PINGs (hyper's adaptive window
/// started at 64 KiB and pinged on the first DATA frame).
#[tokio::test]
async fn a_large_check_fits_the_first_window_without_pings() {
    use prost::Message as _;
    use tokio::io::AsyncWriteExt as _;
    let p = Portcullis::start(CONFIG).await;
    let addr = p.grpc_endpoint().trim_start_matches("http://").to_owned();
    let mut io = tokio::net::TcpStream::connect(addr).await.unwrap();
    io.set_nodelay(true).unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    io.write_all(&hello).await.unwrap();

    let run = async {
        let (mut stream_window, mut connection_increment) = (None, None);
        while stream_window.is_none() || connection_increment.is_none() {
            let f = read_frame(&mut io).await;
            match (f.kind, f.stream) {
                (SETTINGS, 0) if f.flags & ACK == 0 => {
                    stream_window = Some(DEFAULT_WINDOW);
                    for setting in f.payload.chunks(6) {
                        if setting[..2] == SETTINGS_INITIAL_WINDOW_SIZE {
                            stream_window =
                                Some(u32::from_be_bytes(setting[2..].try_into().unwrap()));
                        }
                    }
                    io.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
                }
                (WINDOW_UPDATE, 0) => {
                    connection_increment =
                        Some(u32::from_be_bytes(f.payload[..4].try_into().unwrap()))
                }
                _ => {}
            }
        }
        assert_eq!(stream_window, Some(1 << 20), "each stream's window");
        assert_eq!(
            connection_increment.map(|i| i + DEFAULT_WINDOW),
            Some(1 << 20),
            "the connection's window"
        );

        // HPACK without Huffman or dynamic-table references: :method POST and
        // :scheme http from the static table, the rest literal.
        let path = b"/envoy.service.auth.v3.Authorization/Check";
        let mut block = vec![0x83, 0x86, 0x44, path.len() as u8];
        block.extend_from_slice(path);
        block.extend_from_slice(b"\x41\x09127.0.0.1");
        block.extend_from_slice(b"\x5f\x10application/grpc");
        block.extend_from_slice(b"\x40\x02te\x08trailers");
        let mut request = check("/open/upload", &[("content-type", "text/plain")]);
        let http = request
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.raw_body = vec![b'x'; 300_000];
        http.method = "POST".into();
        let message = framed(0, &request.encode_to_vec());
        assert!(message.len() > 4 * DEFAULT_WINDOW as usize);
        let mut out = frame(HEADERS, END_HEADERS, 1, &block);
        let chunks: Vec<_> = message.chunks(16_384).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            out.extend(frame(DATA, if last { END_STREAM } else { 0 }, 1, chunk));
        }
        io.write_all(&out).await.unwrap();

        let mut answer = Vec::new();
        loop {
            let f = read_frame(&mut io).await;
            assert_ne!(f.kind, PING, "portcullis pinged");
            assert!(
                matches!(f.kind, DATA | HEADERS | SETTINGS | WINDOW_UPDATE),
                "unexpected frame type {} (payload {:?})",
                f.kind,
                f.payload
            );
            if f.stream == 1 && f.kind == DATA {
                answer.extend_from_slice(&f.payload);
            }
            if f.stream == 1 && f.kind == HEADERS && f.flags & END_STREAM != 0 {
                break;
            }
        }
        answer
    };
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), run)
        .await
        .expect("1 MiB windows opened and the Check answered within 10 s");
    assert_eq!(answer[0], 0, "an uncompressed message");
    let resp = CheckResponse::decode(&answer[5..]).expect("a CheckResponse");
    assert_eq!(resp.status.unwrap().code, 0, "allowed");
}
