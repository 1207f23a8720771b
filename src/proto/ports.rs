//! The port tables: live connections per local port (`port_refs`), bound ports (`bound_refs`),
//! and the free ephemeral runs that `connect` picks a local port from.

use std::collections::HashMap;

use super::storage::Storage;
use super::{Endpoint, ProtoError};

/// A count per port: `u32` counts, since a port never has 2^32 connections (each costs the
/// table a few hundred bytes), so that an entry is 8 bytes, not 16.
pub(super) fn refcount_add(map: &mut HashMap<u32, u32>, port: u32) {
    *map.entry(port).or_insert(0) += 1;
}

pub(super) fn refcount_sub(map: &mut HashMap<u32, u32>, port: u32) {
    if let Some(n) = map.get_mut(&port) {
        *n -= 1;
        if *n == 0 {
            map.remove(&port);
        }
    }
}

impl<S: Storage> Endpoint<S> {
    /// The next free ephemeral port at or after the cursor, wrapping (the walk Linux's cursor
    /// makes, without visiting the ports in use).
    pub(super) fn alloc_ephemeral(&mut self) -> Result<u32, ProtoError> {
        let (start, end) = (
            *self.config.ephemeral_ports.start(),
            *self.config.ephemeral_ports.end(),
        );
        let cursor = self.next_ephemeral.clamp(start, end);
        let candidate = match self.free_ports.range(..=cursor).next_back() {
            Some((_, &run_end)) if run_end >= cursor => Some(cursor),
            _ => self
                .free_ports
                .range(cursor..)
                .next()
                .or_else(|| self.free_ports.iter().next())
                .map(|(&run_start, _)| run_start),
        };
        let port = candidate.ok_or(ProtoError::PortsExhausted { start, end })?;
        self.next_ephemeral = if port >= end { start } else { port + 1 };
        Ok(port)
    }

    /// `port`'s use changed (a connection or listener came or went): put it in or take it out of
    /// the free ephemeral runs. Idempotent; ports outside the ephemeral range are ignored.
    pub(super) fn sync_free_port(&mut self, port: u32) {
        if !self.config.ephemeral_ports.contains(&port) {
            return;
        }
        let used = self.port_refs.contains_key(&port) || self.listener_ports.contains_key(&port);
        let run = self
            .free_ports
            .range(..=port)
            .next_back()
            .map(|(&s, &e)| (s, e))
            .filter(|&(_, e)| e >= port);
        match (used, run) {
            (true, Some((s, e))) => {
                // Split the run around `port`.
                self.free_ports.remove(&s);
                if s < port {
                    self.free_ports.insert(s, port - 1);
                }
                if port < e {
                    self.free_ports.insert(port + 1, e);
                }
            }
            (false, None) => {
                // A run of its own, merged with the runs just below and just above.
                let mut run = (port, port);
                if let Some(above) = port.checked_add(1) {
                    if let Some(e) = self.free_ports.remove(&above) {
                        run.1 = e;
                    }
                }
                if let Some(below) = port.checked_sub(1) {
                    if let Some((&s, _)) = self
                        .free_ports
                        .range(..=below)
                        .next_back()
                        .filter(|(_, &e)| e == below)
                    {
                        run.0 = s;
                    }
                }
                self.free_ports.insert(run.0, run.1);
            }
            _ => {}
        }
    }
}
