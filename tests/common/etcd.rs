//! A real etcd (Debian `etcd-server`) on loopback ephemeral ports with its own data
//! directory, killed when dropped. `kill` + `restart` keep the data directory and
//! ports, as an etcd crash and restart would.
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::process::Logged;
use super::{free_port, http_client, test_dir};

pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    dir: TempDir,
    process: Option<Logged>,
    /// With TLS: clients must present a certificate signed by `ca.pem`.
    tls: bool,
}

impl Etcd {
    pub async fn start() -> Self {
        let mut etcd = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            dir: test_dir("etcd"),
            process: None,
            tls: false,
        };
        etcd.restart().await;
        etcd
    }

    /// etcd serving its clients over TLS and requiring client certificates. The test
    /// CA, server and client certificates (`ca.pem`, `client.pem`, `client-key.pem`
    /// in [`Etcd::dir`]) are made with the `openssl` command.
    pub async fn start_tls() -> Self {
        let mut etcd = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            dir: test_dir("etcd"),
            process: None,
            tls: true,
        };
        let d = etcd.dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
        ]);
        for name in ["server", "client"] {
            let key = format!("{name}-key.pem");
            let csr = format!("{name}.csr");
            let pem = format!("{name}.pem");
            openssl(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ]);
        }
        etcd.restart().await;
        etcd
    }

    /// `http://127.0.0.1:<port>` (`https://` with TLS), for `store.endpoints`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Where the TLS files are.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Stops etcd at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts (again) on the same data directory and ports; returns once healthy.
    pub async fn restart(&mut self) {
        self.kill();
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--logger", "zap", "--log-level", "warn"]);
        if self.tls {
            let d = self.dir.path();
            cmd.arg("--cert-file")
                .arg(d.join("server.pem"))
                .arg("--key-file")
                .arg(d.join("server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(d.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let process = Logged::spawn("etcd", cmd, self.dir.path());
        self.process = Some(process);
        if self.tls {
            // /health needs a client certificate: wait for the port, then for a
            // moment more while etcd finishes starting its server.
            let deadline = Instant::now() + Duration::from_secs(20);
            while tokio::net::TcpStream::connect(("127.0.0.1", self.client_port))
                .await
                .is_err()
            {
                assert!(Instant::now() < deadline, "etcd (TLS) not listening");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
        let url = format!("{client}/health");
        let http = http_client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(&url).send().await
                && r.status() == 200
                && r.text().await.unwrap_or_default().contains("true")
            {
                return;
            }
            let p = self.process.as_mut().expect("spawned");
            if let Some(status) = p.exited() {
                panic!("etcd exited with {status}\n{}", p.tail());
            }
            assert!(Instant::now() < deadline, "etcd not healthy\n{}", p.tail());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
