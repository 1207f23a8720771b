//! The deadline index: every connection's connect or close deadline, in time order.

use std::collections::BTreeSet;
use std::time::Instant;

use super::ConnId;

/// The connections' deadlines (connect and close timeouts) in time order, so that
/// [`Endpoint::poll_timeout`](super::Endpoint::poll_timeout) reads the first one and
/// [`Endpoint::handle_timeout`](super::Endpoint::handle_timeout) visits only the expired ones,
/// however many connections there are. The deadline itself lives in the connection's state
/// (`State::Connecting` and `State::Closing` hold one) and this is its index:
/// `Endpoint::set_state`, the one place a state changes, updates it.
#[derive(Debug, Default)]
pub(super) struct Timers {
    /// `(deadline, connection)`; a connection is in here at most once, with its state's deadline.
    by_time: BTreeSet<(Instant, ConnId)>,
}

impl Timers {
    /// Connection `id`'s deadline went from `old` to `new` (`None`: none armed).
    pub(super) fn update(&mut self, id: ConnId, old: Option<Instant>, new: Option<Instant>) {
        if old == new {
            return;
        }
        if let Some(old) = old {
            self.by_time.remove(&(old, id));
        }
        if let Some(new) = new {
            self.by_time.insert((new, id));
        }
    }

    /// The earliest deadline.
    pub(super) fn next(&self) -> Option<Instant> {
        self.by_time.first().map(|&(at, _)| at)
    }

    /// The connection whose deadline is the earliest, if it is not after `now`.
    pub(super) fn first_expired(&self, now: Instant) -> Option<ConnId> {
        self.by_time
            .first()
            .filter(|&&(at, _)| at <= now)
            .map(|&(_, id)| id)
    }

    /// Drop the earliest entry (one whose connection is gone).
    pub(super) fn discard_first(&mut self) {
        self.by_time.pop_first();
    }

    /// Is `(at, id)` in the index (for the invariant check)?
    pub(super) fn contains(&self, at: Instant, id: ConnId) -> bool {
        self.by_time.contains(&(at, id))
    }

    pub(super) fn len(&self) -> usize {
        self.by_time.len()
    }
}
