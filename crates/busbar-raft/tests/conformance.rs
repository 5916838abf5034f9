//! openraft's storage conformance suite (`openraft::testing::Suite`) run on Busbar's real stores:
//! the segment-file WAL as the log store and the sled topic store as the state machine.

use busbar_raft::log_store::LogStore;
use busbar_raft::snapshot::SnapshotDir;
use busbar_raft::state_machine::StateMachine;
use busbar_raft::TypeConfig;
use busbar_storage::wal::{Wal, WalOptions};
use busbar_storage::{TopicStore, TopicStoreOptions};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use openraft::StorageIOError;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        // Small segments so the suite's appends, truncations and purges cross segment boundaries.
        let wal = Wal::open(&dir.path().join("log"), WalOptions { segment_bytes: 512, ..WalOptions::default() })
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let store = TopicStore::open(&dir.path().join("sm"), &TopicStoreOptions::default())
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        let snaps =
            SnapshotDir::open(&dir.path().join("snapshots")).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let sm = StateMachine::open(store, snaps)?;
        Ok((dir, LogStore::new(wal), sm))
    }
}

#[test]
#[allow(clippy::result_large_err)] // openraft's StorageError, as the suite returns it
fn openraft_storage_suite() -> Result<(), StorageError<u64>> {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info").try_init();
    Suite::test_all(Builder)
}
