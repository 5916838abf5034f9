//! Code generated from the `.proto` files in the repository's `proto/` folder, plus [`partition`]:
//! the key-to-partition rule, which is part of the wire contract. Conversions between wire and
//! domain types belong to the crates that use both.

pub mod partition;

/// The public API (`busbar.v1`).
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("busbar.v1");
}

/// The internal node-to-node Raft transport (`busbar.raft.v1`).
pub mod raft {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("busbar.raft.v1");
}

/// Metadata keys carrying the numbered error code and the leader's address on an error status.
pub const ERROR_CODE_KEY: &str = "busbar-error-code";
pub const LEADER_ADDR_KEY: &str = "busbar-leader-addr";
