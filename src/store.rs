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

/// (username, credential id).
pub type CredentialKey = (String, String);
pub type CredentialMap = BTreeMap<CredentialKey, Stored<CredentialSpec>>;

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
        match id {
            ResourceId::Route(k) => inner.route(k).map(|s| view(s, Some(k))),
            ResourceId::Consumer(k) => inner.consumer(k).map(|s| view(s, None)),
            ResourceId::Credential(u, k) => inner.credential(u, k).map(|s| view(s, Some(k))),
        }
    }

    /// Lists routes, consumers, or one consumer's credentials, ordered by id.
    pub async fn list(&self, kind: ListKind<'_>) -> Vec<(ResourceId, Value, u64, u64)> {
        let inner = self.inner.lock().await;
        let tag = |id: ResourceId, (v, c, m): (Value, u64, u64)| (id, v, c, m);
        match kind {
            ListKind::Routes => layered(&inner.file.routes, &inner.admin.written.routes, |k| {
                inner.admin.deleted.routes.contains(k)
            })
            .map(|(k, s)| tag(ResourceId::Route(k.clone()), view(s, Some(k))))
            .collect(),
            ListKind::Consumers => {
                layered(&inner.file.consumers, &inner.admin.written.consumers, |k| {
                    inner.admin.deleted.consumers.contains(k)
                })
                .map(|(k, s)| tag(ResourceId::Consumer(k.clone()), view(s, None)))
                .collect()
            }
            ListKind::Credentials(user) => {
                if inner.consumer(user).is_none() {
                    return Vec::new();
                }
                let range = (user.to_owned(), String::new())..;
                let from_file = inner
                    .file
                    .credentials
                    .range(range.clone())
                    .take_while(|((u, _), _)| u == user);
                let written = inner
                    .admin
                    .written
                    .credentials
                    .range(range)
                    .take_while(|((u, _), _)| u == user);
                let mut merged: BTreeMap<&(String, String), &Stored<CredentialSpec>> = from_file
                    .filter(|((u, id), _)| {
                        !inner
                            .admin
                            .deleted
                            .credentials
                            .contains(&format!("{u}/{id}"))
                    })
                    .collect();
                merged.extend(written);
                merged
                    .into_iter()
                    .map(|((u, k), s)| {
                        tag(
                            ResourceId::Credential(u.clone(), k.clone()),
                            view(s, Some(k)),
                        )
                    })
                    .collect()
            }
        }
    }

    pub async fn consumer_exists(&self, username: &str) -> bool {
        self.inner.lock().await.consumer(username).is_some()
    }

    /// Creates or replaces a resource. Returns (created, stored value).
    pub async fn put(&self, id: ResourceId, body: Value) -> Result<(bool, Value), WriteError> {
        let mut inner = self.inner.lock().await;
        let cx = BuildContext {
            shared: &self.runtime.shared,
        };
        let t = now();
        let index = inner.admin.index + 1;
        let undo = Undo::of(&inner.admin);
        let created;
        let value;
        let apply: Box<dyn FnOnce(&mut Inner) + Send> = match &id {
            ResourceId::Route(rid) => {
                let mut spec: RouteSpec = parse(body)?;
                spec.id = Some(rid.clone());
                let route = Arc::new(snapshot::compile_route(rid, &spec, &cx)?);
                let old = inner.route(rid).cloned();
                created = old.is_none();
                let stored = restamp(spec, old.as_ref(), t, index);
                value = view(&stored, Some(rid)).0;
                let undo = undo.route(&inner.admin, rid);
                inner.admin.deleted.routes.remove(rid);
                inner.admin.written.routes.insert(rid.clone(), stored);
                self.commit(&mut inner, index, undo)?;
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
                let old = inner.consumer(name).cloned();
                created = old.is_none();
                let stored = restamp(spec, old.as_ref(), t, index);
                value = view(&stored, None).0;
                let undo = undo.consumer(&inner.admin, name);
                inner.admin.deleted.consumers.remove(name);
                inner.admin.written.consumers.insert(name.clone(), stored);
                self.commit(&mut inner, index, undo)?;
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
                if inner.consumer(user).is_none() {
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
                let old = inner.credential(user, cid).cloned();
                created = old.is_none();
                let stored = restamp(spec, old.as_ref(), t, index);
                value = view(&stored, Some(cid)).0;
                let undo = undo.credential(&inner.admin, &ck);
                inner
                    .admin
                    .deleted
                    .credentials
                    .remove(&format!("{user}/{cid}"));
                inner.admin.written.credentials.insert(ck.clone(), stored);
                self.commit(&mut inner, index, undo)?;
                Box::new(move |inner| {
                    if let Some(old) = inner.credential_keys.remove(&ck) {
                        inner.consumers.by_key.remove(&old);
                    }
                    inner.consumers.by_key.insert(key.clone(), cred);
                    inner.credential_keys.insert(ck, key);
                })
            }
        };
        apply(&mut inner);
        if matches!(id, ResourceId::Route(_)) {
            self.publish_routes(&inner);
        }
        Ok((created, value))
    }

    /// Persists the Admin layer as edited in place; on failure puts back what
    /// `undo` recorded, so memory never runs ahead of the disk.
    fn commit(&self, inner: &mut Inner, index: u64, undo: Undo) -> Result<(), WriteError> {
        inner.admin.index = index;
        if let Err(e) = self.persist(&inner.admin) {
            undo.restore(&mut inner.admin);
            return Err(e);
        }
        Ok(())
    }

    /// Deletes a resource; deleting a consumer deletes its credentials.
    pub async fn delete(&self, id: &ResourceId) -> Result<(), WriteError> {
        let mut inner = self.inner.lock().await;
        let index = inner.admin.index + 1;
        let undo = Undo::of(&inner.admin);
        match id {
            ResourceId::Route(rid) => {
                if inner.route(rid).is_none() {
                    return Err(WriteError::NotFound("Key not found".into()));
                }
                let undo = undo.route(&inner.admin, rid);
                inner.admin.written.routes.remove(rid);
                if inner.file.routes.contains_key(rid) {
                    inner.admin.deleted.routes.insert(rid.clone());
                }
                self.commit(&mut inner, index, undo)?;
                inner.routes.remove(rid);
                self.publish_routes(&inner);
            }
            ResourceId::Consumer(name) => {
                if inner.consumer(name).is_none() {
                    return Err(WriteError::NotFound("Key not found".into()));
                }
                let creds: Vec<(String, String)> = inner
                    .credential_keys
                    .keys()
                    .filter(|(u, _)| u == name)
                    .cloned()
                    .collect();
                let mut undo = undo.consumer(&inner.admin, name);
                for ck in &creds {
                    undo = undo.credential(&inner.admin, ck);
                    inner.admin.written.credentials.remove(ck);
                    if inner.file.credentials.contains_key(ck) {
                        inner
                            .admin
                            .deleted
                            .credentials
                            .insert(format!("{}/{}", ck.0, ck.1));
                    }
                }
                inner.admin.written.consumers.remove(name);
                if inner.file.consumers.contains_key(name) {
                    inner.admin.deleted.consumers.insert(name.clone());
                }
                self.commit(&mut inner, index, undo)?;
                for key in inner.consumer_keys.remove(name).unwrap_or_default() {
                    inner.consumers.by_key.remove(&key);
                }
                for ck in creds {
                    if let Some(key) = inner.credential_keys.remove(&ck) {
                        inner.consumers.by_key.remove(&key);
                    }
                }
                inner.consumers.by_name.remove(name.as_str());
            }
            ResourceId::Credential(user, cid) => {
                let ck = (user.clone(), cid.clone());
                if inner.credential(user, cid).is_none() {
                    return Err(WriteError::NotFound("Key not found".into()));
                }
                let undo = undo.credential(&inner.admin, &ck);
                inner.admin.written.credentials.remove(&ck);
                if inner.file.credentials.contains_key(&ck) {
                    inner
                        .admin
                        .deleted
                        .credentials
                        .insert(format!("{user}/{cid}"));
                }
                self.commit(&mut inner, index, undo)?;
                if let Some(key) = inner.credential_keys.remove(&ck) {
                    inner.consumers.by_key.remove(&key);
                }
            }
        }
        Ok(())
    }
}

/// What an in-place edit of the Admin layer replaced, to put back if persisting fails.
struct Undo {
    index: u64,
    deleted: Tombstones,
    routes: Vec<(String, Option<Stored<RouteSpec>>)>,
    consumers: Vec<(String, Option<Stored<ConsumerSpec>>)>,
    credentials: Vec<(CredentialKey, Option<Stored<CredentialSpec>>)>,
}

impl Undo {
    fn of(admin: &StateFile) -> Self {
        Undo {
            index: admin.index,
            deleted: admin.deleted.clone(),
            routes: Vec::new(),
            consumers: Vec::new(),
            credentials: Vec::new(),
        }
    }

    fn route(mut self, admin: &StateFile, id: &str) -> Self {
        self.routes
            .push((id.to_owned(), admin.written.routes.get(id).cloned()));
        self
    }

    fn consumer(mut self, admin: &StateFile, name: &str) -> Self {
        self.consumers
            .push((name.to_owned(), admin.written.consumers.get(name).cloned()));
        self
    }

    fn credential(mut self, admin: &StateFile, ck: &(String, String)) -> Self {
        self.credentials
            .push((ck.clone(), admin.written.credentials.get(ck).cloned()));
        self
    }

    fn restore(self, admin: &mut StateFile) {
        fn put_back<K: Ord, V>(map: &mut BTreeMap<K, V>, entries: Vec<(K, Option<V>)>) {
            for (k, v) in entries.into_iter().rev() {
                match v {
                    Some(v) => map.insert(k, v),
                    None => map.remove(&k),
                };
            }
        }
        admin.index = self.index;
        admin.deleted = self.deleted;
        put_back(&mut admin.written.routes, self.routes);
        put_back(&mut admin.written.consumers, self.consumers);
        put_back(&mut admin.written.credentials, self.credentials);
    }
}

impl Inner {
    /// The route in force: an Admin write, else the file's unless deleted.
    fn route(&self, id: &str) -> Option<&Stored<RouteSpec>> {
        self.admin.written.routes.get(id).or_else(|| {
            (!self.admin.deleted.routes.contains(id))
                .then(|| self.file.routes.get(id))
                .flatten()
        })
    }

    fn consumer(&self, name: &str) -> Option<&Stored<ConsumerSpec>> {
        self.admin.written.consumers.get(name).or_else(|| {
            (!self.admin.deleted.consumers.contains(name))
                .then(|| self.file.consumers.get(name))
                .flatten()
        })
    }

    fn credential(&self, user: &str, id: &str) -> Option<&Stored<CredentialSpec>> {
        self.consumer(user)?;
        let ck = (user.to_owned(), id.to_owned());
        self.admin.written.credentials.get(&ck).or_else(|| {
            (!self
                .admin
                .deleted
                .credentials
                .contains(&format!("{user}/{id}")))
            .then(|| self.file.credentials.get(&ck))
            .flatten()
        })
    }
}

/// File entries not deleted, overlaid with Admin writes, in key order.
fn layered<'a, V>(
    file: &'a BTreeMap<String, V>,
    written: &'a BTreeMap<String, V>,
    deleted: impl Fn(&String) -> bool,
) -> impl Iterator<Item = (&'a String, &'a V)> {
    let mut merged: BTreeMap<&'a String, &'a V> =
        file.iter().filter(|(k, _)| !deleted(k)).collect();
    merged.extend(written.iter());
    merged.into_iter()
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(yaml: &str, state: Option<PathBuf>) -> (Arc<Runtime>, Store) {
        let runtime = Arc::new(Runtime::default());
        let config = FileConfig::parse(yaml, "test.yaml").unwrap();
        let store = Store::open(runtime.clone(), &config, "test.yaml", state).unwrap();
        (runtime, store)
    }

    const FILE: &str = "routes:\n  - { id: f1, uri: /f1 }\n  - { id: f2, uri: /f2 }\nconsumers:\n  - { username: alice }\n";

    #[tokio::test]
    async fn admin_writes_overlay_the_file_and_deletes_are_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.yaml");
        let (runtime, s) = store(FILE, Some(state.clone()));
        assert_eq!(runtime.snapshot().router.len(), 2);

        let (created, v) = s
            .put(ResourceId::Route("f1".into()), json!({"uri": "/changed"}))
            .await
            .unwrap();
        assert!(!created, "f1 exists in the file: this is an update");
        assert_eq!(v["uri"], "/changed");
        let (created, _) = s
            .put(ResourceId::Route("a1".into()), json!({"uri": "/a1"}))
            .await
            .unwrap();
        assert!(created);
        s.delete(&ResourceId::Route("f2".into())).await.unwrap();
        assert!(s.get(&ResourceId::Route("f2".into())).await.is_none());
        let ids: Vec<_> = s
            .list(ListKind::Routes)
            .await
            .into_iter()
            .map(|(id, ..)| id.key())
            .collect();
        assert_eq!(ids, vec!["/apisix/routes/a1", "/apisix/routes/f1"]);
        assert_eq!(runtime.snapshot().router.len(), 2);

        // A restart with the same file and state file sees the same thing.
        let (runtime2, s2) = store(FILE, Some(state.clone()));
        assert_eq!(runtime2.snapshot().router.len(), 2);
        assert_eq!(
            s2.get(&ResourceId::Route("f1".into())).await.unwrap().0["uri"],
            "/changed"
        );
        assert!(s2.get(&ResourceId::Route("f2".into())).await.is_none());
        // So does a file reload.
        let config = FileConfig::parse(FILE, "test.yaml").unwrap();
        s2.reload_file(&config, "test.yaml").await.unwrap();
        assert!(s2.get(&ResourceId::Route("f2".into())).await.is_none());
    }

    #[tokio::test]
    async fn a_failed_persist_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("missing-dir").join("state.yaml");
        let (runtime, s) = store(FILE, Some(state));
        let err = s
            .put(ResourceId::Route("x".into()), json!({"uri": "/x"}))
            .await
            .unwrap_err();
        assert!(matches!(err, WriteError::Persist { .. }), "{err}");
        assert!(s.get(&ResourceId::Route("x".into())).await.is_none());
        let err = s.delete(&ResourceId::Route("f1".into())).await.unwrap_err();
        assert!(matches!(err, WriteError::Persist { .. }));
        assert!(s.get(&ResourceId::Route("f1".into())).await.is_some());
        assert_eq!(runtime.snapshot().router.len(), 2);
    }

    #[tokio::test]
    async fn credentials_need_their_consumer_and_go_with_it() {
        let (_rt, s) = store(FILE, None);
        let err = s
            .put(
                ResourceId::Credential("nobody".into(), "c1".into()),
                json!({"plugins": {}}),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, WriteError::NotFound(ref m) if m == "consumer not found"));
        let err = s
            .put(
                ResourceId::Credential("alice".into(), "c1".into()),
                json!({"plugins": {}}),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("exactly one auth plugin"), "{err}");
        s.delete(&ResourceId::Consumer("alice".into()))
            .await
            .unwrap();
        assert!(!s.consumer_exists("alice").await);
        assert!(matches!(
            s.delete(&ResourceId::Consumer("alice".into())).await,
            Err(WriteError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn bad_bodies_name_the_field() {
        let (_rt, s) = store("{}", None);
        let err = s
            .put(
                ResourceId::Route("r".into()),
                json!({"uri": "/x", "methods": ["FETCH"]}),
            )
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid configuration: methods[0]"),
            "{err}"
        );
        let err = s
            .put(
                ResourceId::Route("r".into()),
                json!({"uri": "/x", "plugins": {"nope": {}}}),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("plugin nope"), "{err}");
        let err = s
            .put(ResourceId::Consumer("a".into()), json!({"username": "b"}))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }
}
