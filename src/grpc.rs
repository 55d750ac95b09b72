//! The gRPC front: Envoy's `envoy.service.auth.v3.Authorization`, the standard
//! `grpc.health.v1.Health` for Kubernetes probes, and server reflection so grpcurl
//! can find both without proto files.
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};

use crate::runtime::Runtime;

/// The descriptor set `build.rs` compiles from `proto/`.
pub const EXT_AUTHZ_DESCRIPTOR: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ext_authz_descriptor.bin"));

/// Envoy's `max_request_bytes` plus headers must fit: a message over the limit is an
/// RPC error, which Envoy resolves with `failure_mode_allow`, not with our decision.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

pub struct AuthService {
    runtime: Arc<Runtime>,
}

impl AuthService {
    pub fn server(runtime: Arc<Runtime>) -> AuthorizationServer<AuthService> {
        AuthorizationServer::new(AuthService { runtime })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl Authorization for AuthService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let msg = request.into_inner();
        Ok(Response::new(self.runtime.check(&msg).await))
    }
}

pub const SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";
