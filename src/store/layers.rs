//! The two layers of resources — the config file and the Admin API's writes — and
//! the state file that persists the second. Lookups read through the layers
//! instead of materialising a merged copy, so an Admin call costs the same with ten
//! resources or a hundred thousand.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::resources::{ConsumerSpec, CredentialSpec, RouteSpec};

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
pub struct StateFile {
    pub version: u32,
    pub index: u64,
    #[serde(flatten)]
    pub written: Resources,
    #[serde(default)]
    pub deleted: Tombstones,
}

/// The resources in force: the file layer, minus tombstones, plus Admin writes.
pub fn effective(file: &Resources, admin: &StateFile) -> Resources {
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

/// What an in-place edit of the Admin layer replaced, to put back if persisting fails.
pub struct Undo {
    pub index: u64,
    pub deleted: Tombstones,
    routes: Vec<(String, Option<Stored<RouteSpec>>)>,
    consumers: Vec<(String, Option<Stored<ConsumerSpec>>)>,
    credentials: Vec<(CredentialKey, Option<Stored<CredentialSpec>>)>,
}

impl Undo {
    pub fn of(admin: &StateFile) -> Self {
        Undo {
            index: admin.index,
            deleted: admin.deleted.clone(),
            routes: Vec::new(),
            consumers: Vec::new(),
            credentials: Vec::new(),
        }
    }

    pub fn route(mut self, admin: &StateFile, id: &str) -> Self {
        self.routes
            .push((id.to_owned(), admin.written.routes.get(id).cloned()));
        self
    }

    pub fn consumer(mut self, admin: &StateFile, name: &str) -> Self {
        self.consumers
            .push((name.to_owned(), admin.written.consumers.get(name).cloned()));
        self
    }

    pub fn credential(mut self, admin: &StateFile, ck: &(String, String)) -> Self {
        self.credentials
            .push((ck.clone(), admin.written.credentials.get(ck).cloned()));
        self
    }

    pub fn restore(self, admin: &mut StateFile) {
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

/// File entries not deleted, overlaid with Admin writes, in key order.
pub fn layered<'a, V>(
    file: &'a BTreeMap<String, V>,
    written: &'a BTreeMap<String, V>,
    deleted: impl Fn(&String) -> bool,
) -> impl Iterator<Item = (&'a String, &'a V)> {
    let mut merged: BTreeMap<&'a String, &'a V> =
        file.iter().filter(|(k, _)| !deleted(k)).collect();
    merged.extend(written.iter());
    merged.into_iter()
}

pub fn restamp<T>(spec: T, old: Option<&Stored<T>>, t: i64, index: u64) -> Stored<T> {
    Stored {
        spec,
        create_time: old.map_or(t, |o| o.create_time),
        update_time: t,
        created_index: old.map_or(index, |o| o.created_index),
        modified_index: index,
    }
}

/// The `value` APISIX shows: the spec with its id and times.
pub fn view<T: Serialize>(s: &Stored<T>, id: Option<&String>) -> (Value, u64, u64) {
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
