//! The head's gRPC edge: the services, and the server that runs them on a bound listener.

pub mod auth;
pub mod cluster;
pub mod conns;
pub mod declared;
pub mod deployments;
pub mod planner;
pub mod serve;
pub mod session;
pub mod standby;
pub mod streams;
pub mod tokens;
