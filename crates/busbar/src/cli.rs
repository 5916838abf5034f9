//! Command-line surface. Flag names are a contract: tests, tools and manifests depend on them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use busbar_server::{Limits, ServerConfig};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{cluster_cmd, consume_cmd, dev_cmd, group_cmd, produce_cmd, topic_cmd};

#[derive(Parser, Debug)]
#[command(name = "busbar", version, about = "Busbar: a replicated, partitioned message bus")]
pub struct Cli {
    /// Brokers to contact (HOST:PORT, comma-separated); tried in order until one answers.
    #[arg(long, global = true, env = "BUSBAR_BROKERS", default_value = "127.0.0.1:9501", value_delimiter = ',')]
    pub brokers: Vec<String>,
    /// Output format: text for people, json for one object per line.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Log format for the server.
    #[arg(long, global = true, value_enum, env = "BUSBAR_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node.
    Server(ServerArgs),
    /// Inspect and change the cluster's membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(TopicCmd),
    /// Write records to a topic: VALUE, or one record per line of standard input.
    Produce(produce_cmd::ProduceArgs),
    /// Read records from a topic as JSON lines (with --group: as a member of a consumer group).
    Consume(consume_cmd::ConsumeArgs),
    /// Consumer groups: list, describe (members, committed offsets, lag), reset offsets, delete.
    #[command(subcommand)]
    Group(group_cmd::GroupCmd),
    /// Run a local cluster of server processes in the foreground, for trying Busbar out.
    Dev(dev_cmd::DevArgs),
}

#[derive(Subcommand, Debug)]
pub enum TopicCmd {
    /// Create a topic.
    Create {
        name: String,
        /// Number of partitions (fixed for the topic's life).
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Topic configuration, KEY=VALUE, repeatable: retention.ms, retention.bytes (per partition;
        /// -1 keeps forever), max.message.bytes.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
    },
    /// Change a topic's configuration.
    Alter {
        name: String,
        /// KEY=VALUE to set, repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// KEY to clear (back to the cluster default), repeatable.
        #[arg(long = "delete-config", value_name = "KEY")]
        delete_config: Vec<String>,
    },
    /// Every topic and its partition count.
    List,
    /// A topic's effective configuration, and each partition's start offset (oldest record kept),
    /// end offset (next to be written) and size in bytes.
    Describe { name: String },
    /// Delete a topic and its records.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Every node: id, address, role, term, last log index, applied index, reachable or not.
    Status,
    /// Add a node (learner, caught up, then voter).
    AddNode { id: u64, addr: String },
    /// Remove a node from the membership.
    RemoveNode { id: u64 },
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// This node's id: unique in the cluster, never reused for another node.
    #[arg(long, env = "BUSBAR_ID", default_value_t = 1)]
    pub id: u64,
    /// Address to listen on for clients and peers.
    #[arg(long, env = "BUSBAR_LISTEN", default_value = "127.0.0.1:9501")]
    pub listen: SocketAddr,
    /// Address peers and clients use to reach this node, when it differs from --listen.
    #[arg(long, env = "BUSBAR_ADVERTISE")]
    pub advertise: Option<String>,
    /// Where this node keeps its Raft log, state and snapshots.
    #[arg(long, env = "BUSBAR_DATA_DIR", default_value = "./busbar-data")]
    pub data_dir: PathBuf,
    /// The initial voters, this node included: 1=HOST:PORT,2=HOST:PORT,3=HOST:PORT.
    #[arg(long, env = "BUSBAR_PEERS", conflicts_with = "join")]
    pub peers: Option<String>,
    /// Join a running cluster through this node (HOST:PORT of any member).
    #[arg(long, env = "BUSBAR_JOIN")]
    pub join: Option<String>,
    /// Leader heartbeat interval.
    #[arg(long, env = "BUSBAR_HEARTBEAT_MS", default_value_t = 250)]
    pub heartbeat_ms: u64,
    /// Election timeout, lower bound (a follower waits a random time in [min, max) without a
    /// heartbeat before it stands for election).
    #[arg(long, env = "BUSBAR_ELECTION_TIMEOUT_MIN_MS", default_value_t = 1000)]
    pub election_timeout_min_ms: u64,
    #[arg(long, env = "BUSBAR_ELECTION_TIMEOUT_MAX_MS", default_value_t = 2000)]
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied log entries. A snapshot is cheap (metadata and an
    /// fsync of the store; docs/storage.md); the log on disk is at most this plus --logs-to-keep.
    #[arg(long, env = "BUSBAR_SNAPSHOT_EVERY", default_value_t = 2_000)]
    pub snapshot_every: u64,
    /// Log entries kept below a snapshot (lagging followers catch up from them).
    #[arg(long, env = "BUSBAR_LOGS_TO_KEEP", default_value_t = 5_000)]
    pub logs_to_keep: u64,
    /// sled's cache of the store's index (batch references, partition, group and producer state),
    /// in MiB of sled's on-disk page size (its in-memory size is larger, about 2x). A node's memory
    /// grows with its data until the index outgrows this cache, then nearly stops (sled's per-page
    /// bookkeeping, ~0.35 MiB per GiB stored); index pages that fall out are read back from disk
    /// (docs/operations.md, sizing).
    #[arg(long, env = "BUSBAR_STORE_CACHE_MIB", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub store_cache_mib: u64,
    /// Threads of the async runtime (gRPC, Raft, replication); unset: tokio's default
    /// (`TOKIO_WORKER_THREADS` if set, else one per core). Nodes that share a machine's cores (a
    /// development box, or the benchmarks' three nodes on two cores) spend less CPU waking each
    /// other's threads with 1: about 9% less per record at 500 one-record requests/s, latency the
    /// same within noise (docs/benchmarks.md). Blocking storage work runs on threads of its own
    /// either way.
    #[arg(long, env = "BUSBAR_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Largest record accepted, in bytes.
    #[arg(long, env = "BUSBAR_MAX_RECORD_BYTES", default_value_t = 1 << 20)]
    pub max_record_bytes: usize,
    /// Largest produce batch accepted, in bytes.
    #[arg(long, env = "BUSBAR_MAX_BATCH_BYTES", default_value_t = 1 << 20)]
    pub max_batch_bytes: usize,
    /// How long a write waits for commit before it is reported as indeterminate.
    #[arg(long, env = "BUSBAR_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub write_timeout_ms: u64,
    /// Default retention.ms for topics that do not set it (-1 or unset: keep forever). Set the same
    /// defaults on every node: the leader applies its own.
    #[arg(long, env = "BUSBAR_RETENTION_MS", allow_hyphen_values = true)]
    pub retention_ms: Option<String>,
    /// Default retention.bytes per partition for topics that do not set it (-1 or unset: no limit).
    #[arg(long, env = "BUSBAR_RETENTION_BYTES", allow_hyphen_values = true)]
    pub retention_bytes: Option<String>,
    /// How often the leader looks for records past retention.
    #[arg(long, env = "BUSBAR_RETENTION_CHECK_MS", default_value_t = 5_000)]
    pub retention_check_ms: u64,
    /// Serve /metrics (Prometheus), /healthz and /readyz over HTTP on this address (off if unset).
    #[arg(long, env = "BUSBAR_HTTP")]
    pub http: Option<SocketAddr>,
    /// Take the node id from the hostname's trailing ordinal plus one (pod busbar-0 is node 1).
    #[arg(long, env = "BUSBAR_ID_FROM_HOSTNAME", conflicts_with = "id")]
    pub id_from_hostname: bool,
    /// Keep the membership in step with the process: every start (re)joins; a node whose id is not
    /// in --peers joins through them and leaves the membership when stopped gracefully.
    #[arg(long, env = "BUSBAR_AUTO_MEMBERSHIP")]
    pub auto_membership: bool,
}

/// The async runtime's worker threads the command asks for (`server --worker-threads`); `None`:
/// tokio's default, one per core.
pub fn runtime_workers(cli: &Cli) -> Option<usize> {
    match &cli.command {
        Command::Server(a) => a.worker_threads.map(usize::from),
        _ => None,
    }
}

pub fn init_tracing(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BUSBAR_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn,hyper=warn")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Parses `1=HOST:PORT,2=HOST:PORT`.
pub fn parse_peers(s: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').with_context(|| format!("peer {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id.trim().parse().with_context(|| format!("peer id {id:?} is not a number"))?;
        let addr = addr.trim();
        if !addr.contains(':') {
            bail!("peer {id} address {addr:?} is not HOST:PORT");
        }
        if peers.insert(id, addr.to_string()).is_some() {
            bail!("peer id {id} appears twice in --peers");
        }
    }
    Ok(peers)
}

fn server_config(mut a: ServerArgs) -> anyhow::Result<ServerConfig> {
    if a.id_from_hostname {
        let host = busbar_server::config::hostname().map_err(anyhow::Error::msg)?;
        a.id = busbar_server::config::id_from_hostname(&host).map_err(anyhow::Error::msg)?;
    }
    let advertise = a.advertise.clone().unwrap_or_else(|| a.listen.to_string());
    let mut cfg = ServerConfig::single_node(a.id, a.listen, a.data_dir.clone());
    cfg.advertise = advertise.clone();
    cfg.join = a.join.clone();
    cfg.peers = match (&a.peers, &a.join) {
        (Some(p), _) => {
            let peers = parse_peers(p)?;
            match peers.get(&a.id) {
                // Every pod of a StatefulSet gets the same --peers: those past the initial voters join.
                None if a.auto_membership => {
                    cfg.join = Some(peers.values().cloned().collect::<Vec<_>>().join(","));
                    BTreeMap::new()
                }
                None => bail!("--peers must include this node's own id {}", a.id),
                Some(addr) if *addr != advertise => {
                    bail!("--peers gives node {} the address {addr}, but this node advertises {advertise} (set --advertise)", a.id)
                }
                Some(_) => peers,
            }
        }
        (None, Some(_)) => BTreeMap::new(),
        (None, None) => BTreeMap::from([(a.id, advertise)]),
    };
    if a.election_timeout_min_ms <= a.heartbeat_ms || a.election_timeout_max_ms <= a.election_timeout_min_ms {
        bail!("need heartbeat-ms < election-timeout-min-ms < election-timeout-max-ms");
    }
    cfg.raft.heartbeat_ms = a.heartbeat_ms;
    cfg.raft.election_timeout_min_ms = a.election_timeout_min_ms;
    cfg.raft.election_timeout_max_ms = a.election_timeout_max_ms;
    cfg.raft.snapshot_every = a.snapshot_every.max(1);
    cfg.raft.logs_to_keep = a.logs_to_keep;
    cfg.raft.sled_cache_bytes = a.store_cache_mib << 20;
    cfg.limits = Limits {
        max_record_bytes: a.max_record_bytes,
        max_batch_bytes: a.max_batch_bytes,
        write_timeout: std::time::Duration::from_millis(a.write_timeout_ms),
        max_request_bytes: a.max_batch_bytes.saturating_mul(2).max(4 << 20),
        ..Limits::default()
    };
    let mut defaults = busbar_types::TopicConfig::default();
    defaults.set("retention.ms", a.retention_ms.as_deref()).map_err(|e| anyhow::anyhow!("--retention-ms: {e}"))?;
    defaults
        .set("retention.bytes", a.retention_bytes.as_deref())
        .map_err(|e| anyhow::anyhow!("--retention-bytes: {e}"))?;
    defaults.max_message_bytes = u32::try_from(a.max_record_bytes).ok();
    cfg.topic_defaults = defaults;
    cfg.retention_check = std::time::Duration::from_millis(a.retention_check_ms.max(100));
    cfg.http = a.http;
    cfg.auto_membership = a.auto_membership;
    Ok(cfg)
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(args) => {
            let cfg = server_config(args)?;
            std::fs::create_dir_all(&cfg.data_dir)
                .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
            let listener =
                tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
            busbar_server::run(cfg, listener, shutdown_signal()).await?;
            tracing::info!("stopped cleanly");
            Ok(())
        }
        Command::Cluster(cmd) => cluster_cmd::run(&cli.brokers, cli.output, cmd).await,
        Command::Topic(cmd) => topic_cmd::run(&cli.brokers, cli.output, cmd).await,
        Command::Produce(args) => produce_cmd::run(&cli.brokers, cli.output, args).await,
        Command::Consume(args) => consume_cmd::run(&cli.brokers, cli.output, args).await,
        Command::Group(cmd) => group_cmd::run(&cli.brokers, cli.output, cmd).await,
        Command::Dev(args) => dev_cmd::run(cli.output, args).await,
    }
}

/// Resolves on SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM received"),
                _ = i.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_reject() {
        let p = parse_peers("1=a:1, 2=b:2,3=c:3").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[&2], "b:2");
        assert!(parse_peers("1=a:1,1=b:2").is_err());
        assert!(parse_peers("x=a:1").is_err());
        assert!(parse_peers("1=nohostport").is_err());
        assert!(parse_peers("1").is_err());
    }

    fn server_args(extra: &[&str]) -> Result<ServerArgs, clap::Error> {
        let argv = ["busbar", "server"].iter().chain(extra).copied();
        match Cli::try_parse_from(argv)?.command {
            Command::Server(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn worker_threads_default_to_one_per_core_and_are_never_zero() {
        let cli = |extra: &[&str]| Cli::try_parse_from(["busbar", "server"].iter().chain(extra).copied());
        assert_eq!(runtime_workers(&cli(&[]).unwrap()), None);
        assert_eq!(runtime_workers(&cli(&["--worker-threads", "1"]).unwrap()), Some(1));
        for bad in ["0", "1025", "x"] {
            let err = cli(&["--worker-threads", bad]).unwrap_err().to_string();
            assert!(err.contains("--worker-threads"), "{bad}: {err}");
        }
        // Client commands keep the default.
        let topic_list = Cli::try_parse_from(["busbar", "topic", "list"]).unwrap();
        assert_eq!(runtime_workers(&topic_list), None);
    }

    #[test]
    fn the_store_cache_is_16_mib_by_default_settable_and_never_zero() {
        let cfg = server_config(server_args(&[]).unwrap()).unwrap();
        assert_eq!(cfg.raft.sled_cache_bytes, 16 << 20);
        // The flag's default is the library's, which in-process nodes and tests get.
        let lib = ServerConfig::single_node(1, "127.0.0.1:9501".parse().unwrap(), PathBuf::from("d"));
        assert_eq!(cfg.raft.sled_cache_bytes, lib.raft.sled_cache_bytes);
        let cfg = server_config(server_args(&["--store-cache-mib", "256"]).unwrap()).unwrap();
        assert_eq!(cfg.raft.sled_cache_bytes, 256 << 20);
        let err = server_args(&["--store-cache-mib", "0"]).unwrap_err().to_string();
        assert!(err.contains("--store-cache-mib") && err.contains("1.."), "{err}");
    }
}
