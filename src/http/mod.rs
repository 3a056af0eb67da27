//! The one HTTP stack both servers (gateway and runtime) use.

pub mod body;
pub mod browsers;
pub mod error;
pub mod guard;
mod pipelining;
pub(crate) mod poller;
pub mod router;
pub mod server;
pub mod sockets;
pub mod watchdog;
pub mod websocket;

pub use body::Incoming;
pub use error::ApiError;
pub use server::{HttpMetrics, HttpServer, Reply, Service};
