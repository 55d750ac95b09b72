//! The upstream behind Envoy in every end-to-end test: a real HTTP server that answers
//! each request with what it received, so a test sees exactly which headers, path and
//! body portcullis let through (and what it added or removed).
//!
//! It runs on its own thread and runtime, so it keeps answering whatever the test's
//! runtime is doing (single-threaded `#[tokio::test]`, blocking waits).
use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

/// Response header the echo server sets, so a test can tell an upstream answer from one
/// written by Envoy or portcullis.
pub const ECHO_MARKER: &str = "x-echo-upstream";

pub struct EchoUpstream {
    pub port: u16,
    hits: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EchoUpstream {
    /// Binds 127.0.0.1:0 and starts answering at once.
    pub fn start() -> Self {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind echo upstream");
        listener
            .set_nonblocking(true)
            .expect("nonblocking echo listener");
        let port = listener.local_addr().expect("echo address").port();
        let hits = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = oneshot::channel::<()>();
        let state = hits.clone();
        let thread = std::thread::Builder::new()
            .name(format!("echo-upstream-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("echo runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let app = Router::new().fallback(echo).with_state(state);
                    tokio::select! {
                        served = axum::serve(listener, app) => {
                            if let Err(e) = served { eprintln!("echo upstream stopped: {e}"); }
                        }
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime here cancels the connection tasks Envoy keeps open.
            })
            .expect("spawn echo thread");
        EchoUpstream {
            port,
            hits,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// How many requests reached the upstream so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn echo(
    State(hits): State<Arc<AtomicUsize>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    let mut list = Vec::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        map.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.clone());
        list.push((name.as_str().to_owned(), value));
    }
    let answer = json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "headers": map,
        "header_list": list,
        "body": String::from_utf8_lossy(&body),
    });
    ([(ECHO_MARKER, "1")], axum::Json(answer)).into_response()
}

/// What the echo upstream saw, parsed back from its answer.
#[derive(Debug, Clone, Deserialize)]
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
