//! The nemeses and their schedule: healthy for a few seconds, one fault for a few seconds, healed,
//! and again until the time limit. Every step is a `nemesis` entry in the history (and in
//! `nemesis.jsonl`, the schedule) with what it did to which nodes.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use busbar_client::{Admin, Client};
use serde_json::json;
use tokio::time::Instant;

use crate::cluster::{self, Cluster, Node};
use crate::recorder::Recorder;
use crate::rng::Rng;
use crate::workload::{client_options, Brokers};

/// Bound on one admin call (status, membership) made by the nemesis.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on a fresh node becoming a voter.
const JOIN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a restarted node that was handed a damaged data dir gets to start or refuse.
const DISK_VERDICT_TIMEOUT: Duration = Duration::from_secs(25);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nemesis {
    Kill,
    Pause,
    Partition,
    PauseKill,
    PartitionKill,
    Member,
    Disk,
}

impl Nemesis {
    pub const ALL: [Nemesis; 7] = [
        Nemesis::Kill,
        Nemesis::Pause,
        Nemesis::Partition,
        Nemesis::PauseKill,
        Nemesis::PartitionKill,
        Nemesis::Member,
        Nemesis::Disk,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Nemesis::Kill => "kill",
            Nemesis::Pause => "pause",
            Nemesis::Partition => "partition",
            Nemesis::PauseKill => "pause-kill",
            Nemesis::PartitionKill => "partition-kill",
            Nemesis::Member => "member",
            Nemesis::Disk => "disk",
        }
    }
}

impl fmt::Display for Nemesis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Nemesis {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Nemesis::ALL.into_iter().find(|n| n.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Nemesis::ALL.iter().map(|n| n.name()).collect();
            anyhow!("unknown nemesis {s:?}; known: {}", names.join(", "))
        })
    }
}

/// Bounds of the schedule, in seconds.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub healthy: (u64, u64),
    pub fault: (u64, u64),
}

pub struct NemesisRunner<'a> {
    pub cluster: &'a mut Cluster,
    pub rec: Arc<Recorder>,
    pub brokers: Brokers,
    pub rng: Rng,
    pub schedule: Schedule,
    /// Set for one fault: replace one of its targets (`member`) while the fault holds.
    combine: bool,
}

fn names(nodes: &[Node]) -> Vec<String> {
    nodes.iter().map(Node::name).collect()
}

impl<'a> NemesisRunner<'a> {
    pub fn new(cluster: &'a mut Cluster, rec: Arc<Recorder>, brokers: Brokers, rng: Rng, schedule: Schedule) -> Self {
        Self { cluster, rec, brokers, rng, schedule, combine: false }
    }

    /// Runs faults from `enabled` until `deadline`; every fault is healed before this returns.
    pub async fn run(&mut self, enabled: &[Nemesis], deadline: Instant) {
        if enabled.is_empty() {
            tokio::time::sleep_until(deadline).await;
            return;
        }
        loop {
            let healthy = Duration::from_secs(self.rng.range(self.schedule.healthy.0, self.schedule.healthy.1));
            if Instant::now() + healthy >= deadline {
                tokio::time::sleep_until(deadline).await;
                return;
            }
            tokio::time::sleep(healthy).await;
            let n = enabled[self.rng.below(enabled.len())];
            // With `member` selected too, a kill, pause or partition sometimes has one of its
            // targets removed and replaced while it holds (membership changes during faults, as
            // Redpanda's and NATS's data loss needed).
            self.combine = enabled.contains(&Nemesis::Member)
                && matches!(n, Nemesis::Kill | Nemesis::Pause | Nemesis::Partition)
                && self.rng.chance(40);
            let hold = Duration::from_secs(self.rng.range(self.schedule.fault.0, self.schedule.fault.1));
            let hold = hold.min(deadline.saturating_duration_since(Instant::now())).max(Duration::from_secs(1));
            if let Err(e) = self.one(n, hold).await {
                self.rec.nemesis(&format!("{n}-error"), json!({ "error": format!("{e:#}") }));
                // Whatever it left behind is undone before the next fault.
                self.heal_all().await;
            }
        }
    }

    async fn one(&mut self, n: Nemesis, hold: Duration) -> anyhow::Result<()> {
        match n {
            Nemesis::Kill => self.kill(hold).await,
            Nemesis::Pause => self.pause(hold).await,
            Nemesis::Partition => self.partition(hold).await,
            Nemesis::PauseKill => self.hold_kill(hold, false).await,
            Nemesis::PartitionKill => self.hold_kill(hold, true).await,
            Nemesis::Member => self.member(hold).await,
            Nemesis::Disk => self.disk().await,
        }
    }

    /// The leader's id, as the cluster reports it (None when there is none or no answer in time).
    pub async fn leader(&self) -> Option<u64> {
        leader_of(&self.cluster.member_addrs()).await
    }

    /// One node, the leader, or a minority of the members, at random.
    async fn targets(&mut self) -> (String, Vec<Node>) {
        let mut members = self.cluster.member_nodes();
        self.rng.shuffle(&mut members);
        match self.rng.below(3) {
            0 => ("one".into(), members.into_iter().take(1).collect()),
            1 => {
                let leader = self.leader().await;
                match members.iter().position(|n| Some(n.id) == leader) {
                    Some(i) => ("leader".into(), vec![members.swap_remove(i)]),
                    None => ("one (no leader known)".into(), members.into_iter().take(1).collect()),
                }
            }
            _ => {
                let minority = (members.len().saturating_sub(1)) / 2;
                ("minority".into(), members.into_iter().take(minority.max(1)).collect())
            }
        }
    }

    async fn kill(&mut self, hold: Duration) -> anyhow::Result<()> {
        let (how, targets) = self.targets().await;
        self.rec.nemesis("kill-start", json!({ "targets": names(&targets), "choice": how }));
        let mut result = Ok(());
        for n in &targets {
            if let Err(e) = cluster::kill(n).await {
                result = Err(e);
            }
        }
        self.hold(hold, targets.first()).await?;
        for n in targets.iter().filter(|n| self.cluster.members.contains(&n.id)) {
            if let Err(e) = cluster::start(n).await {
                result = Err(e);
            }
        }
        self.rec.nemesis("kill-stop", json!({ "restarted": names(&targets) }));
        result
    }

    async fn pause(&mut self, hold: Duration) -> anyhow::Result<()> {
        let (how, targets) = self.targets().await;
        self.rec.nemesis("pause-start", json!({ "targets": names(&targets), "choice": how }));
        let mut result = Ok(());
        for n in &targets {
            if let Err(e) = cluster::pause(n).await {
                result = Err(e);
            }
        }
        self.hold(hold, targets.first()).await?;
        for n in targets.iter().filter(|n| self.cluster.members.contains(&n.id)) {
            if let Err(e) = cluster::unpause(n).await {
                result = Err(e);
            }
        }
        self.rec.nemesis("pause-stop", json!({ "resumed": names(&targets) }));
        result
    }

    /// Cuts every link between nodes of different components.
    async fn cut(&self, components: &[Vec<Node>]) -> anyhow::Result<()> {
        for (i, comp) in components.iter().enumerate() {
            let others: Vec<String> = components
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .flat_map(|(_, c)| c.iter().map(|n| n.ip.clone()))
                .collect();
            for n in comp {
                cluster::drop_from(n, &others).await?;
            }
        }
        Ok(())
    }

    async fn heal_network(&self) -> anyhow::Result<()> {
        let mut result = Ok(());
        for n in self.cluster.member_nodes() {
            if let Err(e) = cluster::heal_network(&n).await {
                result = Err(e);
            }
        }
        result
    }

    async fn partition(&mut self, hold: Duration) -> anyhow::Result<()> {
        let mut members = self.cluster.member_nodes();
        self.rng.shuffle(&mut members);
        let modes = if members.len() >= 5 { 3 } else { 2 };
        let candidate: Option<Node>;
        let (mode, detail) = match self.rng.below(modes) {
            0 => {
                let leader = self.leader().await;
                let (lead, rest): (Vec<Node>, Vec<Node>) = members.into_iter().partition(|n| Some(n.id) == leader);
                let (lead, rest) = if lead.is_empty() {
                    // No leader known: isolate some node instead.
                    let mut rest = rest;
                    let one = rest.split_off(rest.len().saturating_sub(1));
                    (one, rest)
                } else {
                    (lead, rest)
                };
                self.cut(&[lead.clone(), rest.clone()]).await?;
                candidate = lead.first().cloned();
                ("isolate-leader", json!({ "isolated": names(&lead), "rest": names(&rest) }))
            }
            1 => {
                let minority = members.len().saturating_sub(1) / 2;
                let majority = members.split_off(minority.max(1));
                self.cut(&[members.clone(), majority.clone()]).await?;
                candidate = members.first().cloned();
                ("split", json!({ "minority": names(&members), "majority": names(&majority) }))
            }
            _ => {
                // A ring: each node sees only its two neighbours, so each sees a different majority.
                let len = members.len();
                for (i, n) in members.iter().enumerate() {
                    let drop: Vec<String> = members
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| {
                            let d = (i + len - j) % len;
                            d != 0 && d != 1 && d != len - 1
                        })
                        .map(|(_, m)| m.ip.clone())
                        .collect();
                    cluster::drop_from(n, &drop).await?;
                }
                candidate = members.first().cloned();
                ("ring", json!({ "ring": names(&members) }))
            }
        };
        self.rec.nemesis("partition-start", json!({ "mode": mode, "detail": detail }));
        self.hold(hold, candidate.as_ref()).await?;
        let r = self.heal_network().await;
        self.rec.nemesis("partition-stop", json!({ "healed": "all links" }));
        r
    }

    /// NATS-style: hold a minority (paused, or partitioned away) while the rest take writes, crash
    /// one node of the majority, then let the minority back and restart the crashed node.
    async fn hold_kill(&mut self, hold: Duration, partition: bool) -> anyhow::Result<()> {
        let kind = if partition { "partition-kill" } else { "pause-kill" };
        let mut members = self.cluster.member_nodes();
        self.rng.shuffle(&mut members);
        let minority_len = (members.len().saturating_sub(1) / 2).max(1);
        let majority = members.split_off(minority_len);
        let minority = members;
        if partition {
            self.cut(&[minority.clone(), majority.clone()]).await?;
        } else {
            for n in &minority {
                cluster::pause(n).await?;
            }
        }
        self.rec.nemesis(&format!("{kind}-hold"), json!({ "held": names(&minority), "majority": names(&majority) }));
        tokio::time::sleep(hold).await;
        // The leader of the majority when there is one: the most telling node to crash.
        let leader = self.leader().await;
        let victim = majority
            .iter()
            .find(|n| Some(n.id) == leader && self.rng.chance(60))
            .cloned()
            .or_else(|| majority.get(self.rng.below(majority.len())).cloned())
            .ok_or_else(|| anyhow!("no majority node to kill"))?;
        cluster::kill(&victim).await?;
        self.rec.nemesis(&format!("{kind}-kill"), json!({ "killed": victim.name() }));
        tokio::time::sleep(Duration::from_secs(self.rng.range(1, 4))).await;
        let mut result = Ok(());
        if partition {
            result = self.heal_network().await;
        } else {
            for n in &minority {
                if let Err(e) = cluster::unpause(n).await {
                    result = Err(e);
                }
            }
        }
        self.rec.nemesis(&format!("{kind}-release"), json!({ "released": names(&minority) }));
        tokio::time::sleep(Duration::from_secs(self.rng.range(1, 4))).await;
        cluster::start(&victim).await?;
        self.rec.nemesis(&format!("{kind}-stop"), json!({ "restarted": victim.name() }));
        result
    }

    /// Removes a member (through the cluster, then its container), then adds a fresh node with a
    /// new id and an empty data dir. An id is never reused.
    /// Holds a fault: sleeps, or (when combining) replaces `target` meanwhile.
    async fn hold(&mut self, hold: Duration, target: Option<&Node>) -> anyhow::Result<()> {
        match target {
            Some(t) if self.combine => {
                self.combine = false;
                self.rec.nemesis("member-during-fault", json!({ "node": t.name() }));
                self.replace(t.clone(), hold / 2).await
            }
            _ => {
                tokio::time::sleep(hold).await;
                Ok(())
            }
        }
    }

    async fn member(&mut self, hold: Duration) -> anyhow::Result<()> {
        let members = self.cluster.member_nodes();
        if members.len() < 3 {
            bail!("only {} members; not removing one", members.len());
        }
        let victim = members[self.rng.below(members.len())].clone();
        self.replace(victim, hold).await
    }

    /// Removes `victim` from the membership and its container, waits `hold`, adds a fresh node.
    async fn replace(&mut self, victim: Node, hold: Duration) -> anyhow::Result<()> {
        self.rec.nemesis("member-remove-start", json!({ "node": victim.name() }));
        let via = self.cluster.member_addrs();
        let (outcome, still_member) = remove_member(&via, victim.id).await;
        self.rec.nemesis(
            "member-remove",
            json!({ "node": victim.name(), "outcome": outcome, "still_member": still_member }),
        );
        if still_member {
            return Ok(());
        }
        cluster::remove(&victim).await.context("removing the container of a removed node")?;
        self.cluster.forget_member(victim.id);
        self.brokers.set(self.cluster.member_addrs());
        tokio::time::sleep(hold).await;
        self.add_fresh().await
    }

    async fn add_fresh(&mut self) -> anyhow::Result<()> {
        let node = self.cluster.start_fresh().await?;
        self.rec.nemesis("member-add-start", json!({ "node": node.name(), "addr": node.addr() }));
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let mut voter = false;
        while Instant::now() < deadline {
            if let Some(ids) = membership(&self.cluster.member_addrs()).await {
                if ids.contains(&node.id) {
                    voter = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.brokers.set(self.cluster.member_addrs());
        self.rec.nemesis("member-add", json!({ "node": node.name(), "voter": voter }));
        if !voter {
            bail!("{} did not become a voter within {JOIN_TIMEOUT:?}", node.name());
        }
        Ok(())
    }

    /// Stops a minority node (SIGKILL), damages one of its data files, restarts it. The node must
    /// refuse to start (then it is replaced by a fresh node) or repair what it can.
    async fn disk(&mut self) -> anyhow::Result<()> {
        let leader = self.leader().await;
        let mut candidates: Vec<Node> =
            self.cluster.member_nodes().into_iter().filter(|n| Some(n.id) != leader).collect();
        if candidates.is_empty() {
            bail!("no follower to damage");
        }
        let victim = candidates.swap_remove(self.rng.below(candidates.len()));
        cluster::kill(&victim).await?;
        let damage = damage_a_file(&victim, &mut self.rng)?;
        self.rec.nemesis("disk-damage", json!({ "node": victim.name(), "damage": damage }));
        cluster::start(&victim).await?;
        // Refused (the process exited), or up and answering.
        let deadline = Instant::now() + DISK_VERDICT_TIMEOUT;
        let mut verdict = "no verdict";
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let st = cluster::state(&victim).await;
            if st != "running" {
                verdict = "refused";
                break;
            }
            let up = tokio::time::timeout(Duration::from_secs(3), async {
                let c = Client::connect_with([victim.addr()], client_options()).await?;
                c.node_status(&victim.addr()).await
            })
            .await;
            if matches!(&up, Ok(Ok(s)) if s.initialized) {
                verdict = "started";
                break;
            }
        }
        let tail = cluster::log_tail(&victim, 5).await;
        let code = cluster::exit_code(&victim).await;
        self.rec.nemesis(
            "disk-verdict",
            json!({ "node": victim.name(), "verdict": verdict, "exit_code": code, "log_tail": tail }),
        );
        if verdict == "refused" {
            // The runbook's repair: remove it from the membership, start a fresh node (new id).
            let via: Vec<String> =
                self.cluster.member_nodes().iter().filter(|n| n.id != victim.id).map(Node::addr).collect();
            let (outcome, still_member) = remove_member(&via, victim.id).await;
            self.rec.nemesis(
                "disk-replace",
                json!({ "node": victim.name(), "outcome": outcome, "still_member": still_member }),
            );
            if still_member {
                bail!("could not remove {} after it refused to start", victim.name());
            }
            cluster::remove(&victim).await?;
            self.cluster.forget_member(victim.id);
            self.brokers.set(self.cluster.member_addrs());
            self.add_fresh().await?;
        } else if verdict != "started" {
            bail!("{} neither started nor refused within {DISK_VERDICT_TIMEOUT:?}", victim.name());
        }
        Ok(())
    }

    /// Undoes every fault: unpause, flush iptables, start stopped members. Bounded by docker's bounds.
    pub async fn heal_all(&mut self) {
        for n in self.cluster.member_nodes() {
            let st = cluster::state(&n).await;
            if st == "paused" {
                let _ = cluster::unpause(&n).await;
            }
            if st == "exited" || st == "created" {
                let _ = cluster::start(&n).await;
            }
            let _ = cluster::heal_network(&n).await;
        }
    }
}

/// The leader's id as reported through any of `addrs`.
pub async fn leader_of(addrs: &[String]) -> Option<u64> {
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let c = Client::connect_with(addrs.to_vec(), client_options()).await?;
        c.metadata().await
    })
    .await;
    match r {
        Ok(Ok(m)) if m.has_leader => Some(m.leader_id),
        _ => None,
    }
}

/// The voter ids of the membership as the leader holds it (None without a leader or an answer).
/// Not `cluster_status`: there each node reports itself, and a removed node, which never hears of
/// its removal, still calls itself a voter.
pub async fn membership(addrs: &[String]) -> Option<Vec<u64>> {
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        // Node by node: a node that knows no leader (cut off, or removed and still running)
        // answers metadata without one.
        let mut found = None;
        for a in addrs {
            let Ok(c) = Client::connect_with([a.clone()], client_options()).await else { continue };
            if let Ok(m) = c.metadata().await {
                if m.has_leader && !m.leader_addr.is_empty() {
                    found = Some(m);
                    break;
                }
            }
        }
        let Some(m) = found else { return Ok(None) };
        let leader = Client::connect_with([m.leader_addr.clone()], client_options()).await?;
        let lm = leader.metadata().await?;
        // Asked the leader itself: its membership is the cluster's latest.
        Ok::<_, busbar_client::ClientError>((lm.has_leader && lm.leader_id == m.leader_id).then_some(lm))
    })
    .await;
    match r {
        Ok(Ok(Some(m))) => Some(m.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect()),
        _ => None,
    }
}

/// Removes `id` through the cluster, retrying a few times (an election may be under way), and
/// tells whether it is still a member (the leader's view; an unknown outcome counts as a member).
async fn remove_member(via: &[String], id: u64) -> (String, bool) {
    let mut outcome = String::new();
    for attempt in 0..4 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        // A different first broker each attempt.
        let mut via = via.to_vec();
        let first = attempt % via.len().max(1);
        via.rotate_left(first);
        let removed = tokio::time::timeout(ADMIN_TIMEOUT, async {
            let admin = Admin::new(Client::connect_with(via.clone(), client_options()).await?);
            admin.remove_node(id).await
        })
        .await;
        outcome = match removed {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => "timed out".to_string(),
        };
        // An error or a timeout may still have removed it; an ok is checked too.
        for _ in 0..5 {
            if let Some(ids) = membership(&via).await {
                if !ids.contains(&id) {
                    return (outcome, false);
                }
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    (outcome, true)
}

/// Flips bits in, or truncates, one data file of a stopped node. Returns what it did.
fn damage_a_file(node: &Node, rng: &mut Rng) -> anyhow::Result<serde_json::Value> {
    let mut files = Vec::new();
    collect_files(&node.data_dir, &mut files, 0);
    // WAL segments are what recovery must judge; sled's files and snapshots too, less often.
    let wal: Vec<_> = files
        .iter()
        .filter(|(p, len)| *len > 0 && p.to_string_lossy().contains("raft-log") && is_segment(p))
        .cloned()
        .collect();
    let pool = if !wal.is_empty() && rng.chance(75) {
        wal
    } else {
        files.iter().filter(|(_, len)| *len > 0).cloned().collect()
    };
    if pool.is_empty() {
        bail!("no data file in {}", node.data_dir.display());
    }
    let (path, len) = pool[rng.below(pool.len())].clone();
    let rel = path.strip_prefix(&node.data_dir).unwrap_or(&path).display().to_string();
    if rng.chance(50) {
        let mut bytes = std::fs::read(&path)?;
        let flips = rng.range(1, 8) as usize;
        let mut at = Vec::new();
        for _ in 0..flips {
            let i = rng.below(bytes.len());
            bytes[i] ^= 1 << rng.below(8);
            at.push(i);
        }
        std::fs::write(&path, &bytes)?;
        Ok(json!({ "file": rel, "len": len, "mode": "bitflip", "offsets": at }))
    } else {
        let to = rng.range(0, len.saturating_sub(1));
        std::fs::OpenOptions::new().write(true).open(&path)?.set_len(to)?;
        Ok(json!({ "file": rel, "len": len, "mode": "truncate", "to": to }))
    }
}

fn is_segment(p: &std::path::Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.chars().any(|c| c.is_ascii_digit()))
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, u64)>, depth: usize) {
    if depth > 6 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            collect_files(&e.path(), out, depth + 1);
        } else if md.is_file() {
            out.push((e.path(), md.len()));
        }
    }
}
