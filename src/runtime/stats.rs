// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The driver's data-path counters: what the transport counts, what the core hands out, and
//! what `VsockDriver::stats` returns.

/// Counters of the driver's data path ([`VsockDriver::stats`](crate::driver::VsockDriver::stats)).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DriverStats {
    /// RX buffers the device returned that failed validation (dropped).
    pub bad_rx_packets: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Device notifications sent (kicks).
    pub kicks: u64,
    /// Device notifications received (used-buffer interrupts the loop thread, or a blocked
    /// caller, woke for).
    pub interrupts: u64,
    /// Of `interrupts`, those a blocked caller waited on and handled itself, with no hand-off
    /// through the loop thread (eventfd mode; see the runtime's `irq.rs`).
    pub caller_interrupts: u64,
    /// Payload bytes the driver copied from callers into DMA memory (once per byte sent).
    pub tx_payload_bytes_copied: u64,
    /// Payload bytes the driver copied into callers' buffers (once per byte read).
    pub rx_payload_bytes_copied: u64,
    /// Payload bytes copied out of RX buffers before being read (small payloads merged into a
    /// heap tail, and connections holding more than their share of the pool): these bytes are
    /// copied twice on the driver side.
    pub rx_payload_bytes_copied_out: u64,
    /// RX buffers in the pool (the ring holds at most `queue_size` of them).
    pub rx_buffers: u64,
    /// RX buffers posted on the ring.
    pub rx_buffers_on_ring: u64,
    /// RX buffers holding received payload not yet read (off the ring).
    pub rx_buffers_held: u64,
    /// TX chunks in the pool.
    pub tx_chunks: u64,
    /// TX chunks holding payload (queued, or on the ring).
    pub tx_chunks_in_use: u64,
    /// TRANSPORT_RESET events from the event queue.
    pub transport_resets: u64,
    /// Events dropped: shorter than an event, or of an unknown id.
    pub bad_events: u64,
    /// Times the device was reset and brought up again (after NEEDS_RESET or a device error).
    pub recoveries: u64,
    /// Connections the driver holds now, in any state (closing ones until the peer is done
    /// with them); listeners are not counted.
    pub connections: u64,
}
