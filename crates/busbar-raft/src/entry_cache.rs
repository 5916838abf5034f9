//! The newest log entries, kept decoded in memory so that replication does not read them back.
//!
//! Without it, a leader's replication task reads every entry it sends from the WAL and decodes it
//! again, once per follower: about a tenth of a leader's CPU under one-record requests. The cache
//! holds the entries of the latest appends, contiguous by index, up to a byte budget (their encoded
//! size); older entries fall out and are read from the WAL as before. It is a copy, never the
//! record of truth: truncate and purge drop the entries they remove from the log before (truncate)
//! or after (purge) the WAL does, so a reader never sees an entry the WAL no longer has.

use std::collections::VecDeque;

use crate::types::Entry;

pub struct EntryCache {
    /// Contiguous by index, oldest first, each with its encoded size.
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
    max_bytes: usize,
}

impl EntryCache {
    pub fn new(max_bytes: usize) -> Self {
        Self { entries: VecDeque::new(), bytes: 0, max_bytes }
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// Adds the entry after the newest one. An entry that does not follow it (the log moved under
    /// the cache) empties the cache first, so the cache stays contiguous.
    pub fn push(&mut self, entry: Entry, size: usize) {
        if self.last_index().is_some_and(|last| last.checked_add(1) != Some(entry.log_id.index)) {
            self.clear();
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.bytes > self.max_bytes {
            match self.entries.pop_front() {
                Some((_, s)) => self.bytes -= s,
                None => break,
            }
        }
    }

    /// Drops the entries at and after `from` (the log is truncated there).
    pub fn truncate(&mut self, from: u64) {
        while self.last_index().is_some_and(|last| last >= from) {
            if let Some((_, s)) = self.entries.pop_back() {
                self.bytes -= s;
            }
        }
    }

    /// Drops the entries at and before `upto` (the log is purged up to there).
    pub fn purge(&mut self, upto: u64) {
        while self.first_index().is_some_and(|first| first <= upto) {
            if let Some((_, s)) = self.entries.pop_front() {
                self.bytes -= s;
            }
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Appends to `out` the cached entries from `at` on, below `end`, while `out` is empty or under
    /// `max_bytes` (counted in `bytes`). Returns the index after the last one added: `at` itself
    /// when the cache does not hold `at`.
    pub fn read_into(&self, at: u64, end: u64, max_bytes: usize, out: &mut Vec<Entry>, bytes: &mut usize) -> u64 {
        let Some(first) = self.first_index() else { return at };
        if at < first {
            return at;
        }
        let Ok(skip) = usize::try_from(at - first) else { return at };
        let mut next = at;
        for (entry, size) in self.entries.iter().skip(skip) {
            if next >= end || (!out.is_empty() && *bytes >= max_bytes) {
                break;
            }
            out.push(entry.clone());
            *bytes += size;
            next += 1;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use busbar_types::Command;
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::types::LogId;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::InitProducerId),
        }
    }

    fn read(c: &EntryCache, at: u64, end: u64, max: usize) -> (Vec<u64>, u64) {
        let (mut out, mut bytes) = (Vec::new(), 0);
        let next = c.read_into(at, end, max, &mut out, &mut bytes);
        (out.iter().map(|e| e.log_id.index).collect(), next)
    }

    #[test]
    fn serves_contiguous_ranges_within_the_byte_budget() {
        let mut c = EntryCache::new(100);
        for i in 5..=9 {
            c.push(entry(i), 10);
        }
        assert_eq!(read(&c, 4, 10, 1000), (vec![], 4), "below the cache: nothing, the WAL serves it");
        assert_eq!(read(&c, 6, 9, 1000), (vec![6, 7, 8], 9));
        assert_eq!(read(&c, 5, 100, 25), (vec![5, 6, 7], 8), "stops once the budget is reached");
        assert_eq!(read(&c, 9, 100, 0), (vec![9], 10), "always at least one entry");
        assert_eq!(read(&c, 10, 100, 1000), (vec![], 10), "past the end: nothing");
    }

    #[test]
    fn old_entries_fall_out_over_budget_and_a_gap_empties_the_cache() {
        let mut c = EntryCache::new(30);
        for i in 1..=5 {
            c.push(entry(i), 10);
        }
        assert_eq!(read(&c, 1, 10, 1000), (vec![], 1), "entries 1 and 2 fell out");
        assert_eq!(read(&c, 3, 10, 1000), (vec![3, 4, 5], 6));
        c.push(entry(9), 10);
        assert_eq!(read(&c, 3, 10, 1000), (vec![], 3), "a gap: only the new entry is kept");
        assert_eq!(read(&c, 9, 10, 1000), (vec![9], 10));
    }

    #[test]
    fn truncate_and_purge_drop_what_the_log_drops() {
        let mut c = EntryCache::new(1000);
        for i in 1..=6 {
            c.push(entry(i), 10);
        }
        c.truncate(5);
        assert_eq!(read(&c, 1, 10, 1000), (vec![1, 2, 3, 4], 5));
        c.push(entry(5), 10);
        c.purge(2);
        assert_eq!(read(&c, 1, 10, 1000), (vec![], 1));
        assert_eq!(read(&c, 3, 10, 1000), (vec![3, 4, 5], 6));
        c.truncate(1);
        assert_eq!(read(&c, 3, 10, 1000), (vec![], 3), "truncated below the first entry: empty");
    }
}
