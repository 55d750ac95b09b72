//! portcullis behind real nginx `auth_request` (Debian's nginx), running the shipped
//! `examples/nginx.conf`: the same decisions as through Envoy, identity headers that
//! a client cannot spoof, and nginx's own rule that only 401/403 pass through.
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{
    Answer, EchoUpstream, Logged, Portcullis, Reply, TestServer, free_port, http_client, test_dir,
};

/// The APISIX jwt-auth docs' token for `jack-key` (HS256, only `nbf`).
const JACK_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJrZXkiOiJqYWNrLWtleSIsIm5iZiI6MTcyOTEzMjI3MX0.UEPXy5jpid624T1XpfjM0PLY73LZPjV3Qt8yZ92kVuU";

fn nginx_bin() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nginx is not installed: apt-get install nginx (.ci/run does)")
}

struct Nginx {
    port: u16,
    process: Logged,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    /// A fast shutdown through the master: SIGKILL would stop only the master and leave
    /// its worker listening.
    fn drop(&mut self) {
        self.process.stop(Duration::from_secs(5));
    }
}

impl Nginx {
    async fn start(portcullis_http: u16, upstream: u16) -> Self {
        let dir = test_dir("nginx");
        let port = free_port();
        let shipped =
            std::fs::read_to_string("examples/nginx.conf").expect("read examples/nginx.conf");
        let conf = shipped
            .replace("127.0.0.1:8000", &format!("127.0.0.1:{port}"))
            .replace("127.0.0.1:9192", &format!("127.0.0.1:{portcullis_http}"))
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{upstream}"));
        assert_ne!(
            conf, shipped,
            "the shipped nginx.conf no longer uses the templated ports"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut cmd = Command::new(nginx_bin());
        cmd.arg("-p").arg(dir.path()).arg("-c").arg(&conf_path);
        let process = Logged::spawn("nginx", cmd, dir.path());
        let client = http_client();
        common::eventually(Duration::from_secs(10), "nginx listening", || {
            let client = client.clone();
            async move {
                client
                    .get(format!("http://127.0.0.1:{port}/"))
                    .send()
                    .await
                    .is_ok()
            }
        })
        .await;
        Nginx {
            port,
            process,
            _dir: dir,
        }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = http_client().get(format!("http://127.0.0.1:{}{path}", self.port));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::read(req.send().await.expect("request through nginx")).await
    }
}

const CONFIG: &str = r#"
consumers:
  - username: jack
    labels: { custom_id: "495aec6a" }
    credentials:
      - id: cred-jack-jwt-auth
        plugins:
          jwt-auth: { key: jack-key, secret: jack-hs256-secret-that-is-very-long }
routes:
  - { id: open, uri: /open/*, plugins: {} }
  - { id: jwt, uri: /jwt/*, plugins: { jwt-auth: {} } }
"#;

#[tokio::test]
async fn nginx_auth_request_front() {
    let upstream = EchoUpstream::start();
    // The APISIX forward-auth docs' auth service.
    let auth = TestServer::start(|req| match req.header("authorization") {
        Some("321") => Answer::new(200).header("X-User-ID", "i-am-user"),
        _ => Answer::new(403).body("Forbidden"),
    });
    let config = format!(
        "{CONFIG}  - {{ id: fa, uri: /fa/*, plugins: {{ forward-auth: {{ uri: \"{}\", request_headers: [Authorization], upstream_headers: [X-User-ID] }} }} }}\n",
        auth.url("/auth")
    );
    let portcullis = Portcullis::start(&config).await;
    let nginx = Nginx::start(portcullis.ports.http, upstream.port).await;

    // An open route passes, and a client's own identity header never arrives.
    let r = nginx
        .get(
            "/open/a?x=1",
            &[("X-Consumer-Username", "admin"), ("X-User-ID", "0")],
        )
        .await;
    let echoed = r.echoed();
    assert_eq!(echoed.path, "/open/a");
    assert_eq!(echoed.header("x-consumer-username"), None);
    assert_eq!(echoed.header("x-user-id"), None);

    // jwt-auth through nginx: the consumer reaches the upstream.
    let r = nginx
        .get(
            "/jwt/x",
            &[
                ("Authorization", JACK_TOKEN),
                ("X-Consumer-Username", "admin"),
            ],
        )
        .await;
    let echoed = r.echoed();
    assert_eq!(echoed.header("x-consumer-username"), Some("jack"));
    assert_eq!(
        echoed.header("x-credential-identifier"),
        Some("cred-jack-jwt-auth")
    );
    assert_eq!(echoed.header("x-consumer-custom-id"), Some("495aec6a"));

    // A 401 passes through nginx with its WWW-Authenticate challenge.
    let hits = upstream.hits();
    let r = nginx.get("/jwt/x", &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some(r#"Bearer realm="jwt""#));
    assert_eq!(
        upstream.hits(),
        hits,
        "a denied request must not reach the upstream"
    );

    // forward-auth through nginx: the auth service's X-User-ID replaces the client's.
    let r = nginx
        .get("/fa/x", &[("Authorization", "321"), ("X-User-ID", "admin")])
        .await;
    assert_eq!(r.echoed().header("x-user-id"), Some("i-am-user"));
    let r = nginx.get("/fa/x", &[("Authorization", "nope")]).await;
    assert_eq!(r.status, 403);
    assert_eq!(upstream.hits(), hits + 1);
    let hits = upstream.hits();

    // nginx turns any other denial (here the unmatched 404) into 500; never a pass.
    let r = nginx.get("/nowhere", &[]).await;
    assert_eq!(r.status, 500);
    assert_eq!(upstream.hits(), hits);

    // nginx passes a client's X-Forwarded-Uri on to /auth beside its own
    // X-Original-URL: the client must not get /jwt/x decided as the open route.
    let r = nginx
        .get(
            "/jwt/x",
            &[
                ("X-Forwarded-Uri", "/open/a"),
                ("X-Forwarded-Host", "localhost"),
            ],
        )
        .await;
    assert_eq!(r.status, 500, "refused (400 from /auth), never passed");
    assert_eq!(upstream.hits(), hits);
}
