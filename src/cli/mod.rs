//! Subcommand implementations of the CLI, and what they share: where sysfs and `/dev` are (so the
//! operator commands can be tested on a fake tree), the pre-flight check of a device spec, and
//! the hint printed under an error.

/// `println!` that returns an error instead of panicking when stdout is gone
/// (`vdpa-vsock list | head -1`): a closed pipe becomes [`StdoutClosed`], on which `main` exits
/// quietly, like a Unix tool killed by SIGPIPE (the process ignores SIGPIPE, as Rust sets it up).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::stdout_error)
    }};
}

pub(crate) mod bench;
pub(crate) mod inspect;
pub(crate) mod list;
pub(crate) mod serve;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use nix::unistd::AccessFlags;
use vdpa_vsock::device::DeviceSpec;

/// Our standard output was closed by its reader (a pipe into `head`, say): not worth a message.
/// No cause. (The CLI's other errors are `anyhow` ones: a context says what was being done and
/// leaves the cause to the chain; an `anyhow!` message that holds a cause's text has no source.)
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// What a failed write to stdout becomes: [`StdoutClosed`] for a closed pipe, else the error.
pub(crate) fn stdout_error(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

/// Where the kernel's sysfs and device nodes are. `/sys` and `/dev` unless overridden by
/// `--sysfs-root`/`--dev-root` or the `SYSFS_ROOT`/`DEV_ROOT` environment variables (tests).
#[derive(Debug, Clone)]
pub(crate) struct Roots {
    /// Stands for `/sys`.
    pub(crate) sys: PathBuf,
    /// Stands for `/dev`.
    pub(crate) dev: PathBuf,
}

impl Roots {
    /// Flags first, then the environment, then the real paths.
    pub(crate) fn new(sys: Option<PathBuf>, dev: Option<PathBuf>) -> Roots {
        let pick = |flag: Option<PathBuf>, var: &str, default: &str| {
            flag.or_else(|| std::env::var_os(var).map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Roots {
            sys: pick(sys, "SYSFS_ROOT", "/sys"),
            dev: pick(dev, "DEV_ROOT", "/dev"),
        }
    }

    /// `rel` (e.g. `bus/pci/devices`) under the sysfs root.
    pub(crate) fn sys(&self, rel: &str) -> PathBuf {
        self.sys.join(rel)
    }

    /// `rel` (e.g. `vhost-vsock`) under the device root.
    pub(crate) fn dev(&self, rel: &str) -> PathBuf {
        self.dev.join(rel)
    }

    /// Whether these are the real `/sys` and `/dev` (external tools are only asked then).
    pub(crate) fn is_real(&self) -> bool {
        self.sys == Path::new("/sys") && self.dev == Path::new("/dev")
    }
}

/// Why a device node can't be used by this process, or `None` when it can be opened read-write.
pub(crate) fn node_problem(path: &Path) -> Option<String> {
    if std::fs::symlink_metadata(path).is_err() {
        return Some(format!("{} does not exist", path.display()));
    }
    match nix::unistd::access(path, AccessFlags::R_OK | AccessFlags::W_OK) {
        Ok(()) => None,
        Err(e) => Some(format!(
            "no read-write access to {} ({e}); join group vsock, see udev/README.md",
            path.display()
        )),
    }
}

/// Check what can be checked before opening `spec`, so a new user gets "no such node" rather
/// than a backend error: the node (or PCI function) exists and is readable and writable.
pub(crate) fn preflight(spec: &DeviceSpec, roots: &Roots) -> Result<()> {
    let node = match spec {
        DeviceSpec::Sim | DeviceSpec::Auto => return Ok(()),
        DeviceSpec::VhostVdpa { path } | DeviceSpec::VhostVsock { path, .. } => PathBuf::from(path),
        DeviceSpec::Vfio { bdf, .. } => {
            let dir = roots.sys("bus/pci/devices").join(bdf);
            if !dir.exists() {
                return Err(anyhow!(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no PCI function {bdf} ({} is missing)", dir.display())
                )));
            }
            return Ok(());
        }
    };
    match std::fs::metadata(&node) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(anyhow!(io::Error::new(
                io::ErrorKind::NotFound,
                format!("device node {} does not exist", node.display())
            )));
        }
        Err(e) => {
            return Err(anyhow!(io::Error::new(
                e.kind(),
                format!("cannot look at device node {}: {e}", node.display())
            )));
        }
        Ok(m) if !m.file_type().is_char_device() => {
            let what = if m.is_dir() {
                "a directory"
            } else if m.is_file() {
                "a regular file"
            } else {
                "not a device"
            };
            return Err(anyhow!(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is {what}, not a character device: expected a node such as /dev/vhost-vdpa-0 or /dev/vhost-vsock",
                    node.display()
                )
            )));
        }
        Ok(_) => {}
    }
    if let Some(p) = node_problem(&node) {
        return Err(anyhow!(io::Error::new(io::ErrorKind::PermissionDenied, p)));
    }
    Ok(())
}

/// A one-line hint for the errors a new user meets, found anywhere in the error's chain.
pub(crate) fn hint(err: &anyhow::Error) -> Option<&'static str> {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<io::Error>() {
            if e.raw_os_error() == Some(libc::ENOTTY) {
                return Some("that node is not a vhost device of this kind (vhost-vdpa: /dev/vhost-vdpa-N, vhost-vsock: /dev/vhost-vsock); `vdpa-vsock list` shows them");
            }
            match e.kind() {
                io::ErrorKind::InvalidInput => {
                    return Some("`vdpa-vsock list` shows the device nodes this machine has")
                }
                io::ErrorKind::NotFound => {
                    return Some("`vdpa-vsock list` shows the devices this machine has")
                }
                io::ErrorKind::PermissionDenied => {
                    return Some("add yourself to group vsock (udev/README.md) or run as root")
                }
                io::ErrorKind::AddrInUse => {
                    return Some("another listener holds that port (a repeated --listen-port, or another program)")
                }
                io::ErrorKind::ConnectionRefused => {
                    return Some("nothing listens there; the sim host serves 7 (echo), 8 (seqpacket echo), 9 (discard)")
                }
                io::ErrorKind::TimedOut => {
                    return Some("the peer did not answer; is the device running?")
                }
                _ => {}
            }
        }
    }
    None
}
