//! Phase 4, **read**: a JSON body is read whole (up to `max_body_bytes`,
//! within `timeouts.total_ms`), because `model` is rewritten and the user
//! ID may be in it; any other body (a multipart upload) streams through
//! untouched.

use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::Method;
use http_body_util::{BodyExt, Limited};

use super::body::Body;
use super::error::ProxyError;
use super::json::{self, BodyFields};
use crate::config::Snapshot;
use crate::telemetry::route::Route;

/// A client's request body as the gateway holds it.
pub(crate) enum ClientBody {
    /// Read whole and inspected.
    Json(Bytes, BodyFields),
    /// Not the gateway's business: streamed to the upstream as is.
    Stream(Body),
}

impl ClientBody {
    /// The JSON body's fields the gateway reads, if it is JSON.
    pub(crate) fn fields(&self) -> Option<&BodyFields> {
        match self {
            ClientBody::Json(_, fields) => Some(fields),
            ClientBody::Stream(_) => None,
        }
    }
}

/// The request's body as the gateway holds it, by `total_at`.
pub(crate) async fn read(
    body: Body,
    parts: &Parts,
    route: Route,
    config: &Snapshot,
    total_at: Instant,
) -> Result<ClientBody, ProxyError> {
    if !carries_json(parts, route) {
        check_declared_length(parts, config.max_body_bytes)?;
        return Ok(ClientBody::Stream(body));
    }
    let whole = matches!(body, Body::Full(_));
    let reading = read_body(body, parts, config.max_body_bytes);
    let bytes = if whole {
        // Came with its head: no timer to set for it.
        reading.await?
    } else {
        tokio::time::timeout_at(total_at.into(), reading)
            .await
            .map_err(|_| ProxyError::RequestTimeout {
                timeout_ms: config.total_timeout.as_millis(),
            })??
    };
    let fields = json::inspect(&bytes)?;
    Ok(ClientBody::Json(bytes, fields))
}

/// Whether the request body is JSON the gateway must read: always on the
/// API routes whose bodies are JSON by definition (whatever the content type
/// claims: `curl -d` says form-urlencoded), elsewhere when it says JSON.
fn carries_json(parts: &Parts, route: Route) -> bool {
    if !matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
        return false;
    }
    if route.takes_json() {
        return true;
    }
    parts.headers.get(CONTENT_TYPE).is_some_and(|value| {
        let media_type = value.to_str().unwrap_or("");
        let media_type = media_type.split(';').next().unwrap_or("").trim();
        media_type.eq_ignore_ascii_case("application/json")
            || media_type.to_ascii_lowercase().ends_with("+json")
    })
}

/// Reads a JSON body up to `limit` bytes.
pub(crate) async fn read_body(
    body: Body,
    parts: &Parts,
    limit: usize,
) -> Result<Bytes, ProxyError> {
    check_declared_length(parts, limit)?;
    if let Body::Full(bytes) = body {
        // Came whole with its head: nothing to wait for.
        let bytes = bytes.unwrap_or_default();
        if bytes.len() > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        return Ok(bytes);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(err) => Err(ProxyError::ClientBody(err.to_string())),
    }
}

/// Refuses a body whose declared length is over the limit before reading it.
fn check_declared_length(parts: &Parts, limit: usize) -> Result<(), ProxyError> {
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => Err(ProxyError::BodyTooLarge { limit }),
        _ => Ok(()),
    }
}
