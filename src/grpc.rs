//! The gRPC front: Envoy's `envoy.service.auth.v3.Authorization`, the standard
//! `grpc.health.v1.Health` for Kubernetes probes, and server reflection so grpcurl
//! can find both without proto files.
// Every Check's future is built here: keep it small (clippy.toml).
#![warn(clippy::large_futures)]
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use hyper::body::Incoming;
use tonic::codegen::{Body, BoxFuture, Service, http};
use tonic::service::Routes;
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

    /// `envoy.service.auth.v3.Authorization/Check` as tonic's generated server would
    /// serve it, except that the request decodes into [`crate::wire::CheckRequest`]
    /// (slices of the received frame) instead of `envoy-types`' owned message.
    fn check(
        &self,
        req: http::Request<Incoming>,
    ) -> BoxFuture<http::Response<FrontBody>, Infallible> {
        let check = Check(self.runtime.clone());
        // tonic's unary future (1.8 KB) is the bulk of this one, which is boxed: it
        // is allocated once per Check, not copied through the callers' futures.
        #[allow(clippy::large_futures)]
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<CheckResponse, CheckRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(grpc.unary(check, req).await.map(SmallFrames::new))
        })
    }
}

/// The body of every answer on a gRPC connection.
pub type FrontBody = SmallFrames<tonic::body::Body>;

impl hyper::service::Service<http::Request<Incoming>> for Front {
    type Response = http::Response<FrontBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        if req.uri().path() == CHECK_PATH {
            return self.check(req);
        }
        let answer = self.others.clone().call(req);
        Box::pin(async move { Ok(answer.await?.map(SmallFrames::new)) })
    }
}

/// DATA frames of an answer are at most this long.
///
/// h2 copies a shorter frame into its write buffer, but keeps a longer one aside and
/// flushes it before it takes the next frame: an answer over 255 bytes (a forwarded
/// access token, `X-Userinfo`) then left in two writes, the message and, in a second
/// segment, the trailers with `grpc-status`, and Envoy woke up twice to read it. As
/// short frames the whole answer goes out in one write (docs/benchmarks.md, change 36).
const MAX_DATA_FRAME: usize = 255;

/// Longer messages (a login page an auth service sent for the client) go out as they
/// are: cut, they would take dozens of frames, and beside that many bytes one more
/// write matters little.
const MAX_CUT_MESSAGE: usize = 8 * 1024;

/// Cuts the answer's message, up to [`MAX_CUT_MESSAGE`] bytes, into DATA frames of at
/// most [`MAX_DATA_FRAME`] bytes (slices of one buffer, nothing copied); trailers and
/// longer messages pass through.
pub struct SmallFrames<B> {
    inner: B,
    rest: Bytes,
}

impl<B> SmallFrames<B> {
    fn new(inner: B) -> SmallFrames<B> {
        SmallFrames {
            inner,
            rest: Bytes::new(),
        }
    }
}

impl<B> Body for SmallFrames<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if self.rest.is_empty() {
            let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                other => return Poll::Ready(other),
            };
            match frame.into_data() {
                Ok(data) if data.len() <= MAX_CUT_MESSAGE => self.rest = data,
                Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            }
        }
        let n = self.rest.len().min(MAX_DATA_FRAME);
        Poll::Ready(Some(Ok(Frame::data(self.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint.set_lower(inner.lower() + rest);
        hint
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A body that yields the given frames, as tonic's encoder does for an answer.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            let data = self.0.iter().filter_map(Frame::data_ref).map(Bytes::len);
            SizeHint::with_exact(data.sum::<usize>() as u64)
        }
    }

    /// Every frame `SmallFrames` yields: data lengths, then `None` for the trailers.
    async fn cut(message: &[u8]) -> (Vec<Option<usize>>, Vec<u8>) {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let mut body = SmallFrames::new(Frames(VecDeque::from([
            Frame::data(Bytes::copy_from_slice(message)),
            Frame::trailers(trailers),
        ])));
        assert_eq!(body.size_hint().exact(), Some(message.len() as u64));
        let (mut shape, mut bytes) = (Vec::new(), Vec::new());
        while let Some(frame) =
            futures::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            match frame.unwrap().into_data() {
                Ok(data) => {
                    shape.push(Some(data.len()));
                    bytes.extend_from_slice(&data);
                    assert!(!body.is_end_stream(), "the trailers are still to come");
                }
                Err(frame) => {
                    assert_eq!(frame.trailers_ref().unwrap()["grpc-status"], "0");
                    shape.push(None);
                }
            }
        }
        assert!(body.is_end_stream());
        (shape, bytes)
    }

    #[tokio::test]
    async fn answers_are_cut_into_frames_h2_copies() {
        let message: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
        let (shape, bytes) = cut(&message).await;
        assert_eq!(shape, [Some(255), Some(255), Some(90), None]);
        assert_eq!(bytes, message);

        assert_eq!(cut(b"short").await.0, [Some(5), None]);
        assert_eq!(cut(&[7; 255]).await.0, [Some(255), None]);
        // A long message goes out whole.
        let long = vec![1u8; MAX_CUT_MESSAGE + 1];
        let (shape, bytes) = cut(&long).await;
        assert_eq!(shape, [Some(long.len()), None]);
        assert_eq!(bytes, long);
    }

    #[test]
    fn the_size_hint_counts_what_is_left_to_send() {
        let mut body = SmallFrames {
            inner: Frames(VecDeque::from([Frame::data(Bytes::from_static(&[0; 40]))])),
            rest: Bytes::from_static(&[0; 300]),
        };
        assert_eq!(body.size_hint().exact(), Some(340));
        body.rest = Bytes::new();
        assert_eq!(body.size_hint().exact(), Some(40));
    }
}
