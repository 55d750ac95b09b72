//! Compiles the vendored ext_authz protos into a descriptor set for gRPC server
//! reflection. The Rust types come from `envoy-types`; this only produces the
//! self-description that `tonic-reflection` serves, so `grpcurl` can list and call
//! `envoy.service.auth.v3.Authorization` against a running portcullis.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let descriptor = out.join("ext_authz_descriptor.bin");
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc for this platform");
    let well_known = protoc_bin_vendored::include_path().expect("vendored protobuf includes");
    let status = Command::new(protoc)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", descriptor.display()))
        .arg("-Iproto")
        .arg(format!("-I{}", well_known.display()))
        .arg("proto/envoy/service/auth/v3/external_auth.proto")
        .status()
        .expect("run protoc");
    assert!(
        status.success(),
        "protoc failed to build the ext_authz descriptor set"
    );
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
}
