//! Running a node: open storage, serve gRPC, form or join the cluster, stop gracefully.

use std::future::Future;
use std::net::SocketAddr;

use busbar_proto::raft::raft_transport_server::RaftTransportServer;
use busbar_proto::v1::busbar_server::BusbarServer;
use busbar_proto::v1::cluster_server::ClusterServer;
use busbar_proto::v1::groups_server::GroupsServer;
use busbar_raft::network::MAX_RAFT_MESSAGE;
use busbar_raft::transport::RaftTransportService;
use busbar_raft::RaftNode;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::BusbarService;
use crate::bootstrap;
use crate::cluster::ClusterService;
use crate::config::ServerConfig;
use crate::groups::GroupsService;
use crate::propose::Proposer;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("opening node storage in {dir}: {source}")]
    Open { dir: String, source: busbar_raft::node::NodeError },
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
}

/// Runs a node on an already-bound listener until `shutdown` resolves, then stops gracefully:
/// stop accepting, let in-flight requests finish (writes are bounded by the write timeout), stop
/// Raft, make the state machine and log durable.
pub async fn run(
    cfg: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let (node, serve) = start(cfg, listener, shutdown).await?;
    let res = serve.await;
    node.shutdown().await;
    match res {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "server task failed");
            Ok(())
        }
    }
}

type ServeTask = JoinHandle<Result<(), ServerError>>;

async fn start(
    cfg: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(RaftNode, ServeTask), ServerError> {
    let node = RaftNode::open(cfg.id, &cfg.data_dir, &cfg.raft)
        .await
        .map_err(|source| ServerError::Open { dir: cfg.data_dir.display().to_string(), source })?;
    tracing::info!(id = cfg.id, listen = %cfg.listen, advertise = %cfg.advertise, data_dir = %cfg.data_dir.display(), "node started");

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(node.clone().run_reclaimer(stop_rx.clone()));

    let limits = cfg.limits.clone();
    let api = BusbarServer::new(BusbarService::new(node.clone(), limits.clone(), stop_rx.clone()))
        .max_decoding_message_size(limits.max_request_bytes)
        .max_encoding_message_size(limits.max_fetch_bytes as usize + (1 << 20));
    let groups = GroupsService::new(node.clone(), Proposer { node: node.clone(), timeout: limits.write_timeout });
    tokio::spawn(groups.clone().run(stop_rx.clone()));
    let groups = GroupsServer::new(groups);
    let cluster = ClusterServer::new(ClusterService::new(node.clone(), cfg.advertise.clone(), limits));
    let transport = RaftTransportServer::new(RaftTransportService::new(node.raft.clone(), node.snapshots.clone()))
        .max_decoding_message_size(MAX_RAFT_MESSAGE)
        .max_encoding_message_size(MAX_RAFT_MESSAGE);

    let serve = tokio::spawn(async move {
        let res = tonic::transport::Server::builder()
            .add_service(api)
            .add_service(groups)
            .add_service(cluster)
            .add_service(transport)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                shutdown.await;
                tracing::info!("shutting down: no new requests; finishing in-flight ones");
                let _ = stop_tx.send(true);
            })
            .await;
        res.map_err(ServerError::from)
    });

    // Formation runs beside the server: peers must be able to reach us while we probe them.
    let boot_node = node.clone();
    let advertise = cfg.advertise.clone();
    let mut stop = stop_rx;
    tokio::spawn(async move {
        let res = match &cfg.join {
            Some(via) => {
                tokio::select! {
                    r = bootstrap::join(&boot_node, &advertise, via) => r,
                    _ = stop.changed() => Ok(()),
                }
            }
            None => bootstrap::form_from_peers(&boot_node, &cfg.peers).await,
        };
        if let Err(e) = res {
            tracing::error!(error = %e, "cluster formation failed");
        }
    });
    Ok((node, serve))
}

/// A node running in this process (for tests and `busbar dev`).
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub node: RaftNode,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serve: ServeTask,
}

/// Starts a node in this process on `listener`.
pub async fn spawn(cfg: ServerConfig, listener: TcpListener) -> Result<ServerHandle, ServerError> {
    let addr =
        listener.local_addr().map_err(|e| ServerError::Bootstrap(bootstrap::BootstrapError::Fatal(e.to_string())))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (node, serve) = start(cfg, listener, async move {
        let _ = rx.await;
    })
    .await?;
    Ok(ServerHandle { addr, node, stop: Some(tx), serve })
}

impl ServerHandle {
    /// Graceful stop, as on SIGTERM.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.serve).await;
        self.node.shutdown().await;
    }

    /// Abrupt stop: the server task is aborted and Raft stopped without flushing the state machine.
    /// In-process approximation of a crash; the WAL holds only what was fsynced, as after kill -9.
    pub async fn crash(self) {
        self.serve.abort();
        let _ = self.node.raft.shutdown().await;
        let _ = self.node.wal.close();
    }
}
