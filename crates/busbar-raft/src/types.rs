//! The openraft type configuration and the aliases the rest of Busbar uses.

use busbar_types::{Command, CommandResponse, NodeId};
pub use openraft::BasicNode;

use crate::snapshot::SnapshotData;

openraft::declare_raft_types!(
    /// Busbar's Raft types: application entries are [`Command`]s, snapshots are manifests of the
    /// store ([`SnapshotData`]).
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StorageIOError = openraft::StorageIOError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, BasicNode>;
pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, BasicNode>;
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
