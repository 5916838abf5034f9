//! A node's configuration, as the `busbar server` flags fill it in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use busbar_raft::RaftConfig;
use busbar_types::NodeId;

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
        }
    }
}
