//! The one harness every end-to-end suite uses: real Envoy (running a config shipped in
//! `envoy/`), the real portcullis binary and a real HTTP echo upstream, all on loopback
//! with ephemeral ports, each stopped when dropped and each printing its output when the
//! test fails.
//!
//! ```ignore
//! let stack = Stack::start("routes: [{id: r1, uri: /get}]").await;
//! let reply = stack.get("/get").await;
//! assert_eq!(reply.status, 200);
//! assert_eq!(reply.echoed().path, "/get");
//! ```
#![allow(dead_code)]

mod admin;
mod echo;
pub mod envoy;
pub mod etcd;
pub mod oidc_provider;
mod portcullis;
mod process;
pub mod redis;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

// Each suite uses a different part of the harness.
#[allow(unused_imports)]
pub use admin::Admin;
#[allow(unused_imports)]
pub use echo::{Answer, ECHO_MARKER, EchoUpstream, Echoed, TestServer};
#[allow(unused_imports)]
pub use envoy::{Envoy, EnvoyPorts, TEMPLATED_PORTS, envoy_bin};
#[allow(unused_imports)]
pub use portcullis::{ADMIN_KEY, Portcullis, PortcullisPorts};
#[allow(unused_imports)]
pub use process::Logged;

/// The shipped front proxy the suites run by default.
pub const ENVOY_GRPC: &str = "envoy/envoy.yaml";
/// The front proxy whose Envoy routes name portcullis routes (`route_id`).
pub const ENVOY_ROUTE_ID: &str = "envoy/envoy-route-id.yaml";
/// The front proxy using Envoy's HTTP ext_authz mode against portcullis's `/auth`.
pub const ENVOY_HTTP: &str = "envoy/envoy-http-authz.yaml";

/// A counter of a `/proc/.../io` file (a process's or one thread's): `rchar`,
/// `syscw`, ….
pub fn io_counter(io: &Path, name: &str) -> u64 {
    let text = std::fs::read_to_string(io).unwrap_or_else(|e| panic!("{}: {e}", io.display()));
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {}", io.display()))
}

/// A loopback port that was free a moment ago and that this test process has not handed
/// out before (tests in one binary run in parallel).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..200 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if HANDED_OUT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return port;
        }
    }
    panic!("no free loopback port after 200 tries")
}

/// A fresh directory for one process's files, removed after the test unless it fails.
pub fn test_dir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("portcullis-e2e-{what}-"))
        .tempdir()
        .expect("create test directory")
}

/// The HTTP client tests use: no proxy from the environment, no redirects followed (the
/// tests assert on 302s), bounded time per request.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("build HTTP client")
}

/// Polls `check` every 50 ms until it returns true; panics naming `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An answer as the client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub async fn read(resp: reqwest::Response) -> Self {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.expect("read response body");
        Reply {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether the echo upstream wrote this answer (the request got through).
    pub fn reached_upstream(&self) -> bool {
        self.headers.contains_key(ECHO_MARKER)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): status {} body {:?}",
                self.status, self.body
            )
        })
    }

    /// What the upstream received; panics (showing the answer) if the request did not
    /// reach it.
    pub fn echoed(&self) -> Echoed {
        assert!(
            self.reached_upstream() && self.status == 200,
            "expected the upstream's echo, got {} {:?} {:?}",
            self.status,
            self.headers,
            self.body
        );
        serde_json::from_str(&self.body).expect("echo answer")
    }
}

/// Echo upstream + portcullis + Envoy, wired together.
pub struct Stack {
    // Dropped in this order: Envoy first, so it does not see its peers vanish mid-test.
    pub envoy: Envoy,
    pub portcullis: Portcullis,
    pub upstream: EchoUpstream,
    pub client: reqwest::Client,
}

impl Stack {
    /// The whole stack with the default front proxy (`envoy/envoy.yaml`, gRPC).
    pub async fn start(portcullis_yaml: &str) -> Self {
        Self::start_with(ENVOY_GRPC, portcullis_yaml).await
    }

    /// The whole stack with another shipped Envoy config.
    pub async fn start_with(envoy_config: &str, portcullis_yaml: &str) -> Self {
        Self::start_full(envoy_config, portcullis_yaml, &[]).await
    }

    /// The default stack, with extra environment for portcullis (`$env://` secrets).
    pub async fn start_with_env(portcullis_yaml: &str, env: &[(&str, &str)]) -> Self {
        Self::start_full(ENVOY_GRPC, portcullis_yaml, env).await
    }

    /// The default stack, its `envoy/envoy.yaml` changed by `edit` first.
    pub async fn start_edited(portcullis_yaml: &str, edit: impl Fn(&str) -> String) -> Self {
        Self::start_inner(ENVOY_GRPC, portcullis_yaml, &[], edit).await
    }

    async fn start_full(envoy_config: &str, portcullis_yaml: &str, env: &[(&str, &str)]) -> Self {
        Self::start_inner(envoy_config, portcullis_yaml, env, str::to_owned).await
    }

    async fn start_inner(
        envoy_config: &str,
        portcullis_yaml: &str,
        env: &[(&str, &str)],
        edit: impl Fn(&str) -> String,
    ) -> Self {
        let upstream = EchoUpstream::start();
        let portcullis = Portcullis::start_with_env(portcullis_yaml, env).await;
        let ports = EnvoyPorts::new(upstream.port, portcullis.ports.grpc, portcullis.ports.http);
        let envoy = Envoy::start_edited(envoy_config, ports, edit).await;
        Stack {
            envoy,
            portcullis,
            upstream,
            client: http_client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.envoy.url(path)
    }

    pub fn admin(&self) -> Admin {
        self.portcullis.admin()
    }

    /// A request through Envoy.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path))
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let resp = request.send().await.expect("request through Envoy");
        Reply::read(resp).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.request(reqwest::Method::GET, path)).await
    }
}

/// Sends `GET <target>` exactly as written (HTTP clients normalise `..` and `//` away
/// before sending) and returns the raw answer, head and body.
pub async fn raw_get(port: u16, target: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {target}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("GET {target}: {e}"))
}

/// The status code of a raw HTTP/1.1 answer.
pub fn raw_status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}
