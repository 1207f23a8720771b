// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Opening a driver by device spec: the one place that knows every backend, the simulated one
//! included.
//!
//! It sits above both the sockets (`driver`) and the simulated device (`sim`): the device layer
//! opens hardware backends ([`DeviceSpec::open`]) but cannot build the simulated device, which is
//! made of the runtime and the sockets. Nothing imports this module; it only adds constructors
//! to [`VsockDriver`].

use std::io;

use crate::device::{auto_candidates, DeviceSpec};
use crate::driver::{dev_err, DriverConfig, DriverError, VsockDriver};
use crate::runtime::error_chain;
use crate::sim::{SimConfig, SimDevice, SimHost};

impl VsockDriver {
    /// Open the device named by `spec` with default settings.
    pub fn open(spec: &DeviceSpec) -> Result<Self, DriverError> {
        VsockDriver::open_with(spec, DriverConfig::default())
    }

    /// Open the device named by `spec`.
    ///
    /// For `sim` the host side's handle is not returned (its built-in services keep running):
    /// use [`VsockDriver::open_sim`] to get it.
    pub fn open_with(spec: &DeviceSpec, config: DriverConfig) -> Result<Self, DriverError> {
        if *spec == DeviceSpec::Sim {
            let sim = SimConfig {
                busy_poll: config.busy_poll,
                ..SimConfig::default()
            };
            return VsockDriver::open_sim(sim, config).map(|(driver, _host)| driver);
        }
        if *spec == DeviceSpec::Auto {
            return VsockDriver::open_auto(config);
        }
        let dev = spec.open().map_err(dev_err(&spec.to_string()))?;
        VsockDriver::from_device(dev, config)
    }

    /// `auto`: the first vsock vDPA device, then a virtio-vsock function bound to vfio-pci, then
    /// the kernel's vhost-vsock with the first free CID from [`crate::device::AUTO_FIRST_CID`].
    fn open_auto(config: DriverConfig) -> Result<Self, DriverError> {
        let mut tried = Vec::new();
        for spec in auto_candidates() {
            let is_vhost_vsock = matches!(spec, DeviceSpec::VhostVsock { .. });
            let r = spec
                .open()
                .map_err(dev_err(&spec.to_string()))
                .and_then(|dev| VsockDriver::from_device(dev, config.clone()));
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

    /// Open an in-process simulated device with the given settings: the driver, and the host
    /// side (CID 2) to listen, connect and read counters on. Dropping the [`SimHost`] does not
    /// stop the device; dropping the driver does.
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
    /// use vdpa_vsock::sim::SimConfig;
    ///
    /// let (driver, host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default())?;
    /// let listener = host.listen(5000)?; // the host (CID 2) listens
    /// let mut client = driver.connect(VsockAddr::new(2, 5000))?;
    /// let (mut server, _) = listener.accept()?;
    /// client.write_all(b"hi")?;
    /// let mut buf = [0u8; 2];
    /// server.read_exact(&mut buf)?;
    /// assert_eq!(&buf, b"hi");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_sim(sim: SimConfig, config: DriverConfig) -> Result<(Self, SimHost), DriverError> {
        let dev = SimDevice::new(sim);
        let host = dev.host();
        let driver = VsockDriver::from_device(Box::new(dev), config)?;
        Ok((driver, host))
    }
}
