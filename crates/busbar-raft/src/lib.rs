//! Busbar's replication layer: the only crate that speaks openraft.
//!
//! It adapts the storage crate to openraft's traits ([`log_store::LogStore`] over the WAL,
//! [`state_machine::StateMachine`] over the sled topic store, with [`snapshot`]s held as manifests
//! of the store and streamed from it),
//! carries Raft messages between nodes over tonic ([`network`] is the client side,
//! [`transport::RaftTransportService`] the server side), and opens a node ([`node::RaftNode`]).
//! Keeping openraft behind this crate keeps a later move to openraft 0.10 local.

// openraft's error types (StorageError, RaftError, Fatal) are large by design; they are returned,
// not stored, so boxing them would only add allocations on the error path.
#![allow(clippy::result_large_err)]

pub mod apply_watchdog;
pub mod codec;
mod entry_cache;
pub mod log_store;
pub mod network;
pub mod node;
pub mod snapshot;
pub mod state_machine;
pub mod transport;
pub mod types;

pub use node::{RaftConfig, RaftNode};
pub use types::{BasicNode, LogId, Raft, StoredMembership, TypeConfig};
