//! What `/metrics` says: a node's Raft state, request counts and latencies, partition offsets,
//! consumer-group lag and bytes on disk, in the Prometheus text exposition format (0.0.4).
//!
//! Written by hand rather than through a metrics crate: everything but the request counters is read
//! fresh from the node at scrape time (Raft metrics, the topic store, the data dir), so there is no
//! registry to keep in step with topics and groups coming and going.
//!
//! Label cardinality is bounded: at most [`MAX_PARTITION_SERIES`] partitions and
//! [`MAX_GROUP_SERIES`] (group, partition) pairs are exported per scrape; past that the family is
//! cut short and `busbar_metrics_series_capped{family=...}` turns 1, so a dashboard can say so.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use busbar_raft::types::RaftMetrics;
use busbar_raft::RaftNode;
use busbar_types::NodeId;
use openraft::ServerState;

/// Most partitions whose offsets one scrape exports (two series each).
pub const MAX_PARTITION_SERIES: usize = 10_000;
/// Most (group, topic, partition) rows whose committed offset and lag one scrape exports.
pub const MAX_GROUP_SERIES: usize = 10_000;
/// Deepest directory level walked when adding up bytes on disk (sled and the WAL are shallow).
const MAX_DIR_DEPTH: usize = 4;

/// Upper bounds of the latency buckets, in seconds: from a fast local fetch to a write that waits
/// out the default 10 s write timeout or a 30 s long poll.
const BUCKETS: [f64; 15] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A latency histogram with fixed buckets, updated lock-free from request handlers.
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot counts what exceeds every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Count and latency of one kind of request.
pub struct RequestMetrics {
    latency: Histogram,
}

impl RequestMetrics {
    const fn new() -> Self {
        Self { latency: Histogram::new() }
    }

    /// Starts timing a request; the time is recorded when the returned guard drops, so one line at
    /// the top of a handler covers every return path, errors included.
    pub fn timer(&'static self) -> RequestTimer {
        RequestTimer { metrics: self, start: Instant::now() }
    }
}

pub struct RequestTimer {
    metrics: &'static RequestMetrics,
    start: Instant,
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        self.metrics.latency.observe(self.start.elapsed());
    }
}

/// The client API's request metrics.
pub struct Requests {
    pub produce: RequestMetrics,
    pub fetch: RequestMetrics,
}

/// Per process, not per node: a real deployment runs one node per process. (In-process test
/// clusters share these counters between their nodes.)
static REQUESTS: Requests = Requests { produce: RequestMetrics::new(), fetch: RequestMetrics::new() };

pub fn requests() -> &'static Requests {
    &REQUESTS
}

/// What the proposer packed into log entries (see `propose.rs`): commands over entries is how
/// many writes share one entry, and so one fdatasync per node.
pub struct Proposals {
    entries: AtomicU64,
    commands: AtomicU64,
}

impl Proposals {
    pub fn observe(&self, commands: usize) {
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.commands.fetch_add(commands as u64, Ordering::Relaxed);
    }

    /// (entries, commands) proposed so far by this process.
    pub fn totals(&self) -> (u64, u64) {
        (self.entries.load(Ordering::Relaxed), self.commands.load(Ordering::Relaxed))
    }
}

static PROPOSALS: Proposals = Proposals { entries: AtomicU64::new(0), commands: AtomicU64::new(0) };

pub fn proposals() -> &'static Proposals {
    &PROPOSALS
}

/// Builds the exposition text, one family at a time.
struct Out {
    text: String,
    errors: u64,
    /// Families cut short by a cardinality cap, reported together at the end (a family's samples
    /// must stay contiguous in the text format).
    capped: Vec<(&'static str, bool)>,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family with a single unlabelled sample.
    fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        // Read the count last-but-consistently: buckets first, then derive the count from them,
        // so `_count` always equals the `+Inf` bucket even while requests are being recorded.
        let mut cumulative = 0u64;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += h.buckets[i].load(Ordering::Relaxed);
            self.sample(&format!("{name}_bucket"), &[("le", &bound.to_string())], cumulative);
        }
        cumulative += h.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], cumulative);
        let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], cumulative);
    }
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Renders every family for `node`, whose data lives under `data_dir`. Blocking (reads the store
/// and walks the data dir): call it from `spawn_blocking`.
pub fn render(node: &RaftNode, data_dir: &Path) -> String {
    let mut out = Out { text: String::with_capacity(16 << 10), errors: 0, capped: Vec::new() };
    out.family("busbar_build_info", "gauge", "Always 1; the version of the running binary.");
    out.sample("busbar_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    out.gauge("busbar_node_id", "This node's id.", node.id);

    let m = node.raft.metrics().borrow().clone();
    render_raft(&mut out, &m);

    let r = requests();
    out.histogram(
        "busbar_produce_request_duration_seconds",
        "Unary Produce requests handled by this process, by time to answer (commit included).",
        &r.produce.latency,
    );
    out.histogram(
        "busbar_fetch_request_duration_seconds",
        "Fetch requests handled by this process, by time to answer (a long poll's wait included).",
        &r.fetch.latency,
    );

    let p = proposals();
    out.family("busbar_proposed_entries_total", "counter", "Log entries this process proposed for writes.");
    out.sample("busbar_proposed_entries_total", &[], p.entries.load(Ordering::Relaxed));
    out.family(
        "busbar_proposed_commands_total",
        "counter",
        "Writes this process proposed; several share an entry under load (commands / entries).",
    );
    out.sample("busbar_proposed_commands_total", &[], p.commands.load(Ordering::Relaxed));

    render_partitions(&mut out, node);
    render_groups(&mut out, node);
    render_storage(&mut out, node, data_dir);

    out.family("busbar_metrics_series_capped", "gauge", "1 when a family was cut short to bound label cardinality.");
    for (family, capped) in std::mem::take(&mut out.capped) {
        out.sample("busbar_metrics_series_capped", &[("family", family)], u8::from(capped));
    }
    let errors = out.errors;
    out.gauge(
        "busbar_metrics_render_errors",
        "Parts of this scrape that could not be read (see the node's log); their series are missing.",
        errors,
    );
    out.text
}

fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Learner => "learner",
        ServerState::Candidate => "candidate",
        ServerState::Shutdown => "shutdown",
    }
}

/// The highest log index a majority of every voter set holds, as the leader sees it: the commit
/// index, which openraft 0.9 does not publish in its metrics. `None` off the leader.
pub fn leader_commit_index(m: &RaftMetrics) -> Option<u64> {
    let repl = m.replication.as_ref()?;
    let mut commit: Option<u64> = None;
    // In a joint configuration an entry commits only with a majority of both voter sets.
    for voters in m.membership_config.membership().get_joint_config() {
        let mut matched: Vec<u64> = voters
            .iter()
            .map(|id| {
                if *id == m.id {
                    m.last_log_index.unwrap_or(0)
                } else {
                    repl.get(id).copied().flatten().map(|l| l.index).unwrap_or(0)
                }
            })
            .collect();
        if matched.is_empty() {
            continue;
        }
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let majority = matched[voters.len() / 2];
        commit = Some(commit.map_or(majority, |c| c.min(majority)));
    }
    commit
}

fn render_raft(out: &mut Out, m: &RaftMetrics) {
    out.gauge("busbar_raft_term", "Current Raft term.", m.current_term);
    out.family("busbar_raft_state", "gauge", "1 for this node's Raft role, 0 for the others.");
    for s in [
        ServerState::Leader,
        ServerState::Follower,
        ServerState::Candidate,
        ServerState::Learner,
        ServerState::Shutdown,
    ] {
        out.sample("busbar_raft_state", &[("state", role_name(s))], u8::from(m.state == s));
    }
    out.gauge(
        "busbar_raft_leader_id",
        "Id of the leader this node knows of; 0 when it knows none.",
        m.current_leader.unwrap_or(0),
    );
    let membership = m.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    out.gauge(
        "busbar_raft_is_voter",
        "1 if this node is a voter of the membership it holds.",
        u8::from(voters.contains(&m.id)),
    );
    out.gauge(
        "busbar_raft_voters",
        "Voters in the membership this node holds (both sets while a change is joint).",
        voters.len(),
    );
    out.gauge(
        "busbar_raft_learners",
        "Learners (nodes catching up before they vote) in the membership this node holds.",
        membership.learner_ids().count(),
    );
    out.gauge(
        "busbar_raft_membership_joint",
        "1 while a membership change is in its joint phase.",
        u8::from(membership.get_joint_config().len() > 1),
    );
    if let Some(i) = m.last_log_index {
        out.gauge("busbar_raft_last_log_index", "Index of the last entry in this node's Raft log.", i);
    }
    if let Some(l) = m.last_applied {
        out.gauge(
            "busbar_raft_applied_index",
            "Index of the last entry applied to this node's state machine.",
            l.index,
        );
    }
    if let Some(c) = leader_commit_index(m) {
        out.gauge("busbar_raft_commit_index", "On the leader: highest index held by a majority (committed).", c);
    }
    if let Some(s) = m.snapshot {
        out.gauge("busbar_raft_snapshot_index", "Last log index covered by this node's latest snapshot.", s.index);
    }
    if let Some(p) = m.purged {
        out.gauge(
            "busbar_raft_purged_index",
            "Last log index purged from this node's log (below the snapshot).",
            p.index,
        );
    }
    if let Some(ms) = m.millis_since_quorum_ack {
        out.gauge(
            "busbar_raft_millis_since_quorum_ack",
            "On the leader: milliseconds since a quorum last acknowledged it (grows when it is cut off).",
            ms,
        );
    }
    if let Some(repl) = &m.replication {
        let last = m.last_log_index.unwrap_or(0);
        out.family(
            "busbar_raft_replication_matched_index",
            "gauge",
            "On the leader: last log index each follower is known to hold.",
        );
        for (id, matched) in repl.iter().filter(|(id, _)| **id != m.id) {
            out.sample(
                "busbar_raft_replication_matched_index",
                &[("follower", &id.to_string())],
                matched.map(|l| l.index).unwrap_or(0),
            );
        }
        out.family(
            "busbar_raft_replication_lag_entries",
            "gauge",
            "On the leader: entries each follower is behind the leader's log.",
        );
        for (id, matched) in repl.iter().filter(|(id, _)| **id != m.id) {
            // Nothing matched yet: the follower is behind by the whole log.
            let lag = match matched {
                Some(l) => last.saturating_sub(l.index),
                None => last + 1,
            };
            out.sample("busbar_raft_replication_lag_entries", &[("follower", &id.to_string())], lag);
        }
    }
}

fn render_partitions(out: &mut Out, node: &RaftNode) {
    let topics = match node.store.list_topics() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: listing topics failed");
            out.errors += 1;
            return;
        }
    };
    out.gauge("busbar_topics", "Topics on this node.", topics.len());
    out.gauge(
        "busbar_partitions",
        "Partitions of every topic on this node.",
        topics.iter().map(|t| u64::from(t.partitions)).sum::<u64>(),
    );
    let mut rows = Vec::new();
    let mut capped = false;
    'topics: for t in &topics {
        match node.store.partition_offsets(t.name.as_str()) {
            Ok(parts) => {
                for p in parts {
                    if rows.len() >= MAX_PARTITION_SERIES {
                        capped = true;
                        break 'topics;
                    }
                    rows.push((t.name.to_string(), p.partition.to_string(), p.start_offset, p.end_offset));
                }
            }
            // Deleted between the listing and this read: nothing to report.
            Err(busbar_storage::StoreError::UnknownTopicOrPartition { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, topic = %t.name, "metrics: reading partition offsets failed");
                out.errors += 1;
            }
        }
    }
    out.family("busbar_partition_start_offset", "gauge", "Oldest offset a partition still holds.");
    for (t, p, start, _) in &rows {
        out.sample("busbar_partition_start_offset", &[("topic", t), ("partition", p)], start);
    }
    out.family(
        "busbar_partition_end_offset",
        "gauge",
        "Offset the next record of a partition will get (records written so far).",
    );
    for (t, p, _, end) in &rows {
        out.sample("busbar_partition_end_offset", &[("topic", t), ("partition", p)], end);
    }
    out.capped.push(("partition", capped));
}

fn render_groups(out: &mut Out, node: &RaftNode) {
    let names = match node.store.group_names() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: listing consumer groups failed");
            out.errors += 1;
            return;
        }
    };
    out.gauge("busbar_groups", "Consumer groups on this node.", names.len());
    let mut members = Vec::new();
    let mut rows = Vec::new();
    let mut capped = false;
    for name in &names {
        if rows.len() >= MAX_GROUP_SERIES || members.len() >= MAX_GROUP_SERIES {
            capped = true;
            break;
        }
        let view = match node.store.group(name) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, group = %name, "metrics: reading a consumer group failed");
                out.errors += 1;
                continue;
            }
        };
        members.push((name.clone(), view.members.len(), view.generation));
        for p in &view.partitions {
            if rows.len() >= MAX_GROUP_SERIES {
                capped = true;
                break;
            }
            rows.push((name.clone(), p.topic.clone(), p.partition.to_string(), p.committed, p.lag()));
        }
    }
    out.family("busbar_group_members", "gauge", "Members of a consumer group.");
    for (g, n, _) in &members {
        out.sample("busbar_group_members", &[("group", g)], n);
    }
    out.family("busbar_group_generation", "gauge", "A consumer group's generation (grows at every rebalance).");
    for (g, _, gen) in &members {
        out.sample("busbar_group_generation", &[("group", g)], gen);
    }
    out.family(
        "busbar_group_committed_offset",
        "gauge",
        "Offset a consumer group has committed for a partition (absent until its first commit).",
    );
    for (g, t, p, committed, _) in &rows {
        if let Some(c) = committed {
            out.sample("busbar_group_committed_offset", &[("group", g), ("topic", t), ("partition", p)], c);
        }
    }
    out.family("busbar_group_lag", "gauge", "Records of a partition a consumer group has not committed yet.");
    for (g, t, p, _, lag) in &rows {
        out.sample("busbar_group_lag", &[("group", g), ("topic", t), ("partition", p)], lag);
    }
    out.capped.push(("group", capped));
}

fn render_storage(out: &mut Out, node: &RaftNode, data_dir: &Path) {
    out.family(
        "busbar_group_offsets_moved_by_retention_total",
        "counter",
        "Committed group offsets moved up to a partition's new start by retention (records the group never consumed).",
    );
    out.sample("busbar_group_offsets_moved_by_retention_total", &[], node.store.group_offsets_moved_by_retention());
    out.family(
        "busbar_storage_bytes",
        "gauge",
        "Bytes on disk: raft_log (WAL segments), state (sled and the batch files), snapshots.",
    );
    match dir_bytes(&data_dir.join("raft-log"), 0) {
        Ok(b) => out.sample("busbar_storage_bytes", &[("kind", "raft_log")], b),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: sizing the raft log dir failed");
            out.errors += 1;
        }
    }
    match node.store.size_on_disk() {
        Ok(b) => out.sample("busbar_storage_bytes", &[("kind", "state")], b),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: sizing the state store failed");
            out.errors += 1;
        }
    }
    match dir_bytes(&data_dir.join("snapshots"), 0) {
        Ok(b) => out.sample("busbar_storage_bytes", &[("kind", "snapshots")], b),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: sizing the snapshot dir failed");
            out.errors += 1;
        }
    }
    out.family(
        "busbar_batch_file_bytes",
        "gauge",
        "Bytes of the state's batch files: all of them, and those stored batches still name (the rest is dead space compaction gives back).",
    );
    match node.store.batch_file_bytes() {
        Ok((all, live)) => {
            out.sample("busbar_batch_file_bytes", &[("kind", "all")], all);
            out.sample("busbar_batch_file_bytes", &[("kind", "live")], live);
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: sizing the batch files failed");
            out.errors += 1;
        }
    }
    let compaction = node.store.compaction_totals();
    if let Err(e) = &compaction {
        tracing::warn!(error = %e, "metrics: reading the compaction totals failed");
        out.errors += 1;
    }
    if let Ok(c) = compaction {
        out.family(
            "busbar_compaction_freed_bytes_total",
            "counter",
            "Bytes of batch files compaction emptied and unlinked since the node started.",
        );
        out.sample("busbar_compaction_freed_bytes_total", &[], c.freed_bytes);
        out.family(
            "busbar_compaction_moved_bytes_total",
            "counter",
            "Bytes of live batches compaction copied out of sparse batch files since the node started.",
        );
        out.sample("busbar_compaction_moved_bytes_total", &[], c.moved_bytes);
    }
}

/// Bytes of the files under `dir`. A file removed while we walk (segment purged, snapshot
/// replaced) is skipped, not an error.
pub(crate) fn dir_bytes(dir: &Path, depth: usize) -> std::io::Result<u64> {
    let mut total = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            if depth < MAX_DIR_DEPTH {
                total += dir_bytes(&entry.path(), depth + 1)?;
            }
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Why a node is or is not ready to serve: it is a voter, knows a leader, and has applied the log
/// to within `max_lag` entries of the leader. `leader_applied` is the leader's applied index as the
/// caller learned it (`None` if it could not ask); unused on the leader itself, which is ready once a
/// quorum acknowledged it within `quorum_ack_stale`.
pub fn readiness(
    m: &RaftMetrics,
    leader_applied: Option<u64>,
    max_lag: u64,
    quorum_ack_stale: Duration,
) -> Result<(), String> {
    if m.state == ServerState::Shutdown {
        return Err("raft is shut down".into());
    }
    if !m.membership_config.membership().voter_ids().any(|v| v == m.id) {
        return Err(format!("node {} is not a voter (not yet joined, catching up as a learner, or removed)", m.id));
    }
    let Some(leader) = m.current_leader else {
        return Err("no known leader".into());
    };
    if leader == m.id {
        if m.state != ServerState::Leader {
            return Err("this node is not yet leading".into());
        }
        return match m.millis_since_quorum_ack {
            Some(ms) if u128::from(ms) <= quorum_ack_stale.as_millis() => Ok(()),
            Some(ms) => Err(format!("leader without a quorum's acknowledgement for {ms} ms")),
            None => Err("leader not yet acknowledged by a quorum".into()),
        };
    }
    let Some(leader_applied) = leader_applied else {
        return Err(format!("cannot reach leader {leader} to compare progress"));
    };
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    if applied.saturating_add(max_lag) < leader_applied {
        return Err(format!("catching up: applied {applied}, leader {leader} applied {leader_applied}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use busbar_raft::BasicNode;
    use openraft::{CommittedLeaderId, LogId, Membership, StoredMembership};

    use super::*;

    const STALE: Duration = Duration::from_secs(2);

    fn log_id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    /// Node `id`'s metrics in a cluster whose voter sets are `configs`.
    fn metrics(id: NodeId, configs: Vec<BTreeSet<NodeId>>) -> RaftMetrics {
        let nodes: BTreeMap<NodeId, BasicNode> =
            configs.iter().flatten().map(|n| (*n, BasicNode::new(format!("h{n}:1")))).collect();
        let mut m = RaftMetrics::new_initial(id);
        m.membership_config = Arc::new(StoredMembership::new(Some(log_id(1)), Membership::new(configs, nodes)));
        m
    }

    #[test]
    fn readiness_needs_a_voter_a_leader_and_progress() {
        let mut m = metrics(2, vec![BTreeSet::from([1, 2, 3])]);
        assert!(readiness(&m, None, 10, STALE).unwrap_err().contains("no known leader"));
        m.current_leader = Some(1);
        assert!(readiness(&m, None, 10, STALE).unwrap_err().contains("cannot reach leader"));
        m.last_applied = Some(log_id(100));
        assert!(readiness(&m, Some(200), 10, STALE).unwrap_err().contains("catching up"));
        assert_eq!(readiness(&m, Some(110), 10, STALE), Ok(()));
        assert_eq!(readiness(&m, Some(90), 10, STALE), Ok(()));

        // A learner (not yet a voter) is not ready, however close it is.
        let mut l = metrics(4, vec![BTreeSet::from([1, 2, 3])]);
        l.current_leader = Some(1);
        assert!(readiness(&l, Some(0), 10, STALE).unwrap_err().contains("not a voter"));

        // The leader: ready while a quorum acknowledges it.
        let mut ld = metrics(1, vec![BTreeSet::from([1, 2, 3])]);
        ld.current_leader = Some(1);
        ld.state = ServerState::Leader;
        assert!(readiness(&ld, None, 10, STALE).is_err());
        ld.millis_since_quorum_ack = Some(100);
        assert_eq!(readiness(&ld, None, 10, STALE), Ok(()));
        ld.millis_since_quorum_ack = Some(5_000);
        assert!(readiness(&ld, None, 10, STALE).unwrap_err().contains("without a quorum"));
        ld.state = ServerState::Shutdown;
        assert!(readiness(&ld, None, 10, STALE).is_err());
    }

    #[test]
    fn commit_index_is_the_majority_match_of_every_voter_set() {
        let mut m = metrics(1, vec![BTreeSet::from([1, 2, 3])]);
        assert_eq!(leader_commit_index(&m), None, "only the leader knows");
        m.last_log_index = Some(50);
        m.replication = Some(BTreeMap::from([(1, Some(log_id(50))), (2, Some(log_id(40))), (3, None)]));
        assert_eq!(leader_commit_index(&m), Some(40));
        // Joint: {1,2,3} and {1,4,5}; the second set has only the leader past 10.
        let mut j = metrics(1, vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([1, 4, 5])]);
        j.last_log_index = Some(50);
        j.replication =
            Some(BTreeMap::from([(2, Some(log_id(45))), (3, Some(log_id(45))), (4, Some(log_id(10))), (5, None)]));
        assert_eq!(leader_commit_index(&j), Some(10));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), r"x\ny");
    }

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_secs(60));
        let mut out = Out { text: String::new(), errors: 0, capped: Vec::new() };
        out.histogram("h", "help", &h);
        assert!(out.text.contains("h_bucket{le=\"0.0005\"} 1\n"), "{}", out.text);
        assert!(out.text.contains("h_bucket{le=\"0.001\"} 2\n"), "{}", out.text);
        assert!(out.text.contains("h_bucket{le=\"30\"} 2\n"), "{}", out.text);
        assert!(out.text.contains("h_bucket{le=\"+Inf\"} 3\nh_sum 60.0011\nh_count 3\n"), "{}", out.text);
    }
}
