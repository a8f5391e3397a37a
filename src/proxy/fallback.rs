//! Falling back to control. With `fallback_to_control` on treatment, a
//! request whose treatment upstream failed before answering (see
//! [`UpstreamErrorKind::FALLS_BACK`]) is sent once more, to control, with
//! control's model and credentials, and control's answer is served.
//!
//! Only what failed before the first byte can be resent: after that the
//! client already has part of treatment's answer. Only JSON bodies can be
//! resent, because only they are held whole (for the `model` rewrite);
//! bodies streamed through (multipart uploads) are gone once sent.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::uri::Uri;
use http::{Method, Request, Response, Version};

use super::error::ProxyError;
use super::json::BodyFields;
use crate::config::Upstream;
use crate::proxy::body::Body;
use crate::telemetry::metrics::UpstreamErrorKind;

/// What is kept of a request so that it can be sent again: the client's
/// own method, path, headers and body, before any rewrite for treatment.
pub(crate) struct Resend {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) fields: BodyFields,
}

impl Resend {
    /// The request as it goes to `upstream`, and the model it names.
    /// `gateway_auth`: the client's credential headers hold a gateway key,
    /// which is never forwarded.
    pub(crate) fn request_for(
        &self,
        upstream: &Upstream,
        gateway_auth: bool,
    ) -> Result<(Request<Body>, Option<HeaderValue>), ProxyError> {
        let (body, model) = super::rewrite::rewrite_for(upstream, &self.body, &self.fields);
        let mut headers = self.headers.clone();
        super::headers::prepare_upstream_request(&mut headers, upstream, gateway_auth);
        let mut request = Request::new(Body::full(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = super::rewrite::upstream_uri(upstream, &self.uri)?;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        Ok((request, model))
    }
}

/// How a treatment attempt failed, if it is a failure worth resending:
/// the status its client would get without fallback, and its kind.
pub(crate) fn failure(
    attempt: &Result<Response<Body>, ProxyError>,
) -> Option<(u16, UpstreamErrorKind)> {
    let (status, kind) = match attempt {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, UpstreamErrorKind::from_status(status)?)
        }
        Err(err) => (err.status().as_u16(), err.upstream_kind()?),
    };
    UpstreamErrorKind::FALLS_BACK
        .contains(&kind)
        .then_some((status, kind))
}
