//! A Busbar node: the gRPC services (client API, cluster administration, Raft transport) on one
//! port, cluster formation (`--peers` / `--join`), and the node's lifecycle up to a graceful stop.
//!
//! Entry point: [`server::run`] takes an already-bound listener and a shutdown future, so tests bind
//! port 0 and stop nodes cleanly; [`server::spawn`] wraps it for in-process clusters.

// openraft's error types (StorageError, RaftError, Fatal) are large by design; they are returned,
// not stored, so boxing them would only add allocations on the error path.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod apply_version;
pub mod bootstrap;
pub mod cluster;
pub mod config;
pub mod error;
pub mod groups;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod propose;
pub mod read_index;
pub mod retention;
pub mod server;

pub use config::{Limits, ServerConfig};
pub use server::{run, spawn, ServerHandle};
