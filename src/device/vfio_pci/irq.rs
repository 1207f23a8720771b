// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Interrupts: the [`IrqPlan`] (MSI-X vectors as Linux's `vp_find_vqs` chooses them, else
//! INTx), `VFIO_DEVICE_SET_IRQS` to wire them to eventfds, the INTx forwarding thread that
//! reads the ISR, and the device request interrupt that announces a removal.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::sys::{self, argsz};
use super::{failed, VfioPciDevice};
use crate::device::virtio_pci::{Transport, ISR_CONFIG, ISR_QUEUE, VIRTIO_MSI_NO_VECTOR};
use crate::device::{pci, DeviceError, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};

/// The INTx forwarding thread and its stop signal.
#[derive(Debug)]
pub(super) struct IntxForwarder {
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for IntxForwarder {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one INTx interrupt means (virtio 1.2 section 4.1.4.5): ISR bit 0 (a queue
/// interrupt) signals every queue's eventfd (the ISR does not say which queue), bit 1 (a
/// configuration change) the config eventfd. Returns the ISR read.
fn dispatch_isr(isr: u8, calls: &[EventFd], config: &EventFd) -> u8 {
    if isr & ISR_QUEUE != 0 {
        for c in calls {
            let _ = c.write(1);
        }
    }
    if isr & ISR_CONFIG != 0 {
        let _ = config.write(1);
    }
    isr
}

/// The eventfds the INTx thread signals.
#[derive(Debug)]
struct IntxTargets {
    /// One per queue.
    calls: Vec<EventFd>,
    /// Configuration changes.
    config: EventFd,
}

/// Waits for the INTx eventfd; reads the ISR (clears it, deasserts the line) and signals what
/// it says ([`dispatch_isr`]); unmasks the line in VFIO.
fn intx_loop(
    device: &File,
    transport: &Transport,
    line: &EventFd,
    stop: &EventFd,
    targets: &IntxTargets,
) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: line.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        match sys::poll(&mut fds, -1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("vfio INTx: poll failed: {e}");
                return;
            }
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents != 0 {
            let _ = line.read();
            dispatch_isr(transport.read_isr(), &targets.calls, &targets.config);
            if let Err(e) = set_irqs_on(
                device,
                sys::VFIO_PCI_INTX_IRQ_INDEX,
                sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_UNMASK,
                &[],
            ) {
                log::error!("vfio INTx: unmask failed: {e}");
                return;
            }
        }
    }
}

/// The MSI-X vector of configuration changes whenever MSI-X is in use (Linux's
/// `VP_MSIX_CONFIG_VECTOR`); queue vectors follow it.
const CONFIG_VECTOR: u16 = 0;

/// How the function's interrupts are wired, in the order Linux's `vp_find_vqs` tries them: a
/// vector per queue plus one for configuration changes, else one vector shared by every queue
/// plus the configuration vector, else INTx (the ISR says which of the two it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqPlan {
    /// MSI-X: configuration changes on vector 0, queue `i` on vector `1 + i`.
    PerQueue {
        /// How many queues have a vector.
        queues: u16,
    },
    /// MSI-X: configuration changes on vector 0, every queue on vector 1 (one eventfd that
    /// every queue's [`VsockDevice::call_fd`](crate::device::VsockDevice::call_fd) names).
    Shared,
    /// The INTx line, read by a thread that signals the queues and the configuration change
    /// eventfds as the ISR says.
    Intx,
}

impl IrqPlan {
    /// The plans to try, best first, for an MSI-X table of `table` entries (0: no MSI-X) and
    /// `queues` queues; INTx always comes last, and alone when `force_intx`.
    pub fn candidates(table: u32, queues: u16, force_intx: bool) -> Vec<IrqPlan> {
        let mut out = Vec::new();
        if !force_intx {
            // One vector per queue plus the config vector.
            if table > u32::from(queues) {
                out.push(IrqPlan::PerQueue { queues });
            }
            if table >= 2 {
                out.push(IrqPlan::Shared);
            }
        }
        out.push(IrqPlan::Intx);
        out
    }

    /// MSI-X vectors in use (0 with INTx).
    pub fn vectors(self) -> u32 {
        match self {
            IrqPlan::PerQueue { queues } => u32::from(queues) + 1,
            IrqPlan::Shared => 2,
            IrqPlan::Intx => 0,
        }
    }

    /// The MSI-X vector of queue `index` (`None` with INTx, or a queue without one).
    pub fn queue_vector(self, index: u16) -> Option<u16> {
        match self {
            IrqPlan::PerQueue { queues } if index < queues => Some(CONFIG_VECTOR + 1 + index),
            IrqPlan::PerQueue { .. } | IrqPlan::Intx => None,
            IrqPlan::Shared => Some(CONFIG_VECTOR + 1),
        }
    }

    /// What goes into `config_msix_vector`.
    pub fn config_vector(self) -> u16 {
        match self {
            IrqPlan::PerQueue { .. } | IrqPlan::Shared => CONFIG_VECTOR,
            IrqPlan::Intx => VIRTIO_MSI_NO_VECTOR,
        }
    }
}

impl std::fmt::Display for IrqPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            IrqPlan::PerQueue { queues } => {
                write!(f, "config on vector {CONFIG_VECTOR}")?;
                for q in 0..queues {
                    let v = self.queue_vector(q).unwrap_or(VIRTIO_MSI_NO_VECTOR);
                    write!(f, ", {} on {v}", queue_name(q))?;
                }
                Ok(())
            }
            IrqPlan::Shared => write!(
                f,
                "config on vector {CONFIG_VECTOR}, every queue on vector {} (shared: too few \
                 vectors for one each)",
                CONFIG_VECTOR + 1
            ),
            IrqPlan::Intx => f.write_str("INTx, ISR bit 0 queues, bit 1 config"),
        }
    }
}

/// The spec's name of queue `index` (5.10.2).
fn queue_name(index: u16) -> &'static str {
    match index {
        RX_QUEUE => "rx",
        TX_QUEUE => "tx",
        EVENT_QUEUE => "event",
        _ => "queue",
    }
}

/// `VFIO_DEVICE_SET_IRQS` for `fds` from vector 0; `DATA_NONE` with no fds uses count 0 for
/// TRIGGER (disable) and count 1 for UNMASK. More fds than an [`sys::IrqSet`] holds
/// ([`sys::IRQ_SET_ROOM`]) are refused before the ioctl: none is wired, rather than the first
/// few.
fn set_irqs_on(device: &File, index: u32, flags: u32, fds: &[i32]) -> Result<(), DeviceError> {
    let too_many = || DeviceError::TooManyEventfds {
        op: "VFIO_DEVICE_SET_IRQS",
        count: fds.len(),
        max: sys::IRQ_SET_ROOM,
    };
    if fds.len() > sys::IRQ_SET_ROOM {
        return Err(too_many());
    }
    let n = u32::try_from(fds.len()).map_err(|_| too_many())?;
    let mut set = sys::IrqSet {
        argsz: argsz::<vfio_bindings::bindings::vfio::vfio_irq_set>() + 4 * n,
        flags,
        index,
        start: 0,
        count: if flags & sys::VFIO_IRQ_SET_ACTION_UNMASK != 0 {
            1
        } else {
            n
        },
        data: [0; sys::IRQ_SET_ROOM],
    };
    set.data[..fds.len()].copy_from_slice(fds);
    sys::device_set_irqs(device, &set).map_err(|e| DeviceError::io("VFIO_DEVICE_SET_IRQS", e))
}

impl VfioPciDevice {
    fn irq_count(&self, index: u32) -> u32 {
        sys::device_get_irq_info(&self.device, index).map_or(0, |info| info.count)
    }

    /// Wires the interrupts: the first [`IrqPlan`] of [`IrqPlan::candidates`] that the function
    /// accepts (a device that refuses the config vector moves us on to the next, as Linux
    /// does). The eventfds stay the same for the device's life, also across `restart`.
    pub(super) fn setup_irqs(&mut self) -> Result<(), DeviceError> {
        let msix = self.irq_count(sys::VFIO_PCI_MSIX_IRQ_INDEX);
        let mut last = None;
        for plan in IrqPlan::candidates(msix, self.queues, self.force_intx) {
            let r = match plan {
                IrqPlan::Intx => self.setup_intx(),
                _ => self.setup_msix(plan),
            };
            match r {
                Ok(()) => {
                    self.irqs = plan;
                    log::info!(
                        "vfio {}: {} of {msix} MSI-X vectors in use{}: {plan}",
                        self.bdf,
                        plan.vectors(),
                        if self.force_intx {
                            " (INTx forced)"
                        } else {
                            ""
                        }
                    );
                    return Ok(());
                }
                Err(e) => {
                    log::warn!("vfio {}: interrupts as {plan:?} failed: {e}", self.bdf);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| failed(format!("{}: no interrupt plan", self.bdf))))
    }

    fn eventfd() -> Result<EventFd, DeviceError> {
        EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError::io("eventfd", e))
    }

    fn dup(e: &EventFd) -> Result<EventFd, DeviceError> {
        e.try_clone().map_err(|e| DeviceError::io("dup eventfd", e))
    }

    /// MSI-X: the config eventfd on [`CONFIG_VECTOR`], the queues' after it (one each, or one
    /// shared), and `config_msix_vector` set (checked).
    fn setup_msix(&mut self, plan: IrqPlan) -> Result<(), DeviceError> {
        let calls: Vec<EventFd> = match plan {
            IrqPlan::PerQueue { queues } => (0..queues)
                .map(|_| Self::eventfd())
                .collect::<Result<_, _>>()?,
            _ => {
                let one = Self::eventfd()?;
                let mut calls = (1..self.queues)
                    .map(|_| Self::dup(&one))
                    .collect::<Result<Vec<_>, _>>()?;
                calls.insert(0, one);
                calls
            }
        };
        let mut fds = vec![self.config_irq.as_raw_fd()];
        match plan {
            IrqPlan::PerQueue { .. } => fds.extend(calls.iter().map(AsRawFd::as_raw_fd)),
            _ => fds.push(calls[0].as_raw_fd()),
        }
        self.set_irqs(sys::VFIO_PCI_MSIX_IRQ_INDEX, &fds)?;
        if let Err(e) = self.transport.set_config_msix_vector(plan.config_vector()) {
            let _ = self.set_irqs(sys::VFIO_PCI_MSIX_IRQ_INDEX, &[]);
            return Err(e);
        }
        self.calls = calls;
        Ok(())
    }

    /// INTx: one level-triggered line for everything. VFIO masks it when it fires; a thread
    /// reads the ISR (which deasserts the line), signals the queues' eventfds on a queue
    /// interrupt and the config eventfd on a configuration change, and unmasks.
    fn setup_intx(&mut self) -> Result<(), DeviceError> {
        if self.irq_count(sys::VFIO_PCI_INTX_IRQ_INDEX) == 0 {
            return Err(failed(format!("{}: neither MSI-X nor INTx", self.bdf)));
        }
        let calls: Vec<EventFd> = (0..self.queues)
            .map(|_| Self::eventfd())
            .collect::<Result<_, _>>()?;
        // No vector: with MSI-X disabled the device raises INTx and sets the ISR.
        let _ = self
            .transport
            .set_config_msix_vector(IrqPlan::Intx.config_vector());
        let cmd = self.config_read16(pci::PCI_COMMAND)?;
        self.config_write16(pci::PCI_COMMAND, cmd & !pci::PCI_COMMAND_INTX_DISABLE)?;
        let line = Self::eventfd()?;
        set_irqs_on(
            &self.device,
            sys::VFIO_PCI_INTX_IRQ_INDEX,
            sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            &[line.as_raw_fd()],
        )?;
        let stop = Self::eventfd()?;
        let transport = Arc::clone(&self.transport);
        let device = Arc::clone(&self.device);
        let targets = IntxTargets {
            calls: calls.iter().map(Self::dup).collect::<Result<_, _>>()?,
            config: Self::dup(&self.config_irq)?,
        };
        let stop2 = Self::dup(&stop)?;
        let thread = std::thread::Builder::new()
            .name(format!("vfio-intx-{}", self.bdf))
            .spawn(move || intx_loop(&device, &transport, &line, &stop2, &targets))
            .map_err(|e| DeviceError::io("spawn INTx thread", e))?;
        self.intx = Some(IntxForwarder {
            stop,
            thread: Some(thread),
        });
        self.calls = calls;
        Ok(())
    }

    /// The device request interrupt on an eventfd, when the function has one (vfio-pci always
    /// reports it). Without it the kernel still waits for us on unbind, but nothing tells us.
    pub(super) fn setup_removal(&self) -> Option<EventFd> {
        if self.irq_count(sys::VFIO_PCI_REQ_IRQ_INDEX) == 0 {
            log::warn!(
                "vfio {}: no device request interrupt: an unbind will wait for the process to \
                 close the device unannounced",
                self.bdf
            );
            return None;
        }
        let wired = Self::eventfd().and_then(|fd| {
            self.set_irqs(sys::VFIO_PCI_REQ_IRQ_INDEX, &[fd.as_raw_fd()])
                .map(|()| fd)
        });
        match wired {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!("vfio {}: device request interrupt: {e}", self.bdf);
                None
            }
        }
    }

    pub(super) fn set_irqs(&self, index: u32, fds: &[i32]) -> Result<(), DeviceError> {
        let flags = if fds.is_empty() {
            sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_TRIGGER
        } else {
            sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER
        };
        set_irqs_on(&self.device, index, flags, fds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_plans_follow_linux_vp_find_vqs() {
        use IrqPlan::{Intx, PerQueue, Shared};
        // Enough vectors for config + rx + tx + event: one each.
        assert_eq!(
            IrqPlan::candidates(4, 3, false),
            [PerQueue { queues: 3 }, Shared, Intx]
        );
        assert_eq!(
            IrqPlan::candidates(64, 3, false),
            [PerQueue { queues: 3 }, Shared, Intx]
        );
        // QEMU's vhost-user-vsock-pci: a 3-entry table for 3 queues + config: shared.
        assert_eq!(IrqPlan::candidates(3, 3, false), [Shared, Intx]);
        // Without an event queue 3 vectors are enough for one each.
        assert_eq!(
            IrqPlan::candidates(3, 2, false),
            [PerQueue { queues: 2 }, Shared, Intx]
        );
        // One vector cannot hold config and queues apart: INTx (Linux does the same).
        assert_eq!(IrqPlan::candidates(1, 3, false), [Intx]);
        assert_eq!(IrqPlan::candidates(0, 3, false), [Intx]);
        // Forced INTx ignores the table.
        assert_eq!(IrqPlan::candidates(64, 3, true), [Intx]);
    }

    #[test]
    fn vector_assignment_per_plan() {
        let per = IrqPlan::PerQueue { queues: 3 };
        assert_eq!(per.vectors(), 4);
        assert_eq!(per.config_vector(), 0);
        assert_eq!(
            (0..4).map(|q| per.queue_vector(q)).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(3), None]
        );
        assert_eq!(
            per.to_string(),
            "config on vector 0, rx on 1, tx on 2, event on 3"
        );
        let two = IrqPlan::PerQueue { queues: 2 };
        assert_eq!(two.vectors(), 3);
        assert_eq!(two.queue_vector(2), None);
        let shared = IrqPlan::Shared;
        assert_eq!(shared.vectors(), 2);
        assert_eq!(shared.config_vector(), 0);
        assert!((0..3).all(|q| shared.queue_vector(q) == Some(1)));
        assert!(shared.to_string().contains("every queue on vector 1"));
        let intx = IrqPlan::Intx;
        assert_eq!(intx.vectors(), 0);
        assert_eq!(intx.config_vector(), VIRTIO_MSI_NO_VECTOR);
        assert!((0..3).all(|q| intx.queue_vector(q).is_none()));
    }

    /// Drains `e` and says whether it had been signalled.
    fn fired(e: &EventFd) -> bool {
        e.read().is_ok()
    }

    #[test]
    fn intx_honours_both_isr_bits() {
        let mk = || EventFd::new(EFD_NONBLOCK).unwrap();
        let calls = [mk(), mk(), mk()];
        let config = mk();
        // Bit 0: every queue (the ISR does not say which), not the config.
        dispatch_isr(ISR_QUEUE, &calls, &config);
        assert!(calls.iter().all(fired));
        assert!(!fired(&config));
        // Bit 1: the config only.
        dispatch_isr(ISR_CONFIG, &calls, &config);
        assert!(calls.iter().all(|c| !fired(c)));
        assert!(fired(&config));
        // Both at once; and a spurious 0 (shared line) signals nothing.
        dispatch_isr(ISR_QUEUE | ISR_CONFIG, &calls, &config);
        assert!(calls.iter().all(fired) && fired(&config));
        dispatch_isr(0, &calls, &config);
        assert!(calls.iter().all(|c| !fired(c)) && !fired(&config));
    }

    #[test]
    fn more_eventfds_than_an_irq_set_holds_are_refused_before_the_ioctl() {
        // /dev/null is no VFIO device: an ioctl reached on it would fail with ENOTTY (an
        // `Io` error), so the typed error below proves the call stopped before it.
        let null = File::open("/dev/null").unwrap();
        for count in [sys::IRQ_SET_ROOM + 1, 64] {
            // Fd numbers only: nothing is opened, and none reaches the kernel.
            let fds = vec![-1; count];
            let flags = sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER;
            match set_irqs_on(&null, sys::VFIO_PCI_MSIX_IRQ_INDEX, flags, &fds) {
                Err(DeviceError::TooManyEventfds { op, count: c, max }) => {
                    assert_eq!(op, "VFIO_DEVICE_SET_IRQS");
                    assert_eq!((c, max), (count, sys::IRQ_SET_ROOM));
                }
                r => panic!("{count} eventfds: expected TooManyEventfds, got {r:?}"),
            }
        }
    }
}
