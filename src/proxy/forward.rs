//! Phase 7, **forward**: sent on a kept-alive upstream connection
//! ([`super::client`], and `abgate_http1::client` for plain HTTP), waiting
//! for the answer's head within `timeouts.first_byte_ms` (and
//! `timeouts.total_ms`); the answer's body is the upstream's own stream.
//! A treatment attempt that fails before answering is sent once more, to
//! control, with `fallback_to_control` (see [`super::fallback`]).

use std::time::Instant;

use http::request::Parts;
use http::Response;

use super::body::Body;
use super::client::ClientError;
use super::context::RequestContext;
use super::error::{ProxyError, Timeout};
use super::fallback::{self, Resend};
use crate::config::Snapshot;
use crate::experiment::assign::Variant;

/// Sends the request to `variant`'s upstream and, if it may fall back
/// (`resend`) and treatment failed, to control.
pub(crate) async fn forward(
    ctx: &mut RequestContext<'_>,
    parts: &mut Parts,
    body: Body,
    variant: Variant,
    resend: &mut Option<Resend>,
    total_at: Instant,
) -> Result<Response<Body>, ProxyError> {
    // The request's head stays here, lent to the sending: a future that
    // owned it would copy it at each step down.
    let attempt = send(ctx, parts, body, variant, total_at).await;
    match (resend.take(), fallback::failure(&attempt)) {
        (Some(resend), Some(failure)) => {
            // Boxed: inline, this rare path would make every request's
            // future 7.6 KiB instead of 4.6, held by each request that
            // waits for its model (thousands at a time are normal).
            Box::pin(fall_back(ctx, resend, attempt, failure, total_at)).await
        }
        _ => attempt,
    }
}

/// Sends `parts` and `body` to `variant`'s upstream and waits for the
/// answer's head: within `timeouts.first_byte_ms`, unless `total_at`
/// comes sooner. The wait is added to the request's upstream wait.
async fn send(
    ctx: &mut RequestContext<'_>,
    parts: &mut Parts,
    body: Body,
    variant: Variant,
    total_at: Instant,
) -> Result<Response<Body>, ProxyError> {
    let live = ctx.live;
    let config = &live.config;
    let waiting = Instant::now();
    let first_byte_at = waiting + config.first_byte_timeout;
    let (deadline, timeout, limit) = if total_at < first_byte_at {
        (total_at, Timeout::Total, config.total_timeout)
    } else {
        (first_byte_at, Timeout::FirstByte, config.first_byte_timeout)
    };
    let response = live
        .client
        .request_until(parts, body, Some(deadline.into()))
        .await;
    let headers_at = Instant::now();
    ctx.upstream_wait += headers_at.saturating_duration_since(waiting);
    ctx.headers_at = Some(headers_at);
    match response {
        Ok(response) => Ok(response),
        Err(ClientError::TimedOut) => Err(ProxyError::UpstreamTimeout {
            variant,
            timeout,
            timeout_ms: limit.as_millis(),
        }),
        Err(err) => Err(classify_client_error(&err, variant, config)),
    }
}

/// Treatment's upstream failed before answering (`failure`: the status
/// its client would get, and the kind): records that as treatment's
/// answer, exactly as without fallback, then sends the request once to
/// control, whose answer (or failure) the client gets. Past control's
/// in-flight cap, treatment's `attempt` stands.
async fn fall_back(
    ctx: &mut RequestContext<'_>,
    resend: Resend,
    attempt: Result<Response<Body>, ProxyError>,
    (status, kind): (u16, crate::telemetry::metrics::UpstreamErrorKind),
    total_at: Instant,
) -> Result<Response<Body>, ProxyError> {
    let (gateway, live) = (ctx.gateway, ctx.live);
    let config = &live.config;
    if let Some(max) = config.limits.max_inflight_per_variant {
        match gateway.inflight.admit_to(Variant::Control, max) {
            // Treatment's place is given back as control's is taken.
            Some(place) => ctx.places.upstream = Some(place),
            None => return attempt,
        }
    }
    match &attempt {
        Ok(response) => tracing::warn!(
            status = response.status().as_u16(),
            "the treatment upstream answered with a server error; falling back to control"
        ),
        Err(err) => tracing::warn!(kind = err.kind(), "{err}; falling back to control"),
    }
    // Its body (a 5xx answer) is dropped unread, closing its connection.
    drop(attempt);
    ctx.record_failed_attempt(status, kind);
    let (request, model) = resend.request_for(&config.control, config.gateway_keys.is_some())?;
    ctx.model = model;
    let (mut parts, body) = request.into_parts();
    let answer = send(ctx, &mut parts, body, Variant::Control, total_at).await;
    let served = answer
        .as_ref()
        .is_ok_and(|response| !response.status().is_server_error());
    gateway.metrics.fallback(&config.experiment, kind, served);
    answer
}

/// Maps a client failure to connect, timeout or reset, naming the variant.
fn classify_client_error(err: &ClientError, variant: Variant, config: &Snapshot) -> ProxyError {
    let detail = error_chain(err);
    if err.is_request_body() {
        return ProxyError::ClientBody(detail);
    }
    if err.is_connect() {
        if has_io_kind(err, std::io::ErrorKind::TimedOut) {
            return ProxyError::UpstreamTimeout {
                variant,
                timeout: Timeout::Connect,
                timeout_ms: config.connect_timeout.as_millis(),
            };
        }
        return ProxyError::UpstreamConnect { variant, detail };
    }
    ProxyError::UpstreamReset { variant, detail }
}

fn has_io_kind(err: &(dyn std::error::Error + 'static), kind: std::io::ErrorKind) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == kind {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// "outer: inner: innermost", the way operators want to read an error.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        let next = err.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = err.source();
    }
    text
}
