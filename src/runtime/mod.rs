//! What a runtime is, on both sides of the wire: wire types, the handle trait, the engine.

pub mod engine;
pub mod events_ws;
pub mod frames;
pub mod handle;
pub mod remote;
pub mod server;
pub mod types;
