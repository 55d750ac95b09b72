//! The gRPC front: Envoy's `envoy.service.auth.v3.Authorization`, the standard
//! `grpc.health.v1.Health` for Kubernetes probes, and server reflection so grpcurl
//! can find both without proto files.
// Every Check's future is built here: keep it small (clippy.toml).
#![warn(clippy::large_futures)]
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use hyper::body::Incoming;
use prost::Message;
use tonic::Status;
use tonic::codegen::{Body, BoxFuture, Service, http};
use tonic::service::Routes;

use crate::runtime::Runtime;
use crate::wire::CheckRequest;

mod unary;

/// The descriptor set `build.rs` compiles from `proto/`.
pub const EXT_AUTHZ_DESCRIPTOR: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ext_authz_descriptor.bin"));

/// Envoy's `max_request_bytes` plus headers must fit: a message over the limit is an
/// RPC error, which Envoy resolves with `failure_mode_allow`, not with our decision.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// What every gRPC connection serves: `Check` goes straight to the decision, anything
/// else (health, reflection, unknown methods) through tonic's router.
///
/// Why `Check` does not go through tonic's server as well: for every request that
/// server clones a boxed service, copies the peer's address into the request's
/// extensions, runs the `grpc-timeout` layer and matches the path in axum's router —
/// about half of a Check's allocations, and none of it needed here. Envoy enforces
/// its own ext_authz timeout by resetting the stream, which drops the Check's future
/// (docs/benchmarks.md, change 38).
#[derive(Clone)]
pub struct Front {
    runtime: Arc<Runtime>,
    others: Routes,
}

impl Front {
    pub fn new(runtime: Arc<Runtime>, others: Routes) -> Front {
        Front {
            runtime,
            others: others.prepare(),
        }
    }

    /// `envoy.service.auth.v3.Authorization/Check`: the request decodes into
    /// [`crate::wire::CheckRequest`] (slices of the received frame) instead of
    /// `envoy-types`' owned message, framed by [`unary`] instead of tonic's codec.
    fn check(
        &self,
        req: http::Request<Incoming>,
    ) -> BoxFuture<http::Response<FrontBody>, Infallible> {
        let runtime = self.runtime.clone();
        Box::pin(async move {
            let check = unary::read_request(req, MAX_MESSAGE_BYTES)
                .await
                .and_then(|message| {
                    CheckRequest::decode(message).map_err(|e| {
                        Status::internal(format!("the CheckRequest does not decode: {e}"))
                    })
                });
            Ok(match check {
                Ok(mut check) => {
                    check.adopt_header_map();
                    unary::answer(&runtime.check(&check).await).map(FrontBody::Answer)
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

/// The body of every answer on a gRPC connection.
pub enum FrontBody {
    /// A `Check`'s answer, or the empty body of an RPC error (trailers-only).
    Answer(unary::Answer),
    /// What tonic's router answered (health, reflection, unknown methods).
    Routed(tonic::body::Body),
}

impl Default for FrontBody {
    fn default() -> Self {
        FrontBody::Answer(unary::Answer::default())
    }
}

impl Body for FrontBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match self.get_mut() {
            FrontBody::Answer(answer) => Pin::new(answer).poll_frame(cx).map_err(|n| match n {}),
            FrontBody::Routed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            FrontBody::Answer(answer) => answer.is_end_stream(),
            FrontBody::Routed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            FrontBody::Answer(answer) => answer.size_hint(),
            FrontBody::Routed(body) => body.size_hint(),
        }
    }
}

impl hyper::service::Service<http::Request<Incoming>> for Front {
    type Response = http::Response<FrontBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        if req.uri().path() == CHECK_PATH {
            return self.check(req);
        }
        let answer = self.others.clone().call(req);
        Box::pin(async move { Ok(answer.await?.map(FrontBody::Routed)) })
    }
}

pub const SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";
