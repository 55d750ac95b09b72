//! Applying etcd's changes to the mirror and the compiled maps, one at a time.
//!
//! The same function serves the watch (one event after another) and a full load
//! (every key, into an empty state), so a replica that followed events and one
//! that just started hold the same resources. Nothing here talks to etcd.
use std::sync::Arc;

use serde_json::Value;

use super::Change;
use crate::plugins::BuildContext;
use crate::resources::{ConsumerSpec, CredentialSpec, RouteSpec};
use crate::snapshot::{self, Consumers, KeyOwner};
use crate::store::layers::{CredentialKey, Resources, Stamp, StateFile, Stored};
use crate::store::{Inner, ResourceId, WriteError, duplicate_key, parse};

/// A stored `value` split into the spec and its times.
struct Unstamped<T> {
    spec: T,
    create_time: i64,
    update_time: i64,
}

fn unstamp<T: serde::de::DeserializeOwned>(mut value: Value) -> Result<Unstamped<T>, WriteError> {
    let mut time = |field: &str| {
        value
            .as_object_mut()
            .and_then(|m| m.remove(field))
            .and_then(|v| v.as_i64())
            .unwrap_or_default()
    };
    let (create_time, update_time) = (time("create_time"), time("update_time"));
    Ok(Unstamped {
        spec: parse(value)?,
        create_time,
        update_time,
    })
}

impl<T: serde::Serialize + serde::de::DeserializeOwned> Unstamped<T> {
    fn stored(&self, created: u64, modified: u64) -> Stored<T> {
        Stored::new(
            &self.spec,
            Some(Stamp {
                create_time: self.create_time,
                update_time: self.update_time,
                created_index: created,
                modified_index: modified,
            }),
        )
    }
}

impl Inner {
    /// A state with nothing in it, for a full (re)load from etcd.
    pub(in crate::store) fn empty(unmatched: crate::config::Unmatched) -> Self {
        Inner {
            file: Resources::default(),
            admin: StateFile::empty(),
            unmatched,
            routes: Default::default(),
            consumers: Arc::new(Consumers::default()),
            disk: None,
        }
    }

    /// Applies one etcd change to the mirror and the compiled maps. A value that
    /// no longer compiles (written by another version, or by hand) is logged and
    /// not served; a change older than what the mirror holds is skipped. Returns
    /// whether the route index must be rebuilt.
    pub(in crate::store) fn apply(&mut self, cx: &BuildContext<'_>, change: Change) -> bool {
        match change {
            Change::Put {
                id,
                value,
                created,
                modified,
            } => {
                if self.modified_index(&id).is_some_and(|m| m >= modified) {
                    return false;
                }
                let key = id.key();
                let result = match &id {
                    ResourceId::Route(rid) => self.put_route(cx, rid, value, created, modified),
                    ResourceId::Consumer(name) => {
                        self.put_consumer(cx, name, value, created, modified)
                    }
                    ResourceId::Credential(user, cid) => {
                        self.put_credential(cx, user, cid, value, created, modified)
                    }
                };
                match result {
                    Ok(()) => matches!(id, ResourceId::Route(_)),
                    Err(error) => {
                        tracing::error!(key = %key, %error, "resource in etcd does not compile; not serving it");
                        self.remove(&id)
                    }
                }
            }
            Change::Delete { id, revision } => {
                if self.modified_index(&id).is_some_and(|m| m > revision) {
                    return false;
                }
                self.remove(&id)
            }
        }
    }

    fn modified_index(&self, id: &ResourceId) -> Option<u64> {
        let w = &self.admin.written;
        let stamp = match id {
            ResourceId::Route(k) => w.routes.get(k).map(|s| self.file.stamp_of(s)),
            ResourceId::Consumer(k) => w.consumers.get(k.as_str()).map(|s| self.file.stamp_of(s)),
            ResourceId::Credential(u, k) => w
                .credentials
                .get(&(u.as_str().into(), k.as_str().into()))
                .map(|s| self.file.stamp_of(s)),
        };
        stamp.map(|s| s.modified_index)
    }

    fn put_route(
        &mut self,
        cx: &BuildContext<'_>,
        rid: &str,
        value: Value,
        created: u64,
        modified: u64,
    ) -> Result<(), WriteError> {
        let mut got: Unstamped<RouteSpec> = unstamp(value)?;
        got.spec.id = Some(rid.to_owned());
        let route = snapshot::compile_route(rid, &got.spec, cx)?;
        self.routes.insert(rid.to_owned(), Arc::new(route));
        self.admin
            .written
            .routes
            .insert(rid.to_owned(), got.stored(created, modified));
        Ok(())
    }

    fn put_consumer(
        &mut self,
        cx: &BuildContext<'_>,
        name: &str,
        value: Value,
        created: u64,
        modified: u64,
    ) -> Result<(), WriteError> {
        let got: Unstamped<ConsumerSpec> = unstamp(value)?;
        if got.spec.username != name {
            return Err(WriteError::Invalid(format!(
                "username {:?} does not match the key",
                got.spec.username
            )));
        }
        let compiled =
            snapshot::compile_consumer(got.spec.username.as_str().into(), &got.spec, cx)?;
        let mut keys = Vec::new();
        for (key, cred) in compiled.inline_credentials {
            if self.consumers.taken(&key, KeyOwner::Consumer(name)) {
                tracing::error!(consumer = name, error = %duplicate_key(&key), "key in etcd already taken; ignoring it");
                continue;
            }
            self.consumers.insert_credential(key.clone(), cred);
            keys.push(key);
        }
        self.consumers.drop_keys(KeyOwner::Inline(name), &keys);
        let is_new = !self.consumers.by_name.contains_key(name);
        let key = compiled.consumer.username.clone();
        self.consumers
            .by_name
            .insert(compiled.consumer.username.clone(), compiled.consumer);
        self.admin
            .written
            .consumers
            .insert(key, got.stored(created, modified));
        if is_new {
            // Credentials written before their consumer (by hand) start counting now.
            let orphans: Vec<_> = self
                .admin
                .written
                .credentials
                .range((Arc::<str>::from(name), Arc::<str>::from(""))..)
                .take_while(|((u, _), _)| &**u == name)
                .map(|((u, c), s)| (u.to_string(), c.to_string(), s.clone()))
                .collect();
            for (u, c, s) in orphans {
                let compiled = s
                    .spec()
                    .map_err(WriteError::Invalid)
                    .and_then(|spec| self.compile_credential(cx, &u, &c, &spec));
                if let Err(error) = compiled {
                    tracing::error!(key = %ResourceId::Credential(u, c).key(), %error, "credential in etcd does not compile; not serving it");
                }
            }
        }
        Ok(())
    }

    fn put_credential(
        &mut self,
        cx: &BuildContext<'_>,
        user: &str,
        cid: &str,
        value: Value,
        created: u64,
        modified: u64,
    ) -> Result<(), WriteError> {
        let mut got: Unstamped<CredentialSpec> = unstamp(value)?;
        got.spec.id = Some(cid.to_owned());
        let key = if self.consumers.by_name.contains_key(user) {
            self.compile_credential(cx, user, cid, &got.spec)?
        } else {
            (user.into(), cid.into())
        };
        self.admin
            .written
            .credentials
            .insert(key, got.stored(created, modified));
        Ok(())
    }

    fn compile_credential(
        &mut self,
        cx: &BuildContext<'_>,
        user: &str,
        cid: &str,
        spec: &CredentialSpec,
    ) -> Result<CredentialKey, WriteError> {
        let ck: CredentialKey = (self.consumers.shared_name(user), cid.into());
        let (key, cred) = snapshot::compile_credential(ck.0.clone(), ck.1.clone(), spec, cx)?;
        if self.consumers.taken(&key, KeyOwner::Credential(user, cid)) {
            return Err(WriteError::Invalid(duplicate_key(&key)));
        }
        self.consumers.insert_credential(key.clone(), cred);
        self.consumers
            .drop_keys(KeyOwner::Credential(user, cid), std::slice::from_ref(&key));
        Ok(ck)
    }

    /// Removes a resource from the mirror and the compiled maps; a consumer's
    /// credentials stop being served with it. Returns whether a route went.
    fn remove(&mut self, id: &ResourceId) -> bool {
        match id {
            ResourceId::Route(rid) => {
                self.admin.written.routes.remove(rid);
                self.routes.remove(rid).is_some()
            }
            ResourceId::Consumer(name) => {
                self.admin.written.consumers.remove(name.as_str());
                // Its credentials stop authenticating now. Their specs stay mirrored
                // until etcd deletes them too (the Admin API does so in the same
                // transaction), exactly as a fresh load would see them.
                self.consumers.drop_keys(KeyOwner::Consumer(name), &[]);
                self.consumers.by_name.remove(name.as_str());
                false
            }
            ResourceId::Credential(user, cid) => {
                let ck: CredentialKey = (user.as_str().into(), cid.as_str().into());
                self.admin.written.credentials.remove(&ck);
                self.consumers
                    .drop_keys(KeyOwner::Credential(user, cid), &[]);
                false
            }
        }
    }
}
