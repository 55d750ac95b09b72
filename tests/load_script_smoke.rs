//! `benches/load.sh --smoke`: a 2-second pass over every row of the load benchmark
//! (real Envoy, nginx, wrk, h2load and this build's portcullis), so the script users
//! run to reproduce docs/benchmarks.md keeps working. The numbers are not checked —
//! only that each row produced some, with no non-2xx answers.
use std::path::Path;
use std::process::Command;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use prost::Message;

#[path = "../benches/support/mod.rs"]
mod support;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The h2load body generator (Python, no protobuf library) must write exactly the
/// CheckRequest the micro-benchmarks use, framed as one gRPC message.
#[test]
fn check_body_generator_matches_the_rust_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("body.bin");
    let status = Command::new("python3")
        .arg(Path::new(ROOT).join("benches/check_body.py"))
        .arg(&out)
        .arg("/jwt-hs/item?x=1")
        .arg("Authorization: Bearer a.b.c")
        .status()
        .expect("python3 runs");
    assert!(status.success());
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes[0], 0, "uncompressed gRPC frame");
    let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
    assert_eq!(len, bytes.len() - 5, "length prefix");
    let decoded = CheckRequest::decode(&bytes[5..]).expect("a CheckRequest");
    let expected = support::check_request("/jwt-hs/item?x=1", &[("authorization", "Bearer a.b.c")]);
    assert_eq!(decoded, expected);
}

#[test]
fn load_script_smoke_pass_produces_every_row() {
    let out = Command::new("bash")
        .arg(Path::new(ROOT).join("benches/load.sh"))
        .arg("--smoke")
        .arg("--portcullis")
        .arg(env!("CARGO_BIN_EXE_portcullis"))
        .output()
        .expect("bash runs benches/load.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "load.sh --smoke failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| row"))
        .collect();
    for label in [
        "Envoy, no auth",
        "Envoy jwt_authn HS256",
        // The reference: ext_authz answered by a server that only sends back a stored OK.
        "Envoy + canned ext_authz answer (nginx)",
        "Envoy + portcullis: no-plugin route",
        "Envoy + portcullis: no-plugin route, with the token",
        "gRPC Check direct: no-plugin route",
        // The same Checks as Envoy sends them: a connection per worker, many streams.
        "streams: no-plugin route",
    ] {
        let row = rows
            .iter()
            .find(|r| r.contains(label))
            .unwrap_or_else(|| panic!("no row {label:?} in\n{stdout}"));
        let column =
            |i: usize| -> f64 { row.split('|').nth(i).unwrap().trim().parse().unwrap_or(0.0) };
        assert!(column(2) > 0.0, "row {label:?} has no req/s: {row}");
        // CPU per request: Envoy (6) on Envoy rows, portcullis (7) on its rows.
        if label.contains("Envoy") {
            assert!(column(6) > 0.0, "row {label:?} has no Envoy CPU: {row}");
        }
        // nginx (8) is the canned answer's server as well as the upstream.
        if label.contains("canned") {
            assert!(column(8) > 0.0, "row {label:?} has no nginx CPU: {row}");
        }
        if label.contains("portcullis") || label.contains("gRPC") {
            assert!(
                column(7) > 0.0,
                "row {label:?} has no portcullis CPU: {row}"
            );
        }
    }
    // Rows for plugins this build has are in the table; the others are named as skipped.
    for plugin_row in [
        "jwt-auth HS256",
        "jwt-auth RS256",
        "openid-connect bearer (JWKS)",
        "openid-connect bearer (introspection cache)",
        "openid-connect session cookie",
        "forward-auth",
    ] {
        assert!(
            stdout.contains(plugin_row),
            "row {plugin_row:?} neither measured nor reported as skipped\n{stdout}"
        );
    }
}
