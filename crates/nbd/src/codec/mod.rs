//! The NBD protocol as a pure codec: bytes in, validated types out, replies encoded into
//! buffers. Nothing in this module tree may perform I/O, spawn threads, or read the clock;
//! the server ([`crate::NbdServer`]) drives it.

pub mod error;
pub mod negotiate;
pub mod option;
pub mod reply;
pub mod request;
pub mod wire;
