//! Where routes, consumers and credentials live, and how a change reaches Checks.
//!
//! Two layers: the config file (hot-reloaded) and the Admin API's writes, persisted
//! in `state_file`. The Admin layer wins for the ids it touches, including
//! deletions of file-declared resources (kept as tombstones), so a restart or a
//! file reload never resurrects what an operator removed or undoes what they wrote.
//!
//! Every change is serialised by one async lock: validate and compile → persist
//! (temp file, fsync, rename) → publish → acknowledge. Publishing is incremental: a
//! route write rebuilds only the route index; a consumer or credential write updates
//! its own entries in the shared concurrent maps.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{FileConfig, Unmatched};
use crate::plugins::BuildContext;
use crate::resources::{ConsumerSpec, CredentialSpec, RouteSpec, SpecError};
use crate::runtime::Runtime;
use crate::snapshot::{self, AuthKey, CompileError, Consumers, Route, Snapshot};

/// A stored resource with APISIX's bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored<T> {
    pub spec: T,
    pub create_time: i64,
    pub update_time: i64,
    pub created_index: u64,
    pub modified_index: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Resources {
    pub routes: BTreeMap<String, Stored<RouteSpec>>,
    pub consumers: BTreeMap<String, Stored<ConsumerSpec>>,
    /// Keyed by (username, credential id).
    #[serde(with = "credential_map")]
    pub credentials: CredentialMap,
}

/// JSON objects need string keys: credentials persist as `"user/id"`.
mod credential_map {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(map: &CredentialMap, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|((u, id), v)| (format!("{u}/{id}"), v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CredentialMap, D::Error> {
        let raw = BTreeMap::<String, Stored<CredentialSpec>>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                let (u, id) = k
                    .split_once('/')
                    .ok_or_else(|| serde::de::Error::custom(format!("bad credential key {k:?}")))?;
                Ok(((u.to_owned(), id.to_owned()), v))
            })
            .collect()
    }
}

pub type CredentialMap = BTreeMap<(String, String), Stored<CredentialSpec>>;

/// Deletions the Admin API made of file-declared resources.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tombstones {
    #[serde(default)]
    pub routes: BTreeSet<String>,
    #[serde(default)]
    pub consumers: BTreeSet<String>,
    /// `"user/id"`.
    #[serde(default)]
    pub credentials: BTreeSet<String>,
}

/// The state file: the Admin API layer. JSON, which is also valid YAML.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    index: u64,
    #[serde(flatten)]
    written: Resources,
    #[serde(default)]
    deleted: Tombstones,
}

/// Which resource a write addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceId {
    Route(String),
    Consumer(String),
    Credential(String, String),
}

impl ResourceId {
    /// The etcd-style key APISIX answers with.
    pub fn key(&self) -> String {
        match self {
            ResourceId::Route(id) => format!("/apisix/routes/{id}"),
            ResourceId::Consumer(u) => format!("/apisix/consumers/{u}"),
            ResourceId::Credential(u, id) => format!("/apisix/consumers/{u}/credentials/{id}"),
        }
    }
}

/// A write the store refused; the Admin API maps these to APISIX's answers.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("failed to persist the state file {file}: {source}")]
    Persist {
        file: String,
        source: std::io::Error,
    },
}

impl From<CompileError> for WriteError {
    fn from(e: CompileError) -> Self {
        WriteError::Invalid(e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: {error}")]
    Resource { file: String, error: String },
    #[error("state file {file}: {reason}")]
    StateFile { file: String, reason: String },
}

struct Inner {
    file: Resources,
    admin: StateFile,
    unmatched: Unmatched,
    routes: HashMap<String, Arc<Route>>,
    /// Which auth keys each consumer's inline plugins and each credential hold.
    consumer_keys: HashMap<String, Vec<AuthKey>>,
    credential_keys: HashMap<(String, String), AuthKey>,
    consumers: Arc<Consumers>,
}

pub struct Store {
    runtime: Arc<Runtime>,
    state_path: Option<PathBuf>,
    inner: tokio::sync::Mutex<Inner>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn file_layer(config: &FileConfig) -> Result<Resources, String> {
    let t = now();
    fn stored<T>(spec: T, t: i64) -> Stored<T> {
        Stored {
            spec,
            create_time: t,
            update_time: t,
            created_index: 0,
            modified_index: 0,
        }
    }
    let mut res = Resources::default();
    for (i, route) in config.routes.iter().enumerate() {
        let id = route.id.clone().ok_or_else(|| {
            format!("at `routes[{i}]`: a route in the config file needs an \"id\"")
        })?;
        if res
            .routes
            .insert(id.clone(), stored(route.clone(), t))
            .is_some()
        {
            return Err(format!("at `routes[{i}].id`: duplicate route id {id:?}"));
        }
    }
    for (i, entry) in config.consumers.iter().enumerate() {
        let name = entry.consumer.username.clone();
        if res
            .consumers
            .insert(name.clone(), stored(entry.consumer.clone(), t))
            .is_some()
        {
            return Err(format!(
                "at `consumers[{i}].username`: duplicate consumer {name:?}"
            ));
        }
        for (j, cred) in entry.credentials.iter().enumerate() {
            let id = cred.id.clone().ok_or_else(|| {
                format!("at `consumers[{i}].credentials[{j}]`: a credential needs an \"id\"")
            })?;
            if res
                .credentials
                .insert((name.clone(), id.clone()), stored(cred.clone(), t))
                .is_some()
            {
                return Err(format!(
                    "at `consumers[{i}].credentials[{j}].id`: duplicate credential id {id:?}"
                ));
            }
        }
    }
    Ok(res)
}

/// The resources in force: the file layer, minus tombstones, plus Admin writes.
fn effective(file: &Resources, admin: &StateFile) -> Resources {
    let mut res = file.clone();
    res.routes
        .retain(|id, _| !admin.deleted.routes.contains(id));
    res.consumers
        .retain(|u, _| !admin.deleted.consumers.contains(u));
    res.credentials.retain(|(u, id), _| {
        !admin.deleted.credentials.contains(&format!("{u}/{id}"))
            && !admin.deleted.consumers.contains(u)
    });
    res.routes.extend(admin.written.routes.clone());
    res.consumers.extend(admin.written.consumers.clone());
    res.credentials.extend(admin.written.credentials.clone());
    res.credentials
        .retain(|(u, _), _| res.consumers.contains_key(u));
    res
}

/// Everything compiled from a resource set, ready to publish.
struct Built {
    routes: HashMap<String, Arc<Route>>,
    consumers: Arc<Consumers>,
    consumer_keys: HashMap<String, Vec<AuthKey>>,
    credential_keys: HashMap<(String, String), AuthKey>,
}

fn duplicate_key(key: &AuthKey) -> String {
    format!(
        "duplicate {} key {:?}: keys must be unique across consumers and credentials",
        key.0, key.1
    )
}

fn build(res: &Resources, cx: &BuildContext<'_>) -> Result<Built, String> {
    let mut routes = HashMap::new();
    for (id, r) in &res.routes {
        let route = snapshot::compile_route(id, &r.spec, cx)
            .map_err(|e| format!("at `routes[id={id}].{}`: {e}", e.path()))?;
        routes.insert(id.clone(), Arc::new(route));
    }
    let consumers = Consumers::default();
    let mut consumer_keys = HashMap::new();
    let mut credential_keys = HashMap::new();
    for (name, c) in &res.consumers {
        let compiled = snapshot::compile_consumer(&c.spec, cx)
            .map_err(|e| format!("at `consumers[username={name}].{}`: {e}", e.path()))?;
        let mut keys = Vec::new();
        for (key, cred) in compiled.inline_credentials {
            if consumers.by_key.insert(key.clone(), cred).is_some() {
                return Err(format!(
                    "at `consumers[username={name}].plugins`: {}",
                    duplicate_key(&key)
                ));
            }
            keys.push(key);
        }
        consumer_keys.insert(name.clone(), keys);
        consumers
            .by_name
            .insert(compiled.consumer.username.clone(), compiled.consumer);
    }
    for ((user, id), c) in &res.credentials {
        let (key, cred) = snapshot::compile_credential(user, id, &c.spec, cx).map_err(|e| {
            format!(
                "at `consumers[username={user}].credentials[id={id}].{}`: {e}",
                e.path()
            )
        })?;
        if consumers.by_key.insert(key.clone(), cred).is_some() {
            return Err(format!(
                "at `consumers[username={user}].credentials[id={id}]`: {}",
                duplicate_key(&key)
            ));
        }
        credential_keys.insert((user.clone(), id.clone()), key);
    }
    Ok(Built {
        routes,
        consumers: Arc::new(consumers),
        consumer_keys,
        credential_keys,
    })
}

/// Validates a whole config file without running anything (`portcullis validate`).
pub fn validate(config: &FileConfig, file: &str) -> Result<(), LoadError> {
    let shared = crate::plugins::Shared::default();
    let res = file_layer(config).map_err(|error| LoadError::Resource {
        file: file.to_owned(),
        error,
    })?;
    build(&res, &BuildContext { shared: &shared }).map_err(|error| LoadError::Resource {
        file: file.to_owned(),
        error,
    })?;
    Ok(())
}

impl Store {
    /// Loads the file layer and the state file, compiles everything and publishes
    /// the first snapshot.
    pub fn open(
        runtime: Arc<Runtime>,
        config: &FileConfig,
        file: &str,
        state_path: Option<PathBuf>,
    ) -> Result<Self, LoadError> {
        let admin = match &state_path {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p).map_err(|e| LoadError::StateFile {
                    file: p.display().to_string(),
                    reason: e.to_string(),
                })?;
                serde_yaml::from_str::<StateFile>(&text).map_err(|e| LoadError::StateFile {
                    file: p.display().to_string(),
                    reason: e.to_string(),
                })?
            }
            _ => StateFile {
                version: 1,
                ..Default::default()
            },
        };
        let file_res = file_layer(config).map_err(|error| LoadError::Resource {
            file: file.to_owned(),
            error,
        })?;
        let built = build(
            &effective(&file_res, &admin),
            &BuildContext {
                shared: &runtime.shared,
            },
        )
        .map_err(|error| LoadError::Resource {
            file: file.to_owned(),
            error,
        })?;
        let inner = Inner {
            file: file_res,
            admin,
            unmatched: config.unmatched,
            routes: HashMap::new(),
            consumer_keys: HashMap::new(),
            credential_keys: HashMap::new(),
            consumers: Arc::new(Consumers::default()),
        };
        let store = Store {
            runtime,
            state_path,
            inner: tokio::sync::Mutex::new(inner),
        };
        let mut inner = store
            .inner
            .try_lock()
            .expect("no one else holds a new store");
        store.install(&mut inner, built);
        drop(inner);
        Ok(store)
    }

    fn install(&self, inner: &mut Inner, built: Built) {
        inner.routes = built.routes;
        inner.consumers = built.consumers;
        inner.consumer_keys = built.consumer_keys;
        inner.credential_keys = built.credential_keys;
        self.publish_routes(inner);
    }

    fn publish_routes(&self, inner: &Inner) {
        let router = crate::router::Router::new(inner.routes.values().cloned());
        self.runtime.publish(Snapshot {
            router,
            consumers: inner.consumers.clone(),
            unmatched: inner.unmatched,
        });
    }

    /// Replaces the file layer after the config file changed. On error nothing
    /// changes: the last good snapshot keeps serving.
    pub async fn reload_file(&self, config: &FileConfig, file: &str) -> Result<(), LoadError> {
        let mut inner = self.inner.lock().await;
        let file_res = file_layer(config).map_err(|error| LoadError::Resource {
            file: file.to_owned(),
            error,
        })?;
        let built = build(
            &effective(&file_res, &inner.admin),
            &BuildContext {
                shared: &self.runtime.shared,
            },
        )
        .map_err(|error| LoadError::Resource {
            file: file.to_owned(),
            error,
        })?;
        inner.file = file_res;
        inner.unmatched = config.unmatched;
        self.install(&mut inner, built);
        Ok(())
    }

    fn persist(&self, state: &StateFile) -> Result<(), WriteError> {
        let Some(path) = &self.state_path else {
            return Ok(());
        };
        let err = |source| WriteError::Persist {
            file: path.display().to_string(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
        serde_json::to_writer_pretty(&mut tmp, state).map_err(|e| err(e.into()))?;
        tmp.write_all(b"\n").map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(path).map_err(|e| err(e.error))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads one resource as the Admin API shows it.
    pub async fn get(&self, id: &ResourceId) -> Option<(Value, u64, u64)> {
        let inner = self.inner.lock().await;
        let res = effective(&inner.file, &inner.admin);
        match id {
            ResourceId::Route(k) => res.routes.get(k).map(|s| view(s, Some(k))),
            ResourceId::Consumer(k) => res.consumers.get(k).map(|s| view(s, None)),
            ResourceId::Credential(u, k) => res
                .credentials
                .get(&(u.clone(), k.clone()))
                .map(|s| view(s, Some(k))),
        }
    }

    /// Lists routes, consumers, or one consumer's credentials.
    pub async fn list(&self, kind: ListKind<'_>) -> Vec<(ResourceId, Value, u64, u64)> {
        let inner = self.inner.lock().await;
        let res = effective(&inner.file, &inner.admin);
        let tag = |id: ResourceId, (v, c, m): (Value, u64, u64)| (id, v, c, m);
        match kind {
            ListKind::Routes => res
                .routes
                .iter()
                .map(|(k, s)| tag(ResourceId::Route(k.clone()), view(s, Some(k))))
                .collect(),
            ListKind::Consumers => res
                .consumers
                .iter()
                .map(|(k, s)| tag(ResourceId::Consumer(k.clone()), view(s, None)))
                .collect(),
            ListKind::Credentials(user) => res
                .credentials
                .iter()
                .filter(|((u, _), _)| u == user)
                .map(|((u, k), s)| {
                    tag(
                        ResourceId::Credential(u.clone(), k.clone()),
                        view(s, Some(k)),
                    )
                })
                .collect(),
        }
    }

    pub async fn consumer_exists(&self, username: &str) -> bool {
        let inner = self.inner.lock().await;
        effective(&inner.file, &inner.admin)
            .consumers
            .contains_key(username)
    }

    /// Creates or replaces a resource. Returns (created, stored value).
    pub async fn put(&self, id: ResourceId, body: Value) -> Result<(bool, Value), WriteError> {
        let mut inner = self.inner.lock().await;
        let current = effective(&inner.file, &inner.admin);
        let cx = BuildContext {
            shared: &self.runtime.shared,
        };
        let t = now();
        let index = inner.admin.index + 1;
        let mut next = inner.admin.clone();
        next.index = index;
        let created;
        let value;
        let apply: Box<dyn FnOnce(&mut Inner) + Send> = match &id {
            ResourceId::Route(rid) => {
                let mut spec: RouteSpec = parse(body)?;
                spec.id = Some(rid.clone());
                let route = Arc::new(snapshot::compile_route(rid, &spec, &cx)?);
                let old = current.routes.get(rid);
                created = old.is_none();
                let stored = restamp(spec, old, t, index);
                value = view(&stored, Some(rid)).0;
                next.deleted.routes.remove(rid);
                next.written.routes.insert(rid.clone(), stored);
                let rid = rid.clone();
                Box::new(move |inner| {
                    inner.routes.insert(rid, route);
                })
            }
            ResourceId::Consumer(name) => {
                let spec: ConsumerSpec = parse(body)?;
                if spec.username != *name {
                    return Err(WriteError::Invalid(format!(
                        "invalid configuration: username: {:?} in the body does not match {:?} in the path",
                        spec.username, name
                    )));
                }
                let compiled = snapshot::compile_consumer(&spec, &cx)?;
                for (key, _) in &compiled.inline_credentials {
                    if let Some(other) = inner.consumers.by_key.get(key)
                        && &*other.username != name.as_str()
                    {
                        return Err(WriteError::Invalid(format!(
                            "invalid plugins configuration: {}",
                            duplicate_key(key)
                        )));
                    }
                }
                let old = current.consumers.get(name);
                created = old.is_none();
                let stored = restamp(spec, old, t, index);
                value = view(&stored, None).0;
                next.deleted.consumers.remove(name);
                next.written.consumers.insert(name.clone(), stored);
                let name = name.clone();
                Box::new(move |inner| {
                    for key in inner.consumer_keys.remove(&name).unwrap_or_default() {
                        inner.consumers.by_key.remove(&key);
                    }
                    let mut keys = Vec::new();
                    for (key, cred) in compiled.inline_credentials {
                        inner.consumers.by_key.insert(key.clone(), cred);
                        keys.push(key);
                    }
                    inner.consumer_keys.insert(name, keys);
                    inner
                        .consumers
                        .by_name
                        .insert(compiled.consumer.username.clone(), compiled.consumer);
                })
            }
            ResourceId::Credential(user, cid) => {
                if !current.consumers.contains_key(user) {
                    return Err(WriteError::NotFound("consumer not found".into()));
                }
                let mut spec: CredentialSpec = parse(body)?;
                spec.id = Some(cid.clone());
                let (key, cred) = snapshot::compile_credential(user, cid, &spec, &cx)?;
                if let Some(other) = inner.consumers.by_key.get(&key)
                    && !(&*other.username == user.as_str()
                        && other.credential_id.as_deref() == Some(cid.as_str()))
                {
                    return Err(WriteError::Invalid(format!(
                        "invalid plugins configuration: {}",
                        duplicate_key(&key)
                    )));
                }
                let ck = (user.clone(), cid.clone());
                let old = current.credentials.get(&ck);
                created = old.is_none();
                let stored = restamp(spec, old, t, index);
                value = view(&stored, Some(cid)).0;
                next.deleted.credentials.remove(&format!("{user}/{cid}"));
                next.written.credentials.insert(ck.clone(), stored);
                Box::new(move |inner| {
                    if let Some(old) = inner.credential_keys.remove(&ck) {
                        inner.consumers.by_key.remove(&old);
                    }
                    inner.consumers.by_key.insert(key.clone(), cred);
                    inner.credential_keys.insert(ck, key);
                })
            }
        };
        self.persist(&next)?;
        inner.admin = next;
        apply(&mut inner);
        if matches!(id, ResourceId::Route(_)) {
            self.publish_routes(&inner);
        }
        Ok((created, value))
    }

    /// Deletes a resource; deleting a consumer deletes its credentials.
    pub async fn delete(&self, id: &ResourceId) -> Result<(), WriteError> {
        let mut inner = self.inner.lock().await;
        let current = effective(&inner.file, &inner.admin);
        let mut next = inner.admin.clone();
        next.index += 1;
        match id {
            ResourceId::Route(rid) => {
                if !current.routes.contains_key(rid) {
                    return Err(WriteError::NotFound("Key not found".into()));
                }
                next.written.routes.remove(rid);
                if inner.file.routes.contains_key(rid) {
                    next.deleted.routes.insert(rid.clone());
                }
                self.persist(&next)?;
                inner.admin = next;
                inner.routes.remove(rid);
                self.publish_routes(&inner);
            }
            ResourceId::Consumer(name) => {
                if !current.consumers.contains_key(name) {
                    return Err(WriteError::NotFound("Key not found".into()));
                }
                next.written.consumers.remove(name);
                next.written.credentials.retain(|(u, _), _| u != name);
                next.deleted
                    .credentials
                    .retain(|k| !k.starts_with(&format!("{name}/")));
                if inner.file.consumers.contains_key(name) {
                    next.deleted.consumers.insert(name.clone());
                }
                self.persist(&next)?;
                inner.admin = next;
                for key in inner.consumer_keys.remove(name).unwrap_or_default() {
                    inner.consumers.by_key.remove(&key);
                }
                let creds: Vec<_> = inner
                    .credential_keys
                    .keys()
                    .filter(|(u, _)| u == name)
                    .cloned()
                    .collect();
                for ck in creds {
                    if let Some(key) = inner.credential_keys.remove(&ck) {
                        inner.consumers.by_key.remove(&key);
                    }
                }
                inner.consumers.by_name.remove(name.as_str());
            }
            ResourceId::Credential(user, cid) => {
                let ck = (user.clone(), cid.clone());
                if !current.credentials.contains_key(&ck) {
                    return Err(WriteError::NotFound("Key not found".into()));
                }
                next.written.credentials.remove(&ck);
                if inner.file.credentials.contains_key(&ck) {
                    next.deleted.credentials.insert(format!("{user}/{cid}"));
                }
                self.persist(&next)?;
                inner.admin = next;
                if let Some(key) = inner.credential_keys.remove(&ck) {
                    inner.consumers.by_key.remove(&key);
                }
            }
        }
        Ok(())
    }
}

pub enum ListKind<'a> {
    Routes,
    Consumers,
    Credentials(&'a str),
}

fn parse<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, WriteError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!("{path}: ")
        };
        WriteError::Invalid(format!("invalid configuration: {at}{}", e.into_inner()))
    })
}

fn restamp<T>(spec: T, old: Option<&Stored<T>>, t: i64, index: u64) -> Stored<T> {
    Stored {
        spec,
        create_time: old.map_or(t, |o| o.create_time),
        update_time: t,
        created_index: old.map_or(index, |o| o.created_index),
        modified_index: index,
    }
}

/// The `value` APISIX shows: the spec with its id and times.
fn view<T: Serialize>(s: &Stored<T>, id: Option<&String>) -> (Value, u64, u64) {
    let mut v = serde_json::to_value(&s.spec).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        if let Some(id) = id {
            map.insert("id".into(), Value::String(id.clone()));
        }
        map.insert("create_time".into(), s.create_time.into());
        map.insert("update_time".into(), s.update_time.into());
    }
    (v, s.created_index, s.modified_index)
}

impl From<SpecError> for WriteError {
    fn from(e: SpecError) -> Self {
        WriteError::Invalid(format!("invalid configuration: {e}"))
    }
}
