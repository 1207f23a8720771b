//! Credit-based flow control (virtio 1.2 section 5.10.6.3), in one type.
//!
//! Each side advertises `buf_alloc` (the size of its receive buffer for this connection) and
//! `fwd_cnt` (the free-running count of bytes its reader has consumed) in every packet. A sender
//! keeps `tx_cnt` (bytes it has sent) and may have at most
//! `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in flight. All counters are free-running
//! `Wrapping<u32>`: only differences are meaningful, so they may wrap past `2^32` freely.

use std::num::Wrapping;

/// Send a `CREDIT_UPDATE` once the reader has freed at least `buf_alloc / CREDIT_UPDATE_FRACTION`
/// bytes that the peer has not been told about.
pub const CREDIT_UPDATE_FRACTION: u32 = 4;

/// The credit state of one connection, both directions.
#[derive(Debug, Clone)]
pub(crate) struct Credit {
    /// Our receive buffer size, advertised in every packet we send.
    pub(crate) buf_alloc: u32,
    /// Bytes our reader has consumed (free-running), advertised in every packet we send.
    pub(crate) fwd_cnt: Wrapping<u32>,
    /// Bytes of RW payload we have accepted from the peer (free-running).
    pub(crate) rx_cnt: Wrapping<u32>,
    /// The `fwd_cnt` carried by the last packet we sent.
    pub(crate) last_fwd_cnt_sent: Wrapping<u32>,
    /// The peer's receive buffer size, from its latest packet.
    pub(crate) peer_buf_alloc: u32,
    /// The peer's consumed-byte count, from its latest packet.
    pub(crate) peer_fwd_cnt: Wrapping<u32>,
    /// Bytes of RW payload we have sent (free-running).
    pub(crate) tx_cnt: Wrapping<u32>,
    /// A `CREDIT_REQUEST` went out and no credit has arrived since.
    pub(crate) credit_request_sent: bool,
}

/// The peer sent more than the credit we advertised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CreditViolation {
    /// Bytes in the offending packet.
    pub(crate) len: u32,
    /// Free space we had.
    pub(crate) free: u32,
}

impl Credit {
    /// Fresh state for a connection with our `buf_alloc`; the peer's values come from its
    /// first packet.
    pub(crate) fn new(buf_alloc: u32) -> Self {
        Credit {
            buf_alloc,
            fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            credit_request_sent: false,
        }
    }

    /// Adopt the peer's counters from the handshake (`REQUEST` or `RESPONSE`), before any data
    /// went out: our `tx_cnt` starts where the peer's `fwd_cnt` does. Linux starts both at 0;
    /// this keeps a peer that starts elsewhere from looking like it acknowledges unsent bytes.
    pub(crate) fn on_handshake(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        self.tx_cnt = Wrapping(fwd_cnt);
    }

    /// Record the peer's `buf_alloc`/`fwd_cnt` from any packet it sent. A `fwd_cnt` that claims
    /// more bytes consumed than we ever sent is ignored (it would make the in-flight count wrap).
    pub(crate) fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        let fwd_cnt = Wrapping(fwd_cnt);
        if (fwd_cnt - self.peer_fwd_cnt).0 <= self.in_flight() {
            self.peer_fwd_cnt = fwd_cnt;
        }
        if self.peer_credit() > 0 {
            self.credit_request_sent = false;
        }
    }

    /// Bytes sent that the peer's reader has not consumed yet: `tx_cnt - peer_fwd_cnt`.
    pub(crate) fn in_flight(&self) -> u32 {
        (self.tx_cnt - self.peer_fwd_cnt).0
    }

    /// The spec's formula: how many more bytes we may send now.
    pub(crate) fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.in_flight())
    }

    /// Account for `n` bytes of RW payload we are about to send. `n` must fit the credit.
    pub(crate) fn on_tx(&mut self, n: u32) {
        debug_assert!(n <= self.peer_credit(), "sending beyond peer credit");
        self.tx_cnt += Wrapping(n);
    }

    /// Bytes received and not yet consumed by our reader: `rx_cnt - fwd_cnt`.
    pub(crate) fn rx_buffered(&self) -> u32 {
        (self.rx_cnt - self.fwd_cnt).0
    }

    /// Free space in our receive buffer.
    pub(crate) fn rx_free(&self) -> u32 {
        self.buf_alloc.saturating_sub(self.rx_buffered())
    }

    /// Accept `len` bytes of RW payload from the peer, or report that it overran our credit.
    pub(crate) fn on_rx(&mut self, len: u32) -> Result<(), CreditViolation> {
        let free = self.rx_free();
        if len > free {
            return Err(CreditViolation { len, free });
        }
        self.rx_cnt += Wrapping(len);
        Ok(())
    }

    /// Our reader consumed `n` bytes.
    pub(crate) fn on_consumed(&mut self, n: u32) {
        debug_assert!(n <= self.rx_buffered());
        self.fwd_cnt += Wrapping(n);
    }

    /// Every packet we send carries our `buf_alloc` and `fwd_cnt`; remember what we said.
    pub(crate) fn on_header_sent(&mut self) -> (u32, u32) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        (self.buf_alloc, self.fwd_cnt.0)
    }

    /// Should we tell the peer about freed space now? When the reader has freed at least
    /// `buf_alloc / CREDIT_UPDATE_FRACTION` unannounced bytes, or has drained the buffer
    /// (Linux's `rx_bytes < SO_RCVLOWAT` case), so a writer blocked on a nearly full buffer
    /// always hears back, without an update per read. `unreadable` bytes of the buffer are
    /// ones the reader cannot take yet (the head of a SEQPACKET message whose tail has not
    /// arrived): with only those left the buffer is as drained as it gets, and the tail may be
    /// waiting for exactly this credit.
    pub(crate) fn need_credit_update(&self, unreadable: u32) -> bool {
        let unannounced = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        unannounced > 0
            && (unannounced >= self.buf_alloc / CREDIT_UPDATE_FRACTION
                || self.rx_buffered() <= unreadable)
    }

    /// Test hook: start every free-running counter at `start` (both directions), as if
    /// `start` bytes had already flowed each way and been consumed.
    #[cfg(test)]
    pub(crate) fn preset_counters(&mut self, start: u32) {
        let s = Wrapping(start);
        self.fwd_cnt = s;
        self.rx_cnt = s;
        self.last_fwd_cnt_sent = s;
        self.peer_fwd_cnt = s;
        self.tx_cnt = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_formula_wraps() {
        let mut c = Credit::new(1000);
        c.preset_counters(u32::MAX - 10);
        c.update_peer(100, u32::MAX - 10);
        assert_eq!(c.peer_credit(), 100);
        c.on_tx(60);
        assert_eq!(c.in_flight(), 60);
        assert_eq!(c.peer_credit(), 40);
        c.update_peer(100, (u32::MAX - 10).wrapping_add(50));
        assert_eq!(c.peer_credit(), 90);
        // A fwd_cnt beyond what we sent is ignored.
        c.update_peer(100, (u32::MAX - 10).wrapping_add(61));
        assert_eq!(c.peer_credit(), 90);
    }

    #[test]
    fn rx_overrun_detected() {
        let mut c = Credit::new(100);
        assert!(c.on_rx(60).is_ok());
        assert_eq!(c.on_rx(41), Err(CreditViolation { len: 41, free: 40 }));
        c.on_consumed(60);
        assert!(c.on_rx(100).is_ok());
    }

    #[test]
    fn credit_update_threshold() {
        let mut c = Credit::new(1 << 20);
        assert!(c.on_rx(1 << 20).is_ok());
        let _ = c.on_header_sent();
        c.on_consumed(1);
        assert!(!c.need_credit_update(0), "one byte is not worth an update");
        c.on_consumed((1 << 18) - 1);
        assert!(c.need_credit_update(0), "a quarter of the buffer is");
        let _ = c.on_header_sent();
        c.on_consumed(1);
        assert!(!c.need_credit_update(0));
        c.on_consumed((1 << 20) - (1 << 18) - 1);
        assert!(c.need_credit_update(0), "drained: always announce");
        let _ = c.on_header_sent();
        assert!(!c.need_credit_update(0));
    }

    #[test]
    fn credit_update_when_only_an_unreadable_head_is_left() {
        let mut c = Credit::new(1 << 20);
        assert!(c.on_rx(1 << 20).is_ok());
        let _ = c.on_header_sent();
        // A whole message of 1000 bytes read; the other bytes are a message still arriving.
        c.on_consumed(1000);
        assert!(!c.need_credit_update(0), "readable bytes are left");
        assert!(
            c.need_credit_update((1 << 20) - 1000),
            "only the unreadable head is left"
        );
        assert!(
            !c.need_credit_update((1 << 20) - 1001),
            "one readable byte is left"
        );
    }
}
