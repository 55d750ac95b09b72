//! `benches/scale.sh` at a small size: the script users run to reproduce the scale
//! numbers of docs/benchmarks.md keeps working, with the resources in the config file
//! (YAML) and in the state file as the Admin API writes it (JSON). The numbers are
//! not checked — only that everything generated was loaded (the script asks the
//! Admin API for the last consumer's credential), the writes and the burst of
//! consumers were accepted and visible, and no Check failed.
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn scale(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(Path::new(ROOT).join("benches/scale.sh"))
        .args([
            "--consumers",
            "300",
            "--routes",
            "30",
            "--writes",
            "2",
            "--burst",
            "5",
        ])
        .args(args)
        .arg("--portcullis")
        .arg(env!("CARGO_BIN_EXE_portcullis"))
        .output()
        .expect("bash runs benches/scale.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scale.sh {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "startup to ready: ",
        "memory after startup (settled, 2 s after ready): VmHWM:",
        "route writes: 1; ",
        "consumer writes: 1; ",
        "burst: 5 consumers with a credential each, 10 Admin PUTs one after another: ",
        "no Check failed during the writes",
    ] {
        assert!(stdout.contains(line), "no {line:?} in\n{stdout}");
    }
    stdout
}

#[test]
fn resources_in_the_config_file() {
    let out = scale(&["--format", "yaml"]);
    assert!(
        out.contains("config: 30 routes, 300 consumers with "),
        "{out}"
    );
}

#[test]
fn resources_in_the_state_file_the_admin_api_writes() {
    let out = scale(&["--via", "admin", "--format", "json"]);
    assert!(
        out.contains("state file (as the Admin API writes it): 30 routes, 300 consumers"),
        "{out}"
    );
}
