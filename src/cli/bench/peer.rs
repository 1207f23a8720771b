//! `--peer CID:PORT[,ECHO_PORT]`: where the sink and the echo service of a bench run are.
//!
//! The sink reads and discards; the one-way rows know it has consumed every byte when, after
//! our `shutdown(Write)`, it closes its end and we read EOF (see [`super::work::finish_sink`]).
//! The echo service writes back every byte it reads, and closes when we close.

use std::fmt;
use std::str::FromStr;

use vdpa_vsock::device::DeviceSpec;
use vdpa_vsock::driver::VsockAddr;

/// The parsed `--peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    /// The sink of the one-way rows.
    pub(crate) sink: VsockAddr,
    /// The echo service of the ping-pong and scale rows (same CID as the sink), if any.
    pub(crate) echo: Option<VsockAddr>,
}

impl FromStr for Peer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const FORM: &str = "expected CID:PORT[,ECHO_PORT], e.g. 2:1234,1235";
        let (addr, echo) = match s.split_once(',') {
            Some((a, e)) => (a, Some(e)),
            None => (s, None),
        };
        let sink: VsockAddr = addr.parse().map_err(|e: String| format!("{FORM}: {e}"))?;
        let echo = echo
            .map(|p| {
                p.parse::<u32>()
                    .map(|port| VsockAddr::new(sink.cid, port))
                    .map_err(|_| format!("{FORM}: bad echo port {p:?} in {s:?}"))
            })
            .transpose()?;
        if echo.is_some_and(|e| e.port == sink.port) {
            return Err(format!(
                "{FORM}: the sink and the echo service need different ports, found {s:?}"
            ));
        }
        Ok(Peer { sink, echo })
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.sink)?;
        if let Some(e) = self.echo {
            write!(f, ",{}", e.port)?;
        }
        Ok(())
    }
}

/// The device kind as the rows name it: `vdpa-vsock sim`, `vdpa-vsock vhost-vsock`.
pub(crate) fn device_kind(spec: &DeviceSpec) -> &'static str {
    match spec {
        DeviceSpec::Sim => "sim",
        DeviceSpec::VhostVdpa { .. } => "vhost-vdpa",
        DeviceSpec::Vfio { .. } => "vfio",
        DeviceSpec::VhostVsock { .. } => "vhost-vsock",
        DeviceSpec::Auto => "auto",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sink_and_echo() {
        let p: Peer = "2:1234,1235".parse().unwrap();
        assert_eq!(p.sink, VsockAddr::new(2, 1234));
        assert_eq!(p.echo, Some(VsockAddr::new(2, 1235)));
        assert_eq!(p.to_string(), "2:1234,1235");
        let p: Peer = "2:9".parse().unwrap();
        assert_eq!(p.echo, None);
    }

    #[test]
    fn rejects_bad_forms() {
        for bad in ["", "2", "2:", "x:9", "2:9,", "2:9,x", "2:9,9", "2:9,7,8"] {
            let e = bad.parse::<Peer>().unwrap_err();
            assert!(e.contains("CID:PORT[,ECHO_PORT]"), "{bad:?}: {e}");
        }
    }
}
