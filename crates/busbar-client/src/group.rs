//! Consumer groups: [`GroupConsumer`] shares the partitions of some topics among the members of a
//! group and keeps the group's position in each (its committed offsets); the group administration
//! calls (list, describe, reset offsets, delete) are on [`Client`] and [`Admin`](crate::Admin).
//!
//! The group protocol (`docs/consumer-groups.md`) runs in a background task per consumer: it joins,
//! heartbeats to the coordinator (the Raft leader, found and followed across failovers), gives up
//! revoked partitions (commit, then acknowledge) and starts newly assigned ones at the group's
//! committed offset. Each owned partition has a fetch task (long polls on any node) feeding one
//! bounded queue that the application drains with [`GroupConsumer::poll`] or as a
//! [`Stream`](futures::Stream).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use busbar_proto::v1 as pb;
use busbar_proto::v1::groups_client::GroupsClient;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::client::Client;
use crate::consumer::ConsumerRecord;
use crate::error::{codes, ClientError};
use crate::leader::LeaderCache;

/// Fetched batches waiting for the application, over all partitions of one consumer. With
/// `max_poll_records` records per batch at most, this bounds what a consumer holds in memory.
const QUEUED_BATCHES: usize = 16;
/// How long a fetch task that fell below a partition's start asks the leader for the new start
/// before it asks any node (see `fetch_loop`).
const LEADER_START_WAIT: Duration = Duration::from_secs(2);
/// Events waiting for the application to read them (see [`GroupConsumer::events`]).
const QUEUED_EVENTS: usize = 64;
/// Commands from the application (commit, close) waiting for the background task.
const QUEUED_COMMANDS: usize = 8;
/// Longest single long poll of a partition; a quiet partition is asked again this often.
const LONG_POLL: Duration = Duration::from_secs(5);
/// Longest pause between two attempts of anything that failed (fetch, describe, join).
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Bound on leaving the group when closing.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts at one commit when the generation moved on under it (each after a heartbeat).
const COMMIT_ATTEMPTS: u32 = 3;

/// A partition of a topic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: u32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        Self { topic: topic.into(), partition }
    }

    fn from_wire(tp: &pb::TopicPartition) -> Self {
        Self { topic: tp.topic.clone(), partition: tp.partition }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Where a partition starts when the group has committed no offset for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest record retained: a new group reads everything there is.
    #[default]
    Earliest,
    /// The end: a new group reads only what is written from now on.
    Latest,
}

/// Where [`Client::reset_group_offsets`] moves a group's offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetTo {
    Earliest,
    Latest,
    Offset(u64),
}

/// A change of the partitions this consumer owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupEvent {
    /// These partitions are now this consumer's; their records follow from the group's committed
    /// offset (or the [`StartFrom`] choice where none is committed).
    Assigned(Vec<TopicPartition>),
    /// These partitions are being given to another member. No record of them is delivered after
    /// this event. With auto-commit, their positions are committed right after it; without, the
    /// consumer waits up to [`GroupConsumerConfig::revoke_timeout`] for [`GroupConsumer::commit`]
    /// before it lets them go.
    Revoked(Vec<TopicPartition>),
    /// These partitions were taken away without a chance to commit: the coordinator removed this
    /// member (its session expired) or could not be reached for a whole session timeout. Records
    /// delivered since the last commit will be delivered again to the next owner.
    Lost(Vec<TopicPartition>),
}

/// Called by the background task on every [`GroupEvent`], before it acts on it (for a revocation:
/// before the commit). Must return quickly: heartbeats wait for it.
pub type RebalanceCallback = Arc<dyn Fn(&GroupEvent) + Send + Sync>;

/// What a [`GroupConsumer`] joins and how it commits.
#[derive(Clone)]
pub struct GroupConsumerConfig {
    /// The group id: 1 to 249 of `[A-Za-z0-9._-]` (INVALID_GROUP_ID, 24).
    pub group: String,
    /// The topics whose partitions the group shares.
    pub topics: Vec<String>,
    /// The coordinator removes a member it has not heard from for this long and gives its
    /// partitions to the others. 1 s to 300 s (INVALID_SESSION_TIMEOUT, 26). Default 10 s.
    pub session_timeout: Duration,
    /// Where a partition without a committed offset starts. Default [`StartFrom::Earliest`].
    pub start: StartFrom,
    /// Commit the consumed positions this often (and when a partition is revoked). `None`: only
    /// [`GroupConsumer::commit`] and [`GroupConsumer::close`] commit. Default 5 s.
    pub auto_commit_interval: Option<Duration>,
    /// Most records one poll returns, and one fetch asks for. Default 500.
    pub max_poll_records: usize,
    /// Without auto-commit: how long a revocation waits for the application to call
    /// [`GroupConsumer::commit`] before it gives the partitions up anyway. With auto-commit: how
    /// long it keeps retrying the revocation's commit. Default 5 s.
    pub revoke_timeout: Duration,
    /// Called on every assignment change; see [`RebalanceCallback`]. Default none.
    pub on_rebalance: Option<RebalanceCallback>,
}

impl GroupConsumerConfig {
    /// The defaults, for `group` consuming `topics`.
    pub fn new<I, S>(group: impl Into<String>, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            group: group.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            session_timeout: Duration::from_secs(10),
            start: StartFrom::Earliest,
            auto_commit_interval: Some(Duration::from_secs(5)),
            max_poll_records: 500,
            revoke_timeout: Duration::from_secs(5),
            on_rebalance: None,
        }
    }
}

impl fmt::Debug for GroupConsumerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupConsumerConfig")
            .field("group", &self.group)
            .field("topics", &self.topics)
            .field("session_timeout", &self.session_timeout)
            .field("start", &self.start)
            .field("auto_commit_interval", &self.auto_commit_interval)
            .field("max_poll_records", &self.max_poll_records)
            .field("revoke_timeout", &self.revoke_timeout)
            .field("on_rebalance", &self.on_rebalance.as_ref().map(|_| "Fn"))
            .finish()
    }
}

/// The application's progress in one owned partition.
struct PartPos {
    /// Which fetch task's records count: a partition lost and assigned again gets a new one, and
    /// records still queued from the old one are dropped.
    epoch: u64,
    /// The offset after the last record handed to the application.
    delivered: u64,
    /// The offset after the last record the application is done with (it asked for more, or
    /// committed): what auto-commit and revocations commit.
    consumed: u64,
    /// What the group has committed for it, as far as this consumer knows.
    committed: Option<u64>,
    /// Where delivery started in this assignment (the committed offset, or the `StartFrom` choice).
    start: u64,
    /// Records are still delivered; false while it is being given up.
    live: bool,
}

impl PartPos {
    /// Records were handed to the application and their position is not committed.
    fn delivered_uncommitted(&self) -> bool {
        self.delivered != self.committed.unwrap_or(self.start)
    }
}

/// State the application side and the background task share.
#[derive(Default)]
struct Shared {
    parts: Mutex<HashMap<TopicPartition, PartPos>>,
    /// Why the background task stopped, when it stopped on an error.
    fatal: Mutex<Option<ClientError>>,
    /// Member id and the generation last heard of.
    member: Mutex<(String, u64)>,
    /// The application took the event receiver: a full queue then deserves a warning.
    events_taken: AtomicBool,
    /// Partitions were given up (lost, or revoked without a commit in time) with records delivered
    /// and not committed: the application's next commit must not say everything was committed.
    dropped_uncommitted: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every guarded value is updated in one step under the lock; a panic elsewhere cannot have
    // left it half-written.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// The application is done with everything delivered so far.
    fn mark_consumed(&self) {
        for p in lock(&self.parts).values_mut() {
            p.consumed = p.delivered;
        }
    }
}

struct Batch {
    epoch: u64,
    records: Vec<ConsumerRecord>,
}

enum Cmd {
    Commit(oneshot::Sender<Result<(), ClientError>>),
    Close { commit: bool, reply: oneshot::Sender<Result<(), ClientError>> },
}

/// A member of a consumer group: receives the records of the partitions the group assigns it,
/// and commits how far it got.
///
/// ```no_run
/// use std::time::Duration;
/// use busbar_client::{Client, GroupConsumer, GroupConsumerConfig, GroupEvent};
/// use futures::StreamExt;
/// # async fn demo() -> Result<(), busbar_client::ClientError> {
/// let client = Client::connect(["127.0.0.1:9501", "127.0.0.1:9502"]).await?;
/// let mut consumer = GroupConsumer::subscribe(client, GroupConsumerConfig::new("billing", ["orders"])).await?;
/// if let Some(mut events) = consumer.events() {
///     tokio::spawn(async move {
///         while let Some(ev) = events.recv().await {
///             if let GroupEvent::Revoked(parts) = ev {
///                 println!("giving up {parts:?}");
///             }
///         }
///     });
/// }
/// while let Some(record) = consumer.next().await {
///     let r = record?;
///     println!("{}/{}@{}: {:?}", r.topic, r.partition, r.offset, r.value);
/// }
/// consumer.close().await?;
/// # Ok(()) }
/// ```
///
/// # Delivery guarantee: at least once
///
/// A partition is consumed by one member at a time, and the group's committed offset is where the
/// next owner starts. A record counts as *consumed* once the application asks for the next one
/// (the next [`poll`](Self::poll) or stream item) or calls [`commit`](Self::commit); auto-commit
/// and revocations commit consumed positions only, never a record the application is still
/// holding. So no record is skipped, and a record is delivered **twice** exactly when it was
/// delivered but its position was not committed before its partition moved to another member
/// (or to this one again), which happens when:
/// - the consumer stopped without [`close`](Self::close) (crashed, or was dropped), or its
///   session expired (it was paused, or cut off from the coordinator, for a session timeout:
///   [`GroupEvent::Lost`]), or a commit failed;
/// - the partition was revoked while the application was still processing records of it (with
///   auto-commit), or before the application committed them (without auto-commit, when it did
///   not call [`commit`](Self::commit) within [`GroupConsumerConfig::revoke_timeout`] of the
///   [`GroupEvent::Revoked`] event).
///
/// The next owner then resumes at the last committed offset. Within one partition records come in
/// offset order.
///
/// # Bounds
///
/// At most 16 fetched batches of `max_poll_records` records wait for the application; a partition
/// whose records are not taken is not fetched further. Dropping the consumer stops everything
/// at once without leaving the group (the coordinator removes it after the session timeout);
/// [`close`](Self::close) commits and leaves.
pub struct GroupConsumer {
    shared: Arc<Shared>,
    records: mpsc::Receiver<Batch>,
    /// The batch being handed out, record by record.
    buffered: VecDeque<(u64, ConsumerRecord)>,
    cmds: mpsc::Sender<Cmd>,
    events: Option<mpsc::Receiver<GroupEvent>>,
    task: Option<JoinHandle<()>>,
    max_poll_records: usize,
    /// The stream yielded its final error.
    ended: bool,
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            // Aborting the task drops its fetch tasks' handles, which abort them in turn.
            t.abort();
        }
    }
}

impl GroupConsumer {
    /// Joins the group and starts consuming what it assigns. Fails when the group cannot be
    /// joined: a bad group id (24), session timeout (26) or topic name (17), or no coordinator
    /// reachable within the client's request timeout.
    pub async fn subscribe(client: Client, config: GroupConsumerConfig) -> Result<Self, ClientError> {
        if config.topics.is_empty() {
            return Err(ClientError::InvalidArgument("subscribe to at least one topic".into()));
        }
        if config.max_poll_records == 0 {
            return Err(ClientError::InvalidArgument("max_poll_records must be at least 1".into()));
        }
        if config.auto_commit_interval.is_some_and(|i| i.is_zero()) {
            return Err(ClientError::InvalidArgument("auto_commit_interval must be positive".into()));
        }
        let shared = Arc::new(Shared::default());
        let (records_tx, records_rx) = mpsc::channel(QUEUED_BATCHES);
        let (events_tx, events_rx) = mpsc::channel(QUEUED_EVENTS);
        let (cmds_tx, cmds_rx) = mpsc::channel(QUEUED_COMMANDS);
        let max_poll_records = config.max_poll_records;
        let deadline = Instant::now() + client.opts.request_timeout;
        let mut task = Task::new(client, config, shared.clone(), records_tx, events_tx);
        task.join(deadline).await?;
        let handle = tokio::spawn(task.run(cmds_rx));
        Ok(Self {
            shared,
            records: records_rx,
            buffered: VecDeque::new(),
            cmds: cmds_tx,
            events: Some(events_rx),
            task: Some(handle),
            max_poll_records,
            ended: false,
        })
    }

    /// The assignment changes, in order. Only the first call gets the receiver; later calls get
    /// `None`. Events are kept (up to 64) from the start, so the first [`GroupEvent::Assigned`] is
    /// there even when this is called after [`subscribe`](Self::subscribe) returned. An
    /// application that takes the receiver and stops reading it loses events beyond 64 (with a
    /// warning); the group protocol never waits for it.
    pub fn events(&mut self) -> Option<mpsc::Receiver<GroupEvent>> {
        let rx = self.events.take()?;
        self.shared.events_taken.store(true, Ordering::Relaxed);
        Some(rx)
    }

    /// This member's id, as the coordinator assigned it (empty while it is rejoining).
    pub fn member_id(&self) -> String {
        lock(&self.shared.member).0.clone()
    }

    /// The group's generation as this member last heard it.
    pub fn generation(&self) -> u64 {
        lock(&self.shared.member).1
    }

    /// The partitions whose records are being delivered to this consumer, sorted.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        let mut v: Vec<TopicPartition> =
            lock(&self.shared.parts).iter().filter(|(_, p)| p.live).map(|(tp, _)| tp.clone()).collect();
        v.sort();
        v
    }

    /// Up to `max_poll_records` records, waiting up to `max_wait` for the first; empty when none
    /// came in time. Everything returned by earlier calls counts as consumed from here on.
    pub async fn poll(&mut self, max_wait: Duration) -> Result<Vec<ConsumerRecord>, ClientError> {
        self.poll_up_to(self.max_poll_records, max_wait).await
    }

    /// [`poll`](Self::poll) returning at most `max_records` records (at least one is asked for).
    /// Records not returned stay queued and are not counted as delivered.
    pub async fn poll_up_to(
        &mut self,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Vec<ConsumerRecord>, ClientError> {
        self.shared.mark_consumed();
        let deadline = Instant::now() + max_wait;
        let max = max_records.max(1);
        loop {
            let mut out = Vec::new();
            let closed = self.take_ready(max, &mut out);
            if !out.is_empty() {
                return Ok(out);
            }
            if closed {
                return Err(self.end_error());
            }
            // Cancel-safe: a batch received here is only buffered; nothing counts as delivered
            // until `take_ready` hands it out.
            match tokio::time::timeout_at(deadline, self.records.recv()).await {
                Err(_) => return Ok(Vec::new()),
                Ok(Some(b)) => self.buffer(b),
                // The background task ended; `take_ready` reports it.
                Ok(None) => {}
            }
        }
    }

    /// Commits the position after every record delivered so far, in every partition this
    /// consumer owns or is giving up. Returns once the commit is replicated. Fails with
    /// UNKNOWN_MEMBER_ID (25) when this member had been removed from the group (its partitions
    /// were [`Lost`](GroupEvent::Lost); it rejoins by itself), and with ILLEGAL_GENERATION (22)
    /// when records delivered since the last commit belonged to partitions this consumer gave up
    /// before they were committed (lost, or revoked and not committed within `revoke_timeout`):
    /// what it still owns is committed, but those records will be delivered again elsewhere.
    pub async fn commit(&self) -> Result<(), ClientError> {
        self.shared.mark_consumed();
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Commit(tx)).await.map_err(|_| self.end_error())?;
        rx.await.map_err(|_| self.end_error())?
    }

    /// Commits what was delivered (as [`commit`](Self::commit)), leaves the group, and stops. Its
    /// partitions are reported [`Revoked`](GroupEvent::Revoked) first, and go to the other members
    /// at once. Returns the commit's error, if any; the
    /// consumer has left either way.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.shared.mark_consumed();
        self.shutdown(true).await
    }

    /// Leaves the group and stops without committing anything more: the next owners resume at
    /// the last commit (for records the application could not finish).
    pub async fn leave(mut self) -> Result<(), ClientError> {
        self.shutdown(false).await
    }

    async fn shutdown(&mut self, commit: bool) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        let result = match self.cmds.send(Cmd::Close { commit, reply: tx }).await {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(self.end_error())),
            // The task had already stopped, on an error.
            Err(_) => Err(self.end_error()),
        };
        if let Some(t) = self.task.take() {
            // It ends right after answering.
            let _ = t.await;
        }
        result
    }

    fn end_error(&self) -> ClientError {
        lock(&self.shared.fatal).clone().unwrap_or_else(|| ClientError::Closed("the group consumer stopped".into()))
    }

    fn buffer(&mut self, b: Batch) {
        self.buffered.extend(b.records.into_iter().map(|r| (b.epoch, r)));
    }

    /// Moves up to `max` deliverable records into `out`, skipping those of partitions no longer
    /// owned. Never waits. True when nothing more will ever come.
    fn take_ready(&mut self, max: usize, out: &mut Vec<ConsumerRecord>) -> bool {
        let mut parts = lock(&self.shared.parts);
        let mut key = TopicPartition::new(String::new(), 0);
        while out.len() < max {
            let Some((epoch, r)) = self.buffered.pop_front() else {
                match self.records.try_recv() {
                    Ok(b) => {
                        self.buffered.extend(b.records.into_iter().map(|r| (b.epoch, r)));
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => return false,
                    Err(mpsc::error::TryRecvError::Disconnected) => return out.is_empty(),
                }
            };
            key.topic.clone_from(&r.topic);
            key.partition = r.partition;
            let Some(p) = parts.get_mut(&key) else { continue };
            // Revoked, lost (a newer epoch), or already delivered: not for the application.
            if !p.live || p.epoch != epoch || r.offset < p.delivered {
                continue;
            }
            p.delivered = r.offset + 1;
            out.push(r);
        }
        false
    }
}

impl Stream for GroupConsumer {
    type Item = Result<ConsumerRecord, ClientError>;

    /// The next record; the one before counts as consumed. After an error that stopped the
    /// consumer (see [`subscribe`](GroupConsumer::subscribe)) the stream ends.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        this.shared.mark_consumed();
        loop {
            let mut out = Vec::with_capacity(1);
            let closed = this.take_ready(1, &mut out);
            if let Some(r) = out.pop() {
                return Poll::Ready(Some(Ok(r)));
            }
            if closed {
                this.ended = true;
                return Poll::Ready(Some(Err(this.end_error())));
            }
            match this.records.poll_recv(cx) {
                Poll::Ready(Some(b)) => this.buffer(b),
                Poll::Ready(None) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Aborts a fetch task when dropped: revoking a partition, or stopping the consumer.
struct Fetcher(JoinHandle<()>);

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connection for every fetch task of a consumer (gRPC multiplexes them), moved to the next
/// broker when it fails.
struct ReadConn {
    client: Client,
    /// Index into the client's brokers (its channel is the client's kept one, asked for per fetch:
    /// a channel kept here would outlive its connection).
    state: Mutex<usize>,
}

impl ReadConn {
    async fn channel(&self) -> Result<(usize, Channel), ClientError> {
        let idx = *lock(&self.state);
        let brokers = self.client.brokers();
        let addr = brokers.get(idx % brokers.len().max(1)).cloned().unwrap_or_default();
        match self.client.channel_to(&addr).await {
            Ok(ch) => Ok((idx, ch)),
            Err(e) => {
                self.failed(idx);
                Err(ClientError::NoBroker { brokers: vec![addr], last: e })
            }
        }
    }

    /// Broker `idx` failed: the next fetch goes to the next one (unless someone moved on already).
    fn failed(&self, idx: usize) {
        let mut s = lock(&self.state);
        if *s == idx {
            *s = (idx + 1) % self.client.brokers().len().max(1);
        }
    }

    async fn fetch(&self, req: pb::FetchRequest) -> Result<pb::FetchResponse, ClientError> {
        let (idx, ch) = self.channel().await?;
        let mut r = tonic::Request::new(req);
        // The broker holds a long poll up to LONG_POLL: allow for it beyond the usual bound.
        r.set_timeout(LONG_POLL + Duration::from_secs(10));
        match self.client.api(ch).fetch(r).await {
            Ok(r) => Ok(r.into_inner()),
            Err(st) => {
                // Any failure: try another node next. One that lags, is stopping, or does not yet
                // know a topic created a moment ago may be fine again later.
                self.failed(idx);
                Err(ClientError::from_status(&st))
            }
        }
    }
}

/// Fetches one partition from `offset` on into the shared queue until aborted. Never gives up: a
/// partition the group still assigns is worth retrying, and the background task aborts this when
/// it is not.
async fn fetch_loop(
    read: Arc<ReadConn>,
    tx: mpsc::Sender<Batch>,
    tp: TopicPartition,
    epoch: u64,
    mut offset: u64,
    max_records: u32,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let req = pb::FetchRequest {
            topic: tp.topic.clone(),
            partition: tp.partition,
            offset,
            max_records,
            max_bytes: 0,
            max_wait_ms: LONG_POLL.as_millis() as u32,
        };
        match read.fetch(req).await {
            Ok(resp) => {
                backoff = Duration::from_millis(50);
                let records: Vec<ConsumerRecord> = resp
                    .records
                    .into_iter()
                    // Offsets only move forward; anything below was fetched before.
                    .filter(|r| r.offset >= offset)
                    .map(|r| ConsumerRecord::from_wire(&tp.topic, tp.partition, r))
                    .collect();
                let Some(last) = records.last().map(|r| r.offset) else { continue };
                offset = last + 1;
                // Waits while the queue is full: the application sets the pace.
                if tx.send(Batch { epoch, records }).await.is_err() {
                    return;
                }
                continue;
            }
            Err(e) if e.code() == Some(codes::OFFSET_OUT_OF_RANGE) => {
                // Below the start: retention removed those records, and the oldest left is where
                // the group can go on. Above the end: that node lags; another one will do.
                // The start offset from the leader (`ListOffsets`); without one, as some node has
                // applied it (`DescribeTopic`): a retention cut takes effect only once committed,
                // and a node that has not applied it yet only makes this loop try again. (A node
                // still holding a deleted topic of the same name could answer for it: the leader
                // is asked first.)
                // The leader is given `LEADER_START_WAIT`, not the client's full retry budget (about
                // 17 s without a leader), during which this partition would deliver nothing.
                let starts = match tokio::time::timeout(LEADER_START_WAIT, read.client.list_offsets(&tp.topic)).await {
                    Ok(Ok(offsets)) => Some(offsets),
                    _ => read.client.describe_topic(&tp.topic).await.ok().map(|d| d.partitions),
                };
                if let Some(offsets) = starts {
                    if let Some(p) = offsets.iter().find(|p| p.partition == tp.partition) {
                        if offset < p.start_offset {
                            tracing::warn!(partition = %tp, from = offset, to = p.start_offset,
                                "records were removed by retention before the group consumed them; skipping ahead");
                            offset = p.start_offset;
                            continue;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(partition = %tp, offset, error = %e, "fetch failed; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The group protocol, run by one background task per consumer.
struct Task {
    client: Client,
    leader: LeaderCache,
    cfg: GroupConsumerConfig,
    shared: Arc<Shared>,
    records: mpsc::Sender<Batch>,
    events: mpsc::Sender<GroupEvent>,
    read: Arc<ReadConn>,
    member_id: String,
    joined: bool,
    /// The newest generation the coordinator told us.
    generation: u64,
    /// The generation whose assignment we have applied: what heartbeats acknowledge.
    applied: u64,
    heartbeat_every: Duration,
    heartbeat_due: Instant,
    join_backoff: Duration,
    /// When the last heartbeat (or join) the coordinator answered was sent. The coordinator saw it
    /// later than that, so a session measured from here ends no later than the coordinator's.
    last_ok: Instant,
    fetchers: HashMap<TopicPartition, Fetcher>,
    /// Assigned, not started yet: waiting for the group's committed offset.
    starting: BTreeSet<TopicPartition>,
    start_retry: Option<Instant>,
    start_backoff: Duration,
    /// Given up, not acknowledged yet: their positions may still be committed.
    revoking: BTreeSet<TopicPartition>,
    /// With auto-commit: when to (re)try committing the revoked partitions.
    revoke_commit_at: Option<Instant>,
    /// When to give them up even without a commit.
    revoke_deadline: Option<Instant>,
    next_epoch: u64,
}

fn is_transient(e: &ClientError) -> bool {
    e.is_retriable() || matches!(e.code(), Some(codes::INDETERMINATE | codes::REQUEST_TIMED_OUT))
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(24 * 3600)
}

impl Task {
    fn new(
        client: Client,
        cfg: GroupConsumerConfig,
        shared: Arc<Shared>,
        records: mpsc::Sender<Batch>,
        events: mpsc::Sender<GroupEvent>,
    ) -> Self {
        let now = Instant::now();
        Self {
            leader: LeaderCache::new(client.clone()),
            read: Arc::new(ReadConn { client: client.clone(), state: Mutex::new(0) }),
            client,
            cfg,
            shared,
            records,
            events,
            member_id: String::new(),
            joined: false,
            generation: 0,
            applied: 0,
            heartbeat_every: Duration::from_secs(1),
            heartbeat_due: now,
            join_backoff: Duration::from_millis(100),
            last_ok: now,
            fetchers: HashMap::new(),
            starting: BTreeSet::new(),
            start_retry: None,
            start_backoff: Duration::from_millis(100),
            revoking: BTreeSet::new(),
            revoke_commit_at: None,
            revoke_deadline: None,
            next_epoch: 0,
        }
    }

    fn session_ms(&self) -> u32 {
        u32::try_from(self.cfg.session_timeout.as_millis()).unwrap_or(u32::MAX)
    }

    /// One call to the coordinator (the leader), following NOT_LEADER redirects and finding the
    /// leader again after an election or a broken connection, until `deadline`.
    async fn coord<T, F, Fut>(&self, deadline: Instant, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(GroupsClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut backoff = Duration::from_millis(50);
        let mut last_redirect: Option<String> = None;
        loop {
            let err = match self.leader.channel().await {
                Err(e) => e,
                Ok((addr, ch)) => {
                    let groups = GroupsClient::new(ch).max_decoding_message_size(self.client.opts.max_message_bytes);
                    match tokio::time::timeout_at(deadline, call(groups)).await {
                        Ok(Ok(r)) => return Ok(r.into_inner()),
                        Ok(Err(st)) => {
                            let e = ClientError::from_status(&st);
                            match &e {
                                ClientError::Api { code: codes::NOT_LEADER, leader_addr: Some(to), .. }
                                    if *to != addr =>
                                {
                                    self.leader.redirect(to);
                                    // At once, but only once to the same place: two nodes naming
                                    // each other mid-election must not make us spin.
                                    let fresh = last_redirect.as_deref() != Some(to.as_str());
                                    last_redirect = Some(to.clone());
                                    if fresh {
                                        continue;
                                    }
                                }
                                _ if is_transient(&e) => self.leader.forget(&addr),
                                _ => return Err(e),
                            }
                            e
                        }
                        Err(_) => {
                            self.leader.forget(&addr);
                            return Err(ClientError::Api {
                                code: codes::REQUEST_TIMED_OUT,
                                message: format!("the group coordinator at {addr} did not answer in time"),
                                leader_addr: None,
                            });
                        }
                    }
                }
            };
            if Instant::now() + backoff >= deadline {
                return Err(err);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn emit(&self, ev: GroupEvent) {
        if let Some(cb) = &self.cfg.on_rebalance {
            cb(&ev);
        }
        match self.events.try_send(ev) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => {
                if self.shared.events_taken.load(Ordering::Relaxed) {
                    tracing::warn!(group = %self.cfg.group, event = ?ev, "event queue full; event dropped");
                }
            }
        }
    }

    /// Joins (again); on success applies the assignment it comes with.
    async fn join(&mut self, deadline: Instant) -> Result<(), ClientError> {
        let sent = Instant::now();
        let req = pb::JoinGroupRequest {
            group: self.cfg.group.clone(),
            member_id: self.member_id.clone(),
            topics: self.cfg.topics.clone(),
            session_timeout_ms: self.session_ms(),
        };
        let r = self
            .coord(deadline, |mut g| {
                let req = req.clone();
                async move { g.join_group(req).await }
            })
            .await?;
        tracing::debug!(group = %self.cfg.group, member = %r.member_id, generation = r.generation, "joined");
        self.member_id = r.member_id;
        self.joined = true;
        self.join_backoff = Duration::from_millis(100);
        self.heartbeat_every = Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(50)));
        self.heartbeat_due = Instant::now() + self.heartbeat_every;
        self.last_ok = sent;
        self.on_assignment(r.generation, &r.assigned);
        Ok(())
    }

    /// One heartbeat with the applied generation; applies the assignment in the answer.
    async fn heartbeat(&mut self) -> Result<(), ClientError> {
        let sent = Instant::now();
        self.heartbeat_due = sent + self.heartbeat_every;
        let req = pb::HeartbeatRequest {
            group: self.cfg.group.clone(),
            member_id: self.member_id.clone(),
            generation: self.applied,
        };
        let r = self
            .coord(sent + self.cfg.session_timeout / 2, |mut g| {
                let req = req.clone();
                async move { g.heartbeat(req).await }
            })
            .await;
        match r {
            Ok(r) => {
                self.last_ok = sent;
                self.on_assignment(r.generation, &r.assigned);
                Ok(())
            }
            Err(e) => {
                if e.code() == Some(codes::UNKNOWN_MEMBER_ID) {
                    self.expelled();
                }
                Err(e)
            }
        }
    }

    /// Brings what this consumer fetches in line with what the coordinator assigns it.
    fn on_assignment(&mut self, generation: u64, assigned: &[pb::TopicPartition]) {
        self.generation = generation;
        *lock(&self.shared.member) = (self.member_id.clone(), generation);
        let assigned: BTreeSet<TopicPartition> = assigned.iter().map(TopicPartition::from_wire).collect();
        let owned: BTreeSet<TopicPartition> = self.fetchers.keys().chain(self.starting.iter()).cloned().collect();

        // Given back while we were still giving them up (the plan changed): go on from where the
        // application is, as if nothing happened.
        let back: Vec<TopicPartition> = self.revoking.intersection(&assigned).cloned().collect();
        for tp in &back {
            self.revoking.remove(tp);
            let delivered = {
                let mut parts = lock(&self.shared.parts);
                parts.get_mut(tp).map(|p| {
                    p.live = true;
                    p.delivered
                })
            };
            match delivered {
                Some(d) => self.spawn_fetcher(tp.clone(), d),
                None => {
                    self.starting.insert(tp.clone());
                }
            }
        }
        if !back.is_empty() {
            self.emit(GroupEvent::Assigned(back.clone()));
        }

        let revoked: Vec<TopicPartition> = owned.difference(&assigned).cloned().collect();
        if !revoked.is_empty() {
            self.revoke(revoked);
        }
        let added: Vec<TopicPartition> =
            assigned.iter().filter(|tp| !owned.contains(*tp) && !back.contains(*tp)).cloned().collect();
        if !added.is_empty() {
            self.starting.extend(added);
            self.start_retry = Some(Instant::now());
        }
        if self.revoking.is_empty() {
            // Nothing to give up (any longer): this generation is applied.
            self.applied = generation;
            self.revoke_deadline = None;
            self.revoke_commit_at = None;
        }
    }

    /// Stops delivering `tps` and starts giving them up: commit (now with auto-commit, or when
    /// the application commits), then acknowledge.
    fn revoke(&mut self, tps: Vec<TopicPartition>) {
        let mut started = Vec::new();
        {
            let mut parts = lock(&self.shared.parts);
            for tp in tps {
                self.fetchers.remove(&tp);
                // Never started: nothing delivered, nothing to commit.
                self.starting.remove(&tp);
                if let Some(p) = parts.get_mut(&tp) {
                    p.live = false;
                    self.revoking.insert(tp.clone());
                    started.push(tp);
                }
            }
        }
        if started.is_empty() {
            return;
        }
        tracing::debug!(group = %self.cfg.group, partitions = ?started, generation = self.generation, "revoked");
        self.emit(GroupEvent::Revoked(started));
        let now = Instant::now();
        if self.revoke_deadline.is_none() {
            self.revoke_deadline = Some(now + self.cfg.revoke_timeout);
        }
        if self.cfg.auto_commit_interval.is_some() {
            self.revoke_commit_at = Some(now);
        }
    }

    /// The revoked partitions are committed (or their time is up): let them go, and say so at once.
    fn finish_revocation(&mut self) {
        {
            let mut parts = lock(&self.shared.parts);
            for tp in &self.revoking {
                if parts.remove(tp).is_some_and(|p| p.delivered_uncommitted()) {
                    self.shared.dropped_uncommitted.store(true, Ordering::SeqCst);
                }
            }
        }
        self.revoking.clear();
        self.revoke_deadline = None;
        self.revoke_commit_at = None;
        self.applied = self.generation;
        self.heartbeat_due = Instant::now();
    }

    /// Everything this consumer owned is gone, without a commit.
    fn lose_all(&mut self) {
        let mut lost: Vec<TopicPartition> = {
            let mut parts = lock(&self.shared.parts);
            if parts.values().any(PartPos::delivered_uncommitted) {
                self.shared.dropped_uncommitted.store(true, Ordering::SeqCst);
            }
            parts.drain().map(|(tp, _)| tp).collect()
        };
        lost.sort();
        self.fetchers.clear();
        self.starting.clear();
        self.start_retry = None;
        self.revoking.clear();
        self.revoke_deadline = None;
        self.revoke_commit_at = None;
        // Nothing held, nothing to give up: any generation is applied.
        self.applied = self.generation;
        if !lost.is_empty() {
            self.emit(GroupEvent::Lost(lost));
        }
    }

    /// The coordinator no longer knows this member (its session expired): start over.
    fn expelled(&mut self) {
        tracing::warn!(group = %self.cfg.group, member = %self.member_id,
            "removed from the group (session expired); rejoining");
        self.lose_all();
        self.joined = false;
        self.member_id.clear();
        self.generation = 0;
        self.applied = 0;
        *lock(&self.shared.member) = (String::new(), 0);
        self.heartbeat_due = Instant::now();
    }

    fn spawn_fetcher(&mut self, tp: TopicPartition, offset: u64) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        if let Some(p) = lock(&self.shared.parts).get_mut(&tp) {
            p.epoch = epoch;
        }
        let max = u32::try_from(self.cfg.max_poll_records).unwrap_or(u32::MAX);
        let h = tokio::spawn(fetch_loop(self.read.clone(), self.records.clone(), tp.clone(), epoch, offset, max));
        self.fetchers.insert(tp, Fetcher(h));
    }

    /// Starts the assigned partitions at the group's committed offsets (a linearizable read on the
    /// coordinator: it sees the previous owner's last commit).
    async fn start_partitions(&mut self) {
        self.start_retry = None;
        if self.starting.is_empty() || !self.joined {
            return;
        }
        let req = pb::DescribeGroupRequest { group: self.cfg.group.clone() };
        let d = self
            .coord(Instant::now() + self.cfg.session_timeout / 2, |mut g| {
                let req = req.clone();
                async move { g.describe_group(req).await }
            })
            .await;
        let d = match d {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(group = %self.cfg.group, error = %e, "reading committed offsets failed; retrying");
                self.start_retry = Some(Instant::now() + self.start_backoff);
                self.start_backoff = (self.start_backoff * 2).min(MAX_BACKOFF);
                return;
            }
        };
        self.start_backoff = Duration::from_millis(100);
        let mut started = Vec::new();
        for tp in self.starting.clone() {
            let found = d.partitions.iter().find(|p| p.topic == tp.topic && p.partition == tp.partition);
            // Not ours in the coordinator's newer view: the next heartbeat will say what is.
            let Some(p) = found.filter(|p| p.owner == self.member_id) else { continue };
            let (position, committed) = if p.has_committed {
                (p.committed, Some(p.committed))
            } else {
                (
                    match self.cfg.start {
                        StartFrom::Earliest => p.start_offset,
                        StartFrom::Latest => p.end_offset,
                    },
                    None,
                )
            };
            self.starting.remove(&tp);
            // A position not committed yet (committed: None) is committed by the next commit, so
            // the group keeps where it started even if this member stops before consuming.
            lock(&self.shared.parts).insert(
                tp.clone(),
                PartPos { epoch: 0, delivered: position, consumed: position, committed, start: position, live: true },
            );
            self.spawn_fetcher(tp.clone(), position);
            started.push(tp);
        }
        if !started.is_empty() {
            tracing::debug!(group = %self.cfg.group, partitions = ?started, "assigned");
            self.emit(GroupEvent::Assigned(started));
        }
        if !self.starting.is_empty() {
            self.start_retry = Some(Instant::now() + self.start_backoff);
            self.start_backoff = (self.start_backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Commits the consumed position of every owned or revoking partition that moved since its
    /// last commit. On ILLEGAL_GENERATION, heartbeats to learn the current assignment and commits
    /// again what is still ours.
    async fn commit(&mut self) -> Result<(), ClientError> {
        for attempt in 1..=COMMIT_ATTEMPTS {
            let offsets: Vec<(TopicPartition, u64)> = lock(&self.shared.parts)
                .iter()
                .filter(|(_, p)| p.committed != Some(p.consumed))
                .map(|(tp, p)| (tp.clone(), p.consumed))
                .collect();
            if offsets.is_empty() {
                return Ok(());
            }
            let req = pb::CommitOffsetsRequest {
                group: self.cfg.group.clone(),
                member_id: self.member_id.clone(),
                generation: self.generation,
                offsets: offsets
                    .iter()
                    .map(|(tp, o)| pb::OffsetCommit { topic: tp.topic.clone(), partition: tp.partition, offset: *o })
                    .collect(),
            };
            // Repeating a commit is harmless (the same offsets again), and commits are sent one at
            // a time, so a retry never lands after a newer commit of ours.
            let r = self
                .coord(Instant::now() + self.cfg.session_timeout, |mut g| {
                    let req = req.clone();
                    async move { g.commit_offsets(req).await }
                })
                .await;
            match r {
                Ok(_) => {
                    let mut parts = lock(&self.shared.parts);
                    for (tp, o) in offsets {
                        if let Some(p) = parts.get_mut(&tp) {
                            p.committed = Some(o);
                        }
                    }
                    return Ok(());
                }
                Err(e) if e.code() == Some(codes::ILLEGAL_GENERATION) && attempt < COMMIT_ATTEMPTS => {
                    tracing::debug!(group = %self.cfg.group, error = %e, "commit fenced; heartbeating to catch up");
                    self.heartbeat().await?;
                }
                Err(e) => {
                    if e.code() == Some(codes::UNKNOWN_MEMBER_ID) {
                        self.expelled();
                    }
                    return Err(e);
                }
            }
        }
        Err(ClientError::Api {
            code: codes::ILLEGAL_GENERATION,
            message: "the group kept rebalancing during the commit".into(),
            leader_addr: None,
        })
    }

    /// Work that waits on something other than a timer of the main loop: partitions to start,
    /// revocations to commit.
    async fn drive(&mut self) {
        let now = Instant::now();
        if self.start_retry.is_some_and(|t| t <= now) {
            self.start_partitions().await;
        }
        if self.revoke_commit_at.is_some_and(|t| t <= now) && !self.revoking.is_empty() {
            self.revoke_commit_at = None;
            match self.commit().await {
                Ok(()) => {
                    if !self.revoking.is_empty() {
                        self.finish_revocation();
                    }
                }
                Err(e) => {
                    tracing::debug!(group = %self.cfg.group, error = %e, "committing revoked partitions failed; retrying");
                    if !self.revoking.is_empty() {
                        self.revoke_commit_at = Some(Instant::now() + Duration::from_millis(200));
                    }
                }
            }
        }
    }

    async fn heartbeat_tick(&mut self) -> Result<(), ClientError> {
        if !self.joined {
            let deadline = Instant::now() + self.cfg.session_timeout;
            return match self.join(deadline).await {
                Ok(()) => Ok(()),
                Err(e) if is_transient(&e) => {
                    tracing::debug!(group = %self.cfg.group, error = %e, "joining failed; retrying");
                    self.heartbeat_due = Instant::now() + self.join_backoff;
                    self.join_backoff = (self.join_backoff * 2).min(Duration::from_secs(5));
                    Ok(())
                }
                Err(e) => Err(e),
            };
        }
        if let Err(e) = self.heartbeat().await {
            if e.code() != Some(codes::UNKNOWN_MEMBER_ID) {
                tracing::debug!(group = %self.cfg.group, error = %e, "heartbeat failed");
            }
        }
        // Not heard by the coordinator for a whole session: it has (or soon will have) given our
        // partitions to others. Stop, so no partition is consumed by two members; the membership
        // is kept, in case a new coordinator gives us grace and them back.
        if self.joined && self.last_ok.elapsed() >= self.cfg.session_timeout && !lock(&self.shared.parts).is_empty() {
            tracing::warn!(group = %self.cfg.group, "no heartbeat answered for a session timeout; giving up partitions");
            self.lose_all();
        }
        Ok(())
    }

    async fn close(&mut self, commit: bool) -> Result<(), ClientError> {
        let owned: Vec<TopicPartition> = {
            let mut v: Vec<TopicPartition> =
                lock(&self.shared.parts).iter().filter(|(_, p)| p.live).map(|(tp, _)| tp.clone()).collect();
            v.sort();
            v
        };
        self.fetchers.clear();
        if !owned.is_empty() {
            self.emit(GroupEvent::Revoked(owned));
        }
        let committed = if commit && self.joined { self.commit().await } else { Ok(()) };
        if self.joined {
            let req = pb::LeaveGroupRequest { group: self.cfg.group.clone(), member_id: self.member_id.clone() };
            let left = self
                .coord(Instant::now() + LEAVE_TIMEOUT, |mut g| {
                    let req = req.clone();
                    async move { g.leave_group(req).await }
                })
                .await;
            if let Err(e) = left {
                // Harmless: the coordinator removes us after the session timeout instead.
                tracing::debug!(group = %self.cfg.group, error = %e, "leaving the group failed");
            }
        }
        lock(&self.shared.parts).clear();
        committed
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        let mut auto_at = self.cfg.auto_commit_interval.map(|i| Instant::now() + i);
        loop {
            self.drive().await;
            let wake = [self.start_retry, self.revoke_commit_at].into_iter().flatten().min();
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    // The consumer was dropped (its Drop aborts us too).
                    None => return,
                    Some(Cmd::Commit(reply)) => {
                        let r = self.commit().await;
                        // The application committed after a revocation: that is what it was
                        // given the chance to do.
                        if r.is_ok() && !self.revoking.is_empty() {
                            self.finish_revocation();
                        }
                        // Records it was given before are not all committed: their partitions
                        // went (lost, or a revocation not committed in time) before this commit.
                        let dropped = self.shared.dropped_uncommitted.swap(false, Ordering::SeqCst);
                        let r = match r {
                            Ok(()) if dropped => Err(ClientError::Api {
                                code: codes::ILLEGAL_GENERATION,
                                message: "some records delivered since the last commit were not committed: their \
                                          partitions were lost or revoked first (they go to the next owner again)"
                                    .into(),
                                leader_addr: None,
                            }),
                            r => r,
                        };
                        let _ = reply.send(r);
                    }
                    Some(Cmd::Close { commit, reply }) => {
                        let r = self.close(commit).await;
                        let _ = reply.send(r);
                        return;
                    }
                },
                _ = tokio::time::sleep_until(self.heartbeat_due) => {
                    if let Err(e) = self.heartbeat_tick().await {
                        tracing::warn!(group = %self.cfg.group, error = %e, "the group consumer stops");
                        *lock(&self.shared.fatal) = Some(e);
                        return;
                    }
                }
                _ = tokio::time::sleep_until(auto_at.unwrap_or_else(far_future)), if auto_at.is_some() => {
                    if let Err(e) = self.commit().await {
                        tracing::debug!(group = %self.cfg.group, error = %e, "auto-commit failed");
                    }
                    auto_at = self.cfg.auto_commit_interval.map(|i| Instant::now() + i);
                }
                _ = tokio::time::sleep_until(self.revoke_deadline.unwrap_or_else(far_future)),
                    if self.revoke_deadline.is_some() => {
                    tracing::warn!(group = %self.cfg.group, partitions = ?self.revoking,
                        "revoked partitions released without a commit after the revoke timeout");
                    self.finish_revocation();
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(far_future)), if wake.is_some() => {}
            }
        }
    }
}

impl Client {
    pub(crate) fn groups(&self, ch: Channel) -> GroupsClient<Channel> {
        GroupsClient::new(ch)
            .max_decoding_message_size(self.opts.max_message_bytes)
            .max_encoding_message_size(self.opts.max_message_bytes)
    }

    /// Every consumer group's name.
    pub async fn list_groups(&self) -> Result<Vec<String>, ClientError> {
        self.with_retry(|ch| {
            let mut g = self.groups(ch);
            async move { g.list_groups(pb::ListGroupsRequest {}).await.map(|r| r.into_inner().groups) }
        })
        .await
    }

    /// A group's members and their partitions, and per partition its committed offset, start and
    /// end offsets and lag (end minus committed). Linearizable: a commit that returned is visible.
    /// GROUP_ID_NOT_FOUND (69) for no such group.
    pub async fn describe_group(&self, group: &str) -> Result<pb::DescribeGroupResponse, ClientError> {
        let req = pb::DescribeGroupRequest { group: group.into() };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut g = self.groups(ch);
            async move { g.describe_group(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Moves a group's committed offsets in every partition of `topic`. Only for a group without
    /// members: NON_EMPTY_GROUP (68) otherwise. An offset outside a partition's range fails with
    /// OFFSET_OUT_OF_RANGE (1). Creates the group if it does not exist.
    pub async fn reset_group_offsets(&self, group: &str, topic: &str, to: ResetTo) -> Result<(), ClientError> {
        let to = match to {
            ResetTo::Earliest => pb::reset_offsets_request::To::Earliest(true),
            ResetTo::Latest => pb::reset_offsets_request::To::Latest(true),
            ResetTo::Offset(o) => pb::reset_offsets_request::To::Offset(o),
        };
        let req = pb::ResetOffsetsRequest { group: group.into(), topic: topic.into(), to: Some(to) };
        // Repeating a reset gives the same offsets: safe to resend.
        self.with_retry(|ch| {
            let req = req.clone();
            let mut g = self.groups(ch);
            async move { g.reset_offsets(req).await.map(|_| ()) }
        })
        .await
    }

    /// Deletes a group and its offsets. Only for a group without members (68); 69 for no such
    /// group.
    pub async fn delete_group(&self, group: &str) -> Result<(), ClientError> {
        let req = pb::DeleteGroupRequest { group: group.into() };
        // Not resent after a broken connection: a repeat of a delete that took effect would say
        // the group does not exist.
        self.with_retry_unsent(|ch| {
            let req = req.clone();
            let mut g = self.groups(ch);
            async move { g.delete_group(req).await.map(|_| ()) }
        })
        .await
    }
}
