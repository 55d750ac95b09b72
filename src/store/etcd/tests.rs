//! Key layout and the application of etcd changes, without an etcd: the watch
//! delivers exactly these `Change`s.
use serde_json::json;

use super::*;
use crate::config::Unmatched;
use crate::plugins::BuildContext;
use crate::plugins::Shared;

const P: &str = "/portcullis";

#[test]
fn keys_round_trip_and_foreign_keys_are_ignored() {
    for id in [
        ResourceId::Route("r-1".into()),
        ResourceId::Consumer("alice".into()),
        ResourceId::Credential("alice".into(), "c.1".into()),
    ] {
        assert_eq!(parse_key(P, &key(P, &id)), Some(id));
    }
    assert_eq!(
        key(P, &ResourceId::Route("1".into())),
        "/portcullis/routes/1"
    );
    for foreign in [
        "/portcullis",
        "/portcullis/",
        "/portcullis/routes",
        "/portcullis/routes/",
        "/portcullis/routes/a/b",
        "/portcullis/upstreams/1",
        "/portcullis/consumers/alice/credentials",
        "/portcullis/consumers/al ice",
        "/portcullis2/routes/1",
        "/other/routes/1",
    ] {
        assert_eq!(parse_key(P, foreign), None, "{foreign}");
    }
}

fn put(id: ResourceId, value: Value, revision: u64) -> Change {
    Change::Put {
        id,
        value,
        created: revision,
        modified: revision,
    }
}

fn consumer(name: &str, key: &str) -> Value {
    json!({"username": name, "plugins": {"jwt-auth": {"key": key, "secret": "a-secret-long-enough-1"}},
           "create_time": 1, "update_time": 2})
}

fn credential(key: &str) -> Value {
    json!({"plugins": {"jwt-auth": {"key": key, "secret": "a-secret-long-enough-2"}}})
}

#[test]
fn changes_update_the_mirror_and_the_credential_index() {
    let shared = Shared::default();
    let cx = BuildContext { shared: &shared };
    let mut inner = Inner::empty(Unmatched::Deny);
    let alice = ResourceId::Consumer("alice".into());
    let cred = ResourceId::Credential("alice".into(), "c1".into());
    assert!(!inner.apply(&cx, put(alice.clone(), consumer("alice", "ka"), 5)));
    assert!(!inner.apply(&cx, put(cred.clone(), credential("kc"), 6)));
    assert!(inner.consumers.credential("jwt-auth", "ka").is_some());
    let c = inner.consumers.credential("jwt-auth", "kc").unwrap();
    assert_eq!(c.credential_id.as_deref(), Some("c1"));
    let stored = inner.consumer("alice").unwrap();
    let stamp = stored.stamp().unwrap();
    assert_eq!((stamp.create_time, stamp.update_time), (1, 2));
    assert_eq!((stamp.created_index, stamp.modified_index), (5, 5));

    // A route change asks for a new route index.
    let r = ResourceId::Route("r1".into());
    assert!(inner.apply(&cx, put(r.clone(), json!({"uri": "/a", "id": "r1"}), 7)));
    assert!(inner.routes.contains_key("r1"));

    // An event older than what the mirror holds (a write this replica already
    // saw in a full load) changes nothing.
    assert!(!inner.apply(&cx, put(cred.clone(), credential("old"), 6)));
    assert!(inner.consumers.credential("jwt-auth", "old").is_none());

    // Deleting the consumer stops its credentials, even before their own events.
    assert!(!inner.apply(
        &cx,
        Change::Delete {
            id: alice.clone(),
            revision: 8
        }
    ));
    assert!(inner.consumers.credential("jwt-auth", "ka").is_none());
    assert!(inner.consumers.credential("jwt-auth", "kc").is_none());
    assert!(inner.credential("alice", "c1").is_none());
    assert!(!inner.apply(
        &cx,
        Change::Delete {
            id: cred,
            revision: 8
        }
    ));
    assert!(inner.apply(&cx, Change::Delete { id: r, revision: 9 }));
    assert!(inner.routes.is_empty());
}

#[test]
fn a_value_that_does_not_compile_is_not_served() {
    let shared = Shared::default();
    let cx = BuildContext { shared: &shared };
    let mut inner = Inner::empty(Unmatched::Deny);
    let r = ResourceId::Route("r1".into());
    inner.apply(&cx, put(r.clone(), json!({"uri": "/a"}), 3));
    assert!(inner.routes.contains_key("r1"));
    // Replaced in etcd by something this version cannot compile: not served.
    inner.apply(
        &cx,
        put(r.clone(), json!({"uri": "/a", "plugins": {"nope": {}}}), 4),
    );
    assert!(!inner.routes.contains_key("r1"));
    assert!(inner.route("r1").is_none());
    // A key already held by another consumer stays with its first holder.
    inner.apply(
        &cx,
        put(ResourceId::Consumer("a".into()), consumer("a", "k"), 5),
    );
    inner.apply(
        &cx,
        put(ResourceId::Consumer("b".into()), consumer("b", "k"), 6),
    );
    assert_eq!(
        &*inner
            .consumers
            .credential("jwt-auth", "k")
            .unwrap()
            .username,
        "a"
    );
}

#[test]
fn a_consumer_fixed_after_a_bad_value_gets_its_credentials_back() {
    let shared = Shared::default();
    let cx = BuildContext { shared: &shared };
    let mut inner = Inner::empty(Unmatched::Deny);
    let carol = ResourceId::Consumer("carol".into());
    inner.apply(&cx, put(carol.clone(), consumer("carol", "k1"), 2));
    inner.apply(
        &cx,
        put(
            ResourceId::Credential("carol".into(), "c".into()),
            credential("kc"),
            3,
        ),
    );
    inner.apply(
        &cx,
        put(
            carol.clone(),
            json!({"username": "carol", "plugins": {"nope": {}}}),
            4,
        ),
    );
    assert!(inner.consumers.credential("jwt-auth", "kc").is_none());
    inner.apply(&cx, put(carol, consumer("carol", "k1"), 5));
    assert!(inner.consumers.credential("jwt-auth", "kc").is_some());
}

#[test]
fn a_credential_seen_before_its_consumer_starts_counting_with_it() {
    let shared = Shared::default();
    let cx = BuildContext { shared: &shared };
    let mut inner = Inner::empty(Unmatched::Deny);
    inner.apply(
        &cx,
        put(
            ResourceId::Credential("bob".into(), "c".into()),
            credential("kb"),
            2,
        ),
    );
    assert!(inner.consumers.credential("jwt-auth", "kb").is_none());
    inner.apply(
        &cx,
        put(ResourceId::Consumer("bob".into()), consumer("bob", "kx"), 3),
    );
    assert!(inner.consumers.credential("jwt-auth", "kb").is_some());
}
