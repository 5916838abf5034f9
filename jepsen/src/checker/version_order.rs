//! The version order: what each (partition, offset) holds, as every ok send, poll and final read
//! reported it; and the two anomalies visible in it alone, `inconsistent-offsets` (one slot, two
//! values) and `duplicate` (one value, two slots).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::json;

use super::ops::{Operation, Outcome};
use super::report::{cite, Anomalies, DUPLICATE, INCONSISTENT_OFFSETS};
use crate::history::Op;

/// Where a partition's slot or a value was observed: the entries that said so.
type Witnesses = Vec<u64>;

/// Where one value was observed: (partition, offset) -> witnesses.
type Locations = BTreeMap<(u32, u64), Witnesses>;

#[derive(Debug, Default)]
pub(crate) struct VersionOrder {
    /// partition -> offset -> value -> entries that reported that value there.
    pub slots: BTreeMap<u32, BTreeMap<u64, BTreeMap<u64, Witnesses>>>,
    /// value -> (partition, offset) -> entries that reported it there.
    pub locations: HashMap<u64, Locations>,
    /// value -> entries of reads (polls, final reads) that returned it. Acks are not reads:
    /// "seen" means a consumer got it.
    pub read_by: HashMap<u64, Witnesses>,
    /// partition -> the highest offset any read returned, and the entry that returned it.
    pub max_read: BTreeMap<u32, (u64, u64)>,
}

impl VersionOrder {
    pub(crate) fn build(ops: &[Operation<'_>]) -> VersionOrder {
        let mut vo = VersionOrder::default();
        for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
            let index = o.index();
            match o.op {
                Op::Send { partition, value, offset: Some(offset) } => {
                    vo.observe(*partition, *offset, *value, index);
                }
                Op::Poll { reads, .. } => {
                    for r in reads {
                        vo.read(r.partition, r.offset, r.value, index);
                    }
                }
                Op::FinalRead { partition, reads, .. } => {
                    // Records of another partition are reported as malformed by `ops`.
                    for r in reads.iter().filter(|r| r.partition == *partition) {
                        vo.read(r.partition, r.offset, r.value, index);
                    }
                }
                _ => {}
            }
        }
        vo
    }

    fn observe(&mut self, partition: u32, offset: u64, value: u64, index: u64) {
        push_once(self.slots.entry(partition).or_default().entry(offset).or_default().entry(value).or_default(), index);
        push_once(self.locations.entry(value).or_default().entry((partition, offset)).or_default(), index);
    }

    fn read(&mut self, partition: u32, offset: u64, value: u64, index: u64) {
        self.observe(partition, offset, value, index);
        push_once(self.read_by.entry(value).or_default(), index);
        let max = self.max_read.entry(partition).or_insert((offset, index));
        if offset > max.0 {
            *max = (offset, index);
        }
    }

    /// The one value known at a slot, if the observations agree on one.
    pub(crate) fn value_at(&self, partition: u32, offset: u64) -> Option<u64> {
        let values = self.slots.get(&partition)?.get(&offset)?;
        match values.len() {
            1 => values.keys().next().copied(),
            _ => None,
        }
    }

    pub(crate) fn partitions(&self) -> BTreeSet<u32> {
        self.slots.keys().copied().collect()
    }

    pub(crate) fn check(&self, anomalies: &mut Anomalies) {
        for (partition, offsets) in &self.slots {
            for (offset, values) in offsets.iter().filter(|(_, v)| v.len() > 1) {
                let values: Vec<_> =
                    values.iter().map(|(value, seen)| json!({"value": value, "indices": cite(seen)})).collect();
                anomalies
                    .push(INCONSISTENT_OFFSETS, json!({"partition": partition, "offset": offset, "values": values}));
            }
        }
        let mut dups: Vec<(&u64, &Locations)> = self.locations.iter().filter(|(_, at)| at.len() > 1).collect();
        dups.sort_by_key(|(value, _)| **value);
        for (value, at) in dups {
            let at: Vec<_> = at
                .iter()
                .map(|((partition, offset), seen)| json!({"partition": partition, "offset": offset, "indices": cite(seen)}))
                .collect();
            anomalies.push(DUPLICATE, json!({"value": value, "locations": at}));
        }
    }
}

/// A poll that returns a record twice is one witness, not two.
fn push_once(witnesses: &mut Witnesses, index: u64) {
    if witnesses.last() != Some(&index) {
        witnesses.push(index);
    }
}
