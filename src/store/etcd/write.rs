//! Admin API writes with the etcd provider: validated and compiled as with the
//! file provider, then committed in one transaction guarded by the revision that
//! was read, so concurrent writers cannot both "create" one id and a merge never
//! overwrites a version it did not see. The answer waits for this replica's watch.
use etcd_client::{Compare, CompareOp, DeleteOptions, TxnOp};
use serde_json::Value;

use super::Etcd;
use crate::plugins::BuildContext;
use crate::resources::{CredentialSpec, RouteSpec};
use crate::snapshot::{self, KeyOwner};
use crate::store::layers::{Keyed, Stamp, Stored, view};
use crate::store::{ResourceId, Store, WriteError, claim, conflict, consumer_body, now, parse};

impl Store {
    pub(in crate::store) async fn put_etcd(
        &self,
        etcd: &Etcd,
        id: ResourceId,
        body: Value,
        expected: Option<u64>,
    ) -> Result<(bool, Value), WriteError> {
        let key = etcd.key(&id);
        let current = etcd.read(&key).await.map_err(WriteError::Unavailable)?;
        if let Some(expected) = expected
            && current.as_ref().map(|c| c.2 as u64) != Some(expected)
        {
            return Err(conflict(&id));
        }
        let create_time = current
            .as_ref()
            .and_then(|(v, ..)| v.get("create_time")?.as_i64());
        let t = now();
        let cx = BuildContext {
            shared: &self.runtime.shared,
        };
        let mut when = vec![match &current {
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Some((_, _, m)) => Compare::mod_revision(key.clone(), CompareOp::Equal, *m),
        }];
        // Validate and compile exactly as the file provider does; the compiled
        // result is dropped: this replica applies the write from the watch.
        let value = match &id {
            ResourceId::Route(rid) => {
                let mut spec: RouteSpec = parse(body)?;
                spec.id = Some(rid.clone());
                snapshot::compile_route(rid, &spec, &cx)?;
                stamp(&spec, rid, create_time, t)
            }
            ResourceId::Consumer(name) => {
                let (spec, compiled) = consumer_body(name, body, &cx)?;
                claim(
                    &self.inner.lock().await.consumers,
                    compiled.inline_credentials.iter().map(|(key, _)| key),
                    KeyOwner::Consumer(name),
                )?;
                stamp(&spec, name, create_time, t)
            }
            ResourceId::Credential(user, cid) => {
                let consumer_key = etcd.key(&ResourceId::Consumer(user.clone()));
                if etcd
                    .read(&consumer_key)
                    .await
                    .map_err(WriteError::Unavailable)?
                    .is_none()
                {
                    return Err(WriteError::NotFound("consumer not found".into()));
                }
                when.push(Compare::create_revision(
                    consumer_key,
                    CompareOp::Greater,
                    0,
                ));
                let mut spec: CredentialSpec = parse(body)?;
                spec.id = Some(cid.clone());
                let (k, _) = snapshot::compile_credential(user.as_str(), cid.as_str(), &spec, &cx)?;
                claim(
                    &self.inner.lock().await.consumers,
                    [&k],
                    KeyOwner::Credential(user, cid),
                )?;
                stamp(&spec, cid, create_time, t)
            }
        };
        let json = serde_json::to_vec(&value).map_err(|e| WriteError::Invalid(e.to_string()))?;
        let revision = etcd
            .commit(when, vec![TxnOp::put(key, json, None)])
            .await
            .map_err(WriteError::Unavailable)?
            .ok_or_else(|| match &id {
                ResourceId::Credential(..) if current.is_none() => WriteError::Conflict(
                    "the resource or its consumer was changed by another write in the meantime; retry".into(),
                ),
                _ => conflict(&id),
            })?;
        self.await_applied(etcd, revision).await;
        Ok((current.is_none(), value))
    }

    pub(in crate::store) async fn delete_etcd(
        &self,
        etcd: &Etcd,
        id: &ResourceId,
    ) -> Result<(), WriteError> {
        let key = etcd.key(id);
        let Some((_, _, modified)) = etcd.read(&key).await.map_err(WriteError::Unavailable)? else {
            return Err(WriteError::NotFound("Key not found".into()));
        };
        let mut ops = vec![TxnOp::delete(key.clone(), None)];
        if let ResourceId::Consumer(_) = id {
            ops.push(TxnOp::delete(
                format!("{key}/"),
                Some(DeleteOptions::new().with_prefix()),
            ));
        }
        let revision = etcd
            .commit(
                vec![Compare::mod_revision(key, CompareOp::Equal, modified)],
                ops,
            )
            .await
            .map_err(WriteError::Unavailable)?
            .ok_or_else(|| conflict(id))?;
        self.await_applied(etcd, revision).await;
        Ok(())
    }
}

/// The Admin `value` of a spec stamped with its times (what etcd stores).
fn stamp<T: Keyed + serde::Serialize + serde::de::DeserializeOwned>(
    spec: &T,
    key: &str,
    create_time: Option<i64>,
    t: i64,
) -> Value {
    let stamp = Stamp {
        create_time: create_time.unwrap_or(t),
        update_time: t,
        created_index: 0,
        modified_index: 0,
    };
    view(&Stored::new(spec, None), stamp, key).0
}
