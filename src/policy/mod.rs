//! Policy decisions, as immutable matchers compiled from config: egress (what the service
//! may call) and, for inbound, routing.

pub mod authz;
pub mod egress;
pub mod host;
pub mod route;
