//! Compiling a whole resource set: the file layer from a config file, and every
//! route, consumer and credential into the runtime types a snapshot publishes.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::LoadError;
use super::layers::{Effective, Resources, Stamp, StateFile, Stored};
use crate::config::FileConfig;
use crate::plugins::BuildContext;
use crate::snapshot::{self, AuthKey, Consumers, Route};

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

pub fn file_layer(config: &FileConfig) -> Result<Resources, String> {
    let t = now();
    // Entries are gathered in file order, checked for duplicates by borrowed name, and
    // only then collected into the maps: a B-tree collected from entries is built from
    // them sorted, with full nodes, where inserting in (nearly) key order leaves nodes
    // about half full (≈ 60 bytes per resource at 100k consumers); and no map is
    // built twice, whose garbage would interleave with what the store keeps.
    let mut routes = Vec::with_capacity(config.routes.len());
    let mut seen = HashSet::with_capacity(config.routes.len());
    for (i, route) in config.routes.iter().enumerate() {
        let Some(id) = route.id.as_deref() else {
            return Err(format!(
                "at `routes[{i}]`: a route in the config file needs an \"id\""
            ));
        };
        if !seen.insert(id) {
            return Err(format!("at `routes[{i}].id`: duplicate route id {id:?}"));
        }
        routes.push((id.to_owned(), Stored::new(route, None)));
    }
    let mut consumers = Vec::with_capacity(config.consumers.len());
    let mut credentials = Vec::new();
    let mut seen = HashSet::with_capacity(config.consumers.len());
    let mut seen_credentials = HashSet::new();
    // Credential ids repeat across consumers (each consumer's "jwt", "default", ...):
    // one allocation per distinct id, shared by every key and compiled credential.
    let mut ids: HashMap<&str, Arc<str>> = HashMap::new();
    for (i, entry) in config.consumers.iter().enumerate() {
        let name = entry.username.as_str();
        if !seen.insert(name) {
            return Err(format!(
                "at `consumers[{i}].username`: duplicate consumer {name:?}"
            ));
        }
        // One allocation of the name for the consumer's key and its credentials' keys
        // (and, once compiled, for the compiled consumer and credentials).
        let key: Arc<str> = name.into();
        consumers.push((key.clone(), Stored::from_compact(&entry.spec, None)));
        for (j, cred) in entry.credentials.iter().enumerate() {
            let Some(id) = cred.id.as_deref() else {
                return Err(format!(
                    "at `consumers[{i}].credentials[{j}]`: a credential needs an \"id\""
                ));
            };
            if !seen_credentials.insert((name, id)) {
                return Err(format!(
                    "at `consumers[{i}].credentials[{j}].id`: duplicate credential id {id:?}"
                ));
            }
            let id = ids.entry(id).or_insert_with(|| id.into()).clone();
            credentials.push(((key.clone(), id), Stored::from_compact(&cred.spec, None)));
        }
    }
    let res = Resources {
        // Every resource of the file was loaded at `t`, with index 0.
        declared: Stamp {
            create_time: t,
            update_time: t,
            created_index: 0,
            modified_index: 0,
        },
        routes: routes.into_iter().collect(),
        consumers: consumers.into_iter().collect(),
        credentials: credentials.into_iter().collect(),
    };
    Ok(res)
}

/// Everything compiled from a resource set, ready to publish.
pub struct Built {
    pub routes: HashMap<String, Arc<Route>>,
    pub consumers: Arc<Consumers>,
}

pub fn duplicate_key(key: &AuthKey) -> String {
    format!(
        "duplicate {} key {:?}: keys must be unique across consumers and credentials",
        key.0, key.1
    )
}

pub fn build(res: &Effective<'_>, cx: &BuildContext<'_>) -> Result<Built, String> {
    let mut routes = HashMap::new();
    for (id, r) in res.routes() {
        let spec = r.spec().map_err(|e| format!("at `routes[id={id}]`: {e}"))?;
        let route = snapshot::compile_route(id, &spec, cx)
            .map_err(|e| format!("at `routes[id={id}].{}`: {e}", e.path()))?;
        routes.insert(id.clone(), Arc::new(route));
    }
    let consumers = Consumers::default();
    for (name, c) in res.consumers() {
        let mut spec = c
            .spec()
            .map_err(|e| format!("at `consumers[username={name}]`: {e}"))?;
        // Kept as the consumer's key, not in its stored text.
        spec.username = name.to_string();
        let compiled = snapshot::compile_consumer(name.clone(), &spec, cx)
            .map_err(|e| format!("at `consumers[username={name}].{}`: {e}", e.path()))?;
        for (key, cred) in compiled.inline_credentials {
            if consumers.insert_credential(key.clone(), cred).is_some() {
                return Err(format!(
                    "at `consumers[username={name}].plugins`: {}",
                    duplicate_key(&key)
                ));
            }
        }
        consumers
            .by_name
            .insert(compiled.consumer.username.clone(), compiled.consumer);
    }
    for ((user, id), c) in res.credentials() {
        let spec = c
            .spec()
            .map_err(|e| format!("at `consumers[username={user}].credentials[id={id}]`: {e}"))?;
        let (key, cred) =
            snapshot::compile_credential(consumers.shared_name(user), id.clone(), &spec, cx)
                .map_err(|e| {
                    format!(
                        "at `consumers[username={user}].credentials[id={id}].{}`: {e}",
                        e.path()
                    )
                })?;
        if consumers.insert_credential(key.clone(), cred).is_some() {
            return Err(format!(
                "at `consumers[username={user}].credentials[id={id}]`: {}",
                duplicate_key(&key)
            ));
        }
    }
    Ok(Built {
        routes,
        consumers: Arc::new(consumers),
    })
}

/// Validates a whole config file without running anything (`portcullis validate`).
pub fn validate(config: &FileConfig, file: &str) -> Result<(), LoadError> {
    let shared = crate::plugins::Shared::default();
    let res = file_layer(config).map_err(|error| LoadError::Resource {
        file: file.to_owned(),
        error,
    })?;
    let res = Effective {
        file: &res,
        admin: &StateFile::default(),
    };
    build(&res, &BuildContext { shared: &shared }).map_err(|error| LoadError::Resource {
        file: file.to_owned(),
        error,
    })?;
    Ok(())
}
