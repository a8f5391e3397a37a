//! Load shedding: caps on the requests in flight, overall and per upstream.
//!
//! The counts live as long as the gateway, across config reloads (requests
//! started on an old config still occupy their place); the caps are read
//! from the config each request starts on. Taking a place is one atomic
//! add, giving it back one atomic subtract: no lock on the request path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::LimitsConfig;
use crate::experiment::assign::Variant;
use crate::proxy::error::ProxyError;

/// Phase 3, **admit**: a place under `limits.max_inflight`, taken before
/// anything is read, while refusing is cheap; past it, a 503 with
/// `Retry-After`.
#[inline]
pub(crate) fn admit(inflight: &Arc<Inflight>, limits: &LimitsConfig) -> Result<Place, ProxyError> {
    inflight.admit(limits.max_inflight).ok_or(ProxyError::Shed {
        variant: None,
        limit: limits.max_inflight,
        retry_after_seconds: limits.retry_after_seconds,
    })
}

/// Which count a place is taken in.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Gateway,
    /// Control's upstream: control and unassigned requests.
    Control,
    Treatment,
}

/// Requests in flight, overall and per upstream.
#[derive(Debug, Default)]
pub(crate) struct Inflight {
    gateway: AtomicUsize,
    control: AtomicUsize,
    treatment: AtomicUsize,
}

/// A place in one count, given back when dropped: when the answer's last
/// byte is sent, or the request ends any other way.
#[derive(Debug)]
pub(crate) struct Place {
    counts: Arc<Inflight>,
    slot: Slot,
}

/// The places one request holds: among all requests, and at its upstream.
#[derive(Debug, Default)]
pub(crate) struct Places {
    pub(crate) gateway: Option<Place>,
    pub(crate) upstream: Option<Place>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.counts.count(self.slot).fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inflight {
    fn count(&self, slot: Slot) -> &AtomicUsize {
        match slot {
            Slot::Gateway => &self.gateway,
            Slot::Control => &self.control,
            Slot::Treatment => &self.treatment,
        }
    }

    fn take(self: &Arc<Self>, slot: Slot, max: usize) -> Option<Place> {
        let count = self.count(slot);
        // Add first, then look: two racing requests cannot both take the
        // last place (at worst both are refused, never both admitted).
        if count.fetch_add(1, Ordering::AcqRel) >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Place {
            counts: self.clone(),
            slot,
        })
    }

    /// A place among all requests, if fewer than `max` are in flight.
    pub(crate) fn admit(self: &Arc<Self>, max: usize) -> Option<Place> {
        self.take(Slot::Gateway, max)
    }

    /// A place among the requests to `variant`'s upstream, if fewer than
    /// `max` are in flight there.
    pub(crate) fn admit_to(self: &Arc<Self>, variant: Variant, max: usize) -> Option<Place> {
        let slot = match variant {
            Variant::Treatment => Slot::Treatment,
            Variant::Control | Variant::Unassigned => Slot::Control,
        };
        self.take(slot, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_capped_and_given_back() {
        let inflight = Arc::new(Inflight::default());
        let first = inflight.admit(2).unwrap();
        let second = inflight.admit(2).unwrap();
        assert!(inflight.admit(2).is_none(), "a third is refused");
        drop(first);
        let third = inflight.admit(2).unwrap();
        drop((second, third));
        assert_eq!(inflight.gateway.load(Ordering::Acquire), 0);
    }

    #[test]
    fn unassigned_requests_share_controls_upstream() {
        let inflight = Arc::new(Inflight::default());
        let _control = inflight.admit_to(Variant::Control, 1).unwrap();
        assert!(inflight.admit_to(Variant::Unassigned, 1).is_none());
        assert!(inflight.admit_to(Variant::Treatment, 1).is_some());
    }
}
