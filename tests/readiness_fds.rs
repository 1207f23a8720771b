//! Readiness descriptors cost nothing until asked for, and go with their sockets. Alone in
//! its test binary: it counts the process's open descriptors, which other tests would change.

use std::os::fd::AsRawFd;

use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::sim::{SimConfig, ECHO_PORT};

#[test]
fn descriptors_are_made_only_when_asked_and_closed_with_the_socket() {
    let (d, _host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).unwrap();
    // Every descriptor of the driver and the sim (their event loops' epolls included) is open
    // once `open_sim` returns: nothing else may come or go below.
    let fds_before = open_fds();
    let plain: Vec<_> = (0..20)
        .map(|_| d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap())
        .collect();
    assert_eq!(
        open_fds(),
        fds_before,
        "a socket never polled has no descriptor"
    );
    for s in &plain {
        let _ = s.as_raw_fd();
        assert_eq!(s.as_raw_fd(), s.as_raw_fd(), "one descriptor per socket");
    }
    assert_eq!(open_fds(), fds_before + 40, "a socketpair each");
    drop(plain);
    assert_eq!(open_fds(), fds_before, "closed with their sockets");
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
