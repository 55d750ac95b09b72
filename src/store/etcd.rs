//! The etcd provider: many replicas, one truth.
//!
//! Resources are stored as APISIX stores them: the Admin API's `value` JSON under
//! `<prefix>/routes/<id>`, `<prefix>/consumers/<username>` and
//! `<prefix>/consumers/<username>/credentials/<id>`, with etcd's create/mod
//! revisions as `createdIndex`/`modifiedIndex`. Each replica reads the whole
//! prefix at one revision, then watches from the next one and applies events in
//! order, through the same incremental publish as an Admin write. When the watch
//! breaks (compaction, etcd restart, lost connection) the replica reads the whole
//! prefix again and swaps in a freshly built state at once; until then the last
//! good snapshot keeps serving.
//!
//! A write is one transaction guarded by the revision the writer read (or "does
//! not exist yet" for a create), so two replicas racing on one id cannot both
//! believe they created it, and a PATCH never overwrites a change it did not see.
//! The Admin API answers after etcd acknowledged and this replica's mirror has
//! applied the write, so a GET right after a PUT on the same replica sees it.
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, Txn,
    TxnOp, WatchOptions,
};
use serde_json::Value;

use super::{Inner, LoadError, ResourceId, Store};
use crate::config::{FileConfig, StoreSettings};
use crate::plugins::BuildContext;
use crate::runtime::Runtime;

/// The largest etcd answer accepted (gRPC's default is 4 MiB): one watch answer
/// carries a whole transaction, and values may be up to etcd's 1.5 MiB.
const MAX_MESSAGE: usize = 64 << 20;

/// A connected etcd and the prefix this deployment's resources live under.
pub struct Etcd {
    client: Client,
    prefix: String,
    timeout: Duration,
}

/// One change read from etcd, in revision order.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Put {
        id: ResourceId,
        value: Value,
        created: u64,
        modified: u64,
    },
    Delete {
        id: ResourceId,
        revision: u64,
    },
}

impl Etcd {
    pub async fn connect(settings: &StoreSettings) -> Result<Self, String> {
        let timeout = Duration::from_secs_f64(settings.timeout);
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            // A dead peer must break the watch, or a replica would wait forever on a
            // stream that will never deliver again.
            .with_keep_alive(Duration::from_secs(5), timeout)
            .with_keep_alive_while_idle(true);
        if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
            opts = opts.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &settings.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca {
                t = t.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(t);
        }
        let client = tokio::time::timeout(
            timeout,
            Client::connect(settings.endpoints.clone(), Some(opts)),
        )
        .await
        .map_err(|_| format!("no answer from {:?} within {timeout:?}", settings.endpoints))?
        .map_err(|e| format!("cannot connect to {:?}: {e}", settings.endpoints))?;
        Ok(Etcd {
            client,
            prefix: settings.prefix.clone(),
            timeout,
        })
    }

    /// The etcd key of a resource.
    pub fn key(&self, id: &ResourceId) -> String {
        key(&self.prefix, id)
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("etcd {what} failed: {e}")),
            Err(_) => Err(format!("etcd {what} timed out after {:?}", self.timeout)),
        }
    }

    /// Every resource under the prefix, as changes at one revision. Read in pages
    /// pinned to the first page's revision: one answer with 100k consumers would
    /// pass the gRPC message limit, and pinning keeps the pages one consistent view.
    /// A page still too large (big values, or foreign keys under the prefix) is
    /// asked for again in halves.
    pub async fn load(&self) -> Result<(Vec<Change>, u64), String> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let mut page: i64 = 1000;
        let mut from = format!("{}/", self.prefix).into_bytes();
        // The end of the `<prefix>/` range: '/' + 1 is '0'.
        let end = format!("{}0", self.prefix).into_bytes();
        let mut revision = 0;
        let mut changes = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(page);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = match tokio::time::timeout(self.timeout, kv.get(from.clone(), Some(opts)))
                .await
            {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) if page > 1 && e.to_string().contains("message length too large") => {
                    page /= 2;
                    continue;
                }
                Ok(Err(e)) => return Err(format!("etcd range failed: {e}")),
                Err(_) => return Err(format!("etcd range timed out after {:?}", self.timeout)),
            };
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                let Some(id) = kv.key_str().ok().and_then(|k| parse_key(&self.prefix, k)) else {
                    continue;
                };
                changes.extend(change_of_put(
                    id,
                    kv.value(),
                    kv.create_revision(),
                    kv.mod_revision(),
                ));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((changes, revision as u64)),
            }
        }
    }

    /// The current value of one key: (value, create revision, mod revision).
    async fn read(&self, key: &str) -> Result<Option<(Value, i64, i64)>, String> {
        let mut client = self.client.clone();
        let resp = self.bounded("get", client.get(key, None)).await?;
        Ok(resp.kvs().first().map(|kv| {
            (
                serde_json::from_slice(kv.value()).unwrap_or(Value::Null),
                kv.create_revision(),
                kv.mod_revision(),
            )
        }))
    }

    /// Runs a guarded transaction; `Ok(Some(revision))` when it committed.
    async fn commit(&self, when: Vec<Compare>, then: Vec<TxnOp>) -> Result<Option<u64>, String> {
        let mut client = self.client.clone();
        let resp = self
            .bounded("txn", client.txn(Txn::new().when(when).and_then(then)))
            .await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision()) as u64))
    }
}

pub fn key(prefix: &str, id: &ResourceId) -> String {
    match id {
        ResourceId::Route(r) => format!("{prefix}/routes/{r}"),
        ResourceId::Consumer(u) => format!("{prefix}/consumers/{u}"),
        ResourceId::Credential(u, c) => format!("{prefix}/consumers/{u}/credentials/{c}"),
    }
}

/// The resource an etcd key names; `None` for keys portcullis does not own.
pub fn parse_key(prefix: &str, key: &str) -> Option<ResourceId> {
    let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    let id = match parts.as_slice() {
        ["routes", id] if crate::resources::valid_id(id) => ResourceId::Route((*id).into()),
        ["consumers", u] if crate::resources::valid_username(u) => {
            ResourceId::Consumer((*u).into())
        }
        ["consumers", u, "credentials", id]
            if crate::resources::valid_username(u) && crate::resources::valid_id(id) =>
        {
            ResourceId::Credential((*u).into(), (*id).into())
        }
        _ => return None,
    };
    Some(id)
}

fn change_of_put(id: ResourceId, value: &[u8], created: i64, modified: i64) -> Option<Change> {
    match serde_json::from_slice::<Value>(value) {
        Ok(value) => Some(Change::Put {
            id,
            value,
            created: created as u64,
            modified: modified as u64,
        }),
        Err(e) => {
            tracing::error!(key = %id.key(), error = %e, "etcd value is not JSON; ignoring it");
            None
        }
    }
}

impl Store {
    /// Connects to etcd, loads the whole prefix, publishes the first snapshot and
    /// starts the watch that keeps this replica in step.
    pub async fn open_etcd(
        runtime: Arc<Runtime>,
        config: &FileConfig,
    ) -> Result<Arc<Self>, LoadError> {
        let etcd = Etcd::connect(&config.store)
            .await
            .map_err(LoadError::Etcd)?;
        let (changes, revision) = etcd.load().await.map_err(LoadError::Etcd)?;
        let store = Arc::new(Store {
            runtime,
            etcd: Some(etcd),
            applied: tokio::sync::watch::channel(0).0,
            inner: tokio::sync::Mutex::new(Inner::empty(config.unmatched)),
        });
        let count = changes.len();
        store.replace_all(changes, revision).await;
        tracing::info!(
            prefix = %config.store.prefix,
            revision,
            resources = count,
            "configuration loaded from etcd"
        );
        tokio::spawn(watch(Arc::downgrade(&store), revision));
        Ok(store)
    }

    /// Builds a whole new state from a full load and swaps it in at once.
    async fn replace_all(&self, changes: Vec<Change>, revision: u64) {
        let mut inner = self.inner.lock().await;
        let mut fresh = Inner::empty(inner.unmatched);
        let cx = BuildContext {
            shared: &self.runtime.shared,
        };
        for change in changes {
            fresh.apply(&cx, change);
        }
        fresh.admin.index = revision;
        *inner = fresh;
        self.republish_routes(&inner);
        drop(inner);
        self.applied.send_replace(revision);
    }

    /// Applies the events of one watch answer, publishing once at the end.
    async fn apply_changes(&self, changes: Vec<Change>, revision: u64) {
        let mut inner = self.inner.lock().await;
        let cx = BuildContext {
            shared: &self.runtime.shared,
        };
        let mut routes_changed = false;
        for change in changes {
            routes_changed |= inner.apply(&cx, change);
        }
        inner.admin.index = inner.admin.index.max(revision);
        if routes_changed {
            self.republish_routes(&inner);
        }
        drop(inner);
        self.applied.send_if_modified(|r| {
            let newer = revision > *r;
            *r = (*r).max(revision);
            newer
        });
    }

    /// Waits (bounded) until the mirror has applied `revision`, so the answer to a
    /// write is followed by reads that see it. The write is durable either way.
    async fn await_applied(&self, etcd: &Etcd, revision: u64) {
        let mut rx = self.applied.subscribe();
        if tokio::time::timeout(etcd.timeout, rx.wait_for(|r| *r >= revision))
            .await
            .is_err()
        {
            tracing::warn!(
                revision,
                "etcd acknowledged a write the watch has not delivered yet"
            );
        }
    }
}

/// Follows etcd from `revision + 1` for as long as the store lives; after any break
/// it reloads everything at a new revision and follows from there.
async fn watch(store: std::sync::Weak<Store>, mut revision: u64) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(s) = store.upgrade() else { return };
        let Some(etcd) = &s.etcd else { return };
        let mut client = etcd
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let prefix = format!("{}/", etcd.prefix);
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision as i64 + 1);
        let reason = match client.watch(prefix, Some(opts)).await {
            Err(e) => format!("cannot start the watch: {e}"),
            Ok(mut stream) => {
                drop(s);
                loop {
                    let msg = stream.message().await;
                    let Some(s) = store.upgrade() else { return };
                    let Some(etcd) = &s.etcd else { return };
                    match msg {
                        Err(e) => break format!("watch failed: {e}"),
                        Ok(None) => break "watch closed".into(),
                        Ok(Some(resp)) if resp.compact_revision() > 0 => {
                            break format!("revision compacted up to {}", resp.compact_revision());
                        }
                        Ok(Some(resp)) if resp.canceled() => {
                            break format!("watch cancelled: {}", resp.cancel_reason());
                        }
                        Ok(Some(resp)) => {
                            backoff = Duration::from_millis(200);
                            let mut changes = Vec::new();
                            let mut last = revision;
                            for ev in resp.events() {
                                let Some(kv) = ev.kv() else { continue };
                                last = last.max(kv.mod_revision() as u64);
                                let Some(id) =
                                    kv.key_str().ok().and_then(|k| parse_key(&etcd.prefix, k))
                                else {
                                    continue;
                                };
                                match ev.event_type() {
                                    EventType::Put => changes.extend(change_of_put(
                                        id,
                                        kv.value(),
                                        kv.create_revision(),
                                        kv.mod_revision(),
                                    )),
                                    EventType::Delete => changes.push(Change::Delete {
                                        id,
                                        revision: kv.mod_revision() as u64,
                                    }),
                                }
                            }
                            if last > revision {
                                s.apply_changes(changes, last).await;
                                revision = last;
                            }
                        }
                    }
                }
            }
        };
        tracing::warn!(%reason, revision, "etcd watch interrupted; serving the last good snapshot and reloading");
        metrics::counter!("portcullis_etcd_resyncs_total").increment(1);
        // Reload the whole prefix at a new revision, retrying while etcd is away.
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            let Some(s) = store.upgrade() else { return };
            let Some(etcd) = &s.etcd else { return };
            match etcd.load().await {
                Ok((changes, rev)) => {
                    s.replace_all(changes, rev).await;
                    tracing::info!(revision = rev, "configuration reloaded from etcd");
                    revision = rev;
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "etcd unreachable; serving the last good snapshot")
                }
            }
        }
    }
}

mod mirror;
#[cfg(test)]
mod tests;
mod write;
