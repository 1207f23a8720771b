//! The sans-IO vsock protocol engine.
#![forbid(unsafe_code)]
