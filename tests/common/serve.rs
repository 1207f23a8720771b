//! `vdpa-vsock serve` as the integration tests run it (tests/cli.rs, tests/serve_10k.rs, each
//! with `#[path = "common/serve.rs"] mod serve;`: a file of its own, so that the tests that
//! share `common/mod.rs` but start no daemon do not carry it as dead code).

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_vdpa-vsock");

/// A running `serve`, killed on drop if still there. Its stderr goes to `serve.log` in its
/// directory ([`Daemon::log`]), where its socket `v.sock` ([`Daemon::uds`]) is too.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    dir: tempfile::TempDir,
    pub(crate) uds: PathBuf,
}

impl Daemon {
    /// Runs `cmd serve --uds DIR/v.sock extra..` and returns once the socket exists (serve
    /// binds it under another name and renames it once it accepts, so a client never meets
    /// ECONNREFUSED). Fails the test if serve exits first or is not up within `limit`.
    #[track_caller]
    pub(crate) fn start(mut cmd: Command, extra: &[&str], limit: Duration) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let child = cmd
            .arg("serve")
            .arg("--uds")
            .arg(&uds)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon { child, dir, uds };
        let t0 = Instant::now();
        while !d.uds.exists() {
            assert!(t0.elapsed() < limit, "serve did not start: {}", d.log());
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("serve exited ({st}): {}", d.log());
            }
            thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// What serve wrote to stderr so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (SIGTERM, SIGINT); returns the time until serve exited and its exit
    /// code. Fails the test if it still runs after `limit`.
    #[track_caller]
    pub(crate) fn signal_and_wait(
        &mut self,
        signal: libc::c_int,
        limit: Duration,
    ) -> (Duration, Option<i32>) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid");
        let t0 = Instant::now();
        // SAFETY: kill(2) on our own child's pid, which is not reaped before `try_wait` below
        // sees it exit; no memory is involved.
        let r = unsafe { libc::kill(pid, signal) };
        assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (t0.elapsed(), st.code());
            }
            assert!(t0.elapsed() < limit, "serve ignores signal {signal}");
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line from `s` (without the newline); what came before EOF or an error. Read byte by
/// byte, so that nothing after the line is taken.
///
/// An interrupted read is retried: a socket with a read timeout (SO_RCVTIMEO) is not restarted
/// after a signal handler runs but fails with EINTR (signal(7)), and any thread of this test
/// process can take such a signal (glibc's own, for one). Counting EINTR as the end made
/// `serve_handshake_timeout` see an empty reply at random when the whole file ran.
pub(crate) fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] != b'\n' => line.push(b[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// A field of `/proc/PID/status` (`Threads`, or `VmRSS` and `VmHWM` in kB), as a number.
#[track_caller]
pub(crate) fn proc_status(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}
