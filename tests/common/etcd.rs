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
}

impl Etcd {
    pub async fn start() -> Self {
        let mut etcd = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            dir: test_dir("etcd"),
            process: None,
        };
        etcd.restart().await;
        etcd
    }

    /// `http://127.0.0.1:<port>`, for `store.endpoints`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
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
        let client = format!("http://127.0.0.1:{}", self.client_port);
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
        let process = Logged::spawn("etcd", cmd, self.dir.path());
        self.process = Some(process);
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
