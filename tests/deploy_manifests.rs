//! The Kubernetes, Istio and Envoy Gateway manifests in `k8s/` are checked offline, by the
//! validators their own projects' schemas feed, plus the wiring between them that no schema
//! can see (ports, names, the config file path, the hardening a platform team expects).
//!
//! - core kinds: PyPI `kubernetes-validate --strict` against the oldest Kubernetes we
//!   support (1.30: gRPC probes, `preStop.sleep`) and the newest it knows;
//! - Istio `AuthorizationPolicy`, Envoy Gateway `SecurityPolicy`, Gateway API
//!   `ReferenceGrant`: npm `@kubernetes-models/*` through `tests/deploy/validate-crs.mjs`;
//! - Istio `meshConfig.extensionProviders`: our JSON Schema written from Istio's MeshConfig
//!   reference (no package ships one), with PyPI `jsonschema`;
//! - every YAML file: `yamllint`.
//!
//! A missing validator fails the test with the command that installs it; nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn k8s(rel: &str) -> PathBuf {
    root().join("k8s").join(rel)
}

fn load(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Runs a validator; a validator that is not installed fails the test with its install command.
fn run(program: &str, args: &[&str], install: &str) -> Output {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program}` ({e}); install it with: {install}"));
    if !out.status.success() {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for (missing, hint) in [
            ("No module named", install),
            ("Cannot find package", "npm ci --prefix tests/deploy"),
            ("ERR_MODULE_NOT_FOUND", "npm ci --prefix tests/deploy"),
        ] {
            assert!(
                !all.contains(missing),
                "`{program}` lacks a dependency; install it with: {hint}\n{all}"
            );
        }
    }
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const KUBERNETES_VALIDATE: &str = "pip install kubernetes-validate";
const NODE_MODELS: &str = "npm ci --prefix tests/deploy (Node.js 20 or newer)";
const JSONSCHEMA: &str = "pip install jsonschema pyyaml";
const YAMLLINT: &str = "pip install yamllint";

fn core_manifests() -> Vec<String> {
    let kustomization = load(&k8s("kustomization.yaml"));
    kustomization["resources"]
        .as_sequence()
        .expect("kustomization.yaml lists resources")
        .iter()
        .map(|r| format!("k8s/{}", r.as_str().expect("resource is a file name")))
        .collect()
}

fn crs() -> Vec<String> {
    let mut files = Vec::new();
    for dir in ["istio", "envoy-gateway"] {
        for entry in std::fs::read_dir(k8s(dir)).expect("k8s subdirectory") {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".yaml") {
                files.push(format!("k8s/{dir}/{name}"));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn kustomization_lists_every_core_manifest_and_nothing_else() {
    let listed = core_manifests();
    for file in &listed {
        assert!(
            root().join(file).is_file(),
            "kustomization.yaml lists {file}, which does not exist"
        );
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(root().join("k8s"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .map(|n| format!("k8s/{n}"))
        .collect();
    on_disk.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(
        sorted, on_disk,
        "every manifest in k8s/ belongs in kustomization.yaml"
    );
}

#[test]
fn core_manifests_pass_kubernetes_validate_strict() {
    let files = core_manifests();
    for version in ["1.30.0", "1.37.0"] {
        let mut args = vec!["--strict", "-k", version];
        args.extend(files.iter().map(String::as_str));
        let out = run("kubernetes-validate", &args, KUBERNETES_VALIDATE);
        let report = text(&out);
        assert!(
            out.status.success(),
            "kubernetes-validate --strict -k {version} failed:\n{report}"
        );
        assert!(
            !report.contains("Couldn't find schema"),
            "a core manifest went unchecked:\n{report}"
        );
        assert_eq!(
            report.matches(" passed for resource ").count(),
            files.len(),
            "{report}"
        );
    }
}

#[test]
fn istio_and_envoy_gateway_resources_pass_their_published_schemas() {
    assert!(
        root()
            .join("tests/deploy/node_modules/@kubernetes-models")
            .is_dir(),
        "the CR models are not installed; install them with: {NODE_MODELS}"
    );
    let files = crs();
    let mut args = vec!["tests/deploy/validate-crs.mjs"];
    args.extend(files.iter().map(String::as_str));
    let out = run("node", &args, NODE_MODELS);
    let report = text(&out);
    assert!(out.status.success(), "validate-crs.mjs failed:\n{report}");
    for file in &files {
        assert!(
            report.contains(&format!("ok {file}#0 ")),
            "{file} not reported valid:\n{report}"
        );
    }
}

#[test]
fn istio_extension_provider_matches_the_meshconfig_schema() {
    let out = run(
        "python3",
        &[
            "tests/deploy/validate_schema.py",
            "tests/deploy/schemas/istio-meshconfig-ext-authz-grpc.schema.json",
            "k8s/istio/extension-provider.yaml",
        ],
        JSONSCHEMA,
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn every_yaml_file_passes_yamllint() {
    let out = run(
        "yamllint",
        &["-s", "-c", "tests/deploy/yamllint.yaml", "k8s/"],
        YAMLLINT,
    );
    assert!(out.status.success(), "yamllint:\n{}", text(&out));
}

/// The validators above must actually reject things: a typo'd field and a bad value each.
#[test]
fn validators_reject_broken_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let broken = |src: &str, from: &str, to: &str, name: &str| -> String {
        let original = std::fs::read_to_string(root().join(src)).unwrap();
        assert!(original.contains(from), "{src} no longer contains {from:?}");
        let path = dir.path().join(name);
        std::fs::write(&path, original.replacen(from, to, 1)).unwrap();
        path.to_str().unwrap().to_owned()
    };

    let deployment = broken(
        "k8s/deployment.yaml",
        "readOnlyRootFilesystem:",
        "readOnlyRootFileSystem:",
        "d.yaml",
    );
    let out = run(
        "kubernetes-validate",
        &["--strict", "--quiet", &deployment],
        KUBERNETES_VALIDATE,
    );
    assert!(
        !out.status.success(),
        "kubernetes-validate accepted an unknown field:\n{}",
        text(&out)
    );

    for (src, from, to, name) in [
        (
            "k8s/envoy-gateway/security-policy.yaml",
            "failOpen: false",
            "failOpn: false",
            "sp-typo.yaml",
        ),
        (
            "k8s/envoy-gateway/security-policy.yaml",
            "port: 9191",
            "port: grpc",
            "sp-port.yaml",
        ),
        (
            "k8s/istio/authorization-policy.yaml",
            "action: CUSTOM",
            "action: EXTERNAL",
            "ap-action.yaml",
        ),
        (
            "k8s/istio/authorization-policy.yaml",
            "provider:",
            "providers:",
            "ap-typo.yaml",
        ),
    ] {
        let file = broken(src, from, to, name);
        let out = run(
            "node",
            &["tests/deploy/validate-crs.mjs", &file],
            NODE_MODELS,
        );
        assert!(
            !out.status.success(),
            "validate-crs.mjs accepted {to:?}:\n{}",
            text(&out)
        );
    }

    for (from, to) in [
        ("failOpen: false", "fail_open: false"),
        ("timeout: 2s", "timeout: 2"),
    ] {
        let file = broken("k8s/istio/extension-provider.yaml", from, to, "ep.yaml");
        let schema = "tests/deploy/schemas/istio-meshconfig-ext-authz-grpc.schema.json";
        let out = run(
            "python3",
            &["tests/deploy/validate_schema.py", schema, &file],
            JSONSCHEMA,
        );
        assert!(
            !out.status.success(),
            "the meshConfig schema accepted {to:?}:\n{}",
            text(&out)
        );
    }
}

fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    assert_eq!(containers.len(), 1);
    &containers[0]
}

#[test]
fn deployment_is_hardened() {
    let d = load(&k8s("deployment.yaml"));
    let pod = &d["spec"]["template"]["spec"];
    let c = container(&d);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::Bool(true));
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(65532));
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    assert_eq!(pod["automountServiceAccountToken"], Value::Bool(false));
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], Value::Bool(true));
    assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false));
    assert_eq!(sc["runAsNonRoot"], Value::Bool(true));
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_yaml::from_str::<Value>("[ALL]").unwrap()
    );
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][resource].is_string(),
                "resources.{kind}.{resource} is set"
            );
        }
    }
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["grpc"]["port"].as_u64(),
            Some(9191),
            "{probe} asks grpc.health.v1 on 9191"
        );
    }
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap() >= 25,
        "room for preStop + drain"
    );
    assert!(pod["affinity"]["podAntiAffinity"].is_mapping());
    assert!(
        pod["topologySpreadConstraints"]
            .as_sequence()
            .is_some_and(|s| !s.is_empty())
    );
}

#[test]
fn deployment_runs_the_configmap_config_with_the_secret_key() {
    let d = load(&k8s("deployment.yaml"));
    let pod = &d["spec"]["template"]["spec"];
    let c = container(&d);
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "serve",
            "--config",
            "/etc/portcullis/portcullis.yaml",
            "--log-format",
            "json"
        ]
    );

    let volumes = pod["volumes"].as_sequence().unwrap();
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap()
    };
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let mount_at = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(path))
            .unwrap()
    };

    // The config file: the ConfigMap's key, mounted as a directory so that edits propagate.
    let config_mount = mount_at("/etc/portcullis");
    assert!(
        config_mount.get("subPath").is_none(),
        "subPath mounts never see ConfigMap updates"
    );
    let cm_name = volume(config_mount["name"].as_str().unwrap())["configMap"]["name"]
        .as_str()
        .unwrap();
    let cm = load(&k8s("configmap.yaml"));
    assert_eq!(cm["metadata"]["name"].as_str(), Some(cm_name));
    let config_text = cm["data"]["portcullis.yaml"]
        .as_str()
        .expect("ConfigMap key portcullis.yaml");
    let config: Value = serde_yaml::from_str(config_text).unwrap();

    for (listener, port) in [("grpc", 9191), ("http", 9192), ("admin", 9180)] {
        assert_eq!(
            config["listen"][listener].as_str(),
            Some(format!("0.0.0.0:{port}").as_str())
        );
        assert!(
            c["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|p| p["containerPort"].as_u64() == Some(port)),
            "containerPort {port} declared"
        );
    }

    // The state file sits on a writable emptyDir (the root filesystem is read-only).
    let state = Path::new(config["state_file"].as_str().unwrap());
    let state_dir = state.parent().unwrap().to_str().unwrap();
    assert!(volume(mount_at(state_dir)["name"].as_str().unwrap())["emptyDir"].is_mapping());

    // The admin key: from the Secret, through the env var the config names.
    assert_eq!(
        config["admin"]["api_key"].as_str(),
        Some("$env://ADMIN_API_KEY")
    );
    let env = c["env"].as_sequence().unwrap();
    let key = env
        .iter()
        .find(|e| e["name"].as_str() == Some("ADMIN_API_KEY"))
        .unwrap();
    let secret = load(&k8s("secret.yaml"));
    let reference = &key["valueFrom"]["secretKeyRef"];
    assert_eq!(reference["name"], secret["metadata"]["name"]);
    assert!(secret["stringData"][reference["key"].as_str().unwrap()].is_string());
}

/// portcullis itself accepts the example configuration. Runs the real binary's `validate`.
#[test]
fn example_config_is_accepted_by_portcullis_validate() {
    let cm = load(&k8s("configmap.yaml"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("portcullis.yaml");
    std::fs::write(&file, cm["data"]["portcullis.yaml"].as_str().unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["validate", "--config", file.to_str().unwrap()])
        .env("ADMIN_API_KEY", "a-key-only-this-test-uses")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "portcullis validate refused the ConfigMap's config:\n{}",
        text(&out)
    );
}

#[test]
fn service_istio_and_envoy_gateway_point_at_the_same_port() {
    let svc = load(&k8s("service.yaml"));
    let d = load(&k8s("deployment.yaml"));
    let ns = load(&k8s("kustomization.yaml"))["namespace"]
        .as_str()
        .unwrap()
        .to_owned();
    let name = svc["metadata"]["name"].as_str().unwrap();
    let ports = svc["spec"]["ports"].as_sequence().unwrap();
    let grpc = ports
        .iter()
        .find(|p| p["name"].as_str() == Some("grpc"))
        .unwrap();
    assert_eq!(grpc["port"].as_u64(), Some(9191));
    for p in ports {
        let target = p["targetPort"].as_str().unwrap();
        assert!(
            container(&d)["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|cp| cp["name"].as_str() == Some(target)),
            "Service targetPort {target} is a named container port"
        );
    }
    let selector = &svc["spec"]["selector"];
    for (k, v) in selector.as_mapping().unwrap() {
        assert_eq!(
            &d["spec"]["template"]["metadata"]["labels"][k.as_str().unwrap()],
            v
        );
    }

    let mesh = load(&k8s("istio/extension-provider.yaml"));
    let provider = &mesh["spec"]["meshConfig"]["extensionProviders"][0];
    let grpc_provider = &provider["envoyExtAuthzGrpc"];
    assert_eq!(
        grpc_provider["service"].as_str(),
        Some(format!("{name}.{ns}.svc.cluster.local").as_str())
    );
    assert_eq!(grpc_provider["port"].as_u64(), Some(9191));
    assert_eq!(grpc_provider["failOpen"], Value::Bool(false));
    assert!(grpc_provider["timeout"].is_string(), "a deliberate timeout");
    let policy = load(&k8s("istio/authorization-policy.yaml"));
    assert_eq!(policy["spec"]["action"].as_str(), Some("CUSTOM"));
    assert_eq!(policy["spec"]["provider"]["name"], provider["name"]);

    let sp = load(&k8s("envoy-gateway/security-policy.yaml"));
    let backend = &sp["spec"]["extAuth"]["grpc"]["backendRefs"][0];
    assert_eq!(backend["name"].as_str(), Some(name));
    assert_eq!(backend["namespace"].as_str(), Some(ns.as_str()));
    assert_eq!(backend["port"].as_u64(), Some(9191));
    assert_eq!(sp["spec"]["extAuth"]["failOpen"], Value::Bool(false));
    let grant = load(&k8s("envoy-gateway/reference-grant.yaml"));
    assert_eq!(grant["metadata"]["namespace"].as_str(), Some(ns.as_str()));
    assert_eq!(
        grant["spec"]["from"][0]["namespace"],
        sp["metadata"]["namespace"]
    );
    assert_eq!(grant["spec"]["to"][0]["name"].as_str(), Some(name));
}

#[test]
fn dockerfile_builds_a_non_root_image_with_the_three_ports() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    assert!(dockerfile.contains("EXPOSE 9191 9192 9180"));
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert_eq!(
        user.trim(),
        "65532:65532",
        "the uid the Deployment's runAsUser names"
    );
    // etcd-client's build script needs a system protoc and its well-known types
    // (rust:*-bookworm has neither): a fresh `docker build`, like a fresh CI machine,
    // fails without them.
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
    if lock.contains("name = \"etcd-client\"") {
        let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
        for (file, text) in [("Dockerfile", &dockerfile), (".ci/run", &ci)] {
            let build = text.find("cargo ");
            for package in ["protobuf-compiler", "libprotobuf-dev"] {
                assert!(
                    matches!((text.find(package), build), (Some(p), Some(b)) if p < b),
                    "{file} installs {package} before it runs cargo"
                );
            }
        }
    }
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for excluded in ["target", "node_modules", ".git"] {
        assert!(
            ignore.lines().any(|l| l.contains(excluded)),
            ".dockerignore leaves out {excluded}"
        );
    }
}
