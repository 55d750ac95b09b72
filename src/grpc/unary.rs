//! One gRPC message in, one out: the HTTP/2 body of a unary call.
//!
//! gRPC frames a message with five bytes (a compressed flag and a big-endian length)
//! and ends a successful call with a `grpc-status: 0` trailer. `Check` is the only
//! call on the hot path, so it is framed here rather than by tonic's codec, which
//! copies every request into an 8 KiB buffer, boxes a decoder and a body per call and
//! runs a streaming state machine for a single message (docs/benchmarks.md,
//! change 39). Errors are still tonic's [`Status`], sent as tonic sends them
//! ([`Status::into_http`]); everything that is not `Check` is still served by tonic.
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tonic::Status;
use tonic::codegen::http::{self, HeaderMap, HeaderValue};

/// The five bytes in front of every gRPC message.
const PREFIX: usize = 5;

/// Reads the one message of a unary call's request body.
///
/// Like tonic's server: a `grpc-encoding` other than `identity` is refused with
/// UNIMPLEMENTED (nothing here decompresses), a compressed flag without it and a
/// message over `limit` with INTERNAL / OUT_OF_RANGE. Unlike tonic, a second message
/// in a unary call is refused rather than dropped unread.
pub async fn read_request<B>(req: http::Request<B>, limit: usize) -> Result<Bytes, Status>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(encoding) = req.headers().get("grpc-encoding")
        && encoding != "identity"
    {
        let mut status = Status::unimplemented(format!(
            "Content is compressed with `{}` which isn't supported",
            String::from_utf8_lossy(encoding.as_bytes())
        ));
        status
            .metadata_mut()
            .insert("grpc-accept-encoding", "identity".parse().expect("ASCII"));
        return Err(status);
    }
    let mut body = req.into_body();
    let mut received = Received::default();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| Status::from_error(e.into()))?;
        if let Ok(data) = frame.into_data() {
            received.push(data, limit)?;
        }
    }
    received.message()
}

/// The request body so far: one chunk as it came (the usual case, Envoy sends a
/// CheckRequest in one DATA frame, and its message is then a slice of that frame),
/// or the chunks copied together.
#[derive(Default)]
struct Received {
    first: Bytes,
    joined: Option<BytesMut>,
}

impl Received {
    fn push(&mut self, data: Bytes, limit: usize) -> Result<(), Status> {
        if self.first.is_empty() && self.joined.is_none() {
            self.first = data;
        } else {
            let joined = self
                .joined
                .get_or_insert_with(|| BytesMut::from(std::mem::take(&mut self.first)));
            joined.extend_from_slice(&data);
        }
        let received = self.bytes();
        if received.len() >= PREFIX {
            let length = prefix(received, limit)?;
            if received.len() > PREFIX + length {
                return Err(Status::internal(
                    "a unary call carries one message; the request body has more",
                ));
            }
        }
        Ok(())
    }

    fn bytes(&self) -> &[u8] {
        self.joined.as_deref().unwrap_or(&self.first)
    }

    fn message(self) -> Result<Bytes, Status> {
        let mut all = match self.joined {
            Some(joined) => joined.freeze(),
            None => self.first,
        };
        if all.is_empty() {
            return Err(Status::internal("Missing request message."));
        }
        if all.len() < PREFIX || all.len() < PREFIX + prefix(&all, usize::MAX)? {
            return Err(Status::internal(
                "the request body ended inside its message (truncated gRPC frame)",
            ));
        }
        all.advance(PREFIX);
        Ok(all)
    }
}

/// The length a message's prefix announces, if its flag and length are acceptable.
fn prefix(bytes: &[u8], limit: usize) -> Result<usize, Status> {
    match bytes[0] {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ));
        }
        flag => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {flag} (valid flags are 0 and 1)"
            )));
        }
    }
    let length = u32::from_be_bytes(bytes[1..PREFIX].try_into().expect("four bytes")) as usize;
    if length > limit {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {length} bytes, the limit is: {limit} bytes"
        )));
    }
    Ok(length)
}

/// A successful unary answer: `message`, framed, then `grpc-status: 0`.
pub fn answer(message: &impl prost::Message) -> http::Response<Answer> {
    let length = message.encoded_len();
    let mut framed = BytesMut::with_capacity(PREFIX + length);
    framed.put_u8(0);
    framed.put_u32(u32::try_from(length).expect("an answer is far below 4 GiB"));
    message
        .encode(&mut framed)
        .expect("the buffer was sized by encoded_len");
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let mut response = http::Response::new(Answer {
        rest: framed.freeze(),
        trailers: Some(trailers),
    });
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
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

/// The body of a unary answer: the framed message in DATA frames of at most
/// [`MAX_DATA_FRAME`] bytes (slices of one buffer, nothing copied) if it is not longer
/// than [`MAX_CUT_MESSAGE`], then the trailers. Empty (the default) for an error,
/// whose status travels in the response headers.
#[derive(Default)]
pub struct Answer {
    rest: Bytes,
    trailers: Option<HeaderMap>,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.rest.is_empty() {
            return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        let n = match self.rest.len() {
            n if n > MAX_CUT_MESSAGE => n,
            n => n.min(MAX_DATA_FRAME),
        };
        Poll::Ready(Some(Ok(Frame::data(self.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.trailers.is_none()
    }

    /// Unknown, as tonic's answers say: with an exact size hyper would add a
    /// `content-length`, and a client that trusts it (curl) stops reading before the
    /// trailers that carry `grpc-status`.
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
    use std::collections::VecDeque;
    use tonic::Code;

    /// A request body that yields the given chunks.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
        }
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    async fn read(chunks: &[&[u8]], headers: &[(&'static str, &str)]) -> Result<Bytes, Status> {
        let body = Chunks(chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect());
        let mut req = http::Request::new(body);
        for (name, value) in headers {
            req.headers_mut()
                .insert(*name, HeaderValue::from_str(value).unwrap());
        }
        read_request(req, 64).await
    }

    #[tokio::test]
    async fn the_message_is_read_whole_or_cut_into_chunks() {
        let wire = framed(b"hello");
        assert_eq!(read(&[&wire], &[]).await.unwrap(), "hello");
        for cut in 1..wire.len() {
            let (a, b) = wire.split_at(cut);
            assert_eq!(read(&[a, b], &[]).await.unwrap(), "hello", "cut at {cut}");
        }
        assert_eq!(read(&[&framed(b"")], &[]).await.unwrap(), "");
        let identity = [("grpc-encoding", "identity")];
        assert_eq!(read(&[&wire], &identity).await.unwrap(), "hello");
    }

    #[tokio::test]
    async fn malformed_bodies_are_rpc_errors() {
        let wire = framed(b"hello");
        let code = |r: Result<Bytes, Status>| r.unwrap_err().code();
        assert_eq!(code(read(&[], &[]).await), Code::Internal);
        assert_eq!(code(read(&[&wire[..3]], &[]).await), Code::Internal);
        assert_eq!(code(read(&[&wire[..7]], &[]).await), Code::Internal);
        let two = [wire.clone(), wire.clone()].concat();
        assert_eq!(code(read(&[&two], &[]).await), Code::Internal);
        let mut compressed = wire.clone();
        compressed[0] = 1;
        assert_eq!(code(read(&[&compressed], &[]).await), Code::Internal);
        compressed[0] = 7;
        assert_eq!(code(read(&[&compressed], &[]).await), Code::Internal);
        let big = framed(&[0; 65]);
        // Refused from its prefix, before the rest arrives.
        assert_eq!(code(read(&[&big[..PREFIX]], &[]).await), Code::OutOfRange);
        let gzip = read(&[&wire], &[("grpc-encoding", "gzip")])
            .await
            .unwrap_err();
        assert_eq!(gzip.code(), Code::Unimplemented);
        assert_eq!(
            gzip.metadata().get("grpc-accept-encoding").unwrap(),
            "identity"
        );
    }

    /// Every frame an answer's body yields: data lengths, then `None` for the trailers.
    async fn frames(mut body: Answer) -> (Vec<Option<usize>>, Vec<u8>) {
        let (mut shape, mut bytes) = (Vec::new(), Vec::new());
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
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

    fn answer_of(bytes: usize) -> (http::Response<Answer>, Vec<u8>) {
        // A CheckResponse whose only field is a string of this many bytes.
        let message = CheckResponse {
            status: Some(envoy_types::pb::google::rpc::Status {
                message: "m".repeat(bytes),
                ..Default::default()
            }),
            ..Default::default()
        };
        let wire = framed(&prost::Message::encode_to_vec(&message));
        (answer(&message), wire)
    }

    #[tokio::test]
    async fn answers_are_cut_into_frames_h2_copies() {
        let (response, wire) = answer_of(600);
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert_eq!(response.body().size_hint().exact(), None);
        let (shape, bytes) = frames(response.into_body()).await;
        assert_eq!(bytes, wire);
        assert_eq!(shape, [Some(255), Some(255), Some(wire.len() - 510), None]);

        let (short, wire) = answer_of(10);
        assert_eq!(frames(short.into_body()).await.0, [Some(wire.len()), None]);
        // A long message goes out whole.
        let (long, wire) = answer_of(MAX_CUT_MESSAGE);
        let (shape, bytes) = frames(long.into_body()).await;
        assert_eq!(shape, [Some(wire.len()), None]);
        assert_eq!(bytes, wire);
    }

    #[test]
    fn an_error_answer_is_trailers_only() {
        let response: http::Response<Answer> = Status::internal("boom").into_http();
        assert_eq!(response.headers()["grpc-status"], "13");
        assert!(response.body().is_end_stream());
    }
}
