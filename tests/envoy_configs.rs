//! Every Envoy configuration shipped in `envoy/` must load in the Envoy version we test
//! with: `envoy --mode validate` parses the whole bootstrap, rejects unknown fields and
//! builds every listener, filter and cluster without opening sockets.
mod common;

use std::path::PathBuf;
use std::process::Command;

fn shipped_configs() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("envoy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_envoy_config_validates() {
    let envoy = common::envoy_bin();
    let files = shipped_configs();
    assert!(
        files.iter().any(|f| f.ends_with("envoy.yaml")),
        "envoy/envoy.yaml is missing; found {files:?}"
    );
    let mut failures = Vec::new();
    for file in &files {
        let out = Command::new(&envoy)
            .args([
                "--mode",
                "validate",
                "--use-dynamic-base-id",
                "-l",
                "warning",
                "-c",
            ])
            .arg(file)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", envoy.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || !stdout.contains("OK") {
            failures.push(format!("{}:\n{stdout}{stderr}", file.display()));
        } else if stderr.contains("Deprecated field") || stdout.contains("Deprecated field") {
            // A deprecated field is removed a few releases later: fix it while it is cheap.
            failures.push(format!(
                "{} uses a deprecated field:\n{stdout}{stderr}",
                file.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "invalid Envoy configs:\n{}",
        failures.join("\n")
    );
}

/// No shipped config re-routes after portcullis allowed a request: a route chosen again
/// on the headers portcullis adds was never checked (Envoy's ext_authz security
/// considerations), and clearing the route cache cost Envoy ~20 µs per allowed request.
#[test]
fn no_shipped_envoy_config_re_routes_after_the_check() {
    for file in shipped_configs() {
        let text = std::fs::read_to_string(&file).expect("read config");
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let setting = line.trim().replace(' ', "");
            assert!(
                !setting.contains("clear_route_cache:true"),
                "{}: `{}`",
                file.display(),
                line.trim()
            );
        }
    }
}

/// The tests run the shipped files with their ports replaced as plain text, so every
/// port must appear as a `port_value:` the harness knows.
#[test]
fn every_shipped_envoy_config_uses_only_templated_ports() {
    for file in shipped_configs() {
        let text = std::fs::read_to_string(&file).expect("read config");
        let settings = text.lines().filter(|l| !l.trim_start().starts_with('#'));
        for line in settings.filter(|l| l.contains("port_value:")) {
            let port: String = line
                .split("port_value:")
                .nth(1)
                .unwrap_or_default()
                .chars()
                .skip_while(|c| c.is_whitespace())
                .take_while(char::is_ascii_digit)
                .collect();
            assert!(
                common::TEMPLATED_PORTS.contains(&port.as_str()),
                "{}: port {port:?} in `{}` is not one the test harness replaces ({:?})",
                file.display(),
                line.trim(),
                common::TEMPLATED_PORTS
            );
        }
        assert!(
            text.contains("port_value: 9080"),
            "{}: no listener on 9080",
            file.display()
        );
        assert!(
            text.contains("port_value: 9901"),
            "{}: no admin on 9901",
            file.display()
        );

        let ports = common::EnvoyPorts {
            listener: 41001,
            admin: 41002,
            upstream: 41003,
            grpc: 41004,
            http: 41005,
        };
        let rendered = common::envoy::render(&text, ports);
        for line in rendered
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
        {
            if let Some(rest) = line.split("port_value:").nth(1) {
                assert!(
                    rest.trim_start().starts_with("4100"),
                    "{}: `{}` kept its shipped port after rendering",
                    file.display(),
                    line.trim()
                );
            }
        }
    }
}

/// `failure_mode_allow: false` and `status_on_error: 503` in every shipped config: with
/// portcullis unreachable nothing reaches the upstream.
#[tokio::test]
async fn every_shipped_envoy_config_fails_closed_when_portcullis_is_down() {
    for config in [
        common::ENVOY_GRPC,
        common::ENVOY_ROUTE_ID,
        common::ENVOY_HTTP,
    ] {
        let upstream = common::EchoUpstream::start();
        // Ports nothing listens on.
        let ports =
            common::EnvoyPorts::new(upstream.port, common::free_port(), common::free_port());
        let envoy = common::Envoy::start(config, ports).await;
        let client = common::http_client();
        for path in ["/", "/api/x", "/anything?q=1"] {
            let resp = client
                .get(envoy.url(path))
                .send()
                .await
                .expect("request through Envoy");
            let reply = common::Reply::read(resp).await;
            assert_eq!(reply.status, 503, "{config} {path}: {reply:?}");
            assert!(
                !reply.reached_upstream(),
                "{config} {path}: reached the upstream"
            );
        }
        let post = client
            .post(envoy.url("/form"))
            .body("a=1")
            .send()
            .await
            .expect("POST");
        assert_eq!(post.status(), 503, "{config}: POST with a body");
        assert_eq!(upstream.hits(), 0, "{config}: the upstream was reached");
    }
}

/// `with_request_body.max_request_bytes: 65536` with `allow_partial_message: false`: a
/// larger body is refused by Envoy (413) before any Check, never authorised cut short.
#[tokio::test]
async fn bodies_over_64_kib_are_refused_before_the_check() {
    for config in [common::ENVOY_GRPC, common::ENVOY_HTTP] {
        let upstream = common::EchoUpstream::start();
        let ports =
            common::EnvoyPorts::new(upstream.port, common::free_port(), common::free_port());
        let envoy = common::Envoy::start(config, ports).await;
        let resp = common::http_client()
            .post(envoy.url("/upload"))
            .body(vec![b'x'; 65537])
            .send()
            .await
            .expect("POST through Envoy");
        assert_eq!(resp.status(), 413, "{config}");
        assert_eq!(upstream.hits(), 0, "{config}: the upstream was reached");
    }
}
