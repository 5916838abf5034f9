//! The client side of the Raft transport: openraft's `RaftNetwork` over tonic.
//!
//! Raft messages are bincode-encoded openraft types inside `RaftRequest.payload`. Snapshots stream
//! from the store in bounded chunks, never read whole into memory. A peer that cannot be reached
//! is reported as `Unreachable`, which makes openraft back off (see [`NetworkConnection::backoff`]).

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use busbar_proto::raft::raft_transport_client::RaftTransportClient;
use busbar_proto::raft::{RaftReply, RaftRequest, SnapshotChunk};
use busbar_storage::StoreError;
use busbar_types::NodeId;
use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::OptionalSend;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use crate::codec;
use crate::snapshot::SnapshotData;
use crate::types::{BasicNode, Snapshot, TypeConfig, Vote};

/// Largest message either side of the Raft transport accepts: AppendEntries batches of large
/// records exceed tonic's 4 MiB default. Bounded so a garbage length cannot exhaust memory.
pub const MAX_RAFT_MESSAGE: usize = 256 << 20;
/// Size of one snapshot chunk on the wire.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Builds a channel to a peer. Lazy: it connects on first use and reconnects by itself.
pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// A table of cut links between nodes, shared by the nodes of an in-process cluster, so tests can
/// partition real nodes: a message from `a` to `b` is dropped (reported as unreachable) while the
/// link `(a, b)` is cut. Production nodes carry none.
#[derive(Clone, Default, Debug)]
pub struct Partitions(Arc<RwLock<HashSet<(NodeId, NodeId)>>>);

impl Partitions {
    /// Cuts every link between `node` and each of `others`, both ways.
    pub fn isolate(&self, node: NodeId, others: impl IntoIterator<Item = NodeId>) {
        if let Ok(mut cut) = self.0.write() {
            for o in others {
                cut.insert((node, o));
                cut.insert((o, node));
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        if let Ok(mut cut) = self.0.write() {
            cut.clear();
        }
    }

    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.0.read().map(|c| c.contains(&(from, to))).unwrap_or(false)
    }
}

#[derive(Clone, Default)]
pub struct NetworkFactory {
    from: NodeId,
    partitions: Option<Partitions>,
}

impl NetworkFactory {
    pub fn new(from: NodeId, partitions: Option<Partitions>) -> Self {
        Self { from, partitions }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = NetworkConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        NetworkConnection {
            from: self.from,
            target,
            addr: node.addr.clone(),
            client: None,
            partitions: self.partitions.clone(),
        }
    }
}

pub struct NetworkConnection {
    from: NodeId,
    target: NodeId,
    addr: String,
    client: Option<RaftTransportClient<Channel>>,
    partitions: Option<Partitions>,
}

#[derive(Debug, thiserror::Error)]
#[error("link {0} -> {1} is cut (test partition)")]
struct LinkCut(NodeId, NodeId);

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl NetworkConnection {
    fn client(&mut self) -> Result<RaftTransportClient<Channel>, Unreachable> {
        if self.partitions.as_ref().is_some_and(|p| p.is_cut(self.from, self.target)) {
            return Err(Unreachable::new(&LinkCut(self.from, self.target)));
        }
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let ch = channel(&self.addr).map_err(|e| Unreachable::new(&e))?;
        let c = RaftTransportClient::new(ch)
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE);
        self.client = Some(c.clone());
        Ok(c)
    }

    /// A status from the transport: an unreachable peer gets backoff, anything else is retried.
    fn status_to_rpc<E: std::error::Error>(status: tonic::Status) -> RPCError<NodeId, BasicNode, E> {
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        }
    }

    fn decode_reply<T: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &self,
        reply: RaftReply,
    ) -> Result<T, RPCError<NodeId, BasicNode, E>> {
        if !reply.error.is_empty() {
            let err: E = codec::decode("raft error reply", &reply.error)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            return Err(RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                BasicNode::new(&self.addr),
                err,
            )));
        }
        codec::decode("raft reply", &reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

impl RaftNetwork<TypeConfig> for NetworkConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let payload = codec::encode("append entries", &rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = self.client()?;
        let mut req = tonic::Request::new(RaftRequest { payload });
        req.set_timeout(option.hard_ttl());
        let reply = client.append_entries(req).await.map_err(Self::status_to_rpc)?;
        self.decode_reply::<_, RaftError<NodeId>>(reply.into_inner())
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        let payload = codec::encode("vote", &rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = self.client()?;
        let mut req = tonic::Request::new(RaftRequest { payload });
        req.set_timeout(option.hard_ttl());
        let reply = client.vote(req).await.map_err(Self::status_to_rpc)?;
        self.decode_reply::<_, RaftError<NodeId>>(reply.into_inner())
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let net_err = |e: &dyn std::error::Error| NetworkError::new(&AnyErr(e.to_string()));
        let meta = codec::encode("snapshot meta", &(vote, snapshot.meta.clone())).map_err(|e| net_err(&e))?;
        let SnapshotData::Held { manifest, store } = *snapshot.snapshot else {
            // Only installs see a received stream; openraft sends what `get_current_snapshot` gives.
            return Err(StreamingError::Network(net_err(&AnyErr("a received snapshot stream is not sent on".into()))));
        };
        let size = manifest.batch_bytes();
        let mut client = self.client().map_err(StreamingError::Unreachable)?;

        // The store streams the snapshot into a bounded channel: the export stays at most two
        // chunks ahead of the network, and stops when the call is dropped (the channel closes).
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(2);
        let runtime = tokio::runtime::Handle::current();
        let exporter = tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter { tx, buf: Vec::new(), runtime };
            w.send(SnapshotChunk { meta, data: Vec::new(), done: false })
                .map_err(|e| StoreError::io("send snapshot", e))?;
            w.buf.reserve(SNAPSHOT_CHUNK);
            let (_, w) = store.export_snapshot(&manifest, w)?;
            w.finish()
        });
        // Generous but bounded: a minute plus a second per 4 MiB.
        let deadline = Duration::from_secs(60 + size / (4 << 20));
        let call = client.install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx));
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = tokio::time::timeout(deadline, call) => r,
        };
        // The exporter ends once the call is over (its channel is closed); its own error says more
        // than the broken stream the receiver saw (a snapshot whose data is gone, a corrupt batch).
        let exported = exporter.await;
        let export_err = match &exported {
            Ok(Err(StoreError::Io { source, .. })) if source.kind() == std::io::ErrorKind::BrokenPipe => None,
            Ok(Err(e)) => Some(e.to_string()),
            Ok(Ok(())) => None,
            Err(join) => Some(format!("snapshot export task: {join}")),
        };
        let reply = match (reply, export_err) {
            // Reported as unreachable so that openraft backs off before it tries again (by then
            // with the current snapshot, if this one was replaced), rather than re-sending at once.
            (_, Some(e)) => return Err(StreamingError::Unreachable(Unreachable::new(&AnyErr(e)))),
            (Err(elapsed), None) => return Err(StreamingError::Network(net_err(&elapsed))),
            (Ok(Err(status)), None) => {
                return Err(match Self::status_to_rpc::<Fatal<NodeId>>(status) {
                    RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                    other => StreamingError::Network(net_err(&other)),
                })
            }
            (Ok(Ok(r)), None) => r.into_inner(),
        };
        if !reply.error.is_empty() {
            let fatal: Fatal<NodeId> = codec::decode("snapshot error reply", &reply.error).map_err(|e| net_err(&e))?;
            return Err(StreamingError::RemoteError(RemoteError::new(self.target, fatal)));
        }
        Ok(codec::decode("snapshot reply", &reply.payload).map_err(|e| net_err(&e))?)
    }

    fn backoff(&self) -> Backoff {
        // 100 ms doubling to 2 s: a peer that is down costs a few RPCs a second at most, and one that
        // comes back is found again within two seconds.
        Backoff::new((0u32..).map(|i| Duration::from_millis(100u64.saturating_mul(1 << i.min(5)).min(2000))))
    }
}

/// A `Write` that cuts a snapshot stream into [`SNAPSHOT_CHUNK`]-sized messages on a bounded
/// channel, blocking while the network is behind. Runs on a blocking thread; a chunk the call has
/// not taken within [`CHUNK_SEND_TIMEOUT`] ends the export (it holds reclaim off while it runs).
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<SnapshotChunk>,
    buf: Vec<u8>,
    runtime: tokio::runtime::Handle,
}

const CHUNK_SEND_TIMEOUT: Duration = Duration::from_secs(30);

impl ChunkWriter {
    fn send(&mut self, chunk: SnapshotChunk) -> std::io::Result<()> {
        use tokio::sync::mpsc::error::SendTimeoutError;
        match self.runtime.block_on(self.tx.send_timeout(chunk, CHUNK_SEND_TIMEOUT)) {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Closed(_)) => Err(closed_early()),
            Err(SendTimeoutError::Timeout(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the snapshot call took no chunk for {CHUNK_SEND_TIMEOUT:?}"),
            )),
        }
    }

    fn send_buffered(&mut self, done: bool) -> std::io::Result<()> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(if done { 0 } else { SNAPSHOT_CHUNK }));
        self.send(SnapshotChunk { meta: Vec::new(), data, done })
    }

    /// Sends what is left as the last chunk.
    fn finish(mut self) -> Result<(), StoreError> {
        self.send_buffered(true).map_err(|e| StoreError::io("send snapshot", e))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(SNAPSHOT_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= SNAPSHOT_CHUNK {
            self.send_buffered(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn closed_early() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the snapshot call ended before the stream")
}

/// Carries an error's text where openraft wants an owned `Error`.
#[derive(Debug)]
struct AnyErr(String);

impl std::fmt::Display for AnyErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AnyErr {}
