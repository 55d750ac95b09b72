//! The gRPC front: Envoy's `envoy.service.auth.v3.Authorization`, the standard
//! `grpc.health.v1.Health` for Kubernetes probes, and server reflection so grpcurl
//! can find both without proto files.
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::{Request, Response, Status};

use crate::runtime::Runtime;
use crate::wire::CheckRequest;

/// The descriptor set `build.rs` compiles from `proto/`.
pub const EXT_AUTHZ_DESCRIPTOR: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ext_authz_descriptor.bin"));

/// Envoy's `max_request_bytes` plus headers must fit: a message over the limit is an
/// RPC error, which Envoy resolves with `failure_mode_allow`, not with our decision.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// `envoy.service.auth.v3.Authorization` as tonic's generated server would serve it,
/// except that the request decodes into [`crate::wire::CheckRequest`] (slices of the
/// received frame) instead of `envoy-types`' owned message.
#[derive(Clone)]
pub struct AuthService {
    runtime: Arc<Runtime>,
}

impl AuthService {
    pub fn server(runtime: Arc<Runtime>) -> AuthService {
        AuthService { runtime }
    }
}

impl tonic::server::NamedService for AuthService {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for AuthService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CHECK_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let check = Check(self.runtime.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<CheckResponse, CheckRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(grpc.unary(check, req).await)
        })
    }
}

struct Check(Arc<Runtime>);

impl tonic::server::UnaryService<CheckRequest> for Check {
    type Response = CheckResponse;
    type Future = BoxFuture<Response<CheckResponse>, Status>;

    fn call(&mut self, request: Request<CheckRequest>) -> Self::Future {
        let runtime = self.0.clone();
        let mut check = request.into_inner();
        check.adopt_header_map();
        Box::pin(async move { Ok(Response::new(runtime.check(&check).await)) })
    }
}

pub const SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";
