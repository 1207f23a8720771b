// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The sockets: [`VsockDriver`] brings a device up and hands programs [`VsockStream`]s,
//! [`VsockListener`]s and [`VsockSeqPacket`]s on it.
//!
//! [`VsockDriver::from_device`] negotiates features, checks the device's `guest_cid`, lays out
//! the DMA region, sets up and fills the rings, then starts the runtime's event loop over the
//! driver's transport (`src/runtime/`, crate-internal, says what one round of it does).
//!
//! Opening by device spec (`VsockDriver::open`, `open_with`) and on the simulated device
//! (`VsockDriver::open_sim`) is one layer up, in `src/open.rs`: it is the one place that knows
//! every backend, the simulated one included.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{DeviceError, VsockDevice, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::dma::DmaRegion;
use crate::dma::{IovaBase, HUGE_PAGE_SIZE};
pub use crate::packet::stream_negotiated;
use crate::packet::{SocketType, PKT_HEADER_SIZE};
use crate::packet::{
    PKT_HEADER_LEN, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_VSOCK_F_SEQPACKET,
};
use crate::packet::{VIRTIO_VSOCK_F_NO_IMPLIED_STREAM, VIRTIO_VSOCK_F_STREAM};
use crate::proto::{self, Endpoint};
use crate::runtime::{
    refill_rx, valid_guest_cid, Core, DeviceRings, DmaStorage, DriverTransport, Ended, EventLoop,
    EventQueue, LoopFds, RecoveryPolicy, RtStorage, RxPool, TxPool, TX_CHUNK, TX_HDR_SLOT,
};
use crate::virtq::SplitQueue;

mod poller;
pub(crate) mod socket;

pub use crate::proto::Readiness;
pub use crate::runtime::DriverStats;
pub use crate::runtime::Interest;
pub use poller::{Pollable, VsockPoller};
pub(crate) use socket::ConnectOpts;
pub use socket::{
    VsockAddr, VsockListener, VsockRequest, VsockSeqPacket, VsockStream, DEFAULT_BACKLOG,
};

/// Largest buffer size accepted for RX and TX buffers (header included).
pub const MAX_BUF_SIZE: u32 = 1 << 20;

/// Event buffers the driver keeps posted on a device's event queue (as Linux does).
pub const EVENT_BUFFERS: u16 = crate::runtime::EVENT_BUFFERS;

/// Default [`DriverConfig::recovery_limit`].
pub const DEFAULT_RECOVERY_LIMIT: u32 = crate::runtime::DEFAULT_RECOVERY_LIMIT;

/// How often the driver checks that a device whose removal is not signalled is still there
/// ([`VsockDevice::polls_presence`]): a removal ends every call within this, plus a round.
pub const PRESENCE_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Default [`DriverConfig::drain_timeout`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Driver settings.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Spin on the rings instead of sleeping on eventfds (lowest latency, burns a core).
    pub busy_poll: bool,
    /// Ring size for rx and tx (clamped to the device's maximum).
    pub queue_size: u16,
    /// Bytes per posted RX buffer, header included.
    pub rx_buf_size: u32,
    /// Largest TX packet, header included (the payload is also capped at one 64 KiB chunk of
    /// the TX pool).
    pub tx_buf_size: u32,
    /// Bytes of DMA memory for payload written and not yet returned by the device, shared by
    /// every connection (each is bounded by `proto.send_buffer`), in 64 KiB chunks. 0: as much
    /// as a full TX ring of the largest packets carries (`queue_size` x the largest payload).
    pub tx_pool_size: usize,
    /// RX buffers in the pool that refills the ring. Buffers beyond the ring hold received
    /// payload that readers have not read yet. 0: twice `queue_size`, or, where the DMA region
    /// must be one physically contiguous huge page (VFIO no-IOMMU), as many as fit in it (at
    /// least `queue_size`).
    pub rx_pool_buffers: usize,
    /// How long dropping the driver waits for its connections to finish as `close` does
    /// (written bytes sent, SHUTDOWN answered) before it resets what is left and then the
    /// device. Zero: reset at once.
    pub drain_timeout: Duration,
    /// How many times within a minute the driver resets the device and brings it up again
    /// after the device set NEEDS_RESET or broke the rules (every connection then ends with
    /// `ConnectionReset`; listeners stay). Beyond it, or at 0, a device error is final: every
    /// call fails with `ConnectionAborted`.
    pub recovery_limit: u32,
    /// Protocol settings (the local CID is taken from the device).
    pub proto: proto::Config,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            busy_poll: false,
            queue_size: 256,
            rx_buf_size: 64 * 1024 + PKT_HEADER_LEN,
            tx_buf_size: 64 * 1024 + PKT_HEADER_LEN,
            tx_pool_size: 0,
            rx_pool_buffers: 0,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            recovery_limit: DEFAULT_RECOVERY_LIMIT,
            proto: proto::Config::default(),
        }
    }
}

/// Errors while bringing a driver up. Causes: the cause is the source (the crate docs, "Errors
/// and their causes"); as an `io::Error` (`From`), the cause is in the message, as
/// `io::Error::new` puts it.
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

/// The features the driver asks a device for, given what it `offered`: VERSION_1 (required), and
/// EVENT_IDX, STREAM, SEQPACKET and NO_IMPLIED_STREAM whenever offered (virtio 1.2 5.10.3.1:
/// the driver SHOULD accept NO_IMPLIED_STREAM). The outcome decides which socket types exist:
/// seqpacket when SEQPACKET is negotiated, streams as [`stream_negotiated`] says. Backends add
/// what only they care about (ACCESS_PLATFORM).
pub fn wanted_features(offered: u64) -> u64 {
    const IF_OFFERED: u64 = (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_VSOCK_F_STREAM)
        | (1 << VIRTIO_VSOCK_F_SEQPACKET)
        | (1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM);
    (1 << VIRTIO_F_VERSION_1) | (offered & IF_OFFERED)
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

/// A running driver: one device, its event loop, and the sockets on it.
#[derive(Debug)]
pub struct VsockDriver {
    core: Arc<Core>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    device_name: String,
    interrupts: Arc<std::sync::atomic::AtomicU64>,
    drain_timeout: Duration,
}

/// A device error of device `name`, as a driver error.
pub(crate) fn dev_err(name: &str) -> impl Fn(DeviceError) -> DriverError + '_ {
    move |source| DriverError::Device {
        name: name.to_string(),
        source,
    }
}

fn io_err(op: &'static str) -> impl Fn(io::Error) -> DriverError {
    move |source| DriverError::Io { op, source }
}

impl VsockDriver {
    /// Bring up `dev` and start the event loop.
    pub fn from_device(
        mut dev: Box<dyn VsockDevice>,
        config: DriverConfig,
    ) -> Result<Self, DriverError> {
        for (what, v) in [
            ("rx_buf_size", config.rx_buf_size),
            ("tx_buf_size", config.tx_buf_size),
        ] {
            if v <= PKT_HEADER_LEN || v > MAX_BUF_SIZE {
                return Err(DriverError::InvalidConfig(format!(
                    "{what} must hold a header and payload: expected {}..={MAX_BUF_SIZE} bytes, found {v}",
                    PKT_HEADER_LEN + 1
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
        let requested = wanted_features(offered);
        let negotiated = dev.negotiate(requested).map_err(&e)?;
        if !stream_negotiated(negotiated) && negotiated & (1 << VIRTIO_VSOCK_F_SEQPACKET) == 0 {
            return Err(e(DeviceError::Failed(format!(
                "the device supports no socket type: it negotiated NO_IMPLIED_STREAM without \
                 STREAM, and no SEQPACKET (features {negotiated:#x})"
            ))));
        }
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
        let ring = usize::from(size);
        let mut dma_opts = dev.dma_options();
        let max_tx_payload = (config.tx_buf_size as usize - PKT_HEADER_SIZE).min(TX_CHUNK);
        let tx_chunks = match config.tx_pool_size {
            0 => (ring * max_tx_payload).div_ceil(TX_CHUNK),
            n => n / TX_CHUNK,
        }
        .max(1);
        // rx, tx and the event queue with its buffers.
        let ring_bytes = 3 * (64 * 1024) as usize;
        // Everything but the RX pool (the TX pool may need a chunk of alignment padding).
        let fixed = ring_bytes + ring * TX_HDR_SLOT + (tx_chunks + 1) * TX_CHUNK + 64 * 1024;
        let rx_size = config.rx_buf_size as usize;
        let rx_count = match config.rx_pool_buffers {
            // Physically contiguous memory is one huge page: fill what is left of it.
            0 if dma_opts.iova == IovaBase::Physical => {
                (dma_opts.size.saturating_sub(fixed) / rx_size).clamp(ring, 2 * ring)
            }
            0 => 2 * ring,
            n => n,
        };
        if rx_count < ring {
            return Err(DriverError::InvalidConfig(format!(
                "rx_pool_buffers must fill the ring: expected at least {ring}, found {rx_count}"
            )));
        }
        let rx_bytes = rx_count * rx_size;
        // An RX buffer never crosses a huge page: at most one buffer's worth is skipped at each
        // page boundary inside the region.
        let rx_slack = (fixed + rx_bytes) / HUGE_PAGE_SIZE * rx_size;
        let need = fixed + rx_bytes + rx_slack;
        dma_opts.size = dma_opts.size.max(need.next_multiple_of(HUGE_PAGE_SIZE));
        let dma = Arc::new(DmaRegion::new(&dma_opts)?);
        dev.map_dma(&dma).map_err(&e)?;
        let mut rx = SplitQueue::new(&dma, size, event_idx)?;
        let mut tx = SplitQueue::new(&dma, size, event_idx)?;
        dev.setup_queue(RX_QUEUE, &rx.layout()).map_err(&e)?;
        dev.setup_queue(TX_QUEUE, &tx.layout()).map_err(&e)?;
        // The event queue, when the device has one (vhost-vsock has none in its kernel ABI).
        let mut evq = if dev.num_queues() > EVENT_QUEUE {
            let mut q = EventQueue::new(&dma, dev.max_queue_size(EVENT_QUEUE), event_idx)
                .map_err(|err| e(DeviceError::Failed(crate::runtime::error_chain(&err))))?;
            dev.setup_queue(EVENT_QUEUE, &q.q.layout()).map_err(&e)?;
            q.post_all()?;
            Some(q)
        } else {
            None
        };

        let storage = DmaStorage {
            tx_pool: TxPool::new(&dma, tx_chunks * TX_CHUNK)?,
            rx_pool: RxPool::new(&dma, rx_count, config.rx_buf_size, ring)?,
            counters: Arc::default(),
        };
        let mut rx_posted = (0..rx_count).map(|_| None).collect::<Vec<_>>();
        refill_rx(&mut rx, &storage, &mut rx_posted)?;
        let tx_hdr = (0..ring)
            .map(|_| dma.alloc(TX_HDR_SLOT, TX_HDR_SLOT))
            .collect::<Result<Vec<_>, _>>()?;
        if config.busy_poll {
            rx.disable_cb();
            tx.disable_cb();
        }
        dev.activate().map_err(&e)?;
        if rx.kick_prepare()? {
            dev.kick(RX_QUEUE).map_err(&e)?;
        }
        if let Some(q) = evq.as_mut() {
            if q.q.kick_prepare()? {
                dev.kick(EVENT_QUEUE).map_err(&e)?;
            }
        }

        let waker = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let queues = if evq.is_some() {
            vec![RX_QUEUE, TX_QUEUE, EVENT_QUEUE]
        } else {
            vec![RX_QUEUE, TX_QUEUE]
        };
        let signals = queues
            .into_iter()
            .map(|q| {
                dev.call_fd(q)
                    .map_err(&e)?
                    .try_clone()
                    .map(Arc::new)
                    .map_err(io_err("dup"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let dup = |fd: Option<&EventFd>| fd.map(EventFd::try_clone).transpose();
        let config_irq = dup(dev.config_fd()).map_err(io_err("dup"))?;
        let removal = dup(dev.removal_fd()).map_err(io_err("dup"))?;
        let presence_check = dev.polls_presence().then_some(PRESENCE_CHECK_INTERVAL);
        let interrupts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let fds = LoopFds {
            waker: waker.try_clone().map_err(io_err("dup"))?,
            stop: stop.try_clone().map_err(io_err("dup"))?,
            signals,
            interrupts: interrupts.clone(),
            config: config_irq,
            removal,
            presence_check,
            max_sleep: config.busy_poll.then_some(Duration::from_millis(1)),
        };
        let mut pc = config.proto.clone();
        pc.local_cid = cid;
        if pc.ephemeral_first.is_none() {
            pc.ephemeral_first = Some(random_port(&pc.ephemeral_ports));
        }
        pc.seqpacket = negotiated & (1 << VIRTIO_VSOCK_F_SEQPACKET) != 0;
        pc.stream = stream_negotiated(negotiated);
        let endpoint = Endpoint::with_storage(pc, RtStorage::Dma(storage.clone()));
        let rings = DeviceRings {
            dma,
            rx,
            tx,
            evq,
            storage,
            rx_posted,
            tx_hdr,
            max_tx_payload,
            requested,
            negotiated,
        };
        let policy = RecoveryPolicy {
            limit: config.recovery_limit,
        };
        let transport = DriverTransport::new(dev, rings, waker, config.busy_poll, policy);
        let core = Core::new(endpoint, Box::new(transport), config.busy_poll)
            .map_err(io_err("readiness descriptor"))?;
        let event_loop = EventLoop::new(fds).map_err(io_err("event loop (epoll)"))?;
        // A blocked caller may wait on the rx and tx interrupts itself (runtime/irq.rs).
        core.attach_irq(event_loop.irq_wait().map_err(io_err("eventfd"))?);
        let thread = event_loop
            .spawn(format!("vsock-{name}"), core.clone())
            .map_err(io_err("spawn event loop"))?;
        log::info!(
            "{name}: driver up, cid {cid}, {size} descriptors per queue, features {negotiated:#x}"
        );
        Ok(VsockDriver {
            core,
            stop,
            thread: Some(thread),
            device_name: name.clone(),
            interrupts,
            drain_timeout: config.drain_timeout,
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

    /// Connect a stream to `addr` (the connect timeout of the protocol config applies, 2 s
    /// by default as Linux's).
    pub fn connect(&self, addr: VsockAddr) -> io::Result<VsockStream> {
        VsockStream::connect_on(&self.core, addr, ConnectOpts::default())
    }

    /// Connect a stream, giving up after `timeout` (any length, as
    /// `SO_VM_SOCKETS_CONNECT_TIMEOUT`).
    pub fn connect_timeout(&self, addr: VsockAddr, timeout: Duration) -> io::Result<VsockStream> {
        VsockStream::connect_on(
            &self.core,
            addr,
            ConnectOpts {
                timeout: Some(timeout),
                ..ConnectOpts::default()
            },
        )
    }

    /// Start connecting a stream and return at once, as a non-blocking `connect(2)` that
    /// returns `EINPROGRESS`: the stream is in non-blocking mode, its descriptor turns
    /// writable once the handshake is done, and [`VsockStream::take_error`] then says whether
    /// it failed (reads and writes before then fail with `NotConnected`, as Linux's).
    pub fn connect_nonblocking(&self, addr: VsockAddr) -> io::Result<VsockStream> {
        VsockStream::connect_on(
            &self.core,
            addr,
            ConnectOpts {
                nonblocking: true,
                ..ConnectOpts::default()
            },
        )
    }

    /// Connect a stream from local port `local_port` (as `bind(2)` before `connect(2)`);
    /// `AddrInUse` when the port is taken.
    pub fn connect_from(&self, local_port: u32, addr: VsockAddr) -> io::Result<VsockStream> {
        VsockStream::connect_on(
            &self.core,
            addr,
            ConnectOpts {
                local_port: Some(local_port),
                ..ConnectOpts::default()
            },
        )
    }

    /// Listen for streams on `port`, with a backlog of [`DEFAULT_BACKLOG`]; on
    /// [`VMADDR_PORT_ANY`](crate::packet::VMADDR_PORT_ANY) a free port is picked (as Linux's
    /// `bind`), which [`VsockListener::port`] reports.
    pub fn listen(&self, port: u32) -> io::Result<VsockListener> {
        self.listen_with_backlog(port, DEFAULT_BACKLOG)
    }

    /// Listen for streams on `port`: at most `backlog` (at least 1) established connections
    /// wait to be accepted; further `REQUEST`s are refused with `RST`.
    pub fn listen_with_backlog(&self, port: u32, backlog: usize) -> io::Result<VsockListener> {
        VsockListener::bind_on(&self.core, port, backlog, SocketType::Stream)
    }

    /// Listen for streams on every port that has no listener of its own (at most one such
    /// listener): [`VsockListener::accept_request`] hands each request over unanswered, so the
    /// caller can accept or refuse it by its port (Firecracker's hybrid vsock); `accept`
    /// accepts every one. [`VsockListener::port`] is `VMADDR_PORT_ANY`.
    pub fn listen_any_port(&self) -> io::Result<VsockListener> {
        VsockListener::bind_any_on(&self.core, crate::packet::SocketType::Stream)
    }

    /// Connect a SEQPACKET socket (needs VIRTIO_VSOCK_F_SEQPACKET).
    pub fn connect_seqpacket(&self, addr: VsockAddr) -> io::Result<VsockSeqPacket> {
        VsockSeqPacket::connect_on(&self.core, addr, ConnectOpts::default())
    }

    /// Start connecting a SEQPACKET socket and return at once (see
    /// [`VsockDriver::connect_nonblocking`]).
    pub fn connect_seqpacket_nonblocking(&self, addr: VsockAddr) -> io::Result<VsockSeqPacket> {
        VsockSeqPacket::connect_on(
            &self.core,
            addr,
            ConnectOpts {
                nonblocking: true,
                ..ConnectOpts::default()
            },
        )
    }

    /// Listen for SEQPACKET connections on `port` (`VMADDR_PORT_ANY`: a free one).
    pub fn listen_seqpacket(&self, port: u32) -> io::Result<VsockListener> {
        VsockListener::bind_on(&self.core, port, DEFAULT_BACKLOG, SocketType::SeqPacket)
    }

    /// A driver-level poller for this driver's sockets (see [`VsockPoller`]; sockets of other
    /// drivers may join it too).
    pub fn poller(&self) -> io::Result<VsockPoller> {
        VsockPoller::new()
    }

    /// Data-path counters: packets, kicks, interrupts, payload bytes copied per direction, the
    /// RX and TX pools' occupancy, and the connections held.
    pub fn stats(&self) -> DriverStats {
        let st = self.core.lock();
        let mut stats = st.transport_stats().unwrap_or_default();
        stats.interrupts = self.interrupts.load(std::sync::atomic::Ordering::Relaxed);
        stats.caller_interrupts = st.caller_interrupts();
        stats.connections = st.ep.connection_count() as u64;
        stats
    }

    /// The driver's core (tests of the runtime look inside it; none under loom, where a
    /// driver cannot run).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Protocol counters.
    pub fn proto_stats(&self) -> proto::Stats {
        self.core.lock().ep.stats()
    }

    /// Reset the device now (as on an unrecoverable error): every stream ends with an error.
    pub fn reset_device(&self, reason: &str) {
        self.core.kill(Ended::Reset(reason.to_string()));
    }
}

impl Drop for VsockDriver {
    /// Drains first (see [`DriverConfig::drain_timeout`]), then stops the loop and resets the
    /// device.
    fn drop(&mut self) {
        let cut = self.core.drain(self.drain_timeout);
        if cut > 0 {
            log::warn!(
                "{}: {cut} connections did not finish within {:?}: reset",
                self.device_name,
                self.drain_timeout
            );
        }
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.core.close_all("driver closed");
    }
}
