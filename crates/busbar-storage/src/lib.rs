//! Busbar's storage layer: everything that touches disk, and nothing that knows about Raft or gRPC.
//!
//! - [`wal`]: the Raft write-ahead log — append-only segment files, crc-framed, group-committed with
//!   fdatasync. Stores opaque entries; the replication layer decides what they contain.
//! - [`topic_store`]: the state machine's data in sled — topics, partitions, record batches — and the
//!   deterministic apply of [`busbar_types::Command`]s to it, plus streamed snapshot export/import.
//! - [`batch_files`]: the append-only files holding the stored batches (sled holds references).
//! - [`snapshot_manifest`]: a snapshot held as the metadata naming batches already in the store.
//! - [`checked`]: the crc32 envelope every stored value carries.
//!
//! `docs/storage.md` says what is durable when; read it before changing a write path.

pub mod apply_version;
pub mod batch;
pub mod batch_files;
pub mod checked;
pub mod durable;
pub mod error;
pub mod group_assign;
pub mod groups;
mod producers;
pub mod snapshot_file;
pub mod snapshot_manifest;
pub mod topic_store;
pub mod wal;

pub use error::StoreError;
pub use snapshot_manifest::SnapshotManifest;
pub use topic_store::{
    CompactionSummary, FetchResult, GroupPartitionView, GroupView, MemberView, PartitionOffsets, TopicInfo, TopicStore,
    TopicStoreOptions, COMPACT_MAX_LIVE_PERCENT, COMPACT_MAX_SPACE_PERCENT,
};
