//! Two replicas sharing one etcd (and one Redis), as docs/replicas.md describes:
//! two portcullis processes, each behind its own Envoy, with one echo upstream.
//! An Admin API write on either replica is enforced by both; etcd going away and
//! coming back loses no acknowledged write; limit-count with `policy: redis` counts
//! across both.
mod common;

use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::redis::Redis;
use common::{
    ENVOY_GRPC, EchoUpstream, Envoy, EnvoyPorts, Portcullis, Reply, eventually, http_client,
};
use serde_json::{Value, json};

/// One replica: portcullis and the Envoy in front of it.
struct Replica {
    envoy: Envoy,
    portcullis: Portcullis,
}

impl Replica {
    async fn start(etcd: &Etcd, upstream: &EchoUpstream) -> Self {
        Self::start_with(etcd, upstream, "", &[]).await
    }

    /// With `store_extra` added to the `store` block and extra environment.
    async fn start_with(
        etcd: &Etcd,
        upstream: &EchoUpstream,
        store_extra: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let yaml = format!(
            "store: {{ kind: etcd, endpoints: ['{}'], prefix: /e2e, timeout: 2 {store_extra}}}\n",
            etcd.endpoint()
        );
        let portcullis = Portcullis::start_with_env(&yaml, env).await;
        let ports = EnvoyPorts::new(upstream.port, portcullis.ports.grpc, portcullis.ports.http);
        let envoy = Envoy::start(ENVOY_GRPC, ports).await;
        Replica { envoy, portcullis }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let mut req = http_client().get(self.envoy.url(path));
        if let Some(t) = token {
            req = req.header("Authorization", t);
        }
        Reply::read(req.send().await.expect("request through Envoy")).await
    }
}

/// An HS256 token for a jwt-auth key, as the APISIX docs sign them.
fn token(key: &str, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "key": key }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign token")
}

const SECRET: &str = "a-secret-that-is-long-enough-for-hs256";

#[track_caller]
fn ok(answer: (u16, Value)) -> Value {
    assert!(
        answer.0 == 200 || answer.0 == 201,
        "Admin API: {} {}",
        answer.0,
        answer.1
    );
    answer.1
}

async fn consumer_with_credential(r: &Replica, name: &str) {
    let admin = r.portcullis.admin();
    ok(admin.put("consumers", json!({ "username": name })).await);
    ok(admin
        .put(
            &format!("consumers/{name}/credentials/c"),
            json!({"plugins": {"jwt-auth": {"key": format!("{name}-key"), "secret": SECRET}}}),
        )
        .await);
}

async fn jwt_route(r: &Replica) {
    ok(r.portcullis
        .admin()
        .put(
            "routes/jwt",
            json!({"uri": "/jwt/*", "plugins": {"jwt-auth": {}}}),
        )
        .await);
}

#[tokio::test]
async fn a_write_on_one_replica_is_enforced_by_the_other() {
    let etcd = Etcd::start().await;
    let upstream = EchoUpstream::start();
    let a = Replica::start(&etcd, &upstream).await;
    let b = Replica::start(&etcd, &upstream).await;
    jwt_route(&a).await;
    let jack = token("jack-key", SECRET);
    eventually(Duration::from_secs(1), "B serves A's route", || async {
        b.get("/jwt/x", Some(&jack)).await.status == 401
    })
    .await;

    // A consumer and credential created through A authenticate through B within 1 s.
    consumer_with_credential(&a, "jack").await;
    let written = Instant::now();
    eventually(Duration::from_secs(1), "B accepts jack's token", || async {
        b.get("/jwt/x", Some(&jack)).await.status == 200
    })
    .await;
    let echoed = b.get("/jwt/x", Some(&jack)).await.echoed();
    assert_eq!(echoed.header("x-consumer-username"), Some("jack"));
    assert_eq!(echoed.header("x-credential-identifier"), Some("c"));
    eprintln!("propagated to B in {:?}", written.elapsed());

    // B's Admin API shows what A wrote, with etcd's revisions as indexes.
    let (status, got) = b
        .portcullis
        .admin()
        .get("consumers/jack/credentials/c")
        .await;
    assert_eq!(status, 200, "{got}");
    assert!(got["modifiedIndex"].as_u64().unwrap() > 0, "{got}");
    assert_eq!(got["value"]["id"], "c");

    // Deleting the consumer on B takes its credential with it, on A too.
    ok(b.portcullis.admin().delete("consumers/jack").await);
    eventually(Duration::from_secs(1), "A refuses jack's token", || async {
        a.get("/jwt/x", Some(&jack)).await.status == 401
    })
    .await;
    let (status, _) = a
        .portcullis
        .admin()
        .get("consumers/jack/credentials/c")
        .await;
    assert_eq!(status, 404);

    // A route deleted on B stops matching on A.
    ok(b.portcullis.admin().delete("routes/jwt").await);
    eventually(
        Duration::from_secs(1),
        "A no longer has the route",
        || async { a.get("/jwt/x", None).await.status == 404 },
    )
    .await;
}

#[tokio::test]
async fn concurrent_writes_of_one_id_are_detected() {
    let etcd = Etcd::start().await;
    let upstream = EchoUpstream::start();
    let a = Replica::start(&etcd, &upstream).await;
    let b = Replica::start(&etcd, &upstream).await;
    let (admin_a, admin_b) = (a.portcullis.admin(), b.portcullis.admin());

    // Sixteen creates of one new id at once, on both replicas: exactly one of them
    // is the create (201); each other either saw it (200) or lost the race (409),
    // never a second "created".
    let mut writes = Vec::new();
    for i in 0..16 {
        let admin = if i % 2 == 0 { &admin_a } else { &admin_b };
        writes.push(admin.put("routes/race", json!({"uri": format!("/race/{i}")})));
    }
    let answers = futures::future::join_all(writes).await;
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    eprintln!("concurrent creates answered {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{answers:?}"
    );
    assert!(
        statuses.iter().all(|s| [200, 201, 409].contains(s)),
        "{answers:?}"
    );
    for (s, body) in &answers {
        if *s == 409 {
            assert!(
                body["error_msg"].as_str().unwrap().contains("retry"),
                "{body}"
            );
        }
    }

    // A PATCH merged on a version that changed since is refused, not applied.
    ok(admin_a
        .put("routes/p", json!({"uri": "/p", "desc": "v1"}))
        .await);
    eventually(Duration::from_secs(1), "B sees route p", || async {
        admin_b.get("routes/p").await.0 == 200
    })
    .await;
    let patches = futures::future::join_all((0..8).map(|i| {
        let admin = if i % 2 == 0 { &admin_a } else { &admin_b };
        admin.patch("routes/p", json!({ "desc": format!("patch {i}") }))
    }))
    .await;
    let applied = patches.iter().filter(|(s, _)| *s == 200).count();
    assert!(applied >= 1, "{patches:?}");
    assert!(
        patches.iter().all(|(s, _)| *s == 200 || *s == 409),
        "{patches:?}"
    );
    // Both replicas end on the same, last acknowledged version.
    eventually(
        Duration::from_secs(2),
        "replicas agree on route p",
        || async {
            let (x, y) = (
                admin_a.get("routes/p").await.1,
                admin_b.get("routes/p").await.1,
            );
            x["modifiedIndex"] == y["modifiedIndex"] && x["value"] == y["value"]
        },
    )
    .await;
}

#[tokio::test]
async fn an_etcd_restart_loses_no_acknowledged_write() {
    let mut etcd = Etcd::start().await;
    let upstream = EchoUpstream::start();
    let a = Replica::start(&etcd, &upstream).await;
    let b = Replica::start(&etcd, &upstream).await;
    jwt_route(&a).await;
    for i in 0..6 {
        let r = if i % 2 == 0 { &a } else { &b };
        consumer_with_credential(r, &format!("before{i}")).await;
    }
    let before3 = token("before3-key", SECRET);
    eventually(
        Duration::from_secs(1),
        "A accepts a consumer B wrote",
        || async { a.get("/jwt/x", Some(&before3)).await.status == 200 },
    )
    .await;

    etcd.kill();
    // Without etcd: the last good snapshot keeps serving, both replicas stay ready,
    // and a write is refused rather than acknowledged and lost.
    for r in [&a, &b] {
        assert_eq!(r.get("/jwt/x", Some(&before3)).await.status, 200);
        let ready = http_client()
            .get(r.portcullis.http_url("/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200);
    }
    let (status, body) = a
        .portcullis
        .admin()
        .put("consumers", json!({"username": "lost"}))
        .await;
    assert_eq!(status, 503, "{body}");

    etcd.restart().await;
    // Writes resume on both replicas (the client reconnects on its own).
    let mut after = Vec::new();
    for i in 0..4 {
        let r = if i % 2 == 0 { &a } else { &b };
        let name = format!("after{i}");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = r
                .portcullis
                .admin()
                .put("consumers", json!({ "username": name }))
                .await;
            if status == 201 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "write after restart: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ok(r.portcullis
            .admin()
            .put(
                &format!("consumers/{name}/credentials/c"),
                json!({"plugins": {"jwt-auth": {"key": format!("{name}-key"), "secret": SECRET}}}),
            )
            .await);
        after.push(name);
    }
    // Both converge on every acknowledged write, before and after the restart.
    for r in [&a, &b] {
        eventually(
            Duration::from_secs(10),
            "replica lists all consumers",
            || async {
                let (_, list) = r.portcullis.admin().get("consumers").await;
                list["total"] == 10
            },
        )
        .await;
        for name in ["before0", "before5", "after0", "after3"] {
            let t = token(&format!("{name}-key"), SECRET);
            eventually(
                Duration::from_secs(5),
                "token accepted after the restart",
                || async { r.get("/jwt/x", Some(&t)).await.status == 200 },
            )
            .await;
        }
        assert_eq!(
            r.get("/jwt/x", Some(&token("lost-key", SECRET)))
                .await
                .status,
            401
        );
    }
}

fn limited_route(redis_port: u16, allow_degradation: bool, id: &str) -> Value {
    json!({"uri": format!("/{id}"), "plugins": {"limit-count": {
        "count": 3, "time_window": 60, "rejected_code": 429, "rejected_msg": "slow down",
        "policy": "redis", "redis_host": "127.0.0.1", "redis_port": redis_port,
        "redis_timeout": 300, "allow_degradation": allow_degradation}}})
}

#[tokio::test]
async fn limit_count_with_redis_counts_across_replicas() {
    let etcd = Etcd::start().await;
    let mut redis = Redis::start().await;
    let upstream = EchoUpstream::start();
    let a = Replica::start(&etcd, &upstream).await;
    let b = Replica::start(&etcd, &upstream).await;
    ok(a.portcullis
        .admin()
        .put(
            "routes/limited",
            limited_route(redis.port, false, "limited"),
        )
        .await);
    ok(a.portcullis
        .admin()
        .put("routes/open", limited_route(redis.port, true, "open"))
        .await);
    eventually(Duration::from_secs(1), "B has the routes", || async {
        b.portcullis.admin().get("routes/open").await.0 == 200
    })
    .await;

    // Eight requests alternating between the replicas: exactly three get through.
    let mut statuses = Vec::new();
    let mut remaining = Vec::new();
    for i in 0..8 {
        let r = if i % 2 == 0 { &a } else { &b };
        let reply = r.get("/limited", None).await;
        statuses.push(reply.status);
        remaining.push(reply.header("x-ratelimit-remaining").map(str::to_owned));
        if reply.status == 429 {
            assert_eq!(reply.json(), json!({"error_msg": "slow down"}));
            assert_eq!(reply.header("x-ratelimit-limit"), Some("3"));
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429, 429, 429]);
    let shown: Vec<_> = remaining[..3].iter().map(|r| r.as_deref()).collect();
    assert_eq!(shown, [Some("2"), Some("1"), Some("0")]);
    let reset: f64 = a
        .get("/limited", None)
        .await
        .header("x-ratelimit-reset")
        .unwrap()
        .parse()
        .unwrap();
    assert!(reset > 0.0 && reset <= 60.0, "{reset}");

    // Redis gone: allow_degradation decides, on both replicas.
    redis.kill();
    for r in [&a, &b] {
        let open = r.get("/open", None).await;
        assert_eq!(open.status, 200, "allow_degradation: true lets it through");
        assert!(open.header("x-ratelimit-remaining").is_none());
        let closed = r.get("/limited", None).await;
        assert_eq!(closed.status, 500);
        assert_eq!(closed.json(), json!({"error_msg": "failed to limit count"}));
        assert!(
            r.portcullis.output().contains("failed to limit count"),
            "the failure is logged"
        );
    }

    // Redis back (empty): the pooled connections reconnect and counting resumes.
    redis.restart().await;
    for r in [&a, &b] {
        eventually(Duration::from_secs(5), "counting resumes", || async {
            r.get("/limited", None).await.status == 200
        })
        .await;
    }
    let fresh = a.get("/limited", None).await;
    assert_eq!(
        fresh.header("x-ratelimit-remaining"),
        Some("0"),
        "third of three"
    );
}

#[test]
fn the_shipped_replicas_example_validates() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["validate", "--config", "examples/replicas.yaml"])
        .env("ADMIN_API_KEY", "k")
        .env("ETCD_PASSWORD", "p")
        .output()
        .expect("run portcullis validate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Resources written straight into etcd (as another tool or an APISIX-style script
/// would) are served, and a prefix larger than one Range page loads whole.
#[tokio::test]
async fn a_replica_loads_a_large_prefix_written_by_hand() {
    use etcd_client::{Client, Txn, TxnOp};
    let etcd = Etcd::start().await;
    let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
    const N: usize = 2500;
    for chunk in (0..N).collect::<Vec<_>>().chunks(50) {
        let mut ops = Vec::new();
        for i in chunk {
            let name = format!("user{i:04}");
            ops.push(TxnOp::put(
                format!("/e2e/consumers/{name}"),
                json!({"username": name}).to_string(),
                None,
            ));
            ops.push(TxnOp::put(
                format!("/e2e/consumers/{name}/credentials/c"),
                json!({"id": "c", "plugins": {"jwt-auth": {"key": format!("{name}-key"), "secret": SECRET}}})
                    .to_string(),
                None,
            ));
        }
        client.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    client
        .put(
            "/e2e/routes/jwt",
            json!({"uri": "/jwt/*", "plugins": {"jwt-auth": {}}}).to_string(),
            None,
        )
        .await
        .unwrap();
    // Not ours: ignored.
    client.put("/e2e/upstreams/1", "{}", None).await.unwrap();
    client.put("/e2e-other/routes/x", "{}", None).await.unwrap();

    let upstream = EchoUpstream::start();
    let a = Replica::start(&etcd, &upstream).await;
    let (_, list) = a.portcullis.admin().get("consumers").await;
    assert_eq!(list["total"], N);
    for name in ["user0000", "user1234", "user2499"] {
        let reply = a
            .get("/jwt/x", Some(&token(&format!("{name}-key"), SECRET)))
            .await;
        assert_eq!(reply.echoed().header("x-consumer-username"), Some(name));
    }
    // A hand-written change reaches the running replica through the watch.
    client
        .delete("/e2e/consumers/user1234", None)
        .await
        .unwrap();
    let t = token("user1234-key", SECRET);
    eventually(
        Duration::from_secs(1),
        "consumer deleted by hand",
        || async { a.get("/jwt/x", Some(&t)).await.status == 401 },
    )
    .await;
}

/// etcd with authentication on: the replica logs in with `username`/`password`
/// (the password from the environment) and reads, watches and writes as that user.
#[tokio::test]
async fn replicas_authenticate_to_etcd() {
    use etcd_client::{Client, ConnectOptions};
    let etcd = Etcd::start().await;
    let mut root = Client::connect([etcd.endpoint()], None).await.unwrap();
    let _ = root.role_add("root").await;
    root.user_add("root", "root-pw", None).await.unwrap();
    root.user_grant_role("root", "root").await.unwrap();
    root.auth_enable().await.unwrap();
    // Without credentials etcd now refuses.
    let mut anonymous = Client::connect([etcd.endpoint()], None).await.unwrap();
    assert!(anonymous.get("/e2e/", None).await.is_err());

    let upstream = EchoUpstream::start();
    let env = [("ETCD_PW", "root-pw")];
    let auth = ", username: root, password: $env://ETCD_PW ";
    let a = Replica::start_with(&etcd, &upstream, auth, &env).await;
    let b = Replica::start_with(&etcd, &upstream, auth, &env).await;
    jwt_route(&a).await;
    consumer_with_credential(&a, "jack").await;
    let jack = token("jack-key", SECRET);
    eventually(Duration::from_secs(1), "B accepts jack's token", || async {
        b.get("/jwt/x", Some(&jack)).await.status == 200
    })
    .await;
    let mut user = Client::connect(
        [etcd.endpoint()],
        Some(ConnectOptions::new().with_user("root", "root-pw")),
    )
    .await
    .unwrap();
    let stored = user.get("/e2e/consumers/jack", None).await.unwrap();
    let value: Value = serde_json::from_slice(stored.kvs()[0].value()).unwrap();
    assert_eq!(value["username"], "jack");
    assert!(value["create_time"].as_i64().unwrap() > 0);
}

/// etcd over TLS with client certificates (`store.tls`).
#[tokio::test]
async fn replicas_reach_etcd_over_mutual_tls() {
    let etcd = Etcd::start_tls().await;
    let upstream = EchoUpstream::start();
    let d = etcd.dir().display().to_string();
    let tls = format!(
        ", tls: {{ ca: '{d}/ca.pem', cert: '{d}/client.pem', key: '{d}/client-key.pem' }} "
    );
    let a = Replica::start_with(&etcd, &upstream, &tls, &[]).await;
    let b = Replica::start_with(&etcd, &upstream, &tls, &[]).await;
    jwt_route(&a).await;
    consumer_with_credential(&b, "jack").await;
    let jack = token("jack-key", SECRET);
    eventually(Duration::from_secs(1), "A accepts jack's token", || async {
        a.get("/jwt/x", Some(&jack)).await.status == 200
    })
    .await;
}

/// A replica whose watch falls behind a compaction (here: stopped while thousands
/// of events pass and etcd compacts them away) reloads everything and converges.
#[tokio::test]
async fn a_replica_behind_a_compaction_reloads_and_converges() {
    use etcd_client::{Client, Txn, TxnOp};
    let etcd = Etcd::start().await;
    let upstream = EchoUpstream::start();
    let a = Replica::start(&etcd, &upstream).await;
    let b = Replica::start(&etcd, &upstream).await;
    jwt_route(&a).await;
    let signal = |sig: &str, pid: u32| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP", b.portcullis.pid());
    let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
    // Far more than socket buffers and etcd's per-watch queue hold: B's watcher falls
    // behind and has to be caught up from etcd's history.
    let filler = "x".repeat(8 * 1024);
    for batch in 0..400 {
        let ops: Vec<TxnOp> = (0..10)
            .map(|i| TxnOp::put(format!("/e2e/filler/{batch}-{i}"), filler.clone(), None))
            .collect();
        client.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    consumer_with_credential(&a, "late").await;
    let status = client.status().await.unwrap();
    let revision = status.header().unwrap().revision();
    client.compact(revision, None).await.unwrap();
    signal("-CONT", b.portcullis.pid());

    let late = token("late-key", SECRET);
    eventually(
        Duration::from_secs(10),
        "B accepts a consumer written while it was stopped",
        || async { b.get("/jwt/x", Some(&late)).await.status == 200 },
    )
    .await;
    assert!(
        b.portcullis.output().contains("revision compacted"),
        "B's watch was cancelled by the compaction and B reloaded"
    );
    // And B keeps following: a later write arrives through the new watch.
    ok(a.portcullis.admin().delete("consumers/late").await);
    eventually(
        Duration::from_secs(1),
        "B follows after the reload",
        || async { b.get("/jwt/x", Some(&late)).await.status == 401 },
    )
    .await;
}
