//! The server side of the Raft transport: receives Raft RPCs from peers and hands them to openraft.

use busbar_proto::raft::raft_transport_server::RaftTransport;
use busbar_proto::raft::{RaftReply, RaftRequest, SnapshotChunk};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::codec;
use crate::snapshot::{SnapshotData, SnapshotDir};
use crate::types::{Raft, Snapshot, SnapshotMeta, Vote};

pub struct RaftTransportService {
    raft: Raft,
    snapshots: SnapshotDir,
}

impl RaftTransportService {
    pub fn new(raft: Raft, snapshots: SnapshotDir) -> Self {
        Self { raft, snapshots }
    }
}

fn reply<T: Serialize, E: Serialize>(res: Result<T, E>) -> Result<Response<RaftReply>, Status> {
    let r = match res {
        Ok(v) => RaftReply { payload: encode(&v)?, error: Vec::new() },
        Err(e) => RaftReply { payload: Vec::new(), error: encode(&e)? },
    };
    Ok(Response::new(r))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, Status> {
    codec::encode("raft reply", v).map_err(|e| Status::internal(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, Status> {
    codec::decode(what, b).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn append_entries(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc = decode("append entries", &req.into_inner().payload)?;
        reply(self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc = decode("vote", &req.into_inner().payload)?;
        reply(self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftReply>, Status> {
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let (vote, meta): (Vote, SnapshotMeta) = decode("snapshot meta", &first.meta)?;
        let path = self.snapshots.incoming_path();
        let received = receive_to_file(&path, first.done, &mut stream).await;
        if let Err(e) = received {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        let snapshot = Snapshot { meta, snapshot: Box::new(SnapshotData::Received { path: path.clone() }) };
        let res = self.raft.install_full_snapshot(vote, snapshot).await;
        // An installed stream is deleted by the state machine; one that was refused (older vote, or
        // already have it) is still here.
        let _ = tokio::fs::remove_file(&path).await;
        reply(res)
    }
}

async fn receive_to_file(
    path: &std::path::Path,
    mut done: bool,
    stream: &mut Streaming<SnapshotChunk>,
) -> Result<(), Status> {
    let io = |e: std::io::Error| Status::internal(format!("writing snapshot {}: {e}", path.display()));
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    while !done {
        let chunk =
            stream.message().await?.ok_or_else(|| Status::aborted("snapshot stream ended before its last chunk"))?;
        file.write_all(&chunk.data).await.map_err(io)?;
        done = chunk.done;
    }
    file.sync_all().await.map_err(io)?;
    Ok(())
}
