//! worker-gateway: one HTTP + WebSocket API over many worker runtimes.

pub mod check;
pub mod clock;
pub mod config;
pub mod files;
pub mod gateway;
pub mod http;
pub mod memory;
pub mod pool;
pub mod runtime;
pub mod secret;
pub mod tls;
pub mod turns;
