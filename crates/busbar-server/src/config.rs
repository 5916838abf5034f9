//! A node's configuration, as the `busbar server` flags fill it in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use busbar_raft::RaftConfig;
use busbar_types::{NodeId, TopicConfig};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub id: NodeId,
    pub listen: SocketAddr,
    /// The address peers and clients use to reach this node (defaults to `listen`).
    pub advertise: String,
    pub data_dir: PathBuf,
    /// The initial voter set (`--peers`), this node included. Empty with `join`.
    pub peers: BTreeMap<NodeId, String>,
    /// Join a running cluster through this node (`--join`).
    pub join: Option<String>,
    pub raft: RaftConfig,
    pub limits: Limits,
    /// Cluster-wide defaults for topic keys a topic does not set itself.
    pub topic_defaults: TopicConfig,
    /// How often the leader looks for records past their retention.
    pub retention_check: Duration,
    /// Serve `/metrics`, `/healthz` and `/readyz` over HTTP here (`--http`); off when `None`.
    pub http: Option<SocketAddr>,
    /// `--auto-membership`: the node keeps its own membership in step with its process, so that
    /// manifests can scale by a number (see `lifecycle`).
    pub auto_membership: bool,
}

/// Bounds on what one request may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_record_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_batch_records: usize,
    pub max_partitions: u32,
    pub max_fetch_records: u32,
    pub max_fetch_bytes: u32,
    /// How long a write may wait for commit before it is reported as indeterminate.
    pub write_timeout: Duration,
    /// Bound on adding a node: the learner must catch up within it.
    pub add_node_timeout: Duration,
    /// Largest gRPC message the client API accepts.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_record_bytes: 1 << 20,
            max_batch_bytes: 1 << 20,
            max_batch_records: 100_000,
            max_partitions: 1024,
            max_fetch_records: 100_000,
            max_fetch_bytes: 64 << 20,
            write_timeout: Duration::from_secs(10),
            add_node_timeout: Duration::from_secs(300),
            max_request_bytes: 8 << 20,
        }
    }
}

impl ServerConfig {
    /// `busbar server` with no flags: a single-node cluster on 127.0.0.1:9501 with data in
    /// ./busbar-data.
    pub fn single_node(id: NodeId, listen: SocketAddr, data_dir: PathBuf) -> Self {
        let advertise = listen.to_string();
        Self {
            id,
            listen,
            advertise: advertise.clone(),
            data_dir,
            peers: BTreeMap::from([(id, advertise)]),
            join: None,
            raft: RaftConfig::default(),
            limits: Limits::default(),
            topic_defaults: TopicConfig::default(),
            retention_check: Duration::from_secs(5),
            http: None,
            auto_membership: false,
        }
    }

    /// With `--auto-membership`, a node outside the initial voter set leaves on a graceful stop.
    pub fn leaves_on_shutdown(&self) -> bool {
        self.auto_membership && !self.peers.contains_key(&self.id)
    }

    /// Whom to ask to count this node as a voter: every `--join` address (comma-separated) and
    /// every other initial voter.
    pub fn membership_contacts(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let joins = self.join.iter().flat_map(|j| j.split(',')).map(str::trim).filter(|a| !a.is_empty());
        let peers = self.peers.iter().filter(|(id, _)| **id != self.id).map(|(_, a)| a.as_str());
        for a in joins.chain(peers) {
            if !out.iter().any(|o| o == a) {
                out.push(a.to_string());
            }
        }
        out
    }
}

/// The node id a StatefulSet pod takes from its hostname: the ordinal after the last `-`, plus one
/// (`busbar-0` is node 1), because node ids start at 1 (0 means "no node" on the wire). A domain
/// part (`busbar-0.busbar.ns`) is ignored.
pub fn id_from_hostname(hostname: &str) -> Result<NodeId, String> {
    let host = hostname.trim();
    let short = host.split('.').next().unwrap_or(host);
    let ordinal = short
        .rsplit_once('-')
        .map(|(_, n)| n)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("hostname {host:?} does not end in -ORDINAL (as a StatefulSet pod's does)"))?;
    let n: NodeId = ordinal.parse().map_err(|_| format!("hostname {host:?}: ordinal {ordinal} is too large"))?;
    n.checked_add(1).ok_or_else(|| format!("hostname {host:?}: ordinal {ordinal} is too large"))
}

/// This machine's hostname as the kernel has it (a `FROM scratch` image has no `hostname` tool),
/// or `HOSTNAME` from the environment when /proc cannot tell.
pub fn hostname() -> Result<String, String> {
    match std::fs::read_to_string("/proc/sys/kernel/hostname") {
        Ok(h) if !h.trim().is_empty() => Ok(h.trim().to_string()),
        _ => std::env::var("HOSTNAME")
            .map_err(|_| "cannot read the hostname (no /proc/sys/kernel/hostname, no HOSTNAME)".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_statefulset_hostnames() {
        assert_eq!(id_from_hostname("busbar-0"), Ok(1));
        assert_eq!(id_from_hostname("busbar-4\n"), Ok(5));
        assert_eq!(id_from_hostname("my-bus-12.busbar.default.svc.cluster.local"), Ok(13));
        assert!(id_from_hostname("busbar").is_err());
        assert!(id_from_hostname("busbar-").is_err());
        assert!(id_from_hostname("busbar-x1").is_err());
        assert!(id_from_hostname("busbar-18446744073709551615").is_err());
        assert!(id_from_hostname("busbar-99999999999999999999999").is_err());
    }

    #[test]
    fn membership_follows_the_initial_voter_set() {
        let mut cfg = ServerConfig::single_node(2, "127.0.0.1:9502".parse().unwrap(), PathBuf::from("d"));
        cfg.peers = BTreeMap::from([(1, "a:1".to_string()), (2, "127.0.0.1:9502".to_string()), (3, "c:3".into())]);
        cfg.auto_membership = true;
        assert!(!cfg.leaves_on_shutdown(), "an initial voter never leaves on its own");
        assert_eq!(cfg.membership_contacts(), vec!["a:1".to_string(), "c:3".to_string()]);
        cfg.id = 4;
        cfg.peers.clear();
        cfg.join = Some("a:1, c:3,a:1".into());
        assert!(cfg.leaves_on_shutdown());
        assert_eq!(cfg.membership_contacts(), vec!["a:1".to_string(), "c:3".to_string()]);
        cfg.auto_membership = false;
        assert!(!cfg.leaves_on_shutdown());
    }
}
