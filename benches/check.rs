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
    let bytes = msg.encode_to_vec();
    let once = rt.block_on(runtime.check(msg));
    let code = once.status.as_ref().map_or(0, |s| s.code);
    assert_eq!(
        code, expect as i32,
        "{group}/{id}: unexpected decision {once:?}"
    );
    c.benchmark_group(group)
        .bench_function(BenchmarkId::from_parameter(id), |b| {
            b.to_async(&rt).iter(|| async {
                let req = CheckRequest::decode(bytes.as_slice()).expect("valid CheckRequest");
                runtime.check(&req).await.encode_to_vec()
            })
        });
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

fn setup() {
    // As `portcullis serve`: the Prometheus recorder receives every Check's metrics.
    let _ = portcullis::telemetry::init_metrics();
}

fn all(c: &mut Criterion) {
    setup();
    no_plugin_route(c);
    route_matching(c);
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
