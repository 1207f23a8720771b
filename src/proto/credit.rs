//! Credit-based flow control (virtio 1.2 section 5.10.6.3), in one type.
//!
//! Each side advertises `buf_alloc` (the size of its receive buffer for this connection) and
//! `fwd_cnt` (the free-running count of bytes its reader has consumed) in every packet. A sender
//! keeps `tx_cnt` (bytes it has sent) and may have at most
//! `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in flight. All counters are free-running
//! `Wrapping<u32>`: only differences are meaningful, so they may wrap past `2^32` freely.
//!
//! Our `buf_alloc` is a per-connection setting ([`BufferSize`], Linux's
//! `SO_VM_SOCKETS_BUFFER_SIZE` with its `_MIN_SIZE` and `_MAX_SIZE`) that the user may change
//! on a live connection. A grant is never taken back: the right edge we advertise
//! (`fwd_cnt + buf_alloc`) never moves back, as TCP's window never shrinks (RFC 9293 3.8.6), so
//! a smaller size only takes effect as the reader consumes what the peer was already allowed
//! to send, and a peer that sends within the credit it was given is never reset for it.

use std::num::Wrapping;

/// Send a `CREDIT_UPDATE` once the reader has freed at least `buf_alloc / CREDIT_UPDATE_FRACTION`
/// bytes that the peer has not been told about.
pub const CREDIT_UPDATE_FRACTION: u32 = 4;

/// Linux's `VSOCK_DEFAULT_BUFFER_MIN_SIZE` (`net/vmw_vsock/af_vsock.c`): the default lower
/// bound of [`BufferSize::size`].
pub const DEFAULT_BUFFER_MIN_SIZE: u64 = 128;
/// Linux's `VSOCK_DEFAULT_BUFFER_MAX_SIZE`: the default upper bound of [`BufferSize::size`]
/// (and `VSOCK_DEFAULT_BUFFER_SIZE`, the default size, is the same 256 KiB).
pub const DEFAULT_BUFFER_MAX_SIZE: u64 = 256 * 1024;
/// The largest receive buffer a connection can have: `buf_alloc` is a 32-bit header field.
/// Linux's `VIRTIO_VSOCK_MAX_BUF_SIZE` (`include/linux/virtio_vsock.h`), to which
/// `virtio_transport_notify_buffer_size` clamps the size.
pub const MAX_BUFFER_SIZE: u64 = u32::MAX as u64;

/// Which of a socket's three receive buffer settings a call changes (the `optname` of
/// `setsockopt(AF_VSOCK, ..)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferOption {
    /// `SO_VM_SOCKETS_BUFFER_SIZE`: the receive buffer itself, advertised as `buf_alloc`.
    Size,
    /// `SO_VM_SOCKETS_BUFFER_MIN_SIZE`: the lower bound of the size.
    MinSize,
    /// `SO_VM_SOCKETS_BUFFER_MAX_SIZE`: the upper bound of the size.
    MaxSize,
}

/// A socket's receive buffer settings, as Linux keeps them in `struct vsock_sock`
/// (`buffer_size`, `buffer_min_size`, `buffer_max_size`), with Linux's rules (6.12.117,
/// `vsock_connectible_setsockopt` and `vsock_update_buffer_size` in `af_vsock.c`):
///
/// - setting the size clamps the value into `[min, max]`, raising it to `min` first and then
///   lowering it to `max`, so that `max` wins when `min > max` (the order of the 6.12 stable
///   fix "vsock: fix buffer size clamping order"; before it `min` won); then to
///   [`MAX_BUFFER_SIZE`], as `virtio_transport_notify_buffer_size` does;
/// - setting `min` or `max` stores the value as given (nothing is refused, not even
///   `min > max`) and clamps the current size again by the rule above;
/// - nothing is ever refused: every `u64` is a valid argument, and the getters say what is in
///   force.
///
/// The defaults are Linux's: size 256 KiB, min 128 bytes, max 256 KiB (an endpoint whose
/// [`Config::buf_alloc`](super::Config) is another size starts there, with the bounds widened
/// to include it). A listener's settings are copied into each connection it takes in, as
/// Linux's `__vsock_create` copies the parent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSize {
    /// The receive buffer (`SO_VM_SOCKETS_BUFFER_SIZE`), at most [`MAX_BUFFER_SIZE`].
    pub size: u64,
    /// `SO_VM_SOCKETS_BUFFER_MIN_SIZE`.
    pub min: u64,
    /// `SO_VM_SOCKETS_BUFFER_MAX_SIZE`.
    pub max: u64,
}

impl BufferSize {
    /// Linux's defaults around a default size of `size` bytes: the bounds are
    /// [`DEFAULT_BUFFER_MIN_SIZE`] and [`DEFAULT_BUFFER_MAX_SIZE`], widened to include `size`.
    pub fn with_default_size(size: u32) -> Self {
        let size = u64::from(size);
        BufferSize {
            size,
            min: DEFAULT_BUFFER_MIN_SIZE.min(size),
            max: DEFAULT_BUFFER_MAX_SIZE.max(size),
        }
    }

    /// `setsockopt(opt, val)`, as Linux's `vsock_connectible_setsockopt` does it.
    pub fn set(&mut self, opt: BufferOption, val: u64) {
        match opt {
            BufferOption::Size => self.size = self.clamp(val),
            BufferOption::MinSize => {
                self.min = val;
                self.size = self.clamp(self.size);
            }
            BufferOption::MaxSize => {
                self.max = val;
                self.size = self.clamp(self.size);
            }
        }
    }

    /// `getsockopt(opt)`.
    pub fn get(&self, opt: BufferOption) -> u64 {
        match opt {
            BufferOption::Size => self.size,
            BufferOption::MinSize => self.min,
            BufferOption::MaxSize => self.max,
        }
    }

    /// Linux's `vsock_update_buffer_size`: up to `min`, then down to `max`, then down to what
    /// the header can carry.
    fn clamp(&self, val: u64) -> u64 {
        val.max(self.min).min(self.max).min(MAX_BUFFER_SIZE)
    }

    /// The size as the header's `buf_alloc` (never above [`MAX_BUFFER_SIZE`]).
    pub(crate) fn buf_alloc(&self) -> u32 {
        u32::try_from(self.size).unwrap_or(u32::MAX)
    }
}

/// The credit state of one connection, both directions.
#[derive(Debug, Clone)]
pub(crate) struct Credit {
    /// Our receive buffer size as the user set it ([`BufferSize::size`]). What we advertise
    /// is [`Credit::window`]: this, or more while a shrink waits for granted bytes to drain.
    pub(crate) buf_alloc: u32,
    /// Bytes our reader has consumed (free-running), advertised in every packet we send.
    pub(crate) fwd_cnt: Wrapping<u32>,
    /// Bytes of RW payload we have accepted from the peer (free-running).
    pub(crate) rx_cnt: Wrapping<u32>,
    /// The `fwd_cnt` carried by the last packet we sent.
    pub(crate) last_fwd_cnt_sent: Wrapping<u32>,
    /// The `buf_alloc` carried by the last packet we sent: with `last_fwd_cnt_sent`, the
    /// right edge of what the peer may send (`last_fwd_cnt_sent + last_buf_alloc_sent`).
    pub(crate) last_buf_alloc_sent: u32,
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
            last_buf_alloc_sent: 0,
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

    /// Bytes beyond `fwd_cnt` the peer was allowed to send by the last packet we sent: that
    /// packet's `buf_alloc` less what the reader consumed since (the peer's right edge,
    /// `last_fwd_cnt_sent + last_buf_alloc_sent`, seen from `fwd_cnt`), and at least what is
    /// buffered.
    fn granted(&self) -> u32 {
        let unannounced = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        self.last_buf_alloc_sent
            .saturating_sub(unannounced)
            .max(self.rx_buffered())
    }

    /// The receive buffer in force, the `buf_alloc` every packet we send carries: the size the
    /// user set, or more while a smaller size waits for what the peer was already granted.
    /// The right edge we advertise (`fwd_cnt + window`) never moves back, as TCP's window
    /// never shrinks (RFC 9293 3.8.6): a peer that sends within the credit it was given is
    /// never reset for it, and after a shrink it gets no new credit until buffered and
    /// granted bytes are below the new size. (Linux 6.12 sets `buf_alloc` at once and drops a
    /// packet that no longer fits: the peer's bytes are lost from the stream.)
    pub(crate) fn window(&self) -> u32 {
        self.buf_alloc.max(self.granted())
    }

    /// Free space in our receive buffer.
    pub(crate) fn rx_free(&self) -> u32 {
        self.window().saturating_sub(self.rx_buffered())
    }

    /// The user changed the receive buffer size; the next packet we send advertises it (as far
    /// as [`Credit::window`] lets it). Returns whether the advertised value changes, so that a
    /// `CREDIT_UPDATE` is worth sending (Linux sends one on every change).
    pub(crate) fn set_buf_alloc(&mut self, size: u32) -> bool {
        let before = self.window();
        self.buf_alloc = size;
        self.window() != before
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
        let window = self.window();
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.last_buf_alloc_sent = window;
        (window, self.fwd_cnt.0)
    }

    /// Should we tell the peer about freed space now? When the reader has freed at least
    /// `buf_alloc / CREDIT_UPDATE_FRACTION` unannounced bytes, or has drained the buffer
    /// completely (Linux's `rx_bytes < SO_RCVLOWAT` case) while the peer may be short of
    /// credit ([`Credit::peer_credit_bound`] below that fraction), so a writer blocked on a
    /// nearly full buffer always hears back, without an update per read. `unreadable` bytes of the
    /// buffer are ones the reader cannot take yet (the head of a SEQPACKET message whose tail
    /// has not arrived): with only those left the buffer is as drained as it gets, and the tail
    /// may be waiting for exactly this credit.
    ///
    /// "Freed" is the credit an update would add to what the last packet gave: the reader's
    /// unannounced bytes, less what a shrink still holds back (see [`Credit::window`]). While
    /// a shrink drains bytes the peer was already granted, an update would give nothing, and
    /// none is sent.
    pub(crate) fn need_credit_update(&self, unreadable: u32) -> bool {
        let unannounced = u64::from((self.fwd_cnt - self.last_fwd_cnt_sent).0);
        let new_credit = (unannounced + u64::from(self.window()))
            .saturating_sub(u64::from(self.last_buf_alloc_sent));
        let fraction = u64::from(self.buf_alloc / CREDIT_UPDATE_FRACTION);
        new_credit > 0
            && (new_credit >= fraction
                || (self.rx_buffered() <= unreadable && self.peer_credit_bound() < fraction))
    }

    /// At most what the peer may still send by what we last told it: the window we last
    /// advertised, less what arrived since (it may have sent more, still on its way). While
    /// this is large the peer is not waiting for credit, and a drained buffer needs no
    /// update: in a request-response exchange our next packet carries the new `fwd_cnt`
    /// anyway, where an update on every drain would be a second packet per message. A peer
    /// that did run out has sent everything its credit allowed; once that has arrived and is
    /// read, this bound is its true credit, below the threshold, and the update goes.
    fn peer_credit_bound(&self) -> u64 {
        let arrived = u64::from((self.rx_cnt - self.last_fwd_cnt_sent).0);
        u64::from(self.last_buf_alloc_sent).saturating_sub(arrived)
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
    fn buffer_size_clamps_as_linux() {
        let mut b = BufferSize::with_default_size(256 * 1024);
        assert_eq!((b.size, b.min, b.max), (256 * 1024, 128, 256 * 1024));
        // The size is clamped into [min, max] ...
        b.set(BufferOption::Size, 1 << 30);
        assert_eq!(b.get(BufferOption::Size), 256 * 1024);
        b.set(BufferOption::Size, 1);
        assert_eq!(b.get(BufferOption::Size), 128);
        // ... and moving a bound moves the size with it.
        b.set(BufferOption::Size, 4096);
        b.set(BufferOption::MaxSize, 1000);
        assert_eq!((b.size, b.min, b.max), (1000, 128, 1000));
        b.set(BufferOption::MinSize, 800);
        assert_eq!((b.size, b.min, b.max), (1000, 800, 1000));
        b.set(BufferOption::MinSize, 2000);
        assert_eq!(
            (b.size, b.min, b.max),
            (1000, 2000, 1000),
            "min > max is kept, and max wins (6.12.117's order)"
        );
        b.set(BufferOption::Size, 5);
        assert_eq!(b.size, 1000);
        // Past what the header carries: u32::MAX, as VIRTIO_VSOCK_MAX_BUF_SIZE.
        b.set(BufferOption::MinSize, 0);
        b.set(BufferOption::MaxSize, u64::MAX);
        b.set(BufferOption::Size, u64::MAX);
        assert_eq!(b.size, MAX_BUFFER_SIZE);
        assert_eq!(b.buf_alloc(), u32::MAX);
        b.set(BufferOption::Size, 0);
        assert_eq!(b.size, 0, "min 0 lets the size be 0, as on Linux");
    }

    #[test]
    fn a_shrink_waits_for_granted_bytes_and_never_moves_the_edge_back() {
        let mut c = Credit::new(1000);
        assert_eq!(c.on_header_sent(), (1000, 0));
        assert!(c.on_rx(600).is_ok());
        // Shrink below what is buffered: the 400 granted bytes stay granted.
        assert!(!c.set_buf_alloc(100), "the window does not change yet");
        assert_eq!(c.window(), 1000);
        assert_eq!(c.rx_free(), 400);
        c.on_consumed(300);
        assert_eq!(c.window(), 700, "fwd_cnt moved 300: the edge stays at 1000");
        assert!(
            !c.need_credit_update(0),
            "an update would grant nothing new"
        );
        assert_eq!(c.on_header_sent(), (700, 300));
        assert!(c.on_rx(400).is_ok());
        assert_eq!(c.rx_free(), 0);
        c.on_consumed(700);
        assert_eq!(c.window(), 100, "drained: the new size is in force");
        assert!(c.need_credit_update(0), "and worth announcing");
        assert_eq!(c.on_header_sent(), (100, 1000));
        assert_eq!(
            c.on_rx(101),
            Err(CreditViolation {
                len: 101,
                free: 100
            })
        );
        // Growing takes effect at once.
        assert!(c.set_buf_alloc(5000));
        assert_eq!(c.on_header_sent(), (5000, 1000));
        assert!(c.on_rx(5000).is_ok());
    }

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
    fn a_drained_buffer_owes_no_update_while_the_peer_has_credit() {
        // Request-response: 64 bytes arrive and are read. The peer may still send 256 KiB
        // less 64 by what we told it; our reply carries the new fwd_cnt.
        let mut c = Credit::new(256 * 1024);
        let _ = c.on_header_sent();
        assert!(c.on_rx(64).is_ok());
        c.on_consumed(64);
        assert!(!c.need_credit_update(0), "a second packet per message");
        // The peer used up what it was told: the drained buffer is announced.
        let _ = c.on_header_sent();
        assert!(c.on_rx(256 * 1024).is_ok());
        c.on_consumed(256 * 1024);
        assert!(c.need_credit_update(0));
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
