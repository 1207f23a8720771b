//! `vdpa-vsock`: command-line front end.
fn main() {}
