//! The config file: where portcullis listens, who may use the Admin API, and the
//! routes and consumers it starts with.
//!
//! The file is parsed once into typed structs with unknown keys refused, and every
//! error names the file, the path inside it and what was expected, so
//! `portcullis validate` and a rejected hot reload say exactly what to fix.
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::resources::{FileConsumer, RouteSpec};

/// The default config: nothing to set up, nothing exposed beyond loopback.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.yaml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub admin: AdminSettings,
    /// Where Admin API writes persist; default `portcullis-state.yaml` beside the config.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    #[serde(default)]
    pub unmatched: Unmatched,
    #[serde(default)]
    pub auth_request: AuthRequestSettings,
    /// Where routes, consumers and credentials live: this file (default) or etcd.
    #[serde(default)]
    pub store: StoreSettings,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub consumers: Vec<FileConsumer>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    #[serde(default = "default_grpc")]
    pub grpc: SocketAddr,
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Threads serving `grpc`, each with its own connections; unset, one per CPU the
    /// process may use. Read at startup, like the addresses.
    #[serde(default)]
    pub grpc_threads: Option<NonZeroUsize>,
}

fn default_grpc() -> SocketAddr {
    ([127, 0, 0, 1], 9191).into()
}
fn default_http() -> SocketAddr {
    ([127, 0, 0, 1], 9192).into()
}
fn default_admin() -> SocketAddr {
    ([127, 0, 0, 1], 9180).into()
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            grpc: default_grpc(),
            http: default_http(),
            admin: default_admin(),
            grpc_threads: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// The `X-API-KEY` value. The Admin API is not served at all without one.
    #[serde(default)]
    pub api_key: Option<String>,
}

/// The HTTP auth_request/forwardAuth front on `listen.http`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRequestSettings {
    /// nginx and Traefik call this path; Envoy's HTTP ext_authz appends the original
    /// path to it (`path_prefix`).
    #[serde(default = "default_auth_path")]
    pub path: String,
    /// Which headers describe the original request. They are trusted, so only the
    /// proxy may set them; a proxy passes the client's copies of the *other*
    /// convention's headers through untouched.
    #[serde(default)]
    pub original: OriginalFrom,
}

/// Where `/auth` reads the original request from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OriginalFrom {
    /// Whichever convention the proxy used: `X-Original-URL` (nginx), else
    /// `X-Forwarded-Uri` (Traefik, Envoy's HTTP mode as shipped), else the
    /// subrequest's own path below `path`. A subrequest carrying both is refused: one
    /// of them came from the client (nginx passes a client's `X-Forwarded-Uri` on,
    /// Traefik a client's `X-Original-URL`).
    #[default]
    Auto,
    /// Only `X-Original-URL` / `X-Original-Method` (nginx `auth_request`,
    /// ingress-nginx); the `X-Forwarded-*` headers are ignored.
    XOriginalUrl,
    /// Only `X-Forwarded-Method/Proto/Host/Uri` (Traefik `forwardAuth`, Caddy
    /// `forward_auth`, Envoy's HTTP ext_authz); `X-Original-*` is ignored.
    XForwarded,
}

fn default_auth_path() -> String {
    "/auth".into()
}

impl Default for AuthRequestSettings {
    fn default() -> Self {
        AuthRequestSettings {
            path: default_auth_path(),
            original: OriginalFrom::Auto,
        }
    }
}

/// The config provider. `file`: routes and consumers from this file plus Admin API
/// writes in `state_file`. `etcd`: every replica reads and watches the same etcd
/// prefix, and Admin API writes go there (docs/replicas.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    #[serde(default)]
    pub kind: StoreKind,
    /// `http://host:port` (or `https://` with `tls`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default)]
    pub username: Option<String>,
    /// May be `$env://NAME`.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub tls: Option<EtcdTls>,
    /// Seconds one etcd request (read, write, initial load) may take.
    #[serde(default = "default_store_timeout")]
    pub timeout: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    File,
    Etcd,
}

/// PEM files for etcd's TLS: `ca` to verify the server, `cert` + `key` for mTLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_prefix() -> String {
    "/portcullis".into()
}
fn default_store_timeout() -> f64 {
    5.0
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            kind: StoreKind::File,
            endpoints: Vec::new(),
            prefix: default_prefix(),
            username: None,
            password: None,
            tls: None,
            timeout: default_store_timeout(),
        }
    }
}

/// What happens to a request no route matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// 404 `{"message":"404 Route Not Found"}`, as APISIX answers.
    #[default]
    Deny,
    /// Pass through untouched (identity headers are still scrubbed).
    Allow,
}

/// A config file error, located as precisely as the parser allows.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: at `{path}`: {reason}")]
    Invalid {
        file: String,
        path: String,
        reason: String,
    },
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<(Self, String), ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Ok((Self::parse(&text, &file)?, text))
    }

    /// Parses YAML or JSON text (`read_json_or_yaml`); `file` names the source in
    /// errors. A `.json` file is JSON only. APISIX's standalone mode takes both formats.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let mut config: FileConfig =
            read_json_or_yaml(text, file.ends_with(".json")).map_err(|e| ConfigError::Invalid {
                file: file.to_owned(),
                path: if e.path == "." {
                    "(top level)".into()
                } else {
                    e.path
                },
                reason: e.reason,
            })?;
        if let Some(key) = &mut config.admin.api_key {
            let mut v = Value::String(std::mem::take(key));
            resolve_env(&mut v).map_err(|reason| ConfigError::Invalid {
                file: file.to_owned(),
                path: "admin.api_key".into(),
                reason: reason.to_string(),
            })?;
            *key = v.as_str().unwrap_or_default().to_owned();
            if key.is_empty() {
                config.admin.api_key = None;
            }
        }
        config.check_store(file)?;
        Ok(config)
    }

    /// With etcd, etcd is the only source of resources: a file that also declared
    /// some would leave two truths, so it is refused rather than merged.
    fn check_store(&mut self, file: &str) -> Result<(), ConfigError> {
        let invalid = |path: &str, reason: String| ConfigError::Invalid {
            file: file.to_owned(),
            path: path.to_owned(),
            reason,
        };
        let store = &mut self.store;
        if store.kind == StoreKind::File {
            if !store.endpoints.is_empty() {
                return Err(invalid(
                    "store.endpoints",
                    "endpoints are only used with `kind: etcd`".into(),
                ));
            }
            return Ok(());
        }
        if store.endpoints.is_empty() {
            return Err(invalid(
                "store.endpoints",
                "`kind: etcd` needs at least one endpoint, e.g. http://127.0.0.1:2379".into(),
            ));
        }
        if !store.prefix.starts_with('/') || store.prefix.ends_with('/') {
            return Err(invalid(
                "store.prefix",
                format!(
                    "{:?}: expected an absolute key prefix without a trailing slash, e.g. /portcullis",
                    store.prefix
                ),
            ));
        }
        if !(store.timeout > 0.0 && store.timeout.is_finite()) {
            return Err(invalid("store.timeout", "expected seconds > 0".into()));
        }
        if store.password.is_some() != store.username.is_some() {
            return Err(invalid(
                "store.username",
                "username and password go together".into(),
            ));
        }
        if let Some(pw) = &mut store.password {
            let mut v = Value::String(std::mem::take(pw));
            resolve_env(&mut v).map_err(|e| invalid("store.password", e.to_string()))?;
            *pw = v.as_str().unwrap_or_default().to_owned();
        }
        if let Some(tls) = &store.tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            return Err(invalid(
                "store.tls",
                "cert and key go together (client certificate)".into(),
            ));
        }
        if !self.routes.is_empty() || !self.consumers.is_empty() {
            return Err(invalid(
                if self.routes.is_empty() {
                    "consumers"
                } else {
                    "routes"
                },
                "with `store.kind: etcd` routes and consumers live in etcd: write them \
                 through the Admin API (this file may not declare any)"
                    .into(),
            ));
        }
        if self.state_file.is_some() {
            return Err(invalid(
                "state_file",
                "with `store.kind: etcd` Admin API writes go to etcd; remove state_file".into(),
            ));
        }
        Ok(())
    }

    /// The state file, relative paths taken from the config file's directory.
    pub fn state_path(&self, config_path: Option<&Path>) -> Option<PathBuf> {
        let dir = config_path.and_then(Path::parent).map(Path::to_path_buf);
        match (&self.state_file, dir) {
            (Some(p), _) if p.is_absolute() => Some(p.clone()),
            (Some(p), Some(dir)) => Some(dir.join(p)),
            (Some(p), None) => Some(p.clone()),
            (None, Some(dir)) => Some(dir.join("portcullis-state.yaml")),
            (None, None) => None,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("environment variable {0} is not set (referenced as $env://{0})")]
    Unset(String),
}

/// Where a config or state file does not read as the type it must be.
#[derive(Debug)]
pub struct ReadError {
    /// The field (`routes[0].uri`), `.` for the document itself.
    pub path: String,
    pub reason: String,
}

impl<E: std::fmt::Display> From<serde_path_to_error::Error<E>> for ReadError {
    fn from(e: serde_path_to_error::Error<E>) -> Self {
        ReadError {
            path: e.path().to_string(),
            reason: e.into_inner().to_string(),
        }
    }
}

/// Reads JSON with serde_json when `text` is a JSON object (or `json_only`), YAML
/// otherwise: a top-level entry or list item at a time where it can
/// ([`crate::yaml::read_in_pieces`]), else whole with serde_yaml, which also reports
/// every error. Text that starts like JSON but is not (a YAML flow mapping,
/// `{listen: ...}`) is read as YAML unless `json_only`.
pub fn read_json_or_yaml<T: DeserializeOwned>(text: &str, json_only: bool) -> Result<T, ReadError> {
    if json_only || text.trim_start().starts_with('{') {
        let mut de = serde_json::Deserializer::from_str(text);
        match serde_path_to_error::deserialize(&mut de) {
            Ok(value) => match de.end() {
                Ok(()) => return Ok(value),
                Err(e) if json_only => {
                    return Err(ReadError {
                        path: ".".into(),
                        reason: e.to_string(),
                    });
                }
                Err(_) => {}
            },
            Err(e) if !json_only && e.inner().is_syntax() => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(value) = crate::yaml::read_in_pieces(text) {
        return Ok(value);
    }
    Ok(serde_path_to_error::deserialize(
        serde_yaml::Deserializer::from_str(text),
    )?)
}

/// Replaces every string of the form `$env://NAME` inside `value` with the
/// variable's value, as APISIX's secret references do. Stored specs keep the
/// reference, so secrets never reach the state file or Admin API answers.
pub fn resolve_env(value: &mut Value) -> Result<(), EnvError> {
    match value {
        Value::String(s) => {
            if let Some(name) = s.strip_prefix("$env://") {
                *s = std::env::var(name).map_err(|_| EnvError::Unset(name.to_owned()))?;
            }
        }
        Value::Array(items) => items.iter_mut().try_for_each(resolve_env)?,
        Value::Object(map) => map.values_mut().try_for_each(resolve_env)?,
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses_with_no_routes_and_no_admin() {
        let c = FileConfig::parse(DEFAULT_CONFIG, "default").unwrap();
        assert_eq!(c.listen.grpc, default_grpc());
        assert_eq!(c.listen.http, default_http());
        assert!(c.admin.api_key.is_none());
        assert!(c.routes.is_empty());
        assert_eq!(c.unmatched, Unmatched::Deny);
    }

    #[test]
    fn errors_name_the_path() {
        let err =
            FileConfig::parse("listen: { grpc: 127.0.0.1:1 }\nroutez: []\n", "p.yaml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("p.yaml: at `routez`"), "{msg}");
        assert!(msg.contains("unknown field `routez`"), "{msg}");
        let err =
            FileConfig::parse("routes:\n  - uri: /a\n    methodz: [GET]\n", "p.yaml").unwrap_err();
        assert!(err.to_string().contains("routes[0]"), "{err}");
        let err = FileConfig::parse("listen: { grpc: nope }\n", "p.yaml").unwrap_err();
        assert!(err.to_string().contains("listen.grpc"), "{err}");
    }

    #[test]
    fn auth_request_names_the_proxys_headers() {
        let c = FileConfig::parse("auth_request: { original: x-forwarded }\n", "p.yaml").unwrap();
        assert_eq!(c.auth_request.original, OriginalFrom::XForwarded);
        let c =
            FileConfig::parse("auth_request: { original: x-original-url }\n", "p.yaml").unwrap();
        assert_eq!(c.auth_request.original, OriginalFrom::XOriginalUrl);
        let c = FileConfig::parse("auth_request: { path: /a }\n", "p.yaml").unwrap();
        assert_eq!(c.auth_request.original, OriginalFrom::Auto);
        let err = FileConfig::parse("auth_request: { original: nginx }\n", "p.yaml").unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("auth_request.original") && err.contains("x-forwarded"),
            "{err}"
        );
    }

    #[test]
    fn json_configs_read_as_their_yaml_does() {
        for path in ["examples/portcullis.yaml", "src/default-config.yaml"] {
            let yaml = std::fs::read_to_string(path)
                .unwrap()
                .replace("$env://ADMIN_API_KEY", "a-literal-key");
            let from_yaml = FileConfig::parse(&yaml, path).unwrap();
            let value: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
            let json = serde_json::to_string_pretty(&value).unwrap();
            for name in ["c.json", "c.conf"] {
                let from_json = FileConfig::parse(&json, name).unwrap();
                assert_eq!(format!("{from_json:?}"), format!("{from_yaml:?}"), "{path}");
            }
        }
        // A YAML flow mapping is not JSON, and is still read as YAML...
        let c = FileConfig::parse("{listen: {grpc_threads: 2}}", "c.yaml").unwrap();
        assert_eq!(c.listen.grpc_threads.map(NonZeroUsize::get), Some(2));
        // ...but not from a file named .json, whose errors are JSON's.
        let err = FileConfig::parse("{listen: {}}", "c.json").unwrap_err();
        assert!(err.to_string().contains("key must be a string"), "{err}");
        let err = FileConfig::parse(r#"{"routes": []} x"#, "c.json").unwrap_err();
        assert!(err.to_string().contains("trailing characters"), "{err}");
        // Schema errors name the path, as with YAML.
        let err = FileConfig::parse(r#"{"routes": [{"uri": "/a", "methodz": []}]}"#, "c.conf")
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("c.conf: at `routes[0]"), "{msg}");
        assert!(msg.contains("methodz"), "{msg}");
    }

    #[test]
    fn grpc_threads_default_to_the_cpus_and_zero_is_refused() {
        let c = FileConfig::parse("{}", "x").unwrap();
        assert_eq!(c.listen.grpc_threads, None);
        let c = FileConfig::parse("listen: { grpc_threads: 3 }", "x").unwrap();
        assert_eq!(c.listen.grpc_threads.map(NonZeroUsize::get), Some(3));
        let err = FileConfig::parse("listen: { grpc_threads: 0 }", "p.yaml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("listen.grpc_threads"), "{msg}");
        assert!(msg.contains("nonzero"), "{msg}");
    }

    #[test]
    fn env_references_resolve_and_missing_ones_fail() {
        // SAFETY of the test: a name no other test uses.
        let mut v = serde_json::json!({"a": ["$env://PORTCULLIS_TEST_UNSET_VAR"]});
        assert_eq!(
            resolve_env(&mut v),
            Err(EnvError::Unset("PORTCULLIS_TEST_UNSET_VAR".into()))
        );
        let mut v = serde_json::json!({"a": "$env://PATH", "b": 1});
        resolve_env(&mut v).unwrap();
        assert_eq!(v["a"], Value::String(std::env::var("PATH").unwrap()));
    }

    #[test]
    fn etcd_store_refuses_a_second_source_of_resources() {
        let c = FileConfig::parse("{}", "x").unwrap();
        assert_eq!(c.store.kind, StoreKind::File);
        let c = FileConfig::parse(
            "store: { kind: etcd, endpoints: [http://127.0.0.1:2379] }",
            "x",
        )
        .unwrap();
        assert_eq!(c.store.prefix, "/portcullis");
        assert_eq!(c.store.timeout, 5.0);
        let err = FileConfig::parse("store: { kind: etcd }", "x").unwrap_err();
        assert!(err.to_string().contains("store.endpoints"), "{err}");
        let err = FileConfig::parse(
            "store: { kind: etcd, endpoints: [http://e:2379] }\nroutes: [{ id: a, uri: /a }]",
            "x",
        )
        .unwrap_err();
        assert!(err.to_string().contains("live in etcd"), "{err}");
        let err = FileConfig::parse(
            "store: { kind: etcd, endpoints: [http://e:2379], prefix: /p/ }",
            "x",
        )
        .unwrap_err();
        assert!(err.to_string().contains("store.prefix"), "{err}");
    }

    #[test]
    fn state_file_defaults_beside_the_config() {
        let c = FileConfig::parse("{}", "x").unwrap();
        assert_eq!(
            c.state_path(Some(Path::new("/etc/p/c.yaml"))),
            Some(PathBuf::from("/etc/p/portcullis-state.yaml"))
        );
        let c = FileConfig::parse("state_file: s.yaml", "x").unwrap();
        assert_eq!(
            c.state_path(Some(Path::new("/etc/p/c.yaml"))),
            Some(PathBuf::from("/etc/p/s.yaml"))
        );
        assert_eq!(c.state_path(None), Some(PathBuf::from("s.yaml")));
    }
}
