//! Where routes, consumers and credentials live, and how a change reaches Checks.
//!
//! Two layers: the config file (hot-reloaded) and the Admin API's writes, persisted
//! in `state_file`. The Admin layer wins for the ids it touches, including
//! deletions of file-declared resources (kept as tombstones), so a restart or a
//! file reload never resurrects what an operator removed or undoes what they wrote.
//!
//! Every change is serialised by one async lock: validate and compile → persist (a
//! synced line in the state file's journal, [`disk`]) → publish → acknowledge.
//! Publishing is incremental: a route write rebuilds only the route index; a consumer
//! or credential write updates its own entries in the shared concurrent maps.
//!
//! With `store.kind: etcd` ([`etcd`]) there is no file layer: the Admin layer is a
//! mirror of the etcd prefix, kept by a watch, and a write is a revision-checked
//! etcd transaction whose result reaches this replica through the same watch as
//! every other replica's writes.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use crate::config::{FileConfig, Unmatched};
use crate::plugins::BuildContext;
use crate::resources::{ConsumerSpec, CredentialSpec, RouteSpec, SpecError};
use crate::runtime::Runtime;
use crate::snapshot::{self, AuthKey, CompileError, Consumers, KeyOwner, Route, Snapshot};

mod build;
mod disk;
pub mod etcd;
mod layers;

pub use build::validate;
use build::{Built, build, duplicate_key, file_layer, now};
use disk::Disk;
pub use layers::{Compact, CredentialKey, CredentialMap, Resources, StateFile, Stored, Tombstones};
use layers::{Effective, Stamp, Undo, layered, overlay, restamp, view};

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
    /// Someone else changed the resource between this write's read and its commit.
    #[error("{0}")]
    Conflict(String),
    /// The shared store (etcd) did not acknowledge the write.
    #[error("{0}")]
    Unavailable(String),
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
    #[error("etcd: {0}")]
    Etcd(String),
}

struct Inner {
    file: Resources,
    admin: StateFile,
    unmatched: Unmatched,
    routes: HashMap<String, Arc<Route>>,
    consumers: Arc<Consumers>,
    /// Where the Admin layer persists; none without a state file (and with etcd).
    disk: Option<Disk>,
}

pub struct Store {
    runtime: Arc<Runtime>,
    /// Set with `store.kind: etcd`: writes go there instead of the state file.
    etcd: Option<etcd::Etcd>,
    /// The etcd revision the mirror has applied up to (0 with the file provider).
    applied: tokio::sync::watch::Sender<u64>,
    inner: tokio::sync::Mutex<Inner>,
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
        let (disk, admin) = match state_path {
            Some(p) => {
                let file = p.display().to_string();
                let (disk, admin) = Disk::open(p, read_state)
                    .map_err(|reason| LoadError::StateFile { file, reason })?;
                (Some(disk), admin)
            }
            None => (None, StateFile::empty()),
        };
        let file_res = file_layer(config).map_err(|error| LoadError::Resource {
            file: file.to_owned(),
            error,
        })?;
        let built = build(
            &Effective {
                file: &file_res,
                admin: &admin,
            },
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
            consumers: Arc::new(Consumers::default()),
            disk,
        };
        let store = Store {
            runtime,
            etcd: None,
            applied: tokio::sync::watch::channel(0).0,
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
        self.publish_routes(inner);
    }

    /// [`Self::publish_routes`] after a write: the old router is freed once the new
    /// one is out, and its pages go back to the OS (`memory::release_free_memory_soon`).
    /// Whole-file loads trim once at their end instead.
    fn republish_routes(&self, inner: &Inner) {
        self.publish_routes(inner);
        crate::memory::release_free_memory_soon();
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
        if self.etcd.is_some() {
            // Resources live in etcd; only file-level settings apply.
            inner.unmatched = config.unmatched;
            self.publish_routes(&inner);
            return Ok(());
        }
        let (file_res, built) = off_the_runtime(|| {
            let file_res = file_layer(config)?;
            let built = build(
                &Effective {
                    file: &file_res,
                    admin: &inner.admin,
                },
                &BuildContext {
                    shared: &self.runtime.shared,
                },
            )?;
            Ok((file_res, built))
        })
        .map_err(|error| LoadError::Resource {
            file: file.to_owned(),
            error,
        })?;
        inner.file = file_res;
        inner.unmatched = config.unmatched;
        self.install(&mut inner, built);
        Ok(())
    }

    /// Reads one resource as the Admin API shows it.
    pub async fn get(&self, id: &ResourceId) -> Option<(Value, u64, u64)> {
        let inner = self.inner.lock().await;
        match id {
            ResourceId::Route(k) => inner.route(k).map(|s| inner.view(s, k)),
            ResourceId::Consumer(k) => inner.consumer(k).map(|s| inner.view(s, k)),
            ResourceId::Credential(u, k) => inner.credential(u, k).map(|s| inner.view(s, k)),
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
            .map(|(k, s)| tag(ResourceId::Route(k.clone()), inner.view(s, k)))
            .collect(),
            ListKind::Consumers => {
                layered(&inner.file.consumers, &inner.admin.written.consumers, |k| {
                    inner.admin.deleted.consumers.contains(&**k)
                })
                .map(|(k, s)| tag(ResourceId::Consumer(k.to_string()), inner.view(s, k)))
                .collect()
            }
            ListKind::Credentials(user) => {
                if inner.consumer(user).is_none() {
                    return Vec::new();
                }
                let range = (Arc::<str>::from(user), Arc::<str>::from(""))..;
                let from_file = inner
                    .file
                    .credentials
                    .range(range.clone())
                    .take_while(|((u, _), _)| &**u == user);
                let written = inner
                    .admin
                    .written
                    .credentials
                    .range(range)
                    .take_while(|((u, _), _)| &**u == user);
                let deleted = &inner.admin.deleted;
                overlay(
                    from_file.filter(|((u, id), _)| !deleted.has_credential(u, id)),
                    written,
                )
                .map(|((u, k), s)| {
                    tag(
                        ResourceId::Credential(u.to_string(), k.to_string()),
                        inner.view(s, k),
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
        self.put_if(id, body, None).await
    }

    /// As [`put`](Self::put), but only if the resource is still at `expected`
    /// (its `modifiedIndex` when it was read): a read-modify-write such as PATCH
    /// must not overwrite a change made in between.
    pub async fn put_if(
        &self,
        id: ResourceId,
        body: Value,
        expected: Option<u64>,
    ) -> Result<(bool, Value), WriteError> {
        if let Some(etcd) = &self.etcd {
            return self.put_etcd(etcd, id, body, expected).await;
        }
        let mut inner = self.inner.lock().await;
        // The stamp of what this write replaces, if anything: its modified index for the
        // condition, its creation for the new stamp.
        let old = inner.stamp_at(&id);
        if let Some(expected) = expected
            && old.map(|s| s.modified_index) != Some(expected)
        {
            return Err(conflict(&id));
        }
        let cx = BuildContext {
            shared: &self.runtime.shared,
        };
        let t = now();
        let index = inner.admin.index + 1;
        let undo = Undo::of(&inner.admin);
        let created = old.is_none();
        let value;
        let apply: Box<dyn FnOnce(&mut Inner) + Send> = match &id {
            ResourceId::Route(rid) => {
                let mut spec: RouteSpec = parse(body)?;
                spec.id = Some(rid.clone());
                let route = Arc::new(snapshot::compile_route(rid, &spec, &cx)?);
                let stored = restamp(&spec, old, t, index);
                value = inner.view(&stored, rid).0;
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
                let (spec, compiled) = consumer_body(name, body, &cx)?;
                claim(
                    &inner.consumers,
                    compiled.inline_credentials.iter().map(|(key, _)| key),
                    KeyOwner::Consumer(name),
                )?;
                let stored = restamp(&spec, old, t, index);
                value = inner.view(&stored, name).0;
                let undo = undo.consumer(&inner.admin, name);
                inner.admin.deleted.consumers.remove(name);
                // The compiled consumer's own name, so the store shares its allocation.
                let key = compiled.consumer.username.clone();
                inner.admin.written.consumers.insert(key, stored);
                self.commit(&mut inner, index, undo)?;
                let name = name.clone();
                Box::new(move |inner| {
                    let mut keys = Vec::new();
                    for (key, cred) in compiled.inline_credentials {
                        inner.consumers.insert_credential(key.clone(), cred);
                        keys.push(key);
                    }
                    inner.consumers.drop_keys(KeyOwner::Inline(&name), &keys);
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
                let id: Arc<str> = cid.as_str().into();
                let (key, cred) = snapshot::compile_credential(
                    inner.consumers.shared_name(user),
                    id.clone(),
                    &spec,
                    &cx,
                )?;
                claim(&inner.consumers, [&key], KeyOwner::Credential(user, cid))?;
                let ck = (cred.username.clone(), id);
                let stored = restamp(&spec, old, t, index);
                value = inner.view(&stored, cid).0;
                let undo = undo.credential(&inner.admin, &ck);
                inner
                    .admin
                    .deleted
                    .credentials
                    .remove(&layers::credential_text(user, cid));
                inner.admin.written.credentials.insert(ck.clone(), stored);
                self.commit(&mut inner, index, undo)?;
                Box::new(move |inner| {
                    inner.consumers.insert_credential(key.clone(), cred);
                    let owner = KeyOwner::Credential(&ck.0, &ck.1);
                    inner.consumers.drop_keys(owner, std::slice::from_ref(&key));
                })
            }
        };
        apply(&mut inner);
        if matches!(id, ResourceId::Route(_)) {
            self.republish_routes(&inner);
        }
        Ok((created, value))
    }

    /// Persists the Admin layer as edited in place; on failure puts back what
    /// `undo` recorded, so memory never runs ahead of the disk.
    fn commit(&self, inner: &mut Inner, index: u64, undo: Undo) -> Result<(), WriteError> {
        inner.admin.index = index;
        let Inner { disk, admin, .. } = inner;
        let Some(disk) = disk else {
            return Ok(());
        };
        if let Err(e) = off_the_runtime(|| disk.record(admin, &undo)) {
            undo.restore(admin);
            return Err(e);
        }
        Ok(())
    }

    /// Deletes a resource; deleting a consumer deletes its credentials.
    pub async fn delete(&self, id: &ResourceId) -> Result<(), WriteError> {
        if let Some(etcd) = &self.etcd {
            return self.delete_etcd(etcd, id).await;
        }
        let mut inner = self.inner.lock().await;
        if inner.stamp_at(id).is_none() {
            return Err(WriteError::NotFound("Key not found".into()));
        }
        let index = inner.admin.index + 1;
        let undo = Undo::of(&inner.admin);
        match id {
            ResourceId::Route(rid) => {
                let undo = undo.route(&inner.admin, rid);
                inner.admin.written.routes.remove(rid);
                if inner.file.routes.contains_key(rid) {
                    inner.admin.deleted.routes.insert(rid.clone());
                }
                self.commit(&mut inner, index, undo)?;
                inner.routes.remove(rid);
                self.republish_routes(&inner);
            }
            ResourceId::Consumer(name) => {
                let creds = inner.credential_ids(name);
                let mut undo = undo.consumer(&inner.admin, name);
                for ck in &creds {
                    undo = undo.credential(&inner.admin, ck);
                    inner.admin.written.credentials.remove(ck);
                    if inner.file.credentials.contains_key(ck) {
                        inner
                            .admin
                            .deleted
                            .credentials
                            .insert(layers::credential_text(&ck.0, &ck.1));
                    }
                }
                inner.admin.written.consumers.remove(name.as_str());
                if inner.file.consumers.contains_key(name.as_str()) {
                    inner.admin.deleted.consumers.insert(name.clone());
                }
                self.commit(&mut inner, index, undo)?;
                inner.consumers.drop_keys(KeyOwner::Consumer(name), &[]);
                inner.consumers.by_name.remove(name.as_str());
            }
            ResourceId::Credential(user, cid) => {
                let ck: CredentialKey = (user.as_str().into(), cid.as_str().into());
                let undo = undo.credential(&inner.admin, &ck);
                inner.admin.written.credentials.remove(&ck);
                if inner.file.credentials.contains_key(&ck) {
                    inner
                        .admin
                        .deleted
                        .credentials
                        .insert(layers::credential_text(user, cid));
                }
                self.commit(&mut inner, index, undo)?;
                inner
                    .consumers
                    .drop_keys(KeyOwner::Credential(user, cid), &[]);
            }
        }
        Ok(())
    }
}

impl Inner {
    /// A resource as the Admin API shows it, with its own stamp or its config file's.
    fn view<T: layers::Keyed + serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        s: &Stored<T>,
        key: &str,
    ) -> (Value, u64, u64) {
        view(s, self.file.stamp_of(s), key)
    }

    /// The stamp of the resource in force at `id`: its own, or its config file's.
    fn stamp_at(&self, id: &ResourceId) -> Option<Stamp> {
        match id {
            ResourceId::Route(k) => self.route(k).map(|s| self.file.stamp_of(s)),
            ResourceId::Consumer(k) => self.consumer(k).map(|s| self.file.stamp_of(s)),
            ResourceId::Credential(u, k) => self.credential(u, k).map(|s| self.file.stamp_of(s)),
        }
    }

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

    /// Every credential id stored for `user` in either layer, tombstoned or not.
    fn credential_ids(&self, user: &str) -> Vec<CredentialKey> {
        let range = (Arc::<str>::from(user), Arc::<str>::from(""))..;
        let of_user = |((u, _), _): &(&CredentialKey, _)| &**u == user;
        let mut ids: Vec<CredentialKey> = self
            .file
            .credentials
            .range(range.clone())
            .take_while(of_user)
            .chain(
                self.admin
                    .written
                    .credentials
                    .range(range)
                    .take_while(of_user),
            )
            .map(|(k, _)| k.clone())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    fn credential(&self, user: &str, id: &str) -> Option<&Stored<CredentialSpec>> {
        self.consumer(user)?;
        let ck: CredentialKey = (user.into(), id.into());
        self.admin.written.credentials.get(&ck).or_else(|| {
            (!self.admin.deleted.has_credential(user, id))
                .then(|| self.file.credentials.get(&ck))
                .flatten()
        })
    }
}

/// Runs `f`, which blocks (rewriting the state file, compiling a whole config), without
/// holding up the tasks that share this runtime thread: on the multi-threaded runtime
/// they move to another thread first (`block_in_place`). The gRPC accept loop is one
/// of them: while a write with 210k resources rewrote the state file on it, a new
/// connection's first Checks waited 110 ms. On a current-thread runtime (tests), `f`
/// simply runs.
fn off_the_runtime<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Reads the state file, which portcullis writes as JSON (a hand-edited one may be
/// YAML): as JSON, 100k stored consumers peak at 130 MiB while starting, where
/// serde_yaml's whole-document events took 0.9 GB.
fn read_state(text: &str) -> Result<StateFile, String> {
    crate::config::read_json_or_yaml(text, false).map_err(|e| match e.path.as_str() {
        "." => e.reason,
        path => format!("at `{path}`: {}", e.reason),
    })
}

fn conflict(id: &ResourceId) -> WriteError {
    WriteError::Conflict(format!(
        "{} was changed by another write in the meantime; read it again and retry",
        id.key()
    ))
}

pub enum ListKind<'a> {
    Routes,
    Consumers,
    Credentials(&'a str),
}

/// A consumer's Admin API body: read, its name checked against the path's, and
/// compiled, the same way whichever provider stores it.
fn consumer_body(
    name: &str,
    body: Value,
    cx: &BuildContext<'_>,
) -> Result<(ConsumerSpec, snapshot::CompiledConsumer), WriteError> {
    let spec: ConsumerSpec = parse(body)?;
    if spec.username != name {
        return Err(WriteError::Invalid(format!(
            "invalid configuration: username: {:?} in the body does not match {name:?} in the path",
            spec.username
        )));
    }
    let compiled = snapshot::compile_consumer(spec.username.as_str().into(), &spec, cx)?;
    Ok((spec, compiled))
}

/// Refuses a write whose auth keys a credential other than `owner`'s already holds.
fn claim<'k>(
    consumers: &Consumers,
    keys: impl IntoIterator<Item = &'k AuthKey>,
    owner: KeyOwner<'_>,
) -> Result<(), WriteError> {
    match keys.into_iter().find(|key| consumers.taken(key, owner)) {
        Some(key) => Err(WriteError::Invalid(format!(
            "invalid plugins configuration: {}",
            duplicate_key(key)
        ))),
        None => Ok(()),
    }
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
    async fn the_state_file_reads_as_written_json_or_as_hand_written_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let (_, s) = store(FILE, Some(state.clone()));
        s.put(ResourceId::Route("a1".into()), json!({"uri": "/a1"}))
            .await
            .unwrap();
        s.put(
            ResourceId::Consumer("bob".into()),
            json!({"username": "bob"}),
        )
        .await
        .unwrap();
        let cred = ResourceId::Credential("bob".into(), "c1".into());
        s.put(
            cred.clone(),
            json!({"plugins": {"jwt-auth": {"key": "k", "secret": "s"}}}),
        )
        .await
        .unwrap();
        s.delete(&ResourceId::Route("f2".into())).await.unwrap();
        async fn expect((_, s): (Arc<Runtime>, Store)) {
            let routes: Vec<_> = s.list(ListKind::Routes).await;
            let ids: Vec<_> = routes.iter().map(|(id, ..)| id.key()).collect();
            assert_eq!(ids, vec!["/apisix/routes/a1", "/apisix/routes/f1"]);
            let cred = ResourceId::Credential("bob".into(), "c1".into());
            let (v, ..) = s.get(&cred).await.unwrap();
            assert_eq!(v["plugins"]["jwt-auth"]["key"], "k");
            assert!(s.consumer_exists("bob").await);
        }
        // The first write made the state file, the next three are in its journal,
        // which a restart folds into it.
        let journal = dir.path().join("state.json.journal");
        assert_eq!(
            std::fs::read_to_string(&journal).unwrap().lines().count(),
            3
        );
        expect(store(FILE, Some(state.clone()))).await;
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
        let written = std::fs::read_to_string(&state).unwrap();
        assert!(written.starts_with('{'), "{written}");
        // Each spec as the store keeps it, not parsed and printed again.
        assert!(
            written.contains(r#""spec": {"id":"a1","uri":"/a1"}"#),
            "{written}"
        );
        assert!(written.contains(r#""bob/c1": {"#), "{written}");

        // The same content as block YAML, then as a YAML flow mapping (not JSON).
        let value: Value = serde_json::from_str(&written).unwrap();
        std::fs::write(&state, serde_yaml::to_string(&value).unwrap()).unwrap();
        expect(store(FILE, Some(state.clone()))).await;
        let flow = written.replace("\"version\"", "version");
        assert!(serde_json::from_str::<Value>(&flow).is_err());
        std::fs::write(&state, flow).unwrap();
        expect(store(FILE, Some(state.clone()))).await;

        // Valid JSON with a wrong field is refused by name, not re-read as YAML.
        std::fs::write(&state, r#"{"version": 1, "index": "three"}"#).unwrap();
        let config = FileConfig::parse(FILE, "test.yaml").unwrap();
        let err = Store::open(Arc::new(Runtime::default()), &config, "t", Some(state))
            .err()
            .expect("a bad index is refused")
            .to_string();
        assert!(err.contains("invalid type: string \"three\""), "{err}");
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

    /// At 100k consumers every duplicated name is megabytes: a credential holds its
    /// consumer's own `Arc`, whether loaded from the file or written later.
    #[tokio::test]
    async fn credentials_share_their_consumers_name() {
        let file = "consumers:\n  - username: alice\n    credentials: [ { id: c1, plugins: { jwt-auth: { key: k1, secret: s1 } } } ]\n";
        let (runtime, s) = store(file, None);
        s.put(
            ResourceId::Credential("alice".into(), "c2".into()),
            json!({"plugins": {"jwt-auth": {"key": "k2", "secret": "s2"}}}),
        )
        .await
        .unwrap();
        let consumers = runtime.snapshot().consumers.clone();
        let name = consumers.by_name.get("alice").unwrap().key().clone();
        for key in ["k1", "k2"] {
            let cred = consumers.credential("jwt-auth", key).unwrap();
            assert!(Arc::ptr_eq(&cred.username, &name), "{key}");
        }
    }

    /// A credential's id is its key in the store, kept once: not in the stored spec,
    /// yet in every answer, in the state file's key, and after a restart.
    #[tokio::test]
    async fn a_credential_id_is_stored_once_and_shown_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.yaml");
        let file = "consumers:\n  - username: alice\n    credentials: [ { id: c1, plugins: { jwt-auth: { key: k1, secret: s1 } } } ]\n";
        let (runtime, s) = store(file, Some(state.clone()));
        s.put(
            ResourceId::Credential("alice".into(), "c2".into()),
            json!({"id": "c2", "plugins": {"jwt-auth": {"key": "k2", "secret": "s2"}}}),
        )
        .await
        .unwrap();
        {
            let inner = s.inner.lock().await;
            let (ck, stored) = inner.file.credentials.iter().next().unwrap();
            assert!(!stored.value().as_object().unwrap().contains_key("id"));
            let cred = runtime
                .snapshot()
                .consumers
                .credential("jwt-auth", "k1")
                .unwrap();
            assert!(Arc::ptr_eq(&ck.1, cred.credential_id.as_ref().unwrap()));
        }
        let persisted: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        let entry = &persisted["credentials"]["alice/c2"];
        assert!(entry["create_time"].as_i64().unwrap() > 0, "{persisted:?}");
        assert!(entry["spec"].get("id").is_none(), "{persisted:?}");
        assert_eq!(entry["spec"]["plugins"]["jwt-auth"]["key"], "k2");

        let (_rt, s2) = store(file, Some(state));
        for id in ["c1", "c2"] {
            let rid = ResourceId::Credential("alice".into(), id.into());
            assert_eq!(s2.get(&rid).await.unwrap().0["id"], id);
        }
        let listed = s2.list(ListKind::Credentials("alice")).await;
        let ids: Vec<_> = listed.iter().map(|(_, v, ..)| v["id"].clone()).collect();
        assert_eq!(ids, [json!("c1"), json!("c2")]);
    }

    /// A consumer's name is its key in the store, kept once: not in the stored spec,
    /// yet first in every answer, the state file's key, and there after a restart.
    /// State files written before still read (their specs name the consumer).
    #[tokio::test]
    async fn a_consumer_name_is_stored_once_and_shown_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let (_rt, s) = store(FILE, Some(state.clone()));
        let bob = ResourceId::Consumer("bob".into());
        let (_, v) = s
            .put(bob.clone(), json!({"username": "bob", "desc": "d"}))
            .await
            .unwrap();
        assert_eq!(v.as_object().unwrap().keys().next().unwrap(), "username");
        assert_eq!(v["username"], "bob");
        {
            let inner = s.inner.lock().await;
            for c in [
                &inner.file.consumers["alice"],
                &inner.admin.written.consumers["bob"],
            ] {
                assert!(
                    !c.value().as_object().unwrap().contains_key("username"),
                    "{c:?}"
                );
            }
        }
        drop(s);
        let (runtime, s) = store(FILE, Some(state.clone()));
        let persisted: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
        assert_eq!(persisted["consumers"]["bob"]["spec"], json!({"desc": "d"}));
        for name in ["alice", "bob"] {
            let id = ResourceId::Consumer(name.into());
            assert_eq!(s.get(&id).await.unwrap().0["username"], name);
            assert!(runtime.snapshot().consumers.by_name.contains_key(name));
        }
        let listed = s.list(ListKind::Consumers).await;
        let names: Vec<_> = listed
            .iter()
            .map(|(_, v, ..)| v["username"].clone())
            .collect();
        assert_eq!(names, [json!("alice"), json!("bob")]);

        // A state file written before, with the name in the spec.
        let mut old = persisted.clone();
        old["consumers"]["bob"]["spec"]["username"] = json!("bob");
        std::fs::write(&state, old.to_string()).unwrap();
        let (_rt, s) = store(FILE, Some(state));
        assert_eq!(s.get(&bob).await.unwrap().0["desc"], "d");

        // The config file still needs one.
        let err = FileConfig::parse("consumers:\n  - { desc: nameless }\n", "test.yaml")
            .expect_err("a consumer without a username is refused")
            .to_string();
        assert!(err.contains("missing field `username`"), "{err}");
    }

    /// Every resource of a config file has the load time and index 0, kept once for
    /// the file rather than in each resource.
    #[tokio::test]
    async fn file_resources_show_the_load_time_and_index_zero() {
        let before = now();
        let (_rt, s) = store(FILE, None);
        {
            let inner = s.inner.lock().await;
            assert!(inner.file.routes.values().all(|r| r.stamp().is_none()));
            assert!(inner.file.consumers.values().all(|c| c.stamp().is_none()));
        }
        for id in [
            ResourceId::Route("f1".into()),
            ResourceId::Consumer("alice".into()),
        ] {
            let (value, created, modified) = s.get(&id).await.unwrap();
            assert_eq!((created, modified), (0, 0), "{id:?}");
            let t = value["create_time"].as_i64().unwrap();
            assert!(t >= before && t <= now(), "{id:?}: {t}");
            assert_eq!(value["update_time"], t, "{id:?}");
        }
        // An Admin write over a file route keeps its creation and stamps its own update.
        let (_, value) = s
            .put(ResourceId::Route("f1".into()), json!({"uri": "/new"}))
            .await
            .unwrap();
        let (_, created, modified) = s.get(&ResourceId::Route("f1".into())).await.unwrap();
        assert_eq!((created, modified), (0, 1));
        assert!(value["create_time"].as_i64().unwrap() >= before);
    }

    /// Without a second map of keys, the index itself says which keys a write
    /// replaces: an updated credential's old key stops working, the new one works at
    /// once, and neither a sibling credential's nor the inline plugins' keys are touched.
    #[tokio::test]
    async fn writes_replace_exactly_the_keys_they_own() {
        let file = "consumers:\n  - username: alice\n    plugins: { jwt-auth: { key: inline, secret: s0 } }\n    credentials:\n      - { id: c1, plugins: { jwt-auth: { key: k1, secret: s1 } } }\n      - { id: c2, plugins: { jwt-auth: { key: k2, secret: s2 } } }\n  - { username: bob, credentials: [ { id: c1, plugins: { jwt-auth: { key: b1, secret: s3 } } } ] }\n";
        let (runtime, s) = store(file, None);
        let has = |key: &str| {
            runtime
                .snapshot()
                .consumers
                .credential("jwt-auth", key)
                .is_some()
        };
        let cred = |user: &str, id: &str| ResourceId::Credential(user.into(), id.into());
        s.put(
            cred("alice", "c1"),
            json!({"plugins": {"jwt-auth": {"key": "k1-new", "secret": "s1"}}}),
        )
        .await
        .unwrap();
        assert!(!has("k1") && has("k1-new") && has("k2") && has("inline") && has("b1"));
        // Same key, new secret: replaced in place.
        s.put(
            cred("alice", "c2"),
            json!({"plugins": {"jwt-auth": {"key": "k2", "secret": "other"}}}),
        )
        .await
        .unwrap();
        assert!(has("k2"));
        // The consumer's own plugins: only the inline key changes.
        s.put(
            ResourceId::Consumer("alice".into()),
            json!({"username": "alice", "plugins": {"jwt-auth": {"key": "inline2", "secret": "s0"}}}),
        )
        .await
        .unwrap();
        assert!(!has("inline") && has("inline2") && has("k1-new") && has("k2"));
        s.delete(&cred("alice", "c2")).await.unwrap();
        assert!(!has("k2") && has("k1-new") && has("inline2"));
        s.delete(&ResourceId::Consumer("alice".into()))
            .await
            .unwrap();
        assert!(
            !has("k1-new") && !has("inline2"),
            "the consumer's keys go with it"
        );
        assert!(
            has("b1"),
            "another consumer's credential with the same id stays"
        );
        assert!(s.get(&cred("alice", "c1")).await.is_none());
    }

    /// A key names one consumer: a write may keep the keys its resource already holds,
    /// never take another's.
    #[tokio::test]
    async fn a_write_cannot_take_a_key_someone_else_holds() {
        let file = "consumers:\n  - username: alice\n    plugins: { jwt-auth: { key: inline, secret: s0 } }\n    credentials: [ { id: c1, plugins: { jwt-auth: { key: k1, secret: s1 } } } ]\n  - { username: bob }\n";
        let (_rt, s) = store(file, None);
        let jwt = |key: &str| json!({"plugins": {"jwt-auth": {"key": key, "secret": "s"}}});
        let consumer = |user: &str, key: &str| {
            let mut body = jwt(key);
            body["username"] = user.into();
            (ResourceId::Consumer(user.into()), body)
        };
        let cred = |user: &str, id: &str| ResourceId::Credential(user.into(), id.into());
        let refused = |r: Result<(bool, Value), WriteError>, key: &str| match r {
            Err(WriteError::Invalid(m)) => assert_eq!(
                m,
                format!(
                    "invalid plugins configuration: duplicate jwt-auth key {key:?}: keys must be unique across consumers and credentials"
                )
            ),
            other => panic!("{key}: {other:?}"),
        };
        for key in ["inline", "k1"] {
            let (id, body) = consumer("bob", key);
            refused(s.put(id, body).await, key);
            refused(s.put(cred("bob", "c1"), jwt(key)).await, key);
        }
        // The consumer's own inline key is not its credential's to take.
        refused(s.put(cred("alice", "c2"), jwt("inline")).await, "inline");
        // Its own keys, written again.
        s.put(cred("alice", "c1"), jwt("k1")).await.unwrap();
        let (id, body) = consumer("alice", "inline");
        s.put(id, body).await.unwrap();
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
