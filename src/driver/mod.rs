// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The driver: joins a device, its rings, the packet parser and the protocol core, and hands
//! programs sockets.
//!
//! One event-loop thread per device sleeps on the device's used-buffer eventfds and a waker
//! eventfd. Each round it:
//! 1. reaps TX completions (the buffers return to the free pool);
//! 2. turns every used RX buffer into a [`VsockPacket`] (bounded by the used length the device
//!    reported), feeds header and payload to the protocol core and reposts the buffer;
//! 3. fires due timers;
//! 4. asks the protocol core for packets to send and builds each in a free TX buffer through the
//!    same `VsockPacket` type's setters, then kicks the device if it wants a notification.
//!
//! A config interrupt ([`VsockDevice::config_fd`]) makes the loop re-read `guest_cid`; a new CID
//! resets every connection (as the event queue's TRANSPORT_RESET does) and becomes ours.
//!
//! In busy-poll mode the device is asked not to interrupt; callers that block spin on the rings
//! themselves and the loop thread only wakes every millisecond for timers and unattended traffic.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::sim::{SimConfig, SimDevice, SimHost};
use crate::device::{DeviceError, DeviceSpec, VsockDevice, RX_QUEUE, TX_QUEUE};
use crate::dma::DmaRegion;
use crate::packet::{
    VsockPacket, PKT_HEADER_SIZE, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_VSOCK_F_SEQPACKET,
};
use crate::proto::{self, Endpoint};
use crate::virtq::{BufferDesc, SplitQueue};

pub(crate) mod socket;

use socket::{Core, Transport};
pub use socket::{VsockAddr, VsockListener, VsockSeqPacket, VsockStream, DEFAULT_BACKLOG};

/// The header length as the ring's `u32` lengths need it.
#[allow(clippy::cast_possible_truncation)] // 44 fits in a u32.
pub(crate) const HDR_LEN: u32 = PKT_HEADER_SIZE as u32;

/// Largest buffer size accepted for RX and TX buffers (header included).
pub const MAX_BUF_SIZE: u32 = 1 << 20;

/// Driver settings.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Spin on the rings instead of sleeping on eventfds (lowest latency, burns a core).
    pub busy_poll: bool,
    /// Ring size for rx and tx (clamped to the device's maximum).
    pub queue_size: u16,
    /// Bytes per posted RX buffer, header included.
    pub rx_buf_size: u32,
    /// Bytes per TX buffer, header included.
    pub tx_buf_size: u32,
    /// Protocol settings (the local CID is taken from the device).
    pub proto: proto::Config,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            busy_poll: false,
            queue_size: 256,
            rx_buf_size: 64 * 1024 + HDR_LEN,
            tx_buf_size: 64 * 1024 + HDR_LEN,
            proto: proto::Config::default(),
        }
    }
}

/// Errors while bringing a driver up.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The device layer failed.
    #[error("device {name}")]
    Device {
        /// Which device.
        name: String,
        /// Why.
        #[source]
        source: DeviceError,
    },
    /// A queue could not be set up.
    #[error("queue setup")]
    Queue(#[from] crate::virtq::QueueError),
    /// DMA memory could not be set up.
    #[error("DMA memory")]
    Dma(#[from] crate::dma::DmaError),
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The driver settings are unusable.
    #[error("invalid driver config: {0}")]
    InvalidConfig(String),
    /// `auto` found no device it could bring up.
    #[error("no usable vsock device found (use --device sim for the simulated one); tried: {}",
        if tried.is_empty() { "nothing: no vhost-vdpa node, no vfio-bound virtio-vsock function, no /dev/vhost-vsock".to_string() } else { tried.join("; ") })]
    NoDevice {
        /// Each candidate and why it failed.
        tried: Vec<String>,
    },
}

impl From<DriverError> for io::Error {
    fn from(e: DriverError) -> io::Error {
        let kind = match &e {
            DriverError::Device {
                source: DeviceError::Io { source, .. } | DeviceError::Hinted { source, .. },
                ..
            } => source.kind(),
            DriverError::Device {
                source: DeviceError::InvalidSpec { .. },
                ..
            } => io::ErrorKind::InvalidInput,
            DriverError::InvalidConfig(_) => io::ErrorKind::InvalidInput,
            DriverError::NoDevice { .. } => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Counters of the driver's data path.
#[derive(Debug, Default, Clone, Copy)]
pub struct DriverStats {
    /// RX buffers the device returned that failed validation (dropped).
    pub bad_rx_packets: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Device notifications sent.
    pub kicks: u64,
}

/// The rings and buffers of one device, as the driver's transport.
struct DriverTransport {
    dev: Box<dyn VsockDevice>,
    dma: Arc<DmaRegion>,
    rx: SplitQueue,
    tx: SplitQueue,
    rx_buf: Vec<GuestAddress>,
    tx_buf: Vec<GuestAddress>,
    tx_free: Vec<u64>,
    rx_batch: Vec<crate::virtq::UsedElem>,
    /// Payload staging between DMA buffers and the protocol core (one packet).
    scratch: Vec<u8>,
    rx_buf_size: u32,
    tx_buf_size: u32,
    waker: EventFd,
    busy_poll: bool,
    stats: DriverStats,
}

impl DriverTransport {
    fn reap_tx(&mut self) -> Result<bool, String> {
        let mut moved = false;
        while let Some(u) = self.tx.pop_used().map_err(|e| format!("tx queue: {e}"))? {
            self.tx_free.push(u.token);
            moved = true;
        }
        Ok(moved)
    }

    fn receive(&mut self, ep: &mut Endpoint, now: Instant) -> Result<bool, String> {
        // Take the whole batch first, so a device that reports one buffer twice is caught
        // before the buffer is reposted under the same id.
        let mut batch = std::mem::take(&mut self.rx_batch);
        while let Some(u) = self.rx.pop_used().map_err(|e| format!("rx queue: {e}"))? {
            batch.push(u);
        }
        let moved = !batch.is_empty();
        let mem = self.dma.memory();
        for u in batch.drain(..) {
            let addr = token_addr(&self.rx_buf, u.token)?;
            match VsockPacket::<()>::from_used_rx_buffer(mem, addr, self.rx_buf_size, u.len) {
                Ok(pkt) => {
                    // One volatile copy out of DMA memory: the device is untrusted and could
                    // still write there, so no plain `&[u8]` may alias it.
                    let hdr = pkt.header();
                    let payload = &mut self.scratch[..hdr.len as usize];
                    match pkt.read_data(payload) {
                        Ok(n) => {
                            ep.handle_packet(now, &hdr, &payload[..n]);
                            self.stats.rx_packets += 1;
                        }
                        Err(e) => {
                            log::warn!("rx payload unreadable: {e}");
                            self.stats.bad_rx_packets += 1;
                        }
                    }
                }
                Err(e) => {
                    log::warn!("dropping malformed rx packet from the device: {e}");
                    self.stats.bad_rx_packets += 1;
                }
            }
            self.rx
                .add(
                    &[BufferDesc {
                        addr,
                        len: self.rx_buf_size,
                        writable: true,
                    }],
                    u.token,
                )
                .map_err(|e| format!("rx repost: {e}"))?;
        }
        self.rx_batch = batch;
        if moved
            && self
                .rx
                .kick_prepare()
                .map_err(|e| format!("rx queue: {e}"))?
        {
            self.dev
                .kick(RX_QUEUE)
                .map_err(|e| format!("rx kick: {e}"))?;
            self.stats.kicks += 1;
        }
        Ok(moved)
    }

    fn transmit(&mut self, ep: &mut Endpoint, now: Instant) -> Result<bool, String> {
        let mut sent = false;
        let room = (self.tx_buf_size as usize) - PKT_HEADER_SIZE;
        while let Some(token) = self.tx_free.pop() {
            let addr = token_addr(&self.tx_buf, token)?;
            let Some(hdr) = ep.poll_transmit(now, &mut self.scratch[..room]) else {
                self.tx_free.push(token);
                break;
            };
            let mut pkt =
                VsockPacket::<()>::from_tx_buffer(self.dma.memory(), addr, self.tx_buf_size)
                    .map_err(|e| format!("tx buffer: {e}"))?;
            pkt.set_header(&hdr);
            pkt.write_data(&self.scratch[..hdr.len as usize])
                .map_err(|e| format!("tx buffer: {e}"))?;
            self.tx
                .add(
                    &[BufferDesc {
                        addr,
                        len: HDR_LEN + hdr.len,
                        writable: false,
                    }],
                    token,
                )
                .map_err(|e| format!("tx queue: {e}"))?;
            self.stats.tx_packets += 1;
            sent = true;
        }
        if sent
            && self
                .tx
                .kick_prepare()
                .map_err(|e| format!("tx queue: {e}"))?
        {
            self.dev
                .kick(TX_QUEUE)
                .map_err(|e| format!("tx kick: {e}"))?;
            self.stats.kicks += 1;
        }
        Ok(sent)
    }
}

/// The features the driver asks a device for, given what it `offered`: VERSION_1 (required), and
/// EVENT_IDX and SEQPACKET whenever offered (the SEQPACKET outcome decides whether seqpacket
/// sockets exist). Backends add what only they care about (ACCESS_PLATFORM).
pub fn wanted_features(offered: u64) -> u64 {
    (1 << VIRTIO_F_VERSION_1)
        | (offered & ((1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_VSOCK_F_SEQPACKET)))
}

/// Whether `cid` may be a guest's CID: 0, 1 and 2 are the hypervisor, local and host, and
/// `u32::MAX` is `VMADDR_CID_ANY`; the upper 32 bits are reserved (virtio 1.2 section 5.10.4).
fn valid_guest_cid(cid: u64) -> bool {
    (3..u64::from(u32::MAX)).contains(&cid)
}

/// A port in `range` that differs from run to run (clock and process id; not for security).
fn random_port(range: &std::ops::RangeInclusive<u32>) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = nanos ^ std::process::id().rotate_left(16);
    let span = range.end().saturating_sub(*range.start()).saturating_add(1);
    range.start() + seed % span.max(1)
}

/// An error and its causes, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// The buffer behind a token (tokens are indexes we handed to the queue ourselves).
fn token_addr(bufs: &[GuestAddress], token: u64) -> Result<GuestAddress, String> {
    usize::try_from(token)
        .ok()
        .and_then(|i| bufs.get(i).copied())
        .ok_or_else(|| format!("queue returned unknown token {token}"))
}

impl Transport for DriverTransport {
    fn pump(&mut self, ep: &mut Endpoint, now: Instant) -> Result<bool, String> {
        let mut moved = self.reap_tx()?;
        moved |= self.receive(ep, now)?;
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
        }
        moved |= self.transmit(ep, now)?;
        if !self.busy_poll {
            // Re-arm interrupts; a `false` means used buffers slipped in meanwhile.
            let rx_quiet = self.rx.enable_cb().map_err(|e| format!("rx queue: {e}"))?;
            let tx_quiet = self.tx.enable_cb().map_err(|e| format!("tx queue: {e}"))?;
            moved |= !(rx_quiet && tx_quiet);
        }
        Ok(moved)
    }

    fn wake(&self) {
        let _ = self.waker.write(1);
    }

    fn config_changed(&mut self, ep: &mut Endpoint, now: Instant) -> Result<(), String> {
        let name = self.dev.name();
        let cid = self
            .dev
            .guest_cid()
            .map_err(|e| format!("{name}: re-reading guest_cid after a config interrupt: {e}"))?;
        let old = ep.local_cid();
        if cid == old {
            log::debug!("{name}: config interrupt, guest_cid still {cid}");
            return Ok(());
        }
        if !valid_guest_cid(cid) {
            return Err(format!(
                "{name}: the device changed guest_cid from {old} to {cid}, which is not a guest CID (expected 3..=4294967294)"
            ));
        }
        log::warn!("{name}: guest_cid changed from {old} to {cid}: every connection is reset");
        ep.handle_transport_reset(now, Some(cid));
        Ok(())
    }

    fn shutdown(&mut self) {
        if let Err(e) = self.dev.reset() {
            log::warn!("{}: reset failed: {e}", self.dev.name());
        }
        // The device no longer owns any buffer: reclaim them (nothing is in flight now).
        self.rx.reset();
        self.tx.reset();
    }
}

impl std::fmt::Debug for DriverTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverTransport")
            .field("dev", &self.dev)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// What a loop thread waits on besides its waker and stop eventfds.
pub(crate) struct LoopFds {
    pub(crate) waker: EventFd,
    pub(crate) stop: EventFd,
    pub(crate) signals: Vec<EventFd>,
    /// The device's config interrupt: read here, then the transport's `config_changed` runs.
    pub(crate) config: Option<EventFd>,
    /// Longest sleep (busy-poll mode: 1 ms).
    pub(crate) max_sleep: Option<Duration>,
}

/// Transport rounds per hold of the core's lock in the event loop.
const MAX_PUMP_ROUNDS: u32 = 64;

/// In spin mode, rounds between two looks at the eventfds.
const SPIN_ROUNDS_PER_POLL: u32 = 256;

/// Run `core`'s transport until `stop` is signalled: the event loop of the driver and of the
/// simulated device alike.
pub(crate) fn run_loop(core: Arc<Core>, fds: LoopFds) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            core.kill(format!("epoll_create failed: {e}"));
            return;
        }
    };
    let all: Vec<&EventFd> = std::iter::once(&fds.stop)
        .chain(std::iter::once(&fds.waker))
        .chain(fds.signals.iter())
        .chain(fds.config.iter())
        .collect();
    // Its index in `all`, when present (it is last).
    let config_index = fds.config.as_ref().map(|_| all.len() - 1);
    let mut config_pending = false;
    for (i, fd) in all.iter().enumerate() {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            std::os::unix::io::AsRawFd::as_raw_fd(*fd),
            EpollEvent::new(EventSet::IN, i as u64),
        ) {
            core.kill(format!("epoll_ctl failed: {e}"));
            return;
        }
    }
    let mut events = vec![EpollEvent::default(); all.len()];
    // A zero sleep means "spin": look at the eventfds (for the stop signal) only now and then,
    // since an epoll_wait per round costs more than the round itself.
    let spinning = fds.max_sleep == Some(Duration::ZERO);
    let mut spins = 0u32;
    loop {
        let (timeout, more) = {
            let mut st = core.lock();
            let now = Instant::now();
            if std::mem::take(&mut config_pending) {
                Core::config_changed_locked(&mut st, now);
            }
            // Pump until nothing moves, so one wake-up drains a whole burst; after
            // MAX_PUMP_ROUNDS let user threads at the lock, then come straight back: work
            // left over may never be signalled again (its eventfd was already consumed).
            let mut more = true;
            for _ in 0..MAX_PUMP_ROUNDS {
                more = Core::pump_locked(&mut st, now);
                if !more {
                    break;
                }
            }
            if st.dead.is_some() {
                return;
            }
            (st.ep.poll_timeout(), more)
        };
        if spinning && !more {
            spins = spins.wrapping_add(1);
            if spins % SPIN_ROUNDS_PER_POLL != 0 {
                std::hint::spin_loop();
                continue;
            }
        }
        let now = Instant::now();
        let mut sleep = timeout.map(|t| t.saturating_duration_since(now));
        if let Some(max) = fds.max_sleep {
            sleep = Some(sleep.map_or(max, |s| s.min(max)));
        }
        let ms = if more {
            // Only look for the stop signal; the work left over is ours to finish.
            0
        } else {
            sleep.map_or(-1, |d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX))
        };
        let n = match epoll.wait(ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                core.kill(format!("epoll_wait failed: {e}"));
                return;
            }
        };
        for ev in &events[..n] {
            match usize::try_from(ev.data()) {
                Ok(0) => return,
                Ok(i) => {
                    if let Some(fd) = all.get(i) {
                        let _ = fd.read();
                    }
                    config_pending |= Some(i) == config_index;
                }
                Err(_) => {}
            }
        }
    }
}

/// A running driver: one device, its event loop, and the sockets on it.
#[derive(Debug)]
pub struct VsockDriver {
    core: Arc<Core>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    sim: Option<SimHost>,
    device_name: String,
}

fn dev_err(name: &str) -> impl Fn(DeviceError) -> DriverError + '_ {
    move |source| DriverError::Device {
        name: name.to_string(),
        source,
    }
}

fn io_err(op: &'static str) -> impl Fn(io::Error) -> DriverError {
    move |source| DriverError::Io { op, source }
}

impl VsockDriver {
    /// Open the device named by `spec` with default settings.
    pub fn open(spec: &DeviceSpec) -> Result<Self, DriverError> {
        VsockDriver::open_with(spec, DriverConfig::default())
    }

    /// Open the device named by `spec`.
    pub fn open_with(spec: &DeviceSpec, config: DriverConfig) -> Result<Self, DriverError> {
        if *spec == DeviceSpec::Sim {
            return VsockDriver::open_sim(
                SimConfig {
                    busy_poll: config.busy_poll,
                    ..SimConfig::default()
                },
                config,
            );
        }
        if *spec == DeviceSpec::Auto {
            return VsockDriver::open_auto(config);
        }
        let dev = spec.open().map_err(dev_err(&spec.to_string()))?;
        VsockDriver::from_device(dev, config, None)
    }

    /// `auto`: the first vsock vDPA device, then a virtio-vsock function bound to vfio-pci, then
    /// the kernel's vhost-vsock with the first free CID from [`crate::device::AUTO_FIRST_CID`].
    fn open_auto(config: DriverConfig) -> Result<Self, DriverError> {
        let mut tried = Vec::new();
        for spec in crate::device::auto_candidates() {
            let is_vhost_vsock = matches!(spec, DeviceSpec::VhostVsock { .. });
            let r = spec
                .open()
                .map_err(dev_err(&spec.to_string()))
                .and_then(|dev| VsockDriver::from_device(dev, config.clone(), None));
            match r {
                Ok(d) => {
                    log::info!("auto: using {spec}");
                    return Ok(d);
                }
                Err(e) => {
                    let in_use = matches!(&e, DriverError::Device { source, .. }
                        if source.os_error().and_then(io::Error::raw_os_error) == Some(libc::EADDRINUSE));
                    log::debug!("auto: {spec}: {e}");
                    tried.push(format!("{spec}: {}", error_chain(&e)));
                    // A CID in use: the next candidate is the next CID. Any other vhost-vsock
                    // failure would repeat for every CID.
                    if is_vhost_vsock && !in_use {
                        break;
                    }
                }
            }
        }
        Err(DriverError::NoDevice { tried })
    }

    /// Open an in-process simulated device with the given settings.
    pub fn open_sim(sim: SimConfig, config: DriverConfig) -> Result<Self, DriverError> {
        let dev = SimDevice::new(sim);
        let host = dev.host();
        VsockDriver::from_device(Box::new(dev), config, Some(host))
    }

    /// Bring up `dev` and start the event loop.
    pub fn from_device(
        mut dev: Box<dyn VsockDevice>,
        config: DriverConfig,
        sim: Option<SimHost>,
    ) -> Result<Self, DriverError> {
        for (what, v) in [
            ("rx_buf_size", config.rx_buf_size),
            ("tx_buf_size", config.tx_buf_size),
        ] {
            if v <= HDR_LEN || v > MAX_BUF_SIZE {
                return Err(DriverError::InvalidConfig(format!(
                    "{what} must hold a header and payload: expected {}..={MAX_BUF_SIZE} bytes, found {v}",
                    HDR_LEN + 1
                )));
            }
        }
        if config.queue_size == 0 || !config.queue_size.is_power_of_two() {
            return Err(DriverError::InvalidConfig(format!(
                "queue_size must be a power of two, found {}",
                config.queue_size
            )));
        }
        let name = dev.name();
        let e = dev_err(&name);
        let offered = dev.offered_features();
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(e(DeviceError::MissingFeature {
                name: "VIRTIO_F_VERSION_1",
                bit: VIRTIO_F_VERSION_1,
                offered,
            }));
        }
        let negotiated = dev.negotiate(wanted_features(offered)).map_err(&e)?;
        let event_idx = negotiated & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let cid = dev.guest_cid().map_err(&e)?;
        if !valid_guest_cid(cid) {
            return Err(e(DeviceError::Failed(format!(
                "the device's guest_cid is {cid}, which is not a guest CID (expected 3..=4294967294: \
                 0 and 1 are reserved, 2 is the host, 4294967295 is VMADDR_CID_ANY)"
            ))));
        }

        let size = config
            .queue_size
            .min(dev.max_queue_size(RX_QUEUE))
            .min(dev.max_queue_size(TX_QUEUE));
        let mut dma_opts = dev.dma_options();
        let ring_bytes = 2 * (64 * 1024) as usize;
        let need = usize::from(size) * (config.rx_buf_size as usize + config.tx_buf_size as usize)
            + ring_bytes
            + 64 * 1024;
        dma_opts.size = dma_opts.size.max(need.next_multiple_of(2 << 20));
        let dma = Arc::new(DmaRegion::new(&dma_opts)?);
        dev.map_dma(&dma).map_err(&e)?;
        let mut rx = SplitQueue::new(&dma, size, event_idx)?;
        let mut tx = SplitQueue::new(&dma, size, event_idx)?;
        dev.setup_queue(RX_QUEUE, &rx.layout()).map_err(&e)?;
        dev.setup_queue(TX_QUEUE, &tx.layout()).map_err(&e)?;

        let mut rx_buf = Vec::with_capacity(size.into());
        for token in 0..u64::from(size) {
            let addr = dma.alloc(config.rx_buf_size as usize, 64)?;
            rx.add(
                &[BufferDesc {
                    addr,
                    len: config.rx_buf_size,
                    writable: true,
                }],
                token,
            )?;
            rx_buf.push(addr);
        }
        let mut tx_buf = Vec::with_capacity(size.into());
        for _ in 0..size {
            tx_buf.push(dma.alloc(config.tx_buf_size as usize, 64)?);
        }
        if config.busy_poll {
            rx.disable_cb();
            tx.disable_cb();
        }
        dev.activate().map_err(&e)?;
        if rx.kick_prepare()? {
            dev.kick(RX_QUEUE).map_err(&e)?;
        }

        let waker = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let signals = vec![
            dev.call_fd(RX_QUEUE)
                .map_err(&e)?
                .try_clone()
                .map_err(io_err("dup"))?,
            dev.call_fd(TX_QUEUE)
                .map_err(&e)?
                .try_clone()
                .map_err(io_err("dup"))?,
        ];
        let config_irq = match dev.config_fd() {
            Some(fd) => Some(fd.try_clone().map_err(io_err("dup"))?),
            None => None,
        };
        let fds = LoopFds {
            waker: waker.try_clone().map_err(io_err("dup"))?,
            stop: stop.try_clone().map_err(io_err("dup"))?,
            signals,
            config: config_irq,
            max_sleep: config.busy_poll.then_some(Duration::from_millis(1)),
        };
        let mut pc = config.proto.clone();
        pc.local_cid = cid;
        if pc.ephemeral_first.is_none() {
            pc.ephemeral_first = Some(random_port(&pc.ephemeral_ports));
        }
        pc.seqpacket = negotiated & (1 << VIRTIO_VSOCK_F_SEQPACKET) != 0;
        let tx_free = (0..u64::from(size)).collect();
        let transport = DriverTransport {
            dev,
            dma,
            rx,
            tx,
            rx_buf,
            tx_buf,
            tx_free,
            rx_batch: Vec::with_capacity(size.into()),
            scratch: vec![0; config.rx_buf_size.max(config.tx_buf_size) as usize],
            rx_buf_size: config.rx_buf_size,
            tx_buf_size: config.tx_buf_size,
            waker,
            busy_poll: config.busy_poll,
            stats: DriverStats::default(),
        };
        let core = Core::new(Endpoint::new(pc), Box::new(transport), config.busy_poll);
        let loop_core = core.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vsock-{name}"))
            .spawn(move || run_loop(loop_core, fds))
            .map_err(io_err("spawn event loop"))?;
        log::info!(
            "{name}: driver up, cid {cid}, {size} descriptors per queue, features {negotiated:#x}"
        );
        Ok(VsockDriver {
            core,
            stop,
            thread: Some(thread),
            sim,
            device_name: name.clone(),
        })
    }

    /// Our CID: the device's `guest_cid`, as last read (at bring-up, and after each config
    /// interrupt).
    pub fn local_cid(&self) -> u64 {
        self.core.lock().ep.local_cid()
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The host side of the simulated device, when the device is `sim`.
    pub fn sim_host(&self) -> Option<&SimHost> {
        self.sim.as_ref()
    }

    /// Connect a stream to `addr` (the connect timeout of the protocol config applies).
    pub fn connect(&self, addr: VsockAddr) -> io::Result<VsockStream> {
        VsockStream::connect_on(&self.core, addr, None)
    }

    /// Connect a stream, giving up after `timeout`.
    pub fn connect_timeout(&self, addr: VsockAddr, timeout: Duration) -> io::Result<VsockStream> {
        VsockStream::connect_on(&self.core, addr, Some(timeout))
    }

    /// Listen for streams on `port`.
    pub fn listen(&self, port: u32) -> io::Result<VsockListener> {
        VsockListener::bind_on(&self.core, port, crate::packet::SocketType::Stream)
    }

    /// Connect a SEQPACKET socket (needs VIRTIO_VSOCK_F_SEQPACKET).
    pub fn connect_seqpacket(&self, addr: VsockAddr) -> io::Result<VsockSeqPacket> {
        VsockSeqPacket::connect_on(&self.core, addr, None)
    }

    /// Listen for SEQPACKET connections on `port`.
    pub fn listen_seqpacket(&self, port: u32) -> io::Result<VsockListener> {
        VsockListener::bind_on(&self.core, port, crate::packet::SocketType::SeqPacket)
    }

    /// Protocol counters.
    pub fn proto_stats(&self) -> proto::Stats {
        self.core.lock().ep.stats()
    }

    /// Reset the device now (as on an unrecoverable error): every stream ends with an error.
    pub fn reset_device(&self, reason: &str) {
        self.core.kill(format!("device reset: {reason}"));
    }
}

impl Drop for VsockDriver {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.core.close_all("driver closed".into());
    }
}
