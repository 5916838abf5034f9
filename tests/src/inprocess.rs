//! A cluster of real Busbar nodes inside the test process: each node has its own gRPC listener on
//! loopback, its own WAL, sled store and snapshot directory in a temporary directory, and talks to
//! the others over real tonic connections. A shared [`Partitions`] table cuts Raft links between
//! nodes to simulate network partitions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use busbar_client::{Client, ClientOptions};
use busbar_raft::network::Partitions;
use busbar_raft::types::RaftMetrics;
use busbar_raft::RaftConfig;
use busbar_server::{Limits, ServerConfig, ServerHandle};
use busbar_types::NodeId;
use openraft::ServerState;
use tokio::net::TcpListener;

use crate::wait;

/// Timing for tests: fast heartbeats and elections, still well above loopback latency.
pub fn test_raft_config() -> RaftConfig {
    RaftConfig {
        heartbeat_ms: 100,
        election_timeout_min_ms: 500,
        election_timeout_max_ms: 1000,
        ..RaftConfig::default()
    }
}

pub struct InProcessCluster {
    dir: tempfile::TempDir,
    addrs: BTreeMap<NodeId, SocketAddr>,
    nodes: BTreeMap<NodeId, ServerHandle>,
    pub partitions: Partitions,
    pub raft: RaftConfig,
    pub limits: Limits,
    /// How often the leader looks for records past retention (fast in tests).
    pub retention_check: Duration,
}

impl InProcessCluster {
    /// Starts `n` voters (ids 1..=n) formed from `--peers`, and waits for a leader.
    pub async fn start(n: u64) -> anyhow::Result<Self> {
        Self::start_with(n, test_raft_config(), Limits { write_timeout: Duration::from_secs(3), ..Limits::default() })
            .await
    }

    pub async fn start_with(n: u64, raft: RaftConfig, limits: Limits) -> anyhow::Result<Self> {
        let mut c = Self {
            dir: tempfile::tempdir()?,
            addrs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            partitions: Partitions::default(),
            raft,
            limits,
            retention_check: Duration::from_millis(200),
        };
        let mut listeners = BTreeMap::new();
        for id in 1..=n {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            c.addrs.insert(id, l.local_addr()?);
            listeners.insert(id, l);
        }
        let peers: BTreeMap<NodeId, String> = c.addrs.iter().map(|(id, a)| (*id, a.to_string())).collect();
        for (id, l) in listeners {
            let mut cfg = c.config(id);
            cfg.peers = peers.clone();
            c.nodes.insert(id, busbar_server::spawn(cfg, l).await?);
        }
        c.leader().await?;
        Ok(c)
    }

    fn config(&self, id: NodeId) -> ServerConfig {
        let addr = self.addrs[&id];
        let mut cfg = ServerConfig::single_node(id, addr, self.data_dir(id));
        cfg.raft = RaftConfig { partitions: Some(self.partitions.clone()), ..self.raft.clone() };
        cfg.limits = self.limits.clone();
        cfg.retention_check = self.retention_check;
        cfg.peers = BTreeMap::new();
        cfg
    }

    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    pub fn addr(&self, id: NodeId) -> String {
        self.addrs[&id].to_string()
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    pub fn running(&self, id: NodeId) -> bool {
        self.nodes.contains_key(&id)
    }

    pub fn metrics(&self, id: NodeId) -> anyhow::Result<RaftMetrics> {
        let n = self.nodes.get(&id).with_context(|| format!("node {id} is not running"))?;
        Ok(n.node.raft.metrics().borrow().clone())
    }

    /// Whether a started node's gRPC server still runs (it stops by itself if Raft stops).
    pub fn serving(&self, id: NodeId) -> anyhow::Result<bool> {
        Ok(self.nodes.get(&id).with_context(|| format!("node {id} is not running"))?.serving())
    }

    /// Takes a node whose server ended by itself out of the cluster, with how it ended.
    pub async fn take_ended(&mut self, id: NodeId) -> anyhow::Result<Result<(), String>> {
        let n = self.nodes.remove(&id).with_context(|| format!("node {id} is not running"))?;
        tokio::time::timeout(Duration::from_secs(20), n.ended()).await.context("the node's end")
    }

    /// A topic's partitions as node `id`'s own store holds them (start, end, stored bytes).
    pub fn store_offsets(&self, id: NodeId, topic: &str) -> anyhow::Result<Vec<busbar_storage::PartitionOffsets>> {
        let n = self.nodes.get(&id).with_context(|| format!("node {id} is not running"))?;
        Ok(n.node.store.partition_offsets(topic)?)
    }

    /// The node's Raft handle, to put entries in its log directly.
    pub fn raft(&self, id: NodeId) -> anyhow::Result<busbar_raft::Raft> {
        Ok(self.nodes.get(&id).with_context(|| format!("node {id} is not running"))?.node.raft.clone())
    }

    /// A client that knows every running node.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let brokers: Vec<String> = self.nodes.keys().map(|id| self.addr(*id)).collect();
        Ok(Client::connect_with(brokers, ClientOptions { max_retries: 40, ..ClientOptions::default() }).await?)
    }

    /// A client that knows only node `id` and does not go looking for another.
    pub async fn client_of(&self, id: NodeId) -> anyhow::Result<Client> {
        Ok(Client::connect_with([self.addr(id)], ClientOptions { max_retries: 0, ..ClientOptions::default() }).await?)
    }

    /// Waits until the running nodes that can hear each other agree on one leader, and returns it.
    pub async fn leader(&self) -> anyhow::Result<NodeId> {
        self.leader_among(&self.ids()).await
    }

    /// Waits until all of `ids` agree on a leader among them that reports itself leader.
    pub async fn leader_among(&self, ids: &[NodeId]) -> anyhow::Result<NodeId> {
        wait::until("a leader agreed on by all nodes", Duration::from_secs(30), || async {
            let mut leader = None;
            for id in ids {
                let m = self.metrics(*id).ok()?;
                let l = m.current_leader?;
                if *leader.get_or_insert(l) != l {
                    return None;
                }
            }
            let l = leader?;
            (ids.contains(&l) && self.metrics(l).ok()?.state == ServerState::Leader).then_some(l)
        })
        .await
    }

    /// Stops a node gracefully (as on SIGTERM).
    pub async fn stop(&mut self, id: NodeId) -> anyhow::Result<()> {
        let n = self.nodes.remove(&id).with_context(|| format!("node {id} is not running"))?;
        n.stop().await;
        Ok(())
    }

    /// Stops a node abruptly: the server is aborted, nothing is flushed beyond what was fsynced.
    pub async fn crash(&mut self, id: NodeId) -> anyhow::Result<()> {
        let n = self.nodes.remove(&id).with_context(|| format!("node {id} is not running"))?;
        n.crash().await;
        Ok(())
    }

    /// Restarts a stopped node on its old address and data directory.
    pub async fn restart(&mut self, id: NodeId) -> anyhow::Result<()> {
        if self.running(id) {
            bail!("node {id} is running");
        }
        let cfg = self.config(id);
        // The old instance's storage may take a moment to be released (its tasks are winding down).
        let handle = wait::until(&format!("node {id} to reopen its storage"), Duration::from_secs(20), || {
            let cfg = cfg.clone();
            async move {
                let l = TcpListener::bind(cfg.listen).await.ok()?;
                busbar_server::spawn(cfg, l).await.ok()
            }
        })
        .await?;
        self.nodes.insert(id, handle);
        Ok(())
    }

    /// Starts a stopped node again under its id and address with its data directory emptied (as
    /// after a lost disk) and every node as `--peers`. Tries once: the start's error if it refused.
    pub async fn restart_wiped(&mut self, id: NodeId) -> anyhow::Result<Result<(), String>> {
        if self.running(id) {
            bail!("node {id} is running");
        }
        std::fs::remove_dir_all(self.data_dir(id))?;
        let mut cfg = self.config(id);
        cfg.peers = self.addrs.iter().map(|(i, a)| (*i, a.to_string())).collect();
        self.start_once(id, cfg).await
    }

    /// Restarts a stopped node on its old address and data directory, trying once: the start's
    /// error if it refused (where `restart` retries until the old instance let go of its storage).
    pub async fn try_restart(&mut self, id: NodeId) -> anyhow::Result<Result<(), String>> {
        if self.running(id) {
            bail!("node {id} is running");
        }
        let cfg = self.config(id);
        self.start_once(id, cfg).await
    }

    async fn start_once(&mut self, id: NodeId, cfg: ServerConfig) -> anyhow::Result<Result<(), String>> {
        let l = wait::until(&format!("node {id}'s address to be free"), Duration::from_secs(20), || {
            let listen = cfg.listen;
            async move { TcpListener::bind(listen).await.ok() }
        })
        .await?;
        match busbar_server::spawn(cfg, l).await {
            Ok(handle) => {
                self.nodes.insert(id, handle);
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(e.to_string())),
        }
    }

    /// Starts a fresh node that joins the cluster through `via` (as `--join`).
    pub async fn start_joining(&mut self, id: NodeId, via: NodeId) -> anyhow::Result<()> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        self.addrs.insert(id, l.local_addr()?);
        let mut cfg = self.config(id);
        cfg.join = Some(self.addr(via));
        self.nodes.insert(id, busbar_server::spawn(cfg, l).await?);
        Ok(())
    }

    /// Voter ids in `id`'s view of the membership.
    pub fn voters(&self, id: NodeId) -> anyhow::Result<Vec<NodeId>> {
        Ok(self.metrics(id)?.membership_config.membership().voter_ids().collect())
    }

    /// Every record of a partition as node `id` holds it: (offset, value).
    pub async fn dump(&self, id: NodeId, topic: &str, partition: u32) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        let client = self.client_of(id).await?;
        let mut out = Vec::new();
        // From the partition's start on that node (retention may have dropped what came before),
        // read from its store: ListOffsets answers from the leader only.
        let node = self.nodes.get(&id).with_context(|| format!("node {id} is not running"))?;
        let mut offset = node
            .node
            .store
            .partition_offsets(topic)?
            .iter()
            .find(|o| o.partition == partition)
            .map(|o| o.start_offset)
            .unwrap_or(0);
        loop {
            let r = client.fetch_from(&self.addr(id), topic, partition, offset, 10_000).await?;
            for rec in r.records {
                out.push((rec.offset, rec.record.map(|r| r.value.to_vec()).unwrap_or_default()));
            }
            offset = out.last().map(|(o, _)| o + 1).unwrap_or(offset);
            if offset >= r.end_offset {
                return Ok(out);
            }
        }
    }

    /// Waits until every running node holds exactly the same records in `partition` as `reference`.
    pub async fn wait_identical(&self, topic: &str, partitions: u32, timeout: Duration) -> anyhow::Result<()> {
        wait::until("all nodes to hold identical partitions", timeout, || async {
            for p in 0..partitions {
                let mut first: Option<Vec<(u64, Vec<u8>)>> = None;
                for id in self.ids() {
                    let d = self.dump(id, topic, p).await.ok()?;
                    match &first {
                        None => first = Some(d),
                        Some(f) if *f == d => {}
                        Some(_) => return None,
                    }
                }
            }
            Some(())
        })
        .await
    }

    pub async fn shutdown(mut self) {
        for id in self.ids() {
            if let Some(n) = self.nodes.remove(&id) {
                n.stop().await;
            }
        }
    }
}
