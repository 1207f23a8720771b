//! The driver: event loop and socket API.
