//! Real HTTP servers written in the tests: the upstream behind Envoy, which answers each
//! request with what it received (so a test sees exactly which headers, path and body
//! portcullis let through), and [`TestServer`], which answers as a test scripts it
//! (a forward-auth service, a slow peer) and records what it was asked.
//!
//! Each runs on its own thread and runtime, so it keeps answering whatever the test's
//! runtime is doing (single-threaded `#[tokio::test]`, blocking waits).
use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Response header the echo server sets, so a test can tell an upstream answer from one
/// written by Envoy or portcullis.
pub const ECHO_MARKER: &str = "x-echo-upstream";

/// What a test server received (and, for the echo upstream, what it answers with).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Echoed {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Header name (lower case) → value; repeated headers are joined with ", ", so a
    /// header that arrived twice never compares equal to a single expected value.
    pub headers: BTreeMap<String, String>,
    /// Every header line in arrival order, duplicates included.
    pub header_list: Vec<(String, String)>,
    pub body: String,
}

impl Echoed {
    fn from_parts(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Self {
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        let mut list = Vec::new();
        for (name, value) in headers {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            map.entry(name.as_str().to_owned())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert_with(|| value.clone());
            list.push((name.as_str().to_owned(), value));
        }
        Echoed {
            method: method.as_str().to_owned(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers: map,
            header_list: list,
            body: String::from_utf8_lossy(body).into_owned(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Every value of `name`, one per header line.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.header_list
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// How a [`TestServer`] answers one request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait this long before answering (timeouts, slow peers).
    pub delay: Duration,
}

impl Answer {
    pub fn new(status: u16) -> Self {
        Answer {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    pub fn json(self, value: &serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(value.to_string())
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Script = dyn Fn(&Echoed) -> Answer + Send + Sync;

struct Shared {
    script: Box<Script>,
    seen: Mutex<Vec<Echoed>>,
    hits: AtomicUsize,
}

/// An HTTP server on 127.0.0.1:0 that answers each request with `script(request)` and
/// records every request it got.
pub struct TestServer {
    pub port: u16,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(script: impl Fn(&Echoed) -> Answer + Send + Sync + 'static) -> Self {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind test server");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("test server address").port();
        let shared = Arc::new(Shared {
            script: Box::new(script),
            seen: Mutex::new(Vec::new()),
            hits: AtomicUsize::new(0),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("test-server-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("test server runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let app = Router::new().fallback(answer).with_state(state);
                    tokio::select! {
                        served = axum::serve(listener, app) => {
                            if let Err(e) = served { eprintln!("test server stopped: {e}"); }
                        }
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime here cancels the connections peers keep open.
            })
            .expect("spawn test server thread");
        TestServer {
            port,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// How many requests arrived so far.
    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Echoed> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn last_request(&self) -> Option<Echoed> {
        self.requests().pop()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn answer(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = Echoed::from_parts(&method, &uri, &headers, &body);
    let scripted = (shared.script)(&seen);
    shared
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(seen);
    shared.hits.fetch_add(1, Ordering::SeqCst);
    if !scripted.delay.is_zero() {
        tokio::time::sleep(scripted.delay).await;
    }
    let mut response = Response::new(Body::from(scripted.body));
    *response.status_mut() =
        StatusCode::from_u16(scripted.status).expect("scripted status is a valid HTTP status");
    for (name, value) in scripted.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("scripted header name");
        let value = HeaderValue::from_str(&value).expect("scripted header value");
        response.headers_mut().append(name, value);
    }
    response.into_response()
}

/// The upstream: answers 200 with the request it received as JSON ([`Echoed`]) and
/// the [`ECHO_MARKER`] header.
pub struct EchoUpstream {
    pub port: u16,
    server: TestServer,
}

impl EchoUpstream {
    /// Binds 127.0.0.1:0 and starts answering at once.
    pub fn start() -> Self {
        let server = TestServer::start(|seen| {
            let json = serde_json::to_value(seen).expect("echo JSON");
            Answer::new(200).header(ECHO_MARKER, "1").json(&json)
        });
        EchoUpstream {
            port: server.port,
            server,
        }
    }

    /// How many requests reached the upstream so far.
    pub fn hits(&self) -> usize {
        self.server.hits()
    }

    /// Every request the upstream got, oldest first.
    pub fn requests(&self) -> Vec<Echoed> {
        self.server.requests()
    }
}
