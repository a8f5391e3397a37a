//! Phase 5, **assign**: the user ID picks the arm by the reference hash;
//! none means `unassigned`, served by control. A forced arm replaces the
//! hashed one and is counted apart (the split's counts of requests and
//! distinct users skip it). Past `limits.max_inflight_per_variant`
//! requests to that upstream, a 503 naming the arm.

use http::request::Parts;

use super::context::RequestContext;
use super::error::ProxyError;
use super::identity::{self, IdentityRules};
use super::json::BodyFields;
use crate::config::Snapshot;
use crate::experiment::assign::{self, Variant};

/// Assigns the request (`fields`: its JSON body's, if any) to its arm,
/// or to the `forced` one, and takes its place under the arm's cap.
#[inline]
pub(crate) fn assign(
    ctx: &mut RequestContext<'_>,
    parts: &Parts,
    fields: Option<&BodyFields>,
    forced: Option<Variant>,
) -> Result<Variant, ProxyError> {
    let (gateway, live) = (ctx.gateway, ctx.live);
    let config = &live.config;
    let limits = &config.limits;
    ctx.stream = fields.is_some_and(|fields| fields.stream);
    let (hashed, user_key, user_id) = choose_variant(config, parts, fields)?;
    if let (Some(sink), Some(user_id)) = (&gateway.events, user_id) {
        ctx.event_user_id = sink.user_id_field(user_id);
    }
    let variant = match forced {
        Some(forced) => {
            ctx.forced = true;
            forced
        }
        None => {
            if let Some(user_key) = user_key {
                live.epoch.counts.count(hashed, user_key);
            }
            hashed
        }
    };
    ctx.variant = Some(variant);
    if let Some(max) = limits.max_inflight_per_variant {
        ctx.places.upstream = Some(gateway.inflight.admit_to(variant, max).ok_or(
            ProxyError::Shed {
                variant: Some(variant),
                limit: max,
                retry_after_seconds: limits.retry_after_seconds,
            },
        )?);
    }
    ctx.inflight = Some(live.metrics.start(variant));
    Ok(variant)
}

/// Finds the user ID and hashes it into an arm; the same md5 gives the key
/// the stage counts the user's first request by.
fn choose_variant<'a>(
    config: &Snapshot,
    parts: &'a Parts,
    fields: Option<&'a BodyFields>,
) -> Result<(Variant, Option<u64>, Option<&'a str>), ProxyError> {
    let rules = IdentityRules {
        header: &config.user_header,
        max_bytes: config.max_user_id_bytes,
    };
    let header = identity::from_header(&parts.headers, rules)?;
    match identity::resolve(header, fields, rules)? {
        Some(user) => {
            let hash = assign::user_hash(user.id.as_bytes(), config.salt.as_deref());
            let variant = assign::variant_of(hash.bucket, config.treatment_fraction);
            Ok((variant, Some(hash.key), Some(user.id)))
        }
        None if config.require_user => Err(ProxyError::UserIdRequired {
            header: config.user_header.to_string(),
        }),
        None => Ok((Variant::Unassigned, None, None)),
    }
}
