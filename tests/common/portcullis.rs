//! The portcullis binary under test, run as users run it: `portcullis serve --config
//! FILE`, with the harness choosing the listen ports and the state file's place.
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_yaml::{Mapping, Value as Yaml};
use tempfile::TempDir;

use super::admin::Admin;
use super::process::Logged;
use super::{free_port, http_client, test_dir};

/// The Admin API key every harness-started portcullis gets in `$ADMIN_API_KEY` (the
/// example key of the APISIX docs). Configs use it as `api_key: $env://ADMIN_API_KEY`.
pub const ADMIN_KEY: &str = "edd1c9f034335f136f87ad84b625c8f1";

#[derive(Debug, Clone, Copy)]
pub struct PortcullisPorts {
    pub grpc: u16,
    pub http: u16,
    pub admin: u16,
}

impl PortcullisPorts {
    fn fresh() -> Self {
        PortcullisPorts {
            grpc: free_port(),
            http: free_port(),
            admin: free_port(),
        }
    }
}

pub struct Portcullis {
    pub ports: PortcullisPorts,
    process: Option<Logged>,
    /// Output of earlier runs of this instance (before `restart`), oldest first.
    earlier_output: String,
    dir: Option<TempDir>,
    /// Extra environment for the process (e.g. `$env://` secrets).
    env: Vec<(String, String)>,
}

impl Portcullis {
    /// Writes `yaml` as [`Portcullis::render`] completes it to `<dir>/portcullis.yaml`,
    /// starts the binary on it and returns once `/readyz` answers 200.
    pub async fn start(yaml: &str) -> Self {
        Self::start_with_env(yaml, &[]).await
    }

    /// [`Portcullis::start`] with extra environment variables for the process.
    pub async fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Self {
        let mut p = Portcullis {
            ports: PortcullisPorts::fresh(),
            process: None,
            earlier_output: String::new(),
            dir: Some(test_dir("portcullis")),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        for attempt in 1..=3 {
            p.write_config(yaml);
            match p.spawn_and_wait().await {
                Ok(()) => return p,
                Err(out) if attempt < 3 && out.contains("ddress already in use") => {
                    p.stop_process();
                    p.ports = PortcullisPorts::fresh();
                }
                Err(out) => panic!("portcullis did not become ready:\n{out}"),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("test directory").path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir().join("portcullis.yaml")
    }

    /// The default state file (used unless the test's YAML names another).
    pub fn state_path(&self) -> PathBuf {
        self.dir().join("portcullis-state.yaml")
    }

    /// The YAML the binary reads for `yaml`: `listen` forced to this instance's ports,
    /// `state_file` defaulted into the test directory and, unless the YAML has an `admin`
    /// block, the Admin API switched on with `api_key: $env://ADMIN_API_KEY`.
    pub fn render(&self, yaml: &str) -> String {
        let mut doc: Yaml = serde_yaml::from_str(yaml)
            .unwrap_or_else(|e| panic!("test config is not YAML: {e}\n{yaml}"));
        if doc.is_null() {
            doc = Yaml::Mapping(Mapping::new());
        }
        let map = doc
            .as_mapping_mut()
            .expect("test config must be a YAML mapping");
        // A test may set other `listen` keys (grpc_threads); the addresses are ours.
        let mut listen = match map.remove("listen") {
            Some(Yaml::Mapping(listen)) => listen,
            _ => Mapping::new(),
        };
        for (key, port) in [
            ("grpc", self.ports.grpc),
            ("http", self.ports.http),
            ("admin", self.ports.admin),
        ] {
            listen.insert(key.into(), format!("127.0.0.1:{port}").into());
        }
        map.insert("listen".into(), Yaml::Mapping(listen));
        if !map.contains_key("admin") {
            let mut admin = Mapping::new();
            admin.insert("api_key".into(), "$env://ADMIN_API_KEY".into());
            map.insert("admin".into(), Yaml::Mapping(admin));
        }
        // With `store` (etcd) there is no state file.
        if !map.contains_key("state_file") && !map.contains_key("store") {
            let state = self.state_path().display().to_string();
            map.insert("state_file".into(), state.into());
        }
        serde_yaml::to_string(&doc).expect("render config")
    }

    fn write_config(&self, yaml: &str) {
        std::fs::write(self.config_path(), self.render(yaml)).expect("write portcullis config");
    }

    /// Replaces the config file the way editors and Kubernetes ConfigMaps do: write a
    /// temporary file beside it, then rename it over the old one.
    pub fn reload(&self, yaml: &str) {
        self.reload_raw(&self.render(yaml));
    }

    /// Replaces the config file with exactly `text` (for invalid files), atomically.
    pub fn reload_raw(&self, text: &str) {
        let tmp = self.dir().join(".portcullis.yaml.tmp");
        std::fs::write(&tmp, text).expect("write new config");
        std::fs::rename(&tmp, self.config_path()).expect("rename new config into place");
    }

    /// Rewrites the config file in place (truncate + write), as `echo > file` does.
    pub fn rewrite_in_place(&self, yaml: &str) {
        std::fs::write(self.config_path(), self.render(yaml)).expect("rewrite config");
    }

    /// Stops the process (SIGKILL, as a crash would) and starts it again on the same
    /// directory, config, state file and ports.
    pub async fn restart(&mut self) {
        self.stop_process();
        if let Err(out) = self.spawn_and_wait().await {
            panic!("portcullis did not come back after a restart:\n{out}");
        }
    }

    /// Sends SIGTERM and returns the exit status (bounded wait).
    pub fn sigterm(&mut self, within: Duration) -> ExitStatus {
        let process = self.process.as_mut().expect("portcullis is running");
        let status = process.terminate(within);
        self.stop_process();
        status
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("portcullis is running").pid()
    }

    /// Everything the binary printed, across restarts.
    pub fn output(&self) -> String {
        let current = self
            .process
            .as_ref()
            .map(Logged::output)
            .unwrap_or_default();
        format!("{}{current}", self.earlier_output)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.http)
    }

    /// `http://127.0.0.1:<grpc>`, for tonic clients.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.grpc)
    }

    /// An Admin API client holding [`ADMIN_KEY`].
    pub fn admin(&self) -> Admin {
        Admin::new(
            format!("http://127.0.0.1:{}", self.ports.admin),
            Some(ADMIN_KEY),
        )
    }

    fn stop_process(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
            self.earlier_output.push_str(&process.output());
        }
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .current_dir(self.dir())
            .env("ADMIN_API_KEY", ADMIN_KEY)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        // The log file is appended to across restarts; `output()` reads it once.
        let _ = std::fs::remove_file(self.dir().join("portcullis.log"));
        self.process = Some(Logged::spawn("portcullis", cmd, self.dir()));
        self.wait_ready(Duration::from_secs(30)).await
    }

    async fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let client = http_client();
        let url = self.http_url("/readyz");
        let deadline = Instant::now() + within;
        let process = self.process.as_mut().expect("spawned");
        loop {
            if let Some(status) = process.exited() {
                return Err(format!(
                    "portcullis exited with {status}\n{}",
                    process.tail()
                ));
            }
            if let Ok(resp) = client.get(&url).send().await
                && resp.status() == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "/readyz not 200 after {within:?}\n{}",
                    process.tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Portcullis {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if !self.earlier_output.is_empty() {
                eprintln!(
                    "----- portcullis, earlier runs -----\n{}",
                    self.earlier_output
                );
            }
            if let Some(dir) = self.dir.take() {
                eprintln!("portcullis test directory kept: {}", dir.keep().display());
            }
        }
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }
}
