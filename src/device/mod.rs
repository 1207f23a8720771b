//! Devices: the `VsockDevice` trait and its backends.
