//! The two layers of resources — the config file and the Admin API's writes — and
//! the state file that persists the second. Lookups read through the layers
//! instead of materialising a merged copy, so an Admin call costs the same with ten
//! resources or a hundred thousand.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::resources::{ConsumerSpec, CredentialSpec, RouteSpec};

/// A spec as its compact JSON text.
///
/// The store keeps every resource's spec for the Admin API and for rebuilds, but
/// nothing on the request path reads it: Checks use the compiled snapshot. Parsed
/// specs are maps of maps (a B-tree leaf alone is ~600 bytes), which made the specs
/// most of the memory at 100k consumers; as text a credential is ~100 bytes. Specs
/// are parsed again only when an Admin call or a rebuild needs them. [`Stored`] holds
/// this text; a config file's consumers are kept as `Compact` from the moment they are
/// read until the file layer copies them into the store.
pub struct Compact<T> {
    json: Box<str>,
    kind: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> Compact<T> {
    pub fn new(spec: &T) -> Self {
        Compact {
            // Specs are plain data (strings, numbers, maps with string keys): their
            // serialisation cannot fail.
            json: serde_json::to_string(spec)
                .expect("a spec serialises to JSON")
                .into_boxed_str(),
            kind: PhantomData,
        }
    }
}

impl<T> Clone for Compact<T> {
    fn clone(&self) -> Self {
        Compact {
            json: self.json.clone(),
            kind: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Compact<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.json)
    }
}

/// A stored resource: its spec with APISIX's bookkeeping, in one allocation — the
/// stamp packed as varints, then the spec's compact JSON text.
///
/// The store keeps one per route, consumer and credential (210k at 100k consumers).
/// A 32-byte stamp kept beside the spec widened every B-tree slot; behind an `Arc`
/// shared by a whole config file it cost nothing there but a 64-byte heap block per
/// Admin write (13 MiB when 100k consumers came through the Admin API). Packed, an
/// Admin write's stamp is 11 bytes and the slot holds one pointer. A config file's
/// resources have no stamp of their own — they were all loaded at once, and their
/// layer holds the one stamp ([`Resources::declared`]) — so they are the spec's
/// text alone, which always starts with `{` where a packed stamp's length cannot.
/// The state file still holds the four fields beside `spec`.
pub struct Stored<T> {
    packed: Box<[u8]>,
    kind: PhantomData<fn() -> T>,
}

/// APISIX's times and etcd-style indexes of a stored resource.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub create_time: i64,
    pub update_time: i64,
    pub created_index: u64,
    pub modified_index: u64,
}

/// A stamp as `Stored` packs it: the update time and modified index as their
/// distance from the create time and created index, which is zero for everything a
/// config file declares and small for most Admin writes; zigzag (`sint64`) so that
/// any values, even out of order in a hand-edited state file, come back exactly.
#[derive(Clone, PartialEq, prost::Message)]
struct PackedStamp {
    #[prost(int64, tag = "1")]
    create_time: i64,
    #[prost(sint64, tag = "2")]
    updated_after: i64,
    #[prost(uint64, tag = "3")]
    created_index: u64,
    #[prost(sint64, tag = "4")]
    modified_after: i64,
}

impl<T: Serialize + DeserializeOwned> Stored<T> {
    /// `stamp` is `None` for a config file's resources (see [`Stored`]).
    pub fn new(spec: &T, stamp: Option<Stamp>) -> Self {
        let mut packed = Self::stamped(stamp, 128);
        let spec_at = packed.len();
        // Specs are plain data (strings, numbers, maps with string keys): their
        // serialisation cannot fail.
        serde_json::to_writer(&mut packed, spec).expect("a spec serialises to JSON");
        Self::from_packed(packed, spec_at)
    }

    /// A spec already kept as text (a config file's consumers), copied as it is.
    pub fn from_compact(spec: &Compact<T>, stamp: Option<Stamp>) -> Self {
        let mut packed = Self::stamped(stamp, spec.json.len());
        let spec_at = packed.len();
        packed.extend_from_slice(spec.json.as_bytes());
        Self::from_packed(packed, spec_at)
    }

    /// The spec, parsed again. It was written from a valid spec, so this fails only
    /// if the spec types changed incompatibly; callers report it.
    pub fn spec(&self) -> Result<T, String> {
        serde_json::from_slice(self.parts().1).map_err(|e| format!("stored spec unreadable: {e}"))
    }

    /// The spec as a JSON value, for the Admin API's answers.
    pub fn value(&self) -> Value {
        serde_json::from_slice(self.parts().1).unwrap_or(Value::Null)
    }
}

impl<T> Stored<T> {
    /// The resource's own stamp; `None` for a config file's resources, which their
    /// layer stamps ([`Resources::stamp_of`]).
    pub fn stamp(&self) -> Option<Stamp> {
        self.parts().0
    }

    /// A buffer holding the packed stamp, if any, with room for `spec_len` bytes of spec.
    fn stamped(stamp: Option<Stamp>, spec_len: usize) -> Vec<u8> {
        let Some(stamp) = stamp else {
            return Vec::with_capacity(spec_len);
        };
        let packed = PackedStamp {
            create_time: stamp.create_time,
            updated_after: stamp.update_time.wrapping_sub(stamp.create_time),
            created_index: stamp.created_index,
            modified_after: stamp.modified_index.wrapping_sub(stamp.created_index) as i64,
        };
        let mut buf = Vec::with_capacity(prost::Message::encoded_len(&packed) + 1 + spec_len);
        // Encoding into a growable vector cannot run out of room.
        prost::Message::encode_length_delimited(&packed, &mut buf)
            .expect("a vector grows to hold the stamp");
        buf
    }

    fn from_packed(packed: Vec<u8>, spec_at: usize) -> Self {
        // `parts` tells a stamp from none by this `{`.
        debug_assert_eq!(packed.get(spec_at), Some(&b'{'), "a spec is a JSON object");
        Stored {
            packed: packed.into_boxed_slice(),
            kind: PhantomData,
        }
    }

    /// The stamp and the spec's JSON text.
    fn parts(&self) -> (Option<Stamp>, &[u8]) {
        let mut rest = &self.packed[..];
        // A spec is a JSON object; a packed stamp's length is at most 44.
        if rest.first() == Some(&b'{') {
            return (None, rest);
        }
        // Only `stamped` writes these bytes, so they always decode.
        let p: PackedStamp = prost::Message::decode_length_delimited(&mut rest)
            .expect("a stamp packed by Stored::stamped");
        let stamp = Stamp {
            create_time: p.create_time,
            update_time: p.create_time.wrapping_add(p.updated_after),
            created_index: p.created_index,
            modified_index: p.created_index.wrapping_add(p.modified_after as u64),
        };
        (Some(stamp), rest)
    }
}

impl<T> Clone for Stored<T> {
    fn clone(&self) -> Self {
        Stored {
            packed: self.packed.clone(),
            kind: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Stored<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (stamp, json) = self.parts();
        f.debug_struct("Stored")
            .field("spec", &String::from_utf8_lossy(json))
            .field("stamp", &stamp)
            .finish()
    }
}

/// The state file's form: the spec itself beside the stamp's four fields. Only the
/// Admin layer is persisted, and all its resources have a stamp of their own. The
/// spec's text goes out as it is kept (compact JSON, valid in YAML too) rather than
/// parsed into a tree and printed again: every Admin write rewrites the whole file,
/// 0.27 → 0.13 s with 210k resources in it.
impl<T: Serialize + DeserializeOwned> Serialize for Stored<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Fields<'a> {
            spec: &'a serde_json::value::RawValue,
            #[serde(flatten)]
            stamp: Option<Stamp>,
        }
        let (stamp, json) = self.parts();
        let spec: &serde_json::value::RawValue =
            serde_json::from_slice(json).map_err(serde::ser::Error::custom)?;
        Fields { spec, stamp }.serialize(s)
    }
}

/// Read field by field rather than through `flatten`, which makes serde buffer the
/// whole object (the spec included) as an untyped tree before reading it again.
impl<'de, T: Serialize + DeserializeOwned> Deserialize<'de> for Stored<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(bound(deserialize = "T: DeserializeOwned"))]
        struct Fields<T> {
            spec: T,
            create_time: i64,
            update_time: i64,
            created_index: u64,
            modified_index: u64,
        }
        let f = Fields::<T>::deserialize(d)?;
        Ok(Stored::new(
            &f.spec,
            Some(Stamp {
                create_time: f.create_time,
                update_time: f.update_time,
                created_index: f.created_index,
                modified_index: f.modified_index,
            }),
        ))
    }
}

/// Read only as part of the state file (`StateFile`'s own reader).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Resources {
    /// The stamp of the resources without one of their own: a config file's, all
    /// loaded at the same time with index 0. Zero in the Admin layer, whose resources
    /// all have their own.
    #[serde(skip)]
    pub declared: Stamp,
    pub routes: BTreeMap<String, Stored<RouteSpec>>,
    /// Keyed by the consumer's name as the compiled consumer and its credentials
    /// hold it: one allocation for the four places a name is kept.
    pub consumers: BTreeMap<Arc<str>, Stored<ConsumerSpec>>,
    /// Keyed by (username, credential id).
    #[serde(serialize_with = "credential_keys")]
    pub credentials: CredentialMap,
}

impl Resources {
    /// A resource's stamp: its own, or its config file's. Either layer's resources
    /// may be passed to the file layer's `stamp_of`.
    pub fn stamp_of<T>(&self, s: &Stored<T>) -> Stamp {
        s.stamp().unwrap_or(self.declared)
    }
}

/// A map read from its entries in one go: a B-tree collected from entries is built
/// sorted with full nodes, where inserting them one by one in key order (as the
/// state file lists them) leaves every node about half full. Like inserting, a
/// repeated key keeps its last value.
struct Packed<K, V>(BTreeMap<K, V>);

impl<'de, K: Ord + Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for Packed<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries<K, V>(PhantomData<fn() -> (K, V)>);
        impl<'de, K: Ord + Deserialize<'de>, V: Deserialize<'de>> serde::de::Visitor<'de>
            for Entries<K, V>
        {
            type Value = BTreeMap<K, V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<Self::Value, A::Error> {
                packed(m, |m| m.next_entry())
            }
        }
        d.deserialize_map(Entries(PhantomData)).map(Packed)
    }
}

/// Reads every entry of `m` with `entry` and packs them as [`Packed`] does.
fn packed<'de, A: serde::de::MapAccess<'de>, K: Ord, V>(
    mut m: A,
    mut entry: impl FnMut(&mut A) -> Result<Option<(K, V)>, A::Error>,
) -> Result<BTreeMap<K, V>, A::Error> {
    let mut out = Vec::with_capacity(m.size_hint().unwrap_or(0));
    while let Some(e) = entry(&mut m)? {
        out.push(e);
    }
    Ok(out.into_iter().collect())
}

/// JSON objects need string keys: credentials persist as `"user/id"`, read back by
/// [`CredentialsSeed`].
fn credential_keys<S: Serializer>(map: &CredentialMap, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(map.iter().map(|((u, id), v)| (credential_text(u, id), v)))
}

/// A credential as `"user/id"`: its key in the state file, the journal and the
/// tombstones, which must agree.
pub fn credential_text(user: &str, id: &str) -> String {
    format!("{user}/{id}")
}

/// [`credential_text`]'s two parts; a username has no `/`, so the first one splits.
pub fn split_credential_text(text: &str) -> Result<(&str, &str), String> {
    text.split_once('/')
        .ok_or_else(|| format!("bad credential key {text:?}"))
}

/// (username, credential id), shared with the compiled credential.
pub type CredentialKey = (Arc<str>, Arc<str>);
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

impl Tombstones {
    /// Whether the Admin API deleted this file-declared credential. Most stores have
    /// no such tombstone: then no key is formatted (a rebuild asks for every credential).
    pub fn has_credential(&self, user: &str, id: &str) -> bool {
        !self.credentials.is_empty() && self.credentials.contains(&credential_text(user, id))
    }
}

/// The state file: the Admin API layer. JSON, which is also valid YAML.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StateFile {
    pub version: u32,
    pub index: u64,
    #[serde(flatten)]
    pub written: Resources,
    #[serde(default)]
    pub deleted: Tombstones,
}

impl StateFile {
    /// An Admin layer with nothing written yet, in the state file's current format.
    pub fn empty() -> Self {
        StateFile {
            version: 1,
            ..Default::default()
        }
    }
}

/// Read key by key rather than derived: a flattened field makes serde buffer every
/// key it does not know (here, every resource) as an untyped tree first — over
/// 100 MB at 100k consumers; and the credentials, which portcullis writes after the
/// consumers, are keyed by their consumer's own name (`CredentialsSeed`).
impl<'de> Deserialize<'de> for StateFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(StateVisitor)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum StateKey {
    Version,
    Index,
    Routes,
    Consumers,
    Credentials,
    Deleted,
    #[serde(other)]
    Other,
}

struct StateVisitor;

impl<'de> serde::de::Visitor<'de> for StateVisitor {
    type Value = StateFile;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "portcullis's state file (version, index, routes, consumers, credentials, deleted)",
        )
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<StateFile, A::Error> {
        use serde::de::Error;
        fn once<T, E: Error>(slot: &Option<T>, name: &'static str) -> Result<(), E> {
            match slot {
                Some(_) => Err(E::duplicate_field(name)),
                None => Ok(()),
            }
        }
        let (mut version, mut index, mut deleted) = (None, None, None);
        let (mut routes, mut consumers, mut credentials) = (None, None, None);
        let mut ids = HashSet::new();
        // Credentials read after the consumers take their names as they are read.
        let mut names_shared = true;
        while let Some(key) = m.next_key::<StateKey>()? {
            match key {
                StateKey::Version => {
                    once(&version, "version")?;
                    version = Some(m.next_value()?);
                }
                StateKey::Index => {
                    once(&index, "index")?;
                    index = Some(m.next_value()?);
                }
                StateKey::Routes => {
                    once(&routes, "routes")?;
                    routes = Some(m.next_value::<Packed<String, Stored<RouteSpec>>>()?.0);
                }
                StateKey::Consumers => {
                    once(&consumers, "consumers")?;
                    consumers = Some(m.next_value::<Packed<Arc<str>, Stored<ConsumerSpec>>>()?.0);
                }
                StateKey::Credentials => {
                    once(&credentials, "credentials")?;
                    names_shared = consumers.is_some();
                    credentials = Some(m.next_value_seed(CredentialsSeed {
                        consumers: consumers.as_ref(),
                        ids: &mut ids,
                    })?);
                }
                StateKey::Deleted => {
                    once(&deleted, "deleted")?;
                    deleted = Some(m.next_value()?);
                }
                StateKey::Other => {
                    m.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        let consumers = consumers.unwrap_or_default();
        let mut credentials = credentials.unwrap_or_default();
        // Hand-edited, the credentials may come first: their names are then shared now.
        if !names_shared && !consumers.is_empty() {
            credentials = credentials
                .into_iter()
                .map(|((user, id), stored)| ((shared_name(&consumers, &user), id), stored))
                .collect();
        }
        Ok(StateFile {
            version: version.ok_or_else(|| A::Error::missing_field("version"))?,
            index: index.ok_or_else(|| A::Error::missing_field("index"))?,
            written: Resources {
                declared: Stamp::default(),
                routes: routes.unwrap_or_default(),
                consumers,
                credentials,
            },
            deleted: deleted.unwrap_or_default(),
        })
    }
}

/// `user`'s consumer's own name if it has one in `consumers`, else a new one.
pub(super) fn shared_name(
    consumers: &BTreeMap<Arc<str>, Stored<ConsumerSpec>>,
    user: &str,
) -> Arc<str> {
    consumers
        .get_key_value(user)
        .map_or_else(|| user.into(), |(name, _)| name.clone())
}

/// The credentials map of a state file, keyed as Admin writes and the file layer key
/// it: a credential's username is its consumer's own `Arc` and equal ids are one
/// `Arc`, found from the `"user/id"` text without allocating either again. Reading
/// them as strings and swapping them afterwards left 100k freed blocks (and a whole
/// freed B-tree) among what the store keeps.
struct CredentialsSeed<'a> {
    consumers: Option<&'a BTreeMap<Arc<str>, Stored<ConsumerSpec>>>,
    ids: &'a mut HashSet<Arc<str>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for CredentialsSeed<'_> {
    type Value = CredentialMap;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<CredentialMap, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for CredentialsSeed<'_> {
    type Value = CredentialMap;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of credentials keyed \"user/id\"")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<CredentialMap, A::Error> {
        let empty = BTreeMap::new();
        let consumers = self.consumers.unwrap_or(&empty);
        let ids = self.ids;
        packed(m, |m| {
            let key = CredentialKeySeed {
                consumers,
                ids: &mut *ids,
            };
            match m.next_key_seed(key)? {
                Some(key) => Ok(Some((key, m.next_value::<Stored<CredentialSpec>>()?))),
                None => Ok(None),
            }
        })
    }
}

/// One `"user/id"` key, read from the text the deserializer holds.
struct CredentialKeySeed<'a> {
    consumers: &'a BTreeMap<Arc<str>, Stored<ConsumerSpec>>,
    ids: &'a mut HashSet<Arc<str>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for CredentialKeySeed<'_> {
    type Value = CredentialKey;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<CredentialKey, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for CredentialKeySeed<'_> {
    type Value = CredentialKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a credential key \"user/id\"")
    }

    fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<CredentialKey, E> {
        let (user, id) = split_credential_text(k).map_err(E::custom)?;
        let id = match self.ids.get(id) {
            Some(shared) => shared.clone(),
            None => {
                let id: Arc<str> = id.into();
                self.ids.insert(id.clone());
                id
            }
        };
        Ok((shared_name(self.consumers, user), id))
    }
}

/// The resources in force: the file layer, minus tombstones, plus Admin writes.
/// Read through both layers rather than copied: a copy of the file layer was ~40 MB
/// of garbage at 100k consumers, interleaved with the snapshot being built.
pub struct Effective<'a> {
    pub file: &'a Resources,
    pub admin: &'a StateFile,
}

impl<'a> Effective<'a> {
    pub fn routes(&self) -> impl Iterator<Item = (&'a String, &'a Stored<RouteSpec>)> + 'a {
        let deleted = &self.admin.deleted.routes;
        layered(&self.file.routes, &self.admin.written.routes, move |id| {
            deleted.contains(id)
        })
    }

    pub fn consumers(&self) -> impl Iterator<Item = (&'a Arc<str>, &'a Stored<ConsumerSpec>)> + 'a {
        let deleted = &self.admin.deleted.consumers;
        layered(
            &self.file.consumers,
            &self.admin.written.consumers,
            move |u| deleted.contains(&**u),
        )
    }

    /// Credentials in force whose consumer is in force too.
    pub fn credentials(
        &self,
    ) -> impl Iterator<Item = (&'a CredentialKey, &'a Stored<CredentialSpec>)> + 'a {
        let (file, admin) = (self.file, self.admin);
        let deleted = &admin.deleted;
        layered(
            &file.credentials,
            &admin.written.credentials,
            move |(u, id)| deleted.consumers.contains(&**u) || deleted.has_credential(u, id),
        )
        .filter(move |((u, _), _)| {
            admin.written.consumers.contains_key(u)
                || (file.consumers.contains_key(u) && !deleted.consumers.contains(&**u))
        })
    }
}

/// What an in-place edit of the Admin layer replaced, to put back if persisting fails;
/// its keys are also what the journal records of the write.
pub struct Undo {
    pub index: u64,
    pub deleted: Tombstones,
    pub(super) routes: Vec<(String, Option<Stored<RouteSpec>>)>,
    pub(super) consumers: Vec<(Arc<str>, Option<Stored<ConsumerSpec>>)>,
    pub(super) credentials: Vec<(CredentialKey, Option<Stored<CredentialSpec>>)>,
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
            .push((name.into(), admin.written.consumers.get(name).cloned()));
        self
    }

    pub fn credential(mut self, admin: &StateFile, ck: &CredentialKey) -> Self {
        self.credentials
            .push((ck.clone(), admin.written.credentials.get(ck).cloned()));
        self
    }

    pub fn restore(self, admin: &mut StateFile) {
        fn put_back<K: Ord, V>(map: &mut BTreeMap<K, V>, entries: Vec<(K, Option<V>)>) {
            for (k, v) in entries.into_iter().rev() {
                set(map, k, v);
            }
        }
        admin.index = self.index;
        admin.deleted = self.deleted;
        put_back(&mut admin.written.routes, self.routes);
        put_back(&mut admin.written.consumers, self.consumers);
        put_back(&mut admin.written.credentials, self.credentials);
    }
}

/// `key` holds `value` in `map` afterwards; `None` removes it.
pub(super) fn set<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(v) => map.insert(key, v),
        None => map.remove(&key),
    };
}

/// File entries not deleted, overlaid with Admin writes, in key order: a merge of
/// the two sorted maps, copying neither.
pub fn layered<'a, K: Ord, V>(
    file: &'a BTreeMap<K, V>,
    written: &'a BTreeMap<K, V>,
    deleted: impl Fn(&K) -> bool + 'a,
) -> impl Iterator<Item = (&'a K, &'a V)> + 'a {
    overlay(
        file.iter().filter(move |(k, _)| !deleted(k)),
        written.iter(),
    )
}

/// Two runs of entries sorted by key, merged in key order; on equal keys the
/// `written` entry replaces the `file` one. [`layered`] over whole maps, or over
/// ranges of them (one consumer's credentials).
pub fn overlay<'a, K: Ord + 'a, V: 'a>(
    file: impl Iterator<Item = (&'a K, &'a V)> + 'a,
    written: impl Iterator<Item = (&'a K, &'a V)> + 'a,
) -> impl Iterator<Item = (&'a K, &'a V)> + 'a {
    let mut file = file.peekable();
    let mut written = written.peekable();
    std::iter::from_fn(move || match (file.peek(), written.peek()) {
        (Some((f, _)), Some((w, _))) => match f.cmp(w) {
            std::cmp::Ordering::Less => file.next(),
            std::cmp::Ordering::Greater => written.next(),
            std::cmp::Ordering::Equal => {
                file.next();
                written.next()
            }
        },
        (Some(_), None) => file.next(),
        (None, _) => written.next(),
    })
}

/// A written spec's stamp, keeping the creation of what it replaces (`old`'s stamp).
pub fn restamp<T: Serialize + DeserializeOwned>(
    spec: &T,
    old: Option<Stamp>,
    t: i64,
    index: u64,
) -> Stored<T> {
    Stored::new(
        spec,
        Some(Stamp {
            create_time: old.map_or(t, |o| o.create_time),
            update_time: t,
            created_index: old.map_or(index, |o| o.created_index),
            modified_index: index,
        }),
    )
}

/// The field of a spec that names it: the store keeps the name as the resource's key
/// and, for consumers and credentials, not in the spec's text.
pub trait Keyed {
    const KEY: &'static str;
}

impl Keyed for RouteSpec {
    const KEY: &'static str = "id";
}

impl Keyed for ConsumerSpec {
    const KEY: &'static str = "username";
}

impl Keyed for CredentialSpec {
    const KEY: &'static str = "id";
}

/// The `value` APISIX shows: the spec with its name (`key`) and times.
pub fn view<T: Keyed + Serialize + DeserializeOwned>(
    s: &Stored<T>,
    stamp: Stamp,
    key: &str,
) -> (Value, u64, u64) {
    let mut v = s.value();
    if let Value::Object(map) = &mut v {
        // First, where a client that wrote it most likely put it.
        map.shift_insert(0, T::KEY.into(), Value::String(key.to_owned()));
        map.insert("create_time".into(), stamp.create_time.into());
        map.insert("update_time".into(), stamp.update_time.into());
    }
    (v, stamp.created_index, stamp.modified_index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_packs_small_and_comes_back_exactly() {
        let spec: RouteSpec = serde_json::from_str(r#"{"uri": "/a"}"#).unwrap();
        let json_len = serde_json::to_string(&spec).unwrap().len();
        let t = 1_764_000_000;
        let stamp = |create_time, update_time, created_index, modified_index| {
            Some(Stamp {
                create_time,
                update_time,
                created_index,
                modified_index,
            })
        };
        // (stamp, bytes it adds to the spec's text; None: not checked)
        let cases = [
            // A config file's resources, an Admin write, an update made later.
            (None, Some(0)),
            (stamp(t, t, 210_000, 210_000), Some(11)),
            (stamp(t, t + 90, 7, 210_000), Some(16)),
            // Whatever a hand-edited state file says.
            (stamp(i64::MIN, i64::MAX, u64::MAX, 0), None),
            (stamp(-1, -5, 9, 3), None),
            (stamp(0, 0, 0, 0), Some(1)),
        ];
        for (stamp, packed_len) in cases {
            let stored = Stored::new(&spec, stamp);
            assert_eq!(stored.stamp(), stamp);
            assert_eq!(stored.spec().unwrap().uri, spec.uri);
            let copied = Stored::from_compact(&Compact::new(&spec), stamp);
            assert_eq!(copied.packed, stored.packed);
            if let Some(len) = packed_len {
                assert_eq!(stored.packed.len() - json_len, len, "{stamp:?}");
            }
        }
        assert_eq!(
            size_of::<Stored<RouteSpec>>(),
            16,
            "a boxed slice in each B-tree slot, nothing more"
        );
    }

    #[test]
    fn a_loaded_state_file_shares_names_and_ids_and_keeps_the_last_of_a_repeated_key() {
        let stamp =
            r#""create_time": 1, "update_time": 2, "created_index": 3, "modified_index": 4"#;
        let cred = format!(r#"{{"spec": {{"plugins": {{}}}}, {stamp}}}"#);
        let consumers = format!(
            r#""consumers": {{"alice": {{"spec": {{"username": "alice"}}, {stamp}}},
                              "bob": {{"spec": {{"username": "bob"}}, {stamp}}}}}"#
        );
        let credentials = format!(
            r#""credentials": {{"alice/jwt": {cred}, "bob/jwt": {cred}, "carol/x": {cred}}}"#
        );
        let routes = format!(
            r#""routes": {{"r": {{"spec": {{"uri": "/a"}}, {stamp}}},
                           "r": {{"spec": {{"uri": "/b"}}, {stamp}}}}}"#
        );
        let check = |state: StateFile| {
            let w = &state.written;
            assert_eq!((state.version, state.index), (1, 9));
            assert_eq!(w.routes.len(), 1);
            assert!(w.routes["r"].spec().unwrap().uri.as_deref() == Some("/b"));
            let name = |n: &str| w.consumers.get_key_value(n).unwrap().0.clone();
            let keys: Vec<_> = w.credentials.keys().cloned().collect();
            assert_eq!(keys.len(), 3);
            assert!(Arc::ptr_eq(&keys[0].0, &name("alice")));
            assert!(Arc::ptr_eq(&keys[1].0, &name("bob")));
            assert!(Arc::ptr_eq(&keys[0].1, &keys[1].1), "one `jwt` id");
            // A credential whose consumer is not in this layer (it is in the file) keeps its own.
            assert_eq!(&*keys[2].0, "carol");
            assert_eq!(
                w.consumers["bob"].stamp().unwrap(),
                serde_json::from_str::<Stamp>(&format!("{{{stamp}}}")).unwrap()
            );
        };
        // As portcullis writes it, then hand-edited: credentials first, a key it does
        // not know, and the same as YAML (without the repeated route, which YAML refuses).
        let as_written =
            format!(r#"{{"version": 1, "index": 9, {routes}, {consumers}, {credentials}}}"#);
        check(serde_json::from_str(&as_written).unwrap());
        let reordered = format!(
            r#"{{{credentials}, "note": [1, 2], {consumers}, {routes}, "index": 9, "version": 1}}"#
        );
        check(serde_json::from_str(&reordered).unwrap());
        let routes = format!(r#""routes": {{"r": {{"spec": {{"uri": "/b"}}, {stamp}}}}}"#);
        check(
            serde_yaml::from_str(&format!(
                "{{{credentials}, {consumers}, {routes}, version: 1, index: 9}}"
            ))
            .unwrap(),
        );

        for (text, error) in [
            (
                format!(r#"{{"version": 1, "index": 9, {consumers}, {consumers}}}"#),
                "duplicate field `consumers`",
            ),
            (r#"{"index": 9}"#.to_owned(), "missing field `version`"),
            (
                format!(r#"{{"version": 1, "index": 9, "credentials": {{"nobody": {cred}}}}}"#),
                "bad credential key \"nobody\"",
            ),
        ] {
            let e = serde_json::from_str::<StateFile>(&text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(error), "{e}");
        }
    }
}
