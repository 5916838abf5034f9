//! The HTTP admin port (`--http HOST:PORT`): `/metrics` (Prometheus text), `/healthz` (the
//! process is up and serving) and `/readyz` (the node is a voter with a known leader and has caught
//! up; see [`crate::metrics::readiness`]). Plain HTTP/1.1, apart from the gRPC port, so probes and
//! scrapers need nothing but an HTTP client.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use busbar_raft::RaftNode;
use tokio::net::TcpListener;

use crate::cluster::probe;
use crate::metrics;

/// A follower within this many applied entries of the leader counts as caught up. Under a steady
/// produce load followers trail by the entries in flight (tens to hundreds); one that restarted
/// after a long stop trails by far more until it has caught up.
pub const READY_MAX_LAG: u64 = 1_000;
/// Bound on asking the leader for its applied index during a readiness check.
const LEADER_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct HttpState {
    inner: Arc<Inner>,
}

struct Inner {
    node: RaftNode,
    data_dir: PathBuf,
    /// A leader not acknowledged by a quorum for this long is cut off: not ready.
    quorum_ack_stale: Duration,
}

impl HttpState {
    pub fn new(node: RaftNode, data_dir: PathBuf, election_timeout_max: Duration) -> Self {
        // Two election timeouts: by then the followers will have elected someone else.
        Self { inner: Arc::new(Inner { node, data_dir, quorum_ack_stale: election_timeout_max * 2 }) }
    }
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves the admin port on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

async fn metrics_handler(State(st): State<HttpState>) -> Response {
    let inner = st.inner.clone();
    // Reading the store and sizing the data dir block: off the async workers.
    match tokio::task::spawn_blocking(move || metrics::render(&inner.node, &inner.data_dir)).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "rendering metrics failed\n").into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(st): State<HttpState>) -> Response {
    let m = st.inner.node.raft.metrics().borrow().clone();
    // Only a follower needs the leader's progress; ask it over the cluster API (bounded).
    let leader_applied = match m.current_leader {
        Some(l) if l != m.id => match m.membership_config.membership().get_node(&l) {
            Some(node) => probe(&node.addr, LEADER_PROBE_TIMEOUT)
                .await
                .ok()
                .filter(|s| s.has_applied_index)
                .map(|s| s.applied_index),
            None => None,
        },
        _ => None,
    };
    match metrics::readiness(&m, leader_applied, READY_MAX_LAG, st.inner.quorum_ack_stale) {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
    }
}
