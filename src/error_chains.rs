//! Every error variant that has a cause, printed as the CLI prints errors (anyhow's `{:#}`:
//! the message, then each `source()`, `: `-separated): each cause's text appears once, none is
//! lost, and `{}` alone shows the causes its type's rule puts in the message (the crate docs,
//! "Errors and their causes").
//!
//! A new variant fails to compile here until it is sorted into has-a-cause or not (the
//! exhaustive matches below), and one with a cause needs a sample.

use std::error::Error;
use std::io;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionError;
use vm_memory::{GuestMemoryError, GuestRegionCollectionError, VolatileMemoryError};

use crate::device::DeviceError;
use crate::dma::DmaError;
use crate::driver::DriverError;
use crate::packet::Error as PacketError;
use crate::pagemap::PagemapError;
use crate::runtime::{ConnReset, CopyError, Ended, EventQueueError, ResetCause, TransportError};
use crate::virtq::QueueError;

/// One error value and the distinct texts of its causes: those its message holds (shown by
/// `{}` too) and those only its sources hold (shown by `{:#}` alone).
struct Sample {
    name: &'static str,
    error: anyhow::Error,
    in_message: &'static [&'static str],
    in_sources: &'static [&'static str],
}

fn sample<E: Error + Send + Sync + 'static>(
    name: &'static str,
    error: E,
    in_message: &'static [&'static str],
    in_sources: &'static [&'static str],
) -> Sample {
    Sample {
        name,
        error: anyhow::Error::new(error),
        in_message,
        in_sources,
    }
}

/// An OS error whose text is `text`.
fn os(text: &str) -> io::Error {
    io::Error::other(text.to_string())
}

fn device_failed(text: &str) -> DeviceError {
    DeviceError::Failed(text.to_string())
}

fn removed(how: &str) -> DeviceError {
    DeviceError::Removed {
        device: "vhost-vdpa:/dev/vhost-vdpa-7".into(),
        how: how.into(),
    }
}

fn broken(reason: &str) -> QueueError {
    QueueError::Broken {
        reason: reason.into(),
    }
}

fn dma_mmap(text: &str) -> DmaError {
    DmaError::Mmap {
        size: 4096,
        flags: "MAP_SHARED",
        source: MmapRegionError::Mmap(os(text)),
    }
}

/// Whether a variant has a cause (exhaustive: a new variant must be sorted here).
fn device_caused(e: &DeviceError) -> bool {
    match e {
        DeviceError::Io { .. } | DeviceError::Hinted { .. } | DeviceError::Dma(_) => true,
        DeviceError::InvalidSpec { .. }
        | DeviceError::MissingFeature { .. }
        | DeviceError::NoSuchQueue { .. }
        | DeviceError::BadQueueSize { .. }
        | DeviceError::NotReady(_)
        | DeviceError::Failed(_)
        | DeviceError::TooManyEventfds { .. }
        | DeviceError::Removed { .. }
        | DeviceError::NotADeviceNode { .. } => false,
    }
}

fn dma_caused(e: &DmaError) -> bool {
    match e {
        DmaError::Mmap { .. } | DmaError::GuestMemory { .. } | DmaError::Physical(_) => true,
        DmaError::InvalidSize { .. }
        | DmaError::MisalignedIova { .. }
        | DmaError::IovaOverflow { .. }
        | DmaError::Exhausted { .. }
        | DmaError::InvalidAlignment(_)
        | DmaError::ZeroSize
        | DmaError::OutOfRange { .. } => false,
    }
}

fn queue_caused(e: &QueueError) -> bool {
    match e {
        QueueError::Dma(_) | QueueError::Memory(_) => true,
        QueueError::Broken { .. }
        | QueueError::Full { .. }
        | QueueError::InvalidSize(_)
        | QueueError::EmptyChain
        | QueueError::WritableBeforeReadable { .. }
        | QueueError::BufferOutOfRange { .. } => false,
    }
}

fn packet_caused(e: &PacketError) -> bool {
    match e {
        PacketError::InvalidMemoryAccess(_) | PacketError::InvalidVolatileAccess(_) => true,
        PacketError::DescriptorChainTooShort(_)
        | PacketError::DescriptorLengthTooSmall { .. }
        | PacketError::DescriptorLengthTooLong { .. }
        | PacketError::FragmentedMemory { .. }
        | PacketError::InvalidHeaderInputSize(_)
        | PacketError::InvalidHeaderLen { .. }
        | PacketError::UnexpectedReadOnlyDescriptor { .. }
        | PacketError::UnexpectedWriteOnlyDescriptor { .. } => false,
    }
}

fn pagemap_caused(e: &PagemapError) -> bool {
    match e {
        PagemapError::Io(_) => true,
        PagemapError::NotPresent { .. }
        | PagemapError::NoPermission
        | PagemapError::NotContiguous { .. } => false,
    }
}

fn transport_caused(e: &TransportError) -> bool {
    match e {
        TransportError::Queue { .. }
        | TransportError::Kick { .. }
        | TransportError::Packet { .. }
        | TransportError::ConfigRead { .. }
        | TransportError::Recovery { .. }
        | TransportError::Removed { .. }
        | TransportError::EventLoop { .. }
        | TransportError::DeviceSideQueue { .. }
        | TransportError::Copy(_)
        | TransportError::DeviceSideMemory { .. } => true,
        TransportError::UnknownToken { .. }
        | TransportError::InvalidGuestCid { .. }
        | TransportError::NeedsReset { .. }
        | TransportError::MissingPayload { .. } => false,
    }
}

fn reset_caused(e: &ResetCause) -> bool {
    match e {
        ResetCause::Recovered { .. } => true,
        ResetCause::TransportReset { .. } | ResetCause::CidChanged { .. } => false,
    }
}

fn ended_caused(e: &Ended) -> bool {
    match e {
        Ended::Failed(_) => true,
        Ended::Closed(_) | Ended::Reset(_) => false,
    }
}

fn event_queue_caused(e: &EventQueueError) -> bool {
    match e {
        EventQueueError::Queue(_) | EventQueueError::Dma(_) => true,
        EventQueueError::NoRoom { .. } => false,
    }
}

fn driver_caused(e: &DriverError) -> bool {
    match e {
        DriverError::Device { .. }
        | DriverError::Queue(_)
        | DriverError::Dma(_)
        | DriverError::Io { .. } => true,
        DriverError::InvalidConfig(_) | DriverError::NoDevice { .. } => false,
    }
}

/// One sample per variant with a cause, each cause text distinct.
fn samples() -> Vec<Sample> {
    let mut out = Vec::new();
    // The device layer.
    let device = [
        (
            "DeviceError::Io",
            DeviceError::io("VHOST_SET_OWNER", os("os-error-1")),
            &["os-error-1"][..],
        ),
        (
            "DeviceError::Hinted",
            DeviceError::hinted("open", "load the module", os("os-error-2")),
            &["os-error-2"][..],
        ),
        (
            "DeviceError::Dma",
            DeviceError::Dma(dma_mmap("os-error-3")),
            &["mmap of a 4096-byte DMA region", "os-error-3"][..],
        ),
    ];
    for (name, e, sources) in device {
        assert!(device_caused(&e), "{name}");
        out.push(sample(name, e, &[], sources));
    }
    let dma = [
        (
            "DmaError::Mmap",
            dma_mmap("os-error-4"),
            &["os-error-4"][..],
        ),
        (
            "DmaError::GuestMemory",
            DmaError::GuestMemory {
                base: 0x1000,
                source: GuestRegionCollectionError::MemoryRegionOverlap,
            },
            &["Some of the memory regions intersect with each other"][..],
        ),
        (
            "DmaError::Physical",
            DmaError::Physical(PagemapError::NotPresent { index: 4321 }),
            &["page 4321 of the range"][..],
        ),
    ];
    for (name, e, sources) in dma {
        assert!(dma_caused(&e), "{name}");
        out.push(sample(name, e, &[], sources));
    }
    let queue = [
        (
            "QueueError::Dma",
            QueueError::Dma(DmaError::ZeroSize),
            &["allocation size must be at least 1 byte"][..],
        ),
        (
            "QueueError::Memory",
            QueueError::Memory(GuestMemoryError::IOError(os("os-error-5"))),
            &["os-error-5"][..],
        ),
    ];
    for (name, e, sources) in queue {
        assert!(queue_caused(&e), "{name}");
        out.push(sample(name, e, &[], sources));
    }
    let packet = [
        (
            "packet::Error::InvalidMemoryAccess",
            PacketError::InvalidMemoryAccess(GuestMemoryError::IOError(os("os-error-6"))),
            &["os-error-6"][..],
        ),
        (
            "packet::Error::InvalidVolatileAccess",
            PacketError::InvalidVolatileAccess(VolatileMemoryError::OutOfBounds { addr: 0xbeef }),
            &["address 0xbeef is out of bounds"][..],
        ),
    ];
    for (name, e, sources) in packet {
        assert!(packet_caused(&e), "{name}");
        out.push(sample(name, e, &[], sources));
    }
    let pagemap = PagemapError::Io(os("os-error-7"));
    assert!(pagemap_caused(&pagemap));
    out.push(sample("PagemapError::Io", pagemap, &[], &["os-error-7"]));

    // The runtime.
    let transport = [
        (
            "TransportError::Queue",
            TransportError::Queue {
                queue: "rx",
                op: "reaping used buffers",
                source: broken("used-id-out-of-range"),
            },
            &[][..],
            &["used-id-out-of-range"][..],
        ),
        (
            "TransportError::Kick",
            TransportError::Kick {
                queue: "tx",
                source: device_failed("kick-refused"),
            },
            &[],
            &["kick-refused"],
        ),
        (
            "TransportError::Packet",
            TransportError::Packet {
                what: "tx buffer: writing the packet",
                source: PacketError::DescriptorChainTooShort("chain-too-short"),
            },
            &[],
            &["chain-too-short"],
        ),
        (
            "TransportError::ConfigRead",
            TransportError::ConfigRead {
                device: "sim".into(),
                source: device_failed("config-unreadable"),
            },
            &[],
            &["config-unreadable"],
        ),
        (
            // Two causes: what made the driver reset the device (in the message, with its
            // own cause), and why bringing it up failed (the source).
            "TransportError::Recovery",
            TransportError::Recovery {
                device: "sim".into(),
                cause: Box::new(TransportError::Queue {
                    queue: "rx",
                    op: "reaping used buffers",
                    source: broken("bogus-used-len"),
                }),
                source: device_failed("features-not-ok"),
            },
            &["bogus-used-len"],
            &["features-not-ok"],
        ),
        (
            "TransportError::Removed",
            TransportError::Removed {
                source: removed("node-deleted"),
            },
            &["node-deleted"],
            &[],
        ),
        (
            "TransportError::EventLoop",
            TransportError::EventLoop {
                op: "epoll_wait",
                source: os("os-error-8"),
            },
            &[],
            &["os-error-8"],
        ),
        (
            "TransportError::DeviceSideQueue",
            TransportError::DeviceSideQueue {
                queue: "rx",
                head: 3,
                source: virtio_queue::Error::InvalidChain,
            },
            &[],
            &["invalid descriptor chain"],
        ),
        (
            "TransportError::Copy",
            TransportError::Copy(CopyError {
                addr: 0xcafe_0000,
                len: 17,
            }),
            &["IOVA 0xcafe0000"],
            &[],
        ),
        (
            "TransportError::DeviceSideMemory",
            TransportError::DeviceSideMemory {
                what: "an RX header",
                addr: 0x2000,
                source: GuestMemoryError::IOError(os("os-error-9")),
            },
            &[],
            &["os-error-9"],
        ),
    ];
    for (name, e, message, sources) in transport {
        assert!(transport_caused(&e), "{name}");
        out.push(sample(name, e, message, sources));
    }
    let recovered = || ResetCause::Recovered {
        device: "sim".into(),
        cause: TransportError::Kick {
            queue: "rx",
            source: device_failed("kick-failed-before-reset"),
        },
    };
    assert!(reset_caused(&recovered()));
    out.push(sample(
        "ResetCause::Recovered",
        recovered(),
        &[],
        &["kick-failed-before-reset"],
    ));
    // The inner errors of the sockets' io::Errors: causes in the message.
    let ended = Ended::Failed(TransportError::Kick {
        queue: "tx",
        source: device_failed("kick-failed-for-good"),
    });
    assert!(ended_caused(&ended));
    out.push(sample(
        "Ended::Failed",
        io::Error::new(io::ErrorKind::ConnectionAborted, Arc::new(ended)),
        &["tx kick"],
        &["kick-failed-for-good"],
    ));
    let ended = Ended::Failed(TransportError::Removed {
        source: removed("kernel-asked-for-it-back"),
    });
    out.push(sample(
        "Ended::Failed(Removed)",
        io::Error::new(io::ErrorKind::ConnectionAborted, Arc::new(ended)),
        &["kernel-asked-for-it-back"],
        &[],
    ));
    out.push(sample(
        "ConnReset",
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            ConnReset(Arc::new(recovered())),
        ),
        &["was reset and brought up again"],
        &["kick-failed-before-reset"],
    ));
    let event_queue = [
        (
            "EventQueueError::Queue",
            EventQueueError::Queue(QueueError::InvalidSize(3)),
            &["found 3"][..],
        ),
        (
            "EventQueueError::Dma",
            EventQueueError::Dma(DmaError::InvalidAlignment(6)),
            &["found 6"][..],
        ),
    ];
    for (name, e, sources) in event_queue {
        assert!(event_queue_caused(&e), "{name}");
        out.push(sample(name, e, &[], sources));
    }

    // The sockets' bring-up, also as the io::Error `VsockDriver::open` users see.
    let driver = [
        (
            "DriverError::Device",
            DriverError::Device {
                name: "sim".into(),
                source: DeviceError::io("VHOST_GET_FEATURES", os("os-error-10")),
            },
            &["os-error-10"][..],
        ),
        (
            "DriverError::Queue",
            DriverError::Queue(QueueError::EmptyChain),
            &["at least one buffer"][..],
        ),
        (
            "DriverError::Dma",
            DriverError::Dma(DmaError::MisalignedIova { base: 0x123 }),
            &["found 0x123"][..],
        ),
        (
            "DriverError::Io",
            DriverError::Io {
                op: "eventfd",
                source: os("os-error-11"),
            },
            &["os-error-11"][..],
        ),
    ];
    for (name, e, sources) in driver {
        assert!(driver_caused(&e), "{name}");
        out.push(sample(name, e, &[], sources));
    }
    let as_io = io::Error::from(DriverError::Device {
        name: "sim".into(),
        source: DeviceError::io("VHOST_SET_OWNER", os("os-error-12")),
    });
    out.push(sample(
        "io::Error from DriverError",
        as_io,
        &[],
        &["os-error-12"],
    ));
    out
}

#[test]
fn every_cause_is_printed_once_and_where_its_rule_says() {
    for s in samples() {
        let name = s.name;
        // As the CLI prints it, and as a `{}`-only user does.
        let full = format!("{:#}", s.error);
        let plain = format!("{}", s.error);
        // No text of the chain appears twice: a message that holds its source's text would
        // show it again where the chain reaches the source.
        let links: Vec<String> = s.error.chain().map(ToString::to_string).collect();
        for (i, link) in links.iter().enumerate() {
            assert!(!link.is_empty(), "{name}: link {i} has no text: {full:?}");
            assert_eq!(
                full.matches(link.as_str()).count(),
                1,
                "{name}: link {i} ({link:?}) appears more than once in {full:?}"
            );
        }
        for cause in s.in_message.iter().chain(s.in_sources) {
            assert_eq!(
                full.matches(cause).count(),
                1,
                "{name}: cause {cause:?} should appear once in {full:?}"
            );
        }
        for cause in s.in_message {
            assert!(
                plain.contains(cause),
                "{name}: {cause:?} missing from {plain:?}"
            );
        }
        for cause in s.in_sources {
            assert!(
                !plain.contains(cause),
                "{name}: {cause:?} is a source's, but the message {plain:?} holds it too"
            );
        }
    }
}

#[test]
fn a_removal_is_named_once() {
    // What a call on a removed device fails with, as the CLI prints it.
    let ended = Ended::Failed(TransportError::Removed {
        source: removed("the kernel asked for it back (unbind or unplug)"),
    });
    let e = io::Error::new(io::ErrorKind::ConnectionAborted, Arc::new(ended));
    let line = format!(
        "{:#}",
        anyhow::Error::new(e).context("reading from the vsock stream")
    );
    assert_eq!(line.matches("removed").count(), 1, "{line}");
    assert!(
        line.ends_with(
            "vhost-vdpa:/dev/vhost-vdpa-7 was removed: the kernel asked for it back (unbind or unplug)"
        ),
        "{line}"
    );
}
