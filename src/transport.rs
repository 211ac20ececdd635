//! Bytes on the wire: listeners, original destinations, detection, connects and TCP forwarding.

pub mod connect;
pub mod detect;
pub mod idle;
pub mod io;
pub mod linger;
pub mod listen;
pub mod orig_dst;
pub mod stream;
pub mod tcp;
