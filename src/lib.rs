//! portcullis: an Envoy `ext_authz` server with Apache APISIX's auth plugin semantics.
//!
//! A request flows one way: `request` decodes Envoy's CheckRequest into a borrowed
//! view → `router` matches an APISIX-style route → `pipeline` runs its `plugins` in
//! priority order → `encode` builds the CheckResponse. Configuration comes from
//! `config` and `store`, compiled by `snapshot` and swapped atomically in `runtime`.
// Audited exceptions, both in `memory`: glibc's `malloc_trim` and `mallopt`.
#![deny(unsafe_code)]

pub mod admin;
pub mod auth_request;
pub mod check_threads;
pub mod config;
pub mod decision;
pub mod encode;
pub mod grpc;
pub mod http;
pub mod memory;
pub mod pipeline;
pub mod plugins;
pub mod request;
pub mod resources;
pub mod router;
pub mod runtime;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod telemetry;
pub mod watch;
pub mod wire;
pub mod yaml;
