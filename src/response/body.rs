//! The body of every response the proxy gives, and the fields a CRM answer's body carries for
//! its head: the proxy's `RateLimit` fields. They ride with the body, not in the answer's header
//! map, so that the HTTP/1.1 writer puts them in the head after the map's own fields, with no
//! insert into the map and no removal from it (the two inserts, of names `http` does not know,
//! were about 550 of a proxied request's 1,200 instructions of `RateLimit` work); the HTTP/2
//! listener moves them into the map at its edge ([`fields_into_head`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Frame, SizeHint};

use crate::upstream::BodyError;

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// A response body: bytes at hand or streamed (a CRM's), boxed behind one pointer, as
/// `http_body_util`'s `BoxBody` is; with the `RateLimit` fields of a CRM answer when it carries
/// them.
pub struct Body(Box<dyn Source>);

/// What a [`Body`] boxes.
trait Source: hyper::body::Body<Data = Bytes, Error = BodyError> + Send + Sync + Unpin {
    /// The fields carried for the head, taken (each is written once).
    fn take_fields(&mut self) -> Option<RateLimitFields>;
}

/// The proxy's `RateLimit-Policy` and `RateLimit` values for one answer.
#[derive(Debug)]
pub struct RateLimitFields {
    pub policy: HeaderValue,
    pub state: HeaderValue,
}

impl RateLimitFields {
    /// Appends both fields to `headers`.
    pub fn append_to(self, headers: &mut HeaderMap) {
        headers.append(RATELIMIT_POLICY.clone(), self.policy);
        headers.append(RATELIMIT.clone(), self.state);
    }

    /// Both fields as lines of an HTTP/1.1 head.
    pub fn write(&self, out: &mut Vec<u8>) {
        for (name, value) in [(&RATELIMIT_POLICY, &self.policy), (&RATELIMIT, &self.state)] {
            for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
                out.extend_from_slice(part);
            }
        }
    }
}

/// A body and the fields it carries.
struct Carrying<B> {
    body: B,
    fields: Option<RateLimitFields>,
}

impl Body {
    /// `body`, carrying no fields.
    pub fn new<B>(body: B) -> Body
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
        B::Error: Into<BodyError>,
    {
        Body::carrying(body, None)
    }

    /// `body`, carrying `fields` for the head.
    pub fn carrying<B>(body: B, fields: Option<RateLimitFields>) -> Body
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
        B::Error: Into<BodyError>,
    {
        Body(Box::new(Carrying { body, fields }))
    }

    /// The fields the body carries for the head, taken.
    pub fn take_fields(&mut self) -> Option<RateLimitFields> {
        self.0.take_fields()
    }
}

/// Moves the fields a response's body carries into its header map (for a writer that writes
/// only the map: hyper's HTTP/2 server).
pub fn fields_into_head(resp: &mut Response<Body>) {
    if let Some(fields) = resp.body_mut().take_fields() {
        fields.append_to(resp.headers_mut());
    }
}

impl<B> Source for Carrying<B>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BodyError>,
{
    fn take_fields(&mut self) -> Option<RateLimitFields> {
        self.fields.take()
    }
}

impl<B> hyper::body::Body for Carrying<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.get_mut().body)
            .poll_frame(cx)
            .map(|f| f.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut *self.get_mut().0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Body as _;

    use super::*;

    fn fields() -> RateLimitFields {
        RateLimitFields {
            policy: HeaderValue::from_static("\"minute\";q=400;w=60"),
            state: HeaderValue::from_static("\"minute\";r=399;t=60"),
        }
    }

    #[tokio::test]
    async fn a_body_carries_its_fields_once_and_its_bytes_as_they_were() {
        let mut body = Body::carrying(Full::new(Bytes::from_static(b"{}")), Some(fields()));
        assert_eq!(body.size_hint().exact(), Some(2));
        let mut out = Vec::new();
        body.take_fields().unwrap().write(&mut out);
        assert_eq!(
            out,
            b"ratelimit-policy: \"minute\";q=400;w=60\r\nratelimit: \"minute\";r=399;t=60\r\n"
        );
        assert!(body.take_fields().is_none(), "written once");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "{}");
        assert!(Body::new(Full::new(Bytes::new())).take_fields().is_none());
    }

    #[test]
    fn for_a_map_only_writer_the_fields_go_into_the_map_after_the_crms_own() {
        let body = Body::carrying(Full::new(Bytes::new()), Some(fields()));
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert("ratelimit", HeaderValue::from_static("crm's own"));
        fields_into_head(&mut resp);
        let all: Vec<_> = resp.headers().get_all("ratelimit").iter().collect();
        assert_eq!(all, ["crm's own", "\"minute\";r=399;t=60"]);
        assert_eq!(resp.headers()["ratelimit-policy"], "\"minute\";q=400;w=60");
        assert!(resp.body_mut().take_fields().is_none());
    }
}
