//! Networking: name resolution, upstream connections, listeners and original destinations.

pub mod attempts;
pub mod connect;
pub mod corked;
pub mod dns;
pub mod orig_dst;
pub mod text;
pub mod upstream;
