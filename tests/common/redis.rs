//! A real Redis (Debian `redis-server`) on a loopback ephemeral port, without
//! persistence, killed when dropped.
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::process::Logged;
use super::{free_port, test_dir};

pub struct Redis {
    pub port: u16,
    dir: TempDir,
    process: Option<Logged>,
}

impl Redis {
    pub async fn start() -> Self {
        let mut redis = Redis {
            port: free_port(),
            dir: test_dir("redis"),
            process: None,
        };
        redis.restart().await;
        redis
    }

    /// Starts (again) on the same port, empty; returns once it answers PING.
    pub async fn restart(&mut self) {
        self.kill();
        let redis = self;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &redis.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(redis.dir.path());
        redis.process = Some(Logged::spawn("redis", cmd, redis.dir.path()));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if redis.ping().await {
                return;
            }
            let p = redis.process.as_mut().expect("spawned");
            if let Some(status) = p.exited() {
                panic!("redis-server exited with {status}\n{}", p.tail());
            }
            assert!(Instant::now() < deadline, "redis not up\n{}", p.tail());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").await.is_ok()
            && s.read_exact(&mut buf).await.is_ok()
            && &buf == b"+PONG\r\n"
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }
}
