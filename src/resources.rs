//! Routes, consumers and credentials in the JSON shapes APISIX's Admin API takes.
//!
//! The config file and the Admin API share these types, so a body that works with
//! `curl -X PUT .../apisix/admin/routes/1` also works as an entry under `routes:`.
//! Specs are the stored form (echoed back by GET); compiling them into the runtime
//! types of `snapshot` happens once, in `snapshot::compile_*`.
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::store::Compact;

/// APISIX's id pattern (`^[a-zA-Z0-9-_.]+$`, at most 64 characters).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// APISIX's limit on a consumer's username (its schema's `maxLength`).
const MAX_USERNAME: usize = 100;

/// APISIX's consumer username pattern (`^[a-zA-Z0-9_\-]+$`, at most 100 characters).
pub fn valid_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USERNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

/// APISIX accepts ids as strings or integers (`"id": 1`).
fn id_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(u64),
    }
    Ok(Option::<Id>::deserialize(d)?.map(|id| match id {
        Id::S(s) => s,
        Id::N(n) => n.to_string(),
    }))
}

pub type PluginMap = BTreeMap<String, Value>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::upper_case_acronyms)]
pub enum HttpMethod {
    GET,
    POST,
    PUT,
    DELETE,
    PATCH,
    HEAD,
    OPTIONS,
    CONNECT,
    TRACE,
    PURGE,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::GET => "GET",
            HttpMethod::POST => "POST",
            HttpMethod::PUT => "PUT",
            HttpMethod::DELETE => "DELETE",
            HttpMethod::PATCH => "PATCH",
            HttpMethod::HEAD => "HEAD",
            HttpMethod::OPTIONS => "OPTIONS",
            HttpMethod::CONNECT => "CONNECT",
            HttpMethod::TRACE => "TRACE",
            HttpMethod::PURGE => "PURGE",
        }
    }
}

/// An APISIX route. Fields that configure proxying (`upstream`, `upstream_id`,
/// `service_id`, `timeout`, `enable_websocket`) are accepted so existing bodies load,
/// and ignored: under ext_authz Envoy owns the upstream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    #[serde(
        default,
        deserialize_with = "id_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uris: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<HttpMethod>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<PluginMap>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_websocket: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    /// Read from a body, the config file or etcd, never written out: a stored
    /// consumer's name is its key in the store, and every answer and etcd value adds
    /// it back from there (`layers::view`), as for a credential's id. A copy in each
    /// stored spec was 1.5–3 MiB at 100k consumers. Required all the same: the Admin
    /// API puts the path's name in the body, the config file's reader and etcd's
    /// mirror refuse a consumer without one.
    #[serde(default, skip_serializing)]
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<PluginMap>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    /// Read from a body or the config file, never written out: a stored credential's
    /// id is its key in the store, and every answer and etcd value adds it back from
    /// there (`layers::view`). A copy in each stored spec was 3 MiB at 100k.
    #[serde(default, deserialize_with = "id_string", skip_serializing)]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub plugins: PluginMap,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<i64>,
}

/// A consumer as written in the config file: the Admin API body plus its
/// credentials inline (the Admin API manages them under `/credentials`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumerEntry {
    #[serde(flatten)]
    pub consumer: ConsumerSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<CredentialSpec>,
}

/// A config file's consumer, turned into the compact form the store keeps as soon
/// as it is read. A parsed entry is maps of maps (≈ 1.5 KB with a credential); with
/// 100k consumers the parsed list alone was ≈ 155 MB at the peak of startup, all
/// of it copied into compact specs right after.
#[derive(Debug, Clone)]
pub struct FileConsumer {
    pub username: String,
    pub spec: Compact<ConsumerSpec>,
    pub credentials: Vec<FileCredential>,
}

#[derive(Debug, Clone)]
pub struct FileCredential {
    /// Kept beside the spec: a stored credential's id is its key (`CredentialSpec::id`).
    pub id: Option<String>,
    pub spec: Compact<CredentialSpec>,
}

impl<'de> Deserialize<'de> for FileConsumer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entry = ConsumerEntry::deserialize(d)?;
        if entry.consumer.username.is_empty() {
            return Err(serde::de::Error::missing_field("username"));
        }
        Ok(FileConsumer {
            spec: Compact::new(&entry.consumer),
            username: entry.consumer.username,
            // Into a new vector: `collect` would reuse the parsed one's allocation,
            // sized for four parsed credentials (640 bytes kept per consumer).
            credentials: {
                let mut out = Vec::with_capacity(entry.credentials.len());
                out.extend(entry.credentials.into_iter().map(|cred| FileCredential {
                    spec: Compact::new(&cred),
                    id: cred.id,
                }));
                out
            },
        })
    }
}

/// A schema error with the path of the offending field, as the Admin API's
/// `error_msg` and `portcullis validate` report it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {reason}")]
pub struct SpecError {
    pub path: String,
    pub reason: String,
}

impl SpecError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        SpecError {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl RouteSpec {
    /// Checks APISIX's route rules that serde cannot express.
    pub fn check(&self) -> Result<(), SpecError> {
        if let Some(id) = &self.id
            && !valid_id(id)
        {
            return Err(SpecError::new(
                "id",
                format!("{id:?} does not match ^[a-zA-Z0-9-_.]{{1,64}}$"),
            ));
        }
        match (&self.uri, &self.uris) {
            (None, None) => return Err(SpecError::new("uri", "a route needs \"uri\" or \"uris\"")),
            (Some(_), Some(_)) => {
                return Err(SpecError::new(
                    "uris",
                    "set either \"uri\" or \"uris\", not both",
                ));
            }
            _ => {}
        }
        for (i, uri) in self
            .uri
            .iter()
            .chain(self.uris.iter().flatten())
            .enumerate()
        {
            if !uri.starts_with('/') {
                let at = if self.uri.is_some() {
                    "uri".to_string()
                } else {
                    format!("uris[{i}]")
                };
                return Err(SpecError::new(at, format!("{uri:?} must start with \"/\"")));
            }
        }
        if let Some(uris) = &self.uris
            && uris.is_empty()
        {
            return Err(SpecError::new("uris", "must not be empty"));
        }
        if self.host.is_some() && self.hosts.is_some() {
            return Err(SpecError::new(
                "hosts",
                "set either \"host\" or \"hosts\", not both",
            ));
        }
        for (i, host) in self
            .host
            .iter()
            .chain(self.hosts.iter().flatten())
            .enumerate()
        {
            if !valid_host_pattern(host) {
                let at = if self.host.is_some() {
                    "host".to_string()
                } else {
                    format!("hosts[{i}]")
                };
                return Err(SpecError::new(
                    at,
                    format!("{host:?} is not a host name or a *.wildcard"),
                ));
            }
        }
        if let Some(status) = self.status
            && status > 1
        {
            return Err(SpecError::new(
                "status",
                "must be 0 (disabled) or 1 (enabled)",
            ));
        }
        if self.create_time.is_some() || self.update_time.is_some() {
            return Err(SpecError::new(
                "create_time",
                "create_time and update_time are set by the server",
            ));
        }
        Ok(())
    }
}

impl ConsumerSpec {
    pub fn check(&self) -> Result<(), SpecError> {
        if !valid_username(&self.username) {
            let why = if self.username.len() > MAX_USERNAME {
                format!("is longer than {MAX_USERNAME} characters")
            } else {
                "does not match ^[a-zA-Z0-9_\\-]+$".to_owned()
            };
            return Err(SpecError::new(
                "username",
                format!("{:?} {why}", self.username),
            ));
        }
        if self.create_time.is_some() || self.update_time.is_some() {
            return Err(SpecError::new(
                "create_time",
                "create_time and update_time are set by the server",
            ));
        }
        Ok(())
    }
}

impl CredentialSpec {
    pub fn check(&self) -> Result<(), SpecError> {
        if let Some(id) = &self.id
            && !valid_id(id)
        {
            return Err(SpecError::new(
                "id",
                format!("{id:?} does not match ^[a-zA-Z0-9-_.]{{1,64}}$"),
            ));
        }
        if self.plugins.len() != 1 {
            return Err(SpecError::new(
                "plugins",
                "a credential holds exactly one auth plugin (only supports auth type plugins in consumer credential)",
            ));
        }
        if self.create_time.is_some() || self.update_time.is_some() {
            return Err(SpecError::new(
                "create_time",
                "create_time and update_time are set by the server",
            ));
        }
        Ok(())
    }
}

/// `example.com` or `*.example.com`; letters, digits, `-`, `.`, optional port-free.
fn valid_host_pattern(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_ids_may_be_integers_and_envoy_fields_are_accepted() {
        let r: RouteSpec = serde_json::from_str(
            r#"{"id":1,"uri":"/a/*","upstream":{"type":"roundrobin","nodes":{"127.0.0.1:1980":1}},"plugins":{}}"#,
        )
        .unwrap();
        assert_eq!(r.id.as_deref(), Some("1"));
        r.check().unwrap();
    }

    #[test]
    fn unknown_route_fields_are_refused() {
        let err = serde_json::from_str::<RouteSpec>(r#"{"uri":"/","vars":[["arg_a","==","1"]]}"#)
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `vars`"), "{err}");
    }

    #[test]
    fn route_rules() {
        let r: RouteSpec = serde_json::from_str(r#"{"hosts":["*.a.com"]}"#).unwrap();
        assert_eq!(r.check().unwrap_err().path, "uri");
        let r: RouteSpec = serde_json::from_str(r#"{"uri":"x"}"#).unwrap();
        assert_eq!(r.check().unwrap_err().path, "uri");
        let r: RouteSpec = serde_json::from_str(r#"{"uri":"/x","status":3}"#).unwrap();
        assert_eq!(r.check().unwrap_err().path, "status");
        let r: RouteSpec = serde_json::from_str(r#"{"uri":"/x","hosts":["a b"]}"#).unwrap();
        assert_eq!(r.check().unwrap_err().path, "hosts[0]");
    }

    #[test]
    fn usernames_follow_apisix() {
        assert!(valid_username("jack_1-x"));
        assert!(!valid_username("jack.doe"));
        assert!(!valid_username(""));
        assert!(valid_username(&"a".repeat(100)));

        // The error names the rule that was broken.
        let spec = |name: &str| -> ConsumerSpec {
            serde_json::from_value(serde_json::json!({ "username": name })).unwrap()
        };
        let reason = |name: &str| spec(name).check().unwrap_err().reason;
        assert!(reason(&"a".repeat(101)).ends_with("is longer than 100 characters"));
        assert!(reason("jack.doe").ends_with("does not match ^[a-zA-Z0-9_\\-]+$"));
    }
}
