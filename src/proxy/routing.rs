//! Phase 1, **route**: only `/v1/...` is proxied, anything else is a 404;
//! methods no model API uses get a 405, oversized heads a 431, paths a
//! normaliser could move a 400 (see [`super::path`]).

use http::request::Parts;
use http::Method;

use super::error::ProxyError;
use crate::telemetry::route::Route;

/// The request's API family, or why it is refused before anything else.
#[inline]
pub(crate) fn route(parts: &Parts, max_header_bytes: usize) -> Result<Route, ProxyError> {
    check_method(&parts.method)?;
    check_header_size(parts, max_header_bytes)?;
    super::path::check_path(parts.uri.path())
        .map_err(|reason| ProxyError::InvalidPath { reason })?;
    Route::classify(parts.uri.path()).ok_or_else(|| ProxyError::NotFound {
        path: truncate(parts.uri.path(), 200),
    })
}

/// Refuses methods no model API uses (TRACE, CONNECT, extensions): they
/// are never forwarded.
fn check_method(method: &Method) -> Result<(), ProxyError> {
    match *method {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::HEAD
        | Method::OPTIONS => Ok(()),
        _ => Err(ProxyError::MethodNotForwarded {
            method: truncate(method.as_str(), 32),
        }),
    }
}

/// Refuses a request whose line and headers, as HTTP/1.1 writes them, are
/// over `limit` bytes. (The HTTP layer refuses far larger ones itself,
/// before they reach the gateway: see `server::ConnectionLimits`.)
fn check_header_size(parts: &Parts, limit: usize) -> Result<(), ProxyError> {
    let line = parts.method.as_str().len()
        + parts
            .uri
            .path_and_query()
            .map_or(1, |path| path.as_str().len())
        + " HTTP/1.1\r\n ".len();
    let size = parts.headers.iter().fold(line, |size, (name, value)| {
        size + name.as_str().len() + value.len() + ": \r\n".len()
    });
    if size > limit {
        return Err(ProxyError::HeadersTooLarge { size, limit });
    }
    Ok(())
}

/// `text` cut to `max` characters, marked as cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}
