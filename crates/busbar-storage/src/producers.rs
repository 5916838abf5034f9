//! Idempotent producers' state: the recent batches of each (producer id, topic, partition), which let
//! a retried batch be answered with its original offsets instead of being appended twice.
//!
//! The table is bounded from apply version 2 on (`crate::apply_version`; before it, the rules of
//! older builds: unbounded). Every producer id the cluster hands out could otherwise leave a state
//! per partition it wrote to, forever: a service that starts a fresh producer per process or per
//! job grows every node's memory without limit. Past [`TopicStoreOptions::max_producer_states`] the
//! least recently used states are evicted (Kafka expires them by time instead; a Raft state machine
//! needs a rule every node applies identically, and wall clocks differ between nodes).
//!
//! Determinism: "least recently used" is decided by a stamp each state gets when a batch touches it,
//! from a counter that only apply advances. Every node applies the same commands in the same order, so
//! every node gives the same states the same relative order and evicts the same ones. The counter's
//! absolute value may differ after a restart (it restarts above the largest stamp still held), which
//! changes no order among the states still held. The stamps are stored beside each state (sled) and
//! in the snapshot header, so a restarted node and a node installed from a snapshot order them the
//! same way too. Stamps given before the move to version 2 depend on each node's history (which
//! build applied which entry); the move restamps every state in key order.
//!
//! From version 2, a producer with no state in a partition that sends it a sequence above 0 (its
//! state was evicted, or the topic recreated) is refused with `UnknownProducerId` (Kafka's code 59):
//! without its state, the store cannot tell a retry from a new batch, and appending it could
//! duplicate a record. The Rust client sends such a batch again under a fresh producer id from
//! sequence 0 when no earlier attempt may have written it, and reports INDETERMINATE when one may
//! have. A retry of sequence 0 after its state was evicted cannot be told from a first batch and is
//! appended again: eviction is least-recently-used, so that takes more than the bound's worth of
//! other producers' states between two attempts of one batch.
//!
//! [`TopicStoreOptions::max_producer_states`]: crate::topic_store::TopicStoreOptions::max_producer_states

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::checked;
use crate::error::StoreError;

/// How many of an idempotent producer's most recent batches per partition are remembered: a retry of
/// any of them is answered with its original offsets (Kafka keeps five as well).
pub const PRODUCER_WINDOW: usize = 5;

/// The default bound on producer states per node: about 26 MiB of memory when full (a state with its
/// window is about 200 bytes). Every node of a cluster must use the same bound: eviction is part of
/// the replicated state machine.
pub const DEFAULT_MAX_PRODUCER_STATES: usize = 1 << 17;

/// An idempotent producer's recent batches in one partition: (sequence, base offset, count).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    pub recent: VecDeque<(u64, u64, u32)>,
    /// When a batch last touched this state, on the table's apply-driven clock (see the module
    /// documentation). Not in this struct's encoding, which snapshot headers written before stamps
    /// existed also use: it travels beside it ([`encode_stored`], `SnapshotHeader::producer_stamps`).
    #[serde(skip)]
    pub last_used: u64,
}

/// (producer id, topic id, partition)
pub(crate) type ProducerKey = (u64, u32, u32);

/// The producer states a store holds, and the clock that stamps them.
#[derive(Debug, Default)]
pub(crate) struct ProducerTable {
    pub states: HashMap<ProducerKey, ProducerState>,
    /// The next stamp: above every stamp in `states`.
    pub clock: u64,
}

impl ProducerTable {
    pub fn new(states: HashMap<ProducerKey, ProducerState>) -> Self {
        let clock = states.values().map(|s| s.last_used.saturating_add(1)).max().unwrap_or(0);
        Self { states, clock }
    }
}

/// The states to evict so that `live` (every state held after an apply, with its stamp) fits
/// `max`: none while it fits; otherwise the least recently used ones, down to 7/8 of `max`, so that
/// a table at its bound pays for the selection once per `max / 8` new states, not on each. Ties
/// (stamps are unique, so only in hand-built tables) go by key, so the choice never depends on
/// hash order.
pub(crate) fn choose_evictions(live: Vec<(u64, ProducerKey)>, max: usize) -> Vec<ProducerKey> {
    if live.len() <= max {
        return Vec::new();
    }
    let keep = max - max / 8;
    let excess = live.len() - keep;
    let mut live = live;
    if excess < live.len() {
        live.select_nth_unstable(excess);
    }
    live.truncate(excess);
    live.into_iter().map(|(_, k)| k).collect()
}

/// A state as stored in sled: the state's own encoding, then its stamp.
pub(crate) fn encode_stored(st: &ProducerState) -> Result<Vec<u8>, StoreError> {
    checked::seal_bincode("producer state", &(st, st.last_used))
}

/// Reads what [`encode_stored`] wrote, or a state stored before stamps existed (stamp 0: older than
/// any state touched since, which is what it is).
pub(crate) fn decode_stored(what: &dyn Fn() -> String, value: &[u8]) -> Result<ProducerState, StoreError> {
    match checked::open_bincode::<(ProducerState, u64)>(what, value) {
        Ok((mut st, stamp)) => {
            st.last_used = stamp;
            Ok(st)
        }
        Err(stamped) => checked::open_bincode::<ProducerState>(what, value).map_err(|_| stamped),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn state(stamp: u64) -> ProducerState {
        ProducerState { recent: VecDeque::from([(stamp, stamp * 10, 1)]), last_used: stamp }
    }

    #[test]
    fn nothing_is_evicted_within_the_bound_and_the_oldest_go_past_it() {
        let live: Vec<_> = (0..8u64).map(|i| (i, (i, 0, 0))).collect();
        assert!(choose_evictions(live.clone(), 8).is_empty());
        // 9 states, bound 8: down to 7, the two least recently used, whatever the input order.
        let mut live: Vec<_> = (0..9u64).rev().map(|i| (100 - i, (i, 1, 2))).collect();
        live.swap(0, 4);
        let mut out = choose_evictions(live, 8);
        out.sort();
        assert_eq!(out, vec![(7, 1, 2), (8, 1, 2)]);
        // A bound of 1 keeps one.
        assert_eq!(choose_evictions(vec![(5, (1, 0, 0)), (3, (2, 0, 0))], 1), vec![(2, 0, 0)]);
    }

    #[test]
    fn the_clock_restarts_above_every_stamp_held() {
        let t = ProducerTable::new(HashMap::from([((1, 0, 0), state(4)), ((2, 0, 0), state(9))]));
        assert_eq!(t.clock, 10);
        assert_eq!(ProducerTable::new(HashMap::new()).clock, 0);
    }

    #[test]
    fn stored_states_keep_their_stamp_and_unstamped_ones_read_as_oldest() {
        let st = state(42);
        let back = decode_stored(&|| "p".into(), &encode_stored(&st).unwrap()).unwrap();
        assert_eq!((back.recent.clone(), back.last_used), (st.recent.clone(), 42));
        let legacy = checked::seal_bincode("producer state", &st).unwrap();
        let back = decode_stored(&|| "p".into(), &legacy).unwrap();
        assert_eq!((back.recent, back.last_used), (st.recent.clone(), 0));
        // Damage is still refused.
        let mut bad = encode_stored(&st).unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode_stored(&|| "p".into(), &bad).is_err());
    }
}
