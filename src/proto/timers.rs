//! The deadline index: every connection's connect or close deadline, in time order.

use std::collections::BTreeSet;
use std::time::Instant;

use super::conn::Conn;
use super::storage::Storage;
use super::ConnId;

/// The connections' deadlines (connect and close timeouts) in time order, so that
/// [`Endpoint::poll_timeout`](super::Endpoint::poll_timeout) reads the first one and
/// [`Endpoint::handle_timeout`](super::Endpoint::handle_timeout) visits only the expired ones,
/// however many connections there are. `Conn::deadline` is the table (one `Option<Instant>` per
/// connection) and this is its index: [`Timers::set`] is the only place either changes, so they
/// cannot disagree.
#[derive(Debug, Default)]
pub(super) struct Timers {
    /// `(deadline, connection)`; a connection is in here at most once, with its `deadline`.
    by_time: BTreeSet<(Instant, ConnId)>,
}

impl Timers {
    /// Arm (`Some`) or clear (`None`) the deadline of `conn`, in the connection and the index.
    pub(super) fn set<S: Storage>(&mut self, conn: &mut Conn<S>, deadline: Option<Instant>) {
        if conn.deadline == deadline {
            return;
        }
        if let Some(old) = conn.deadline {
            self.by_time.remove(&(old, conn.id));
        }
        if let Some(new) = deadline {
            self.by_time.insert((new, conn.id));
        }
        conn.deadline = deadline;
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
