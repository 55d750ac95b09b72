//! One Check end to end, as the gRPC front runs it minus the transport: decode the
//! protobuf bytes → `Runtime::check` (route match, plugins, decision) → encode the
//! CheckResponse. Snapshots are built through the public config path
//! (`FileConfig::parse` → `Store::open`), with the Prometheus recorder installed as
//! `portcullis serve` does, so metric recording is part of every measured Check.
//!
//! `cargo bench --bench check` runs all rows; `cargo bench --bench check -- route`
//! filters them.
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::google::rpc::Code;
use portcullis::config::FileConfig;
use portcullis::runtime::Runtime;
use portcullis::store::Store;
use portcullis::wire;
use prost::Message;

mod support;

/// A runtime serving the snapshot compiled from `yaml`, through the public API.
fn runtime_from(yaml: &str) -> Arc<Runtime> {
    let config = FileConfig::parse(yaml, "bench.yaml").expect("bench config parses");
    let runtime = Arc::new(Runtime::default());
    // The store publishes into the runtime; the runtime keeps what it published.
    Store::open(runtime.clone(), &config, "bench.yaml", None).expect("bench config compiles");
    runtime
}

fn tokio() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Decode → check → encode, as one measured iteration. Asserts the expected
/// outcome once first, so a row can never silently measure a denial.
fn bench_check(
    c: &mut Criterion,
    group: &str,
    id: &str,
    runtime: &Runtime,
    msg: &CheckRequest,
    expect: Code,
) {
    let rt = tokio();
    // As tonic hands it over: the received frame, which the decoded fields slice.
    let bytes = bytes::Bytes::from(msg.encode_to_vec());
    assert_decision(&rt, runtime, msg, expect, &format!("{group}/{id}"));
    c.benchmark_group(group)
        .bench_function(BenchmarkId::from_parameter(id), |b| {
            b.to_async(&rt)
                .iter(|| check_encoded(runtime, bytes.clone()))
        });
}

/// Fails the bench unless `msg` is decided with `expect`, so a row can never silently
/// measure another decision.
fn assert_decision(
    rt: &tokio::runtime::Runtime,
    runtime: &Runtime,
    msg: &CheckRequest,
    expect: Code,
    row: &str,
) {
    let once = rt.block_on(runtime.check(&wire::CheckRequest::from(msg)));
    let code = once.status.as_ref().map_or(0, |s| s.code);
    assert_eq!(code, expect as i32, "{row}: unexpected decision {once:?}");
}

/// One measured iteration: decode the received frame, decide, encode the answer.
async fn check_encoded(runtime: &Runtime, bytes: bytes::Bytes) -> Vec<u8> {
    let mut req = wire::CheckRequest::decode(bytes).expect("valid CheckRequest");
    req.adopt_header_map();
    runtime.check(&req).await.encode_to_vec()
}

fn routes_yaml(n: usize) -> String {
    let mut y = String::from("routes:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  - {{ id: r{i}, uri: \"/svc{i}/*\", methods: [GET, POST] }}\n"
        ));
    }
    y
}

fn no_plugin_route(c: &mut Criterion) {
    let runtime = runtime_from("routes:\n  - { id: open, uri: \"/bench/*\" }\n");
    let msg = support::check_request("/bench/item?x=1", &[]);
    bench_check(c, "check", "no-plugin route", &runtime, &msg, Code::Ok);
}

fn route_matching(c: &mut Criterion) {
    for n in [10usize, 1_000, 10_000] {
        let runtime = runtime_from(&routes_yaml(n));
        // The last route: no index position is cheaper than another's.
        let msg = support::check_request(&format!("/svc{}/items/42", n - 1), &[]);
        bench_check(
            c,
            "route matching",
            &format!("{n} routes"),
            &runtime,
            &msg,
            Code::Ok,
        );
    }
}

const FAR_FUTURE: u64 = 4_102_444_800; // 2100-01-01

fn sign(alg: jsonwebtoken::Algorithm, key: &jsonwebtoken::EncodingKey, user_key: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &serde_json::json!({ "key": user_key, "exp": FAR_FUTURE }),
        key,
    )
    .expect("sign bench token")
}

/// Indents a PEM block for a YAML `|` scalar.
fn yaml_block(pem: &str, indent: usize) -> String {
    pem.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(indent)))
        .collect()
}

fn jwt_auth(c: &mut Criterion) {
    use jsonwebtoken::{Algorithm, EncodingKey};
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    use rsa::pkcs1::EncodeRsaPrivateKey;

    let hs_secret = "bench-secret-0123456789abcdef0123456789";
    let rsa = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
    let rsa_public = rsa
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("RSA public PEM");
    let rsa_private = rsa.to_pkcs1_pem(LineEnding::LF).expect("RSA private PEM");
    let ec = p256::SecretKey::random(&mut rsa::rand_core::OsRng);
    let ec_public = ec
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("EC public PEM");
    let ec_private = ec.to_pkcs8_pem(LineEnding::LF).expect("EC private PEM");

    let yaml = format!(
        "routes:\n  - {{ id: jwt, uri: \"/jwt/*\", plugins: {{ jwt-auth: {{}} }} }}\n\
         consumers:\n\
         \x20 - username: hs\n    credentials: [ {{ id: c, plugins: {{ jwt-auth: {{ key: hs, secret: {hs_secret} }} }} }} ]\n\
         \x20 - username: rs\n    credentials:\n      - id: c\n        plugins:\n          jwt-auth:\n            key: rs\n            algorithm: RS256\n            public_key: |\n{}\
         \x20 - username: es\n    credentials:\n      - id: c\n        plugins:\n          jwt-auth:\n            key: es\n            algorithm: ES256\n            public_key: |\n{}",
        yaml_block(&rsa_public, 14),
        yaml_block(&ec_public, 14),
    );
    let runtime = runtime_from(&yaml);
    let tokens = [
        (
            "HS256",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(hs_secret.as_bytes()),
                "hs",
            ),
        ),
        (
            "RS256",
            sign(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(rsa_private.as_bytes()).expect("RSA PEM"),
                "rs",
            ),
        ),
        (
            "ES256",
            sign(
                Algorithm::ES256,
                &EncodingKey::from_ec_pem(ec_private.as_bytes()).expect("EC PEM"),
                "es",
            ),
        ),
    ];
    for (alg, token) in &tokens {
        let msg = support::check_request(
            "/jwt/item",
            &[("authorization", &format!("Bearer {token}"))],
        );
        bench_check(c, "jwt-auth", alg, &runtime, &msg, Code::Ok);
    }
}

/// 100k consumers, one jwt-auth credential each: the credential index lookup on its
/// own, and a whole HS256 Check against that snapshot.
fn credential_lookup(c: &mut Criterion) {
    const N: usize = 100_000;
    let mut yaml = String::from(
        "routes:\n  - { id: jwt, uri: \"/jwt/*\", plugins: { jwt-auth: {} } }\nconsumers:\n",
    );
    for i in 0..N {
        yaml.push_str(&format!(
            "  - {{ username: user{i}, credentials: [ {{ id: c, plugins: {{ jwt-auth: {{ key: key{i}, secret: secret-{i}-0123456789abcdef }} }} }} ] }}\n"
        ));
    }
    let runtime = runtime_from(&yaml);
    let wanted = format!("key{}", N / 2);
    let snapshot = runtime.snapshot();
    assert!(snapshot.consumers.credential("jwt-auth", &wanted).is_some());
    c.benchmark_group("credential lookup").bench_function(
        BenchmarkId::from_parameter("100k consumers"),
        |b| {
            b.iter(|| {
                snapshot
                    .consumers
                    .credential("jwt-auth", std::hint::black_box(&wanted))
            })
        },
    );
    let secret = format!("secret-{}-0123456789abcdef", N / 2);
    let token = sign(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        &wanted,
    );
    let msg = support::check_request(
        "/jwt/item",
        &[("authorization", &format!("Bearer {token}"))],
    );
    bench_check(
        c,
        "jwt-auth",
        "HS256, 100k consumers",
        &runtime,
        &msg,
        Code::Ok,
    );
}

/// Reading a config file of 10k consumers with a credential each and 1k routes,
/// written as scale.sh writes it: whole with serde_yaml (how every YAML file was read
/// before, the baseline) and a top-level entry or list item at a time
/// (`portcullis::yaml`), which keeps the peak memory of a 100k-consumer file at what
/// its JSON costs.
fn config_read(c: &mut Criterion) {
    use portcullis::config::FileConfig;
    let mut yaml = String::from("listen: { grpc: 127.0.0.1:9191 }\nroutes:\n");
    for i in 0..1_000 {
        yaml.push_str(&format!(
            "  - {{ id: r{i}, uri: \"/svc{i}/*\", methods: [GET, POST] }}\n"
        ));
    }
    yaml.push_str("consumers:\n");
    for i in 0..10_000 {
        yaml.push_str(&format!(
            "  - {{ username: user{i}, labels: {{ team: t{t}, custom_id: c{i} }}, credentials: [{{ id: cred-user{i}-jwt-auth, plugins: {{ jwt-auth: {{ key: key{i}, secret: secret-{i}-0123456789abcdef }} }} }}] }}\n",
            t = i % 97
        ));
    }
    let whole = || -> FileConfig {
        serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&yaml)).unwrap()
    };
    let pieces = || -> FileConfig { portcullis::yaml::read_in_pieces(&yaml).unwrap() };
    assert_eq!(format!("{:?}", whole()), format!("{:?}", pieces()));
    let mut group = c.benchmark_group("config read, 10k consumers + 1k routes (YAML)");
    group.sample_size(10);
    group.bench_function("whole, serde_yaml", |b| b.iter(whole));
    group.bench_function("in pieces", |b| b.iter(pieces));
    group.finish();
}

/// forward-auth with its decision cache, every measured Check a hit. The first
/// Check (the one `bench_check` asserts) goes to a real auth service, an axum
/// server on loopback on its own thread, and fills the cache; the service counts
/// its calls so the row proves the timed loop never left the process.
fn forward_auth_cache_hit(c: &mut Criterion) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind auth service");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("local addr").port();
    std::thread::spawn(move || {
        let rt = tokio();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/auth",
                axum::routing::any(|| async {
                    CALLS.fetch_add(1, Ordering::Relaxed);
                    ([("x-user-id", "u-123")], "ok")
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            axum::serve(listener, app).await.expect("auth service");
        });
    });
    let runtime = runtime_from(&format!(
        r#"
routes:
  - id: fa
    uri: /fa/*
    plugins:
      forward-auth:
        uri: http://127.0.0.1:{port}/auth
        request_headers: [Authorization]
        upstream_headers: [X-User-ID]
        portcullis: {{ cache: {{ key_headers: [Authorization], ttl: 600 }} }}
"#
    ));
    let msg = support::check_request("/fa/item", &[("authorization", "Bearer session-1")]);
    bench_check(
        c,
        "forward-auth",
        "decision cache hit",
        &runtime,
        &msg,
        Code::Ok,
    );
    assert_eq!(
        CALLS.load(Ordering::Relaxed),
        1,
        "only the first Check may reach the auth service"
    );
}

/// openid-connect relying party, a request carrying a valid session cookie: check the
/// session's clocks, set the identity headers. The session holds an access token that
/// is still valid, so no OP is contacted (the discovery URL points at a closed port;
/// fetching it would fail the asserted allow). Two rows: the same cookie again (as a
/// browser sends it until the session is renewed; opened once, then remembered), and
/// a cookie seen for the first time (each iteration a newly sealed one, so every
/// measured Check decrypts, parses and remembers it).
fn openid_connect_session(c: &mut Criterion) {
    use portcullis::plugins::openid_connect::session::{self, CookieAttrs, Sealer};
    const SECRET: &str = "bench-session-secret-0123456789";
    let runtime = runtime_from(&format!(
        r#"
routes:
  - id: app
    uri: /app/*
    plugins:
      openid-connect:
        client_id: bench
        client_secret: bench-secret
        discovery: http://127.0.0.1:9/.well-known/openid-configuration
        redirect_uri: http://app.example/callback
        session: {{ secret: {SECRET} }}
"#
    ));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({"iss": "http://op.example", "sub": "alice", "aud": "bench", "exp": now + 3600, "iat": now});
    let id_token = format!(
        "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            claims.to_string()
        )
    );
    // The session cookie's JSON shape, as the login flow writes it.
    let session = serde_json::json!({
        "sid": "bench-sid",
        "created": now,
        "saved": now,
        "id_token": id_token,
        "sub": "alice",
        "access_token": "opaque-access-token-0123456789abcdef",
        "access_exp": now + 3600,
        "refresh_token": null,
        "userinfo": {"sub": "alice", "email": "alice@example.com", "name": "Alice"},
        "scope": "openid profile email",
    });
    // The cookies the login flow would set, turned into the request's Cookie header.
    let attrs = CookieAttrs {
        path: "/".into(),
        domain: None,
        secure: false,
        http_only: true,
        same_site: Some("Lax".into()),
    };
    let sealer = Sealer::new(SECRET);
    let check_with_new_cookie = || {
        let set_cookies = session::write(&sealer, "session", &session, &attrs, None, 0);
        let cookie: Vec<&str> = set_cookies
            .iter()
            .map(|c| c.split(';').next().unwrap_or_default())
            .collect();
        support::check_request("/app/item", &[("cookie", &cookie.join("; "))])
    };
    bench_check(
        c,
        "openid-connect",
        "session cookie",
        &runtime,
        &check_with_new_cookie(),
        Code::Ok,
    );

    let rt = tokio();
    let row = "openid-connect/session cookie, first request";
    assert_decision(&rt, &runtime, &check_with_new_cookie(), Code::Ok, row);
    c.benchmark_group("openid-connect").bench_function(
        BenchmarkId::from_parameter("session cookie, first request"),
        |b| {
            b.to_async(&rt).iter_batched(
                || bytes::Bytes::from(check_with_new_cookie().encode_to_vec()),
                |bytes| check_encoded(&runtime, bytes),
                criterion::BatchSize::SmallInput,
            )
        },
    );
}

/// openid-connect bearer-only, every measured Check answered from portcullis's
/// caches: an RS256 JWT checked against the JWKS (key set and verified token
/// cached), and an opaque token whose introspection answer is cached. The discovery
/// document, the JWKS and the introspection endpoint are served by a real HTTP
/// server on loopback (axum, its own thread) that counts the introspection calls:
/// the row asserts only the first, asserted Check reached it.
fn openid_connect_bearer(c: &mut Criterion) {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static INTROSPECTIONS: AtomicUsize = AtomicUsize::new(0);
    let b64 = |bytes: &[u8]| {
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
    };
    let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa key");
    let jwk = serde_json::json!({"keys": [{
        "kty": "RSA", "alg": "RS256", "use": "sig", "kid": "bench",
        "n": b64(&private.n().to_bytes_be()), "e": b64(&private.e().to_bytes_be()),
    }]});
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind OP");
    listener.set_nonblocking(true).expect("nonblocking");
    let issuer = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let discovery = serde_json::json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/jwks"),
        "introspection_endpoint": format!("{issuer}/introspect"),
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let introspected = serde_json::json!({
        "active": true, "sub": "alice", "scope": "openid", "client_id": "bench",
        "iss": issuer, "exp": now + 3600,
    });
    std::thread::spawn(move || {
        tokio().block_on(async move {
            let app = axum::Router::new()
                .route(
                    "/.well-known/openid-configuration",
                    axum::routing::get(move || async move { axum::Json(discovery) }),
                )
                .route(
                    "/jwks",
                    axum::routing::get(move || async move { axum::Json(jwk) }),
                )
                .route(
                    "/introspect",
                    axum::routing::post(move || async move {
                        INTROSPECTIONS.fetch_add(1, Ordering::Relaxed);
                        axum::Json(introspected)
                    }),
                );
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            axum::serve(listener, app).await.expect("OP");
        });
    });
    let runtime = runtime_from(&format!(
        r#"
routes:
  - id: jwks
    uri: /jwks/*
    plugins:
      openid-connect: {{ client_id: bench, client_secret: bench-secret, discovery: "{issuer}/.well-known/openid-configuration", bearer_only: true, use_jwks: true }}
  - id: introspect
    uri: /introspect/*
    plugins:
      openid-connect: {{ client_id: bench, client_secret: bench-secret, discovery: "{issuer}/.well-known/openid-configuration", bearer_only: true }}
"#
    ));
    let pem = private
        .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
        .expect("pem");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("bench".into());
    let token = jsonwebtoken::encode(
        &header,
        &serde_json::json!({"iss": issuer, "sub": "alice", "aud": "bench", "exp": now + 3600, "iat": now}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).expect("rsa pem"),
    )
    .expect("sign");
    let msg = support::check_request(
        "/jwks/item",
        &[("authorization", &format!("Bearer {token}"))],
    );
    bench_check(
        c,
        "openid-connect",
        "bearer JWT, JWKS (cached)",
        &runtime,
        &msg,
        Code::Ok,
    );
    let msg = support::check_request(
        "/introspect/item",
        &[("authorization", "Bearer opaque-bench-token-0123456789")],
    );
    bench_check(
        c,
        "openid-connect",
        "introspection cache hit",
        &runtime,
        &msg,
        Code::Ok,
    );
    assert_eq!(
        INTROSPECTIONS.load(Ordering::Relaxed),
        1,
        "only the first Check may reach the introspection endpoint"
    );
}

fn setup() {
    // As `portcullis serve`: the Prometheus recorder receives every Check's metrics.
    let _ = portcullis::telemetry::init_metrics();
}

fn all(c: &mut Criterion) {
    setup();
    no_plugin_route(c);
    route_matching(c);
    jwt_auth(c);
    credential_lookup(c);
    forward_auth_cache_hit(c);
    openid_connect_session(c);
    openid_connect_bearer(c);
    config_read(c);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = all
}
criterion_main!(benches);
