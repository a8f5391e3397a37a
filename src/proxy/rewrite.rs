//! Phase 6, **rewrite**: `model` spliced in, the upstream's URI, host and
//! credentials set; the client's credentials dropped when the upstream
//! gets the gateway's own or they held a gateway key; every `x-abgate-*`
//! header dropped (see [`super::headers`]). A treatment request that may
//! fall back keeps the client's own request to send to control.

use bytes::Bytes;
use http::header::HeaderValue;
use http::request::Parts;
use http::uri::{self, PathAndQuery, Uri};
use http::Version;

use super::body::Body;
use super::context::RequestContext;
use super::error::ProxyError;
use super::fallback::Resend;
use super::json::{self, BodyFields};
use super::read::ClientBody;
use crate::config::Upstream;
use crate::experiment::assign::Variant;

/// The request as `variant`'s upstream gets it; what is kept to resend
/// it to control goes in `resend`.
#[inline]
pub(crate) fn rewrite(
    ctx: &mut RequestContext<'_>,
    parts: &mut Parts,
    body: ClientBody,
    variant: Variant,
    resend: &mut Option<Resend>,
) -> Result<Body, ProxyError> {
    let config = &ctx.live.config;
    let upstream = config.upstream(variant);
    let body = match body {
        ClientBody::Json(bytes, fields) => {
            let (rewritten, model) = rewrite_for(upstream, &bytes, &fields);
            ctx.model = model;
            if variant == Variant::Treatment && config.fallback_to_control {
                // Kept as the client sent it: control gets its own model
                // and credentials.
                *resend = Some(Resend {
                    method: parts.method.clone(),
                    uri: parts.uri.clone(),
                    headers: parts.headers.clone(),
                    body: bytes,
                    fields,
                });
            }
            Body::full(rewritten)
        }
        ClientBody::Stream(body) => body,
    };
    parts.uri = upstream_uri(upstream, &parts.uri)?;
    parts.version = Version::HTTP_11;
    super::headers::prepare_upstream_request(
        &mut parts.headers,
        upstream,
        config.gateway_keys.is_some(),
    );
    Ok(body)
}

/// A JSON body with `upstream`'s model spliced in (or the client's kept),
/// and the model it names, for the `x-abgate-model` header.
pub(crate) fn rewrite_for(
    upstream: &Upstream,
    body: &Bytes,
    fields: &BodyFields,
) -> (Bytes, Option<HeaderValue>) {
    match &upstream.model {
        Some(model) => (
            json::rewrite_model(body, &fields.model_spans, &model.json),
            Some(model.header.clone()),
        ),
        None => (
            body.clone(),
            fields
                .model
                .as_deref()
                .and_then(|m| HeaderValue::from_str(m).ok()),
        ),
    }
}

/// The upstream URI: its origin and prefix, then the client's path and query.
pub(crate) fn upstream_uri(upstream: &Upstream, original: &Uri) -> Result<Uri, ProxyError> {
    let path_and_query = original
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let path_and_query = if upstream.path_prefix.is_empty() {
        path_and_query
    } else {
        let joined = format!("{}{}", upstream.path_prefix, path_and_query);
        PathAndQuery::try_from(joined)
            .map_err(|err| ProxyError::Internal(format!("upstream path: {err}")))?
    };
    // From its parts, each already valid: no builder steps to pass through.
    let mut parts = uri::Parts::default();
    parts.scheme = Some(upstream.scheme.clone());
    parts.authority = Some(upstream.authority.clone());
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).map_err(|err| ProxyError::Internal(format!("upstream URI: {err}")))
}
