//! Apply versions: which rules the state machine applies an entry with.
//!
//! Every replica must turn the same log into the same state. A build that changes what apply does
//! with an entry would break that while a cluster runs two builds (a rolling upgrade), and even
//! after a full-stop upgrade, because each node replays the entries past its own applied position
//! with the new rules while the others applied them with the old. So a change of rules takes effect
//! at a point of the log: the entry [`busbar_types::Command::SetApplyVersion`], which the leader
//! proposes only once every member runs a build that knows the new version
//! (`busbar_server::apply_version`). Before that entry every node applies the old rules, whatever
//! its build; from it on, the new ones.
//!
//! The versions:
//! - **1**: the rules before versions existed. A store that never saw the command is at 1 (a new
//!   store too: it may be about to replay a log written at 1).
//! - **2**: idempotent-producer states are bounded (`crate::producers`): past the bound the least
//!   recently used are evicted, and a producer with no state in a partition may only start at
//!   sequence 0 (UNKNOWN_PRODUCER_ID otherwise). Entering 2 restamps every state held in key order,
//!   so that the stamps every node assigned before (by its own build's history) do not matter.
//! - **3**: a partition's last batch takes in the next records while both together stay within
//!   `TAIL_MERGE_BYTES` (`crate::topic_store`): one-record requests at a low rate no longer make
//!   a stored batch (and a sled reference) each. Batch boundaries move, so every node must do it
//!   from the same entry on.
//! - **4**: the leader encodes produced records in [`RecordEncoding::Varint`] (8 bytes per small
//!   record rather than bincode's 25; `busbar_types::record_batch`). Apply itself is unchanged
//!   but for one rule that keeps batch boundaries a function of the log: a stored batch holds one
//!   encoding, so an entry in the other encoding starts a new batch (it is neither merged into
//!   the batch pending in the apply call nor into the partition's last batch). Entries proposed
//!   before the leader applied this version are still in bincode, so both arrive for a while. A
//!   varint entry before this version (no leader proposes one) is refused, never stored: a node
//!   of an older build could not read it.

use busbar_types::RecordEncoding;

/// The version of a store that never applied [`busbar_types::Command::SetApplyVersion`].
pub const LEGACY_APPLY_VERSION: u32 = 1;

/// The highest version this build can apply. A log that asks for a higher one stops this node's
/// state machine (it cannot apply the entries that follow the way the others will).
pub const APPLY_VERSION: u32 = 4;

/// From this version on, producer states are bounded and a stateless producer must start at 0.
pub(crate) const BOUNDED_PRODUCERS: u32 = 2;

/// From this version on, small batches are merged into the partition's last batch.
pub(crate) const MERGED_TAILS: u32 = 3;

/// From this version on, leaders encode records in [`RecordEncoding::Varint`].
pub const VARINT_RECORDS: u32 = 4;

/// The encoding a leader gives the records it proposes while its state machine applies at
/// `version`: every member's build reads it (see the module documentation).
pub fn record_encoding(version: u32) -> RecordEncoding {
    if version >= VARINT_RECORDS {
        RecordEncoding::Varint
    } else {
        RecordEncoding::Bincode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaders_encode_in_varint_from_version_4_on() {
        for v in [0, LEGACY_APPLY_VERSION, BOUNDED_PRODUCERS, MERGED_TAILS] {
            assert_eq!(record_encoding(v), RecordEncoding::Bincode, "version {v}");
        }
        assert_eq!(record_encoding(VARINT_RECORDS), RecordEncoding::Varint);
        assert_eq!(record_encoding(APPLY_VERSION), RecordEncoding::Varint);
    }
}
