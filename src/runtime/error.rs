// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Why a transport failed ([`TransportError`]) and why a core stopped ([`Ended`]).
//!
//! A transport error is final: the core shuts the transport down and every blocked and future
//! call on it fails with `io::ErrorKind::ConnectionAborted`, whose inner error is the core's
//! [`Ended`] (so the cause chain survives into `std::io`).

use std::error::Error;
use std::fmt;
use std::io;

use crate::device::DeviceError;
use crate::packet::Error as PacketError;
use crate::virtq::QueueError;

/// What made a transport stop: the device broke the rules or stopped working. Each variant says
/// what was being done and what was seen. Causes: the cause is the source (the crate docs,
/// "Errors and their causes"); [`TransportError::Removed`] is its cause;
/// [`TransportError::Recovery`] has two, the device error while bringing it up (the source)
/// and what made the driver reset it (in the message, with its causes).
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    /// A driver-side virtqueue refused an operation: the device wrote something invalid (the
    /// queue is broken until reset), or a buffer that must fit did not.
    #[error("{queue} queue: {op} failed")]
    Queue {
        /// Which queue ("rx", "tx").
        queue: &'static str,
        /// What was being done ("reaping used buffers", "reposting a buffer", ...).
        op: &'static str,
        /// What the queue found.
        #[source]
        source: QueueError,
    },
    /// Notifying the device of new buffers failed.
    #[error("{queue} kick: notifying the device of new buffers failed")]
    Kick {
        /// Which queue ("rx", "tx").
        queue: &'static str,
        /// What the device layer said.
        #[source]
        source: DeviceError,
    },
    /// A queue returned a token we never posted (tokens are the indexes of our buffers).
    #[error("{queue} queue returned unknown token {token}: expected one of the {count} buffers posted (0..{count})")]
    UnknownToken {
        /// Which queue ("rx", "tx").
        queue: &'static str,
        /// The token seen.
        token: u64,
        /// How many buffers the queue has.
        count: usize,
    },
    /// A packet could not be built in, or read from, its buffer.
    #[error("{what}")]
    Packet {
        /// What was being done, e.g. "tx buffer: writing the packet".
        what: &'static str,
        /// What the packet layer found.
        #[source]
        source: PacketError,
    },
    /// After a config interrupt the device's `guest_cid` could not be read.
    #[error("{device}: re-reading guest_cid after a config interrupt failed")]
    ConfigRead {
        /// The device's name.
        device: String,
        /// What the device layer said.
        #[source]
        source: DeviceError,
    },
    /// After a config interrupt the device's `guest_cid` is one no guest may have.
    #[error(
        "{device}: the device changed guest_cid from {old} to {new}, which is not a guest CID (expected 3..=4294967294)"
    )]
    InvalidGuestCid {
        /// The device's name.
        device: String,
        /// The CID we had.
        old: u64,
        /// The CID the device's config now says.
        new: u64,
    },
    /// The device set NEEDS_RESET in its status (virtio 1.2 section 2.1.2).
    #[error("{device}: the device needs a reset (status {})", crate::device::status_names(*status))]
    NeedsReset {
        /// The device's name.
        device: String,
        /// The status byte read.
        status: u8,
    },
    /// Bringing the device up again after `cause` failed.
    #[error(
        "{device}: bringing the device up again after \"{}\" failed",
        error_chain(&**cause)
    )]
    Recovery {
        /// The device's name.
        device: String,
        /// What made the driver reset it.
        cause: Box<TransportError>,
        /// What the device layer said while bringing it up.
        #[source]
        source: DeviceError,
    },
    /// The device went away (see [`DeviceError::Removed`]): the device error says which
    /// device and how, and this error shows as it (a message of our own here would name the
    /// removal twice).
    #[error(transparent)]
    Removed {
        /// How it went.
        source: DeviceError,
    },
    /// The event loop could not wait on its eventfds.
    #[error("event loop: {op} failed")]
    EventLoop {
        /// The system call ("epoll_create", "epoll_ctl", "epoll_wait").
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The device half of a ring (the simulated device's) could not return a chain to the
    /// driver.
    #[error("device side of the {queue} queue: add_used of chain {head} failed")]
    DeviceSideQueue {
        /// Which queue ("rx", "tx").
        queue: &'static str,
        /// The head index of the chain being returned.
        head: u16,
        /// What virtio-queue said.
        #[source]
        source: virtio_queue::Error,
    },
    /// The protocol core handed out an RW packet whose payload the send queue could not give
    /// as one piece (a bug: the core bounds every packet by `TxBuf::contiguous`).
    #[error("tx: an RW packet of {len} bytes came without its payload segment")]
    MissingPayload {
        /// The header's `len`.
        len: u32,
    },
    /// A copy into the driver's own DMA memory failed (a bug: every address is ours). The copy
    /// error says it all: it is this error's message.
    #[error(transparent)]
    Copy(#[from] super::storage::CopyError),
    /// The device side (the simulated device's) could not write the driver's memory.
    #[error("device side: {what} at {addr:#x} failed")]
    DeviceSideMemory {
        /// What was being written.
        what: &'static str,
        /// Its guest (IOVA) address.
        addr: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Why the driver reset every connection while it went on (the inner error of each
/// connection's `ConnectionReset`, through `ConnReset`). Causes: the cause is the source (the
/// crate docs, "Errors and their causes").
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResetCause {
    /// The device sent TRANSPORT_RESET on its event queue.
    #[error("{device} sent TRANSPORT_RESET (guest_cid {cid})")]
    TransportReset {
        /// The device's name.
        device: String,
        /// The CID read after it.
        cid: u64,
    },
    /// The device's `guest_cid` changed (a config interrupt).
    #[error("{device} changed guest_cid from {old} to {new}")]
    CidChanged {
        /// The device's name.
        device: String,
        /// The CID we had.
        old: u64,
        /// The new one.
        new: u64,
    },
    /// The device was reset and brought up again after `cause`.
    #[error("{device} was reset and brought up again")]
    Recovered {
        /// The device's name.
        device: String,
        /// Why it was reset.
        #[source]
        cause: TransportError,
    },
}

/// Why a core stopped: every blocked and future call on it fails with this, as the inner error
/// of an `io::Error` of kind `ConnectionAborted`. Causes: the cause is in the message (the
/// crate docs, "Errors and their causes"): `{}` on the `io::Error` says why the device died.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The transport failed: the device is dead or broke the rules.
    Failed(TransportError),
    /// The owner closed the core (the driver was dropped); nothing failed.
    Closed(&'static str),
    /// The user reset the device (`VsockDriver::reset_device`).
    Reset(String),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Failed(e) => write!(f, "vsock device failed: {e}"),
            Ended::Closed(why) => write!(f, "vsock device closed by the owner: {why}"),
            Ended::Reset(why) => write!(f, "vsock device reset by the user: {why}"),
        }
    }
}

impl Error for Ended {
    /// The transport error's own cause: its message is already part of ours (as `io::Error`
    /// does with the error it wraps), so a printed chain says each thing once.
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Ended::Failed(e) => e.source(),
            Ended::Closed(_) | Ended::Reset(_) => None,
        }
    }
}

impl From<TransportError> for Ended {
    fn from(e: TransportError) -> Self {
        Ended::Failed(e)
    }
}

/// An error and its causes, `: `-separated (for logs and lists of failures).
pub(crate) fn error_chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
