// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The simulated device as the device layer sees it: `impl VsockDevice` (negotiation, queue
//! setup, kicks, the config interrupt) and the device thread, which runs the host side's core
//! over the rings.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::host::SimHost;
use super::rings::SimRings;
use super::{lock, SimConfig};
use crate::device::{status, DeviceError, VsockDevice, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::dma::{DmaOptions, DmaRegion, IovaBase};
use crate::packet::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_VSOCK_F_NO_IMPLIED_STREAM,
    VIRTIO_VSOCK_F_SEQPACKET, VIRTIO_VSOCK_F_STREAM,
};
use crate::runtime::{Core, EventLoop, LoopFds};
use crate::virtq::QueueLayout;

/// The simulated device. See the module docs.
pub struct SimDevice {
    cfg: SimConfig,
    negotiated: u64,
    layouts: [Option<QueueLayout>; 3],
    mem: Option<GuestMemoryMmap<()>>,
    kick: [EventFd; 3],
    call: [EventFd; 3],
    /// The config interrupt ([`SimHost::set_guest_cid`] signals it).
    config: EventFd,
    /// The removal eventfd ([`SimHost::unplug`] signals it).
    removal: EventFd,
    /// Status bits set by the driver (ACKNOWLEDGE .. DRIVER_OK; NEEDS_RESET comes from the
    /// host).
    status: u8,
    rings: Arc<Mutex<Option<SimRings>>>,
    host: SimHost,
    waker: EventFd,
    stop: Option<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDevice")
            .field("cfg", &self.cfg)
            .field("negotiated", &self.negotiated)
            .field("running", &self.thread.is_some())
            .finish_non_exhaustive()
    }
}

fn eventfd() -> EventFd {
    // An eventfd only fails when the process is out of file descriptors; nothing works then.
    EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| panic!("eventfd: {e}"))
}

fn dup_eventfd(e: &EventFd) -> EventFd {
    // As for `eventfd`: only an exhausted file table makes this fail.
    e.try_clone().unwrap_or_else(|e| panic!("dup eventfd: {e}"))
}

/// The status a device has once the driver noticed it and knows how to drive it.
const ACKNOWLEDGE_DRIVER: u8 = status::ACKNOWLEDGE | status::DRIVER;

impl SimDevice {
    /// 3 queues (rx, tx, event), or 2 without the event queue.
    fn queue_count(&self) -> u16 {
        if self.cfg.event_queue {
            3
        } else {
            2
        }
    }

    /// A new simulated device (not started: the driver brings it up through [`VsockDevice`]).
    pub fn new(cfg: SimConfig) -> Self {
        let rings = Arc::new(Mutex::new(None));
        let waker = eventfd();
        let config = eventfd();
        let removal = eventfd();
        let host = SimHost::start(
            &cfg,
            rings.clone(),
            dup_eventfd(&waker),
            dup_eventfd(&config),
            dup_eventfd(&removal),
        );
        SimDevice {
            host,
            config,
            removal,
            status: ACKNOWLEDGE_DRIVER,
            cfg,
            negotiated: 0,
            layouts: [None, None, None],
            mem: None,
            kick: [eventfd(), eventfd(), eventfd()],
            call: [eventfd(), eventfd(), eventfd()],
            rings,
            waker,
            stop: None,
            thread: None,
        }
    }

    /// The host side, for tests and the CLI.
    pub fn host(&self) -> SimHost {
        self.host.clone()
    }

    fn make_queue(&self, index: u16, layout: &QueueLayout) -> Result<Queue, DeviceError> {
        let mut q = Queue::new(self.cfg.queue_max)
            .map_err(|e| DeviceError::Failed(format!("queue {index}: {e}")))?;
        q.try_set_size(layout.size)
            .map_err(|_| DeviceError::BadQueueSize {
                size: layout.size,
                max: self.cfg.queue_max,
            })?;
        q.try_set_desc_table_address(layout.desc_table)
            .and_then(|()| q.try_set_avail_ring_address(layout.avail_ring))
            .and_then(|()| q.try_set_used_ring_address(layout.used_ring))
            .map_err(|e| DeviceError::Failed(format!("queue {index} addresses: {e}")))?;
        q.set_event_idx(self.negotiated & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        q.set_ready(true);
        Ok(q)
    }
}

impl VsockDevice for SimDevice {
    fn name(&self) -> String {
        "sim".into()
    }

    fn offered_features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1;
        if self.cfg.seqpacket {
            f |= 1 << VIRTIO_VSOCK_F_SEQPACKET;
        }
        if self.cfg.event_idx {
            f |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if self.cfg.stream {
            f |= 1 << VIRTIO_VSOCK_F_STREAM;
        }
        if self.cfg.no_implied_stream {
            f |= 1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM;
        }
        f
    }

    fn negotiate(&mut self, features: u64) -> Result<u64, DeviceError> {
        let offered = self.offered_features();
        if features & !offered != 0 {
            return Err(DeviceError::Failed(format!(
                "driver accepted features {features:#x} beyond those offered {offered:#x}"
            )));
        }
        self.negotiated = features;
        self.status |= status::FEATURES_OK;
        Ok(features)
    }

    fn guest_cid(&self) -> Result<u64, DeviceError> {
        Ok(self.host.guest_cid())
    }

    fn num_queues(&self) -> u16 {
        self.queue_count()
    }

    fn max_queue_size(&self, _index: u16) -> u16 {
        self.cfg.queue_max
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "backend",
                "in-process simulated virtio-vsock (a device thread on virtio-queue's Queue)"
                    .into(),
            ),
            (
                "host",
                "CID 2: echo on port 7, SEQPACKET echo on 8, discard on 9".into(),
            ),
        ]
    }

    fn dma_options(&self) -> DmaOptions {
        DmaOptions {
            iova: IovaBase::Fixed(0x1_0000_0000),
            ..DmaOptions::default()
        }
    }

    fn map_dma(&mut self, dma: &DmaRegion) -> Result<(), DeviceError> {
        self.mem = Some(dma.memory().clone());
        Ok(())
    }

    fn setup_queue(&mut self, index: u16, layout: &QueueLayout) -> Result<(), DeviceError> {
        match index {
            RX_QUEUE | TX_QUEUE | EVENT_QUEUE if index < self.queue_count() => {
                let max = self.cfg.queue_max;
                if layout.size == 0 || !layout.size.is_power_of_two() || layout.size > max {
                    return Err(DeviceError::BadQueueSize {
                        size: layout.size,
                        max,
                    });
                }
                self.layouts[usize::from(index)] = Some(*layout);
                Ok(())
            }
            _ => Err(DeviceError::NoSuchQueue {
                index,
                count: self.queue_count(),
            }),
        }
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        let mem = self
            .mem
            .clone()
            .ok_or(DeviceError::NotReady("activate before map_dma"))?;
        let (Some(rxl), Some(txl)) = (self.layouts[0], self.layouts[1]) else {
            return Err(DeviceError::NotReady(
                "activate before both queues were set up",
            ));
        };
        let mut rx = self.make_queue(RX_QUEUE, &rxl)?;
        let mut tx = self.make_queue(TX_QUEUE, &txl)?;
        let evq = match self.layouts[2] {
            Some(l) => Some((
                self.make_queue(EVENT_QUEUE, &l)?,
                dup_eventfd(&self.call[2]),
            )),
            None => None,
        };
        if self.cfg.busy_poll {
            // We spin on the avail rings: ask the driver not to kick.
            let _ = rx.disable_notification(&mem);
            let _ = tx.disable_notification(&mem);
        }
        let dup = |e: &EventFd| e.try_clone().map_err(|e| DeviceError::io("dup eventfd", e));
        let call = [dup(&self.call[0])?, dup(&self.call[1])?];
        // The hostile mode misbehaves once per device: a driver that recovers finds a sound one.
        let hostile = self.cfg.hostile.take();
        *lock(&self.rings) = Some(SimRings::new(mem, rx, tx, evq, call, hostile));
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError::io("eventfd", e))?;
        let fds = LoopFds {
            waker: dup(&self.waker)?,
            stop: dup(&stop)?,
            signals: vec![Arc::new(dup(&self.kick[0])?), Arc::new(dup(&self.kick[1])?)],
            interrupts: Arc::default(),
            config: None,
            removal: None,
            presence_check: None,
            max_sleep: Some(if self.cfg.busy_poll {
                Duration::ZERO
            } else {
                Duration::from_millis(100)
            }),
        };
        let event_loop = EventLoop::new(fds).map_err(|e| DeviceError::io("sim event loop", e))?;
        let core = self.host.core.clone();
        self.thread = Some(
            event_loop
                .spawn("sim-device".into(), core)
                .map_err(|e| DeviceError::io("spawn sim thread", e))?,
        );
        self.stop = Some(stop);
        self.status |= status::DRIVER_OK;
        Ok(())
    }

    fn kick(&self, index: u16) -> Result<(), DeviceError> {
        let fd = self
            .kick
            .get(usize::from(index))
            .filter(|_| index < self.queue_count())
            .ok_or(DeviceError::NoSuchQueue {
                index,
                count: self.queue_count(),
            })?;
        fd.write(1).map_err(|e| DeviceError::io("kick", e))
    }

    fn call_fd(&self, index: u16) -> Result<&EventFd, DeviceError> {
        self.call
            .get(usize::from(index))
            .filter(|_| index < self.queue_count())
            .ok_or(DeviceError::NoSuchQueue {
                index,
                count: self.queue_count(),
            })
    }

    fn config_fd(&self) -> Option<&EventFd> {
        Some(&self.config)
    }

    fn status(&self) -> Result<Option<u8>, DeviceError> {
        let needs = if self.host.needs_reset.load(Ordering::Acquire) {
            status::NEEDS_RESET
        } else {
            0
        };
        Ok(Some(self.status | needs))
    }

    fn restart(&mut self) -> Result<(), DeviceError> {
        if self.thread.is_some() {
            return Err(DeviceError::NotReady("restart before reset"));
        }
        self.status = ACKNOWLEDGE_DRIVER;
        Ok(())
    }

    fn removal_fd(&self) -> Option<&EventFd> {
        Some(&self.removal)
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.write(1);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *lock(&self.rings) = None;
        self.status = 0;
        self.negotiated = 0;
        self.layouts = [None, None, None];
        self.host.needs_reset.store(false, Ordering::Release);
        // Every host-side connection ends, as a guest's would on a transport reset.
        let mut st = self.host.core.lock();
        st.ep.handle_transport_reset(Instant::now(), None);
        Core::route_events(&mut st);
        Ok(())
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        let _ = self.reset();
    }
}
