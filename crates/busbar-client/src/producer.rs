//! A batching, retrying, optionally idempotent producer.
//!
//! Records are grouped per partition into batches. A background task sends a batch when it is full
//! (`max_batch_bytes`), when it has waited `linger`, or on [`Producer::flush`]. At most one batch
//! per partition is in flight, and at most `max_in_flight` over all partitions: one per partition
//! keeps an idempotent producer's sequence numbers in log order, so a retried batch can never land
//! behind a later one. Memory is bounded by `max_buffer_bytes`: [`Producer::send`] waits while the
//! buffer is full.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use busbar_proto::v1 as pb;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{Client, Record};
use crate::error::{codes, ClientError};
use crate::leader::LeaderCache;

/// How a [`Producer`] batches, bounds and retries.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// How long a batch that is not full waits for more records before it is sent.
    pub linger: Duration,
    /// A batch is sent once it holds this many bytes ([`Record::size_hint`]). A single larger
    /// record travels alone (and the broker may reject it with RECORD_TOO_LARGE).
    pub max_batch_bytes: usize,
    /// Batches awaiting their answer at once, over all partitions (at most one per partition).
    pub max_in_flight: usize,
    /// Bytes of records buffered and not yet acknowledged; [`Producer::send`] waits above it.
    pub max_buffer_bytes: usize,
    /// How long one batch may be retried, counted from its first attempt; then its records fail
    /// with the last error.
    pub delivery_timeout: Duration,
    /// First pause before a retry; doubles on each further retry up to `max_retry_backoff`.
    pub retry_backoff: Duration,
    pub max_retry_backoff: Duration,
    /// Exactly-once appends per batch across retries (see the crate documentation). Without it, a
    /// batch whose outcome is unknown fails with an error for which
    /// [`ClientError::is_indeterminate`] is true, rather than risk writing it twice.
    pub idempotent: bool,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            linger: Duration::from_millis(5),
            max_batch_bytes: 256 << 10,
            max_in_flight: 64,
            max_buffer_bytes: 32 << 20,
            delivery_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_millis(50),
            max_retry_backoff: Duration::from_secs(1),
            idempotent: true,
        }
    }
}

/// Where an acknowledged record was written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecordMetadata {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

type Delivery = Result<RecordMetadata, ClientError>;

/// Called once with a record's outcome; see [`Producer::send_with_callback`].
pub type DeliveryCallback = Box<dyn FnOnce(Result<RecordMetadata, ClientError>) + Send>;

/// Who learns a record's outcome.
enum Waiter {
    /// A [`DeliveryFuture`]'s sender.
    Future(oneshot::Sender<Delivery>),
    /// A callback, run on the producer's task that received the answer.
    Callback(DeliveryCallback),
}

impl Waiter {
    fn answer(self, outcome: Delivery) {
        match self {
            // The caller may have dropped its future: nobody to tell.
            Waiter::Future(tx) => {
                let _ = tx.send(outcome);
            }
            Waiter::Callback(f) => f(outcome),
        }
    }
}

fn stopped() -> ClientError {
    ClientError::Closed("the producer stopped before the record's batch was answered".into())
}

/// Resolves when the record's batch is acknowledged (committed on a quorum) or has failed.
#[must_use = "a record's outcome is only known by awaiting its DeliveryFuture"]
#[derive(Debug)]
pub struct DeliveryFuture {
    rx: oneshot::Receiver<Delivery>,
}

impl Future for DeliveryFuture {
    type Output = Delivery;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Delivery> {
        Pin::new(&mut self.rx).poll(cx).map(|r| match r {
            Ok(d) => d,
            Err(_) => Err(stopped()),
        })
    }
}

/// Sends records in batches; see the [module documentation](self) and the crate documentation for
/// the delivery guarantees.
///
/// ```no_run
/// use busbar_client::{Client, Producer, ProducerConfig, Record};
/// # async fn demo() -> Result<(), busbar_client::ClientError> {
/// let client = Client::connect(["127.0.0.1:9501"]).await?;
/// let producer = Producer::new(client, ProducerConfig::default()).await?;
/// // Same key, same partition, acknowledged in send order.
/// let a = producer.send("orders", Record::keyed("customer-7", "created")).await?;
/// let b = producer.send("orders", Record::keyed("customer-7", "paid")).await?;
/// let (a, b) = (a.await?, b.await?);
/// assert!(a.partition == b.partition && a.offset < b.offset);
/// producer.close().await;
/// # Ok(()) }
/// ```
pub struct Producer {
    shared: Arc<Shared>,
    driver: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    client: Client,
    config: ProducerConfig,
    leader: LeaderCache,
    state: Mutex<State>,
    /// Wakes the sending task: a new batch to time, a full batch, a finished one, a flush.
    wake: Notify,
    /// Wakes flushers: some records finished.
    done: Notify,
    /// One permit per buffered byte.
    buffer: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
}

struct State {
    topics: HashMap<String, TopicState>,
    /// The producer id partitions start with (0: not idempotent).
    producer_id: u64,
    /// Every record gets the next id, so a flush can wait for exactly the records sent before it.
    next_id: u64,
    unfinished: BTreeSet<u64>,
    /// Batches holding a record with a smaller id are sent without waiting for `linger`.
    flush_below: u64,
    closing: bool,
    in_flight: usize,
}

struct TopicState {
    parts: Vec<PartState>,
    /// Where keyless records without a partition go, until that partition's batch is sent.
    sticky: u32,
}

struct PartState {
    /// Batches in send order; only the last may still take records.
    queue: VecDeque<Batch>,
    in_flight: bool,
    producer_id: u64,
    /// The sequence number of this partition's next batch.
    next_seq: u64,
    /// A batch failed after it may have been written: the cluster's idea of our sequence is
    /// unknown, so the partition continues under a fresh producer id from sequence 0. Reusing the
    /// old sequence could make the cluster answer a new batch as a duplicate of the old one.
    stale_id: bool,
}

struct Batch {
    records: Vec<pb::Record>,
    waiters: Vec<(u64, Waiter)>,
    bytes: usize,
    created: Instant,
    /// Takes no more records.
    full: bool,
    /// The buffer bytes this batch holds, given back when it is answered.
    memory: Option<OwnedSemaphorePermit>,
}

/// A batch dropped unanswered (its task was cancelled) tells its records' waiters so: a future
/// would see its sender dropped, a callback must be called.
impl Drop for Batch {
    fn drop(&mut self) {
        for (_, w) in self.waiters.drain(..) {
            w.answer(Err(stopped()));
        }
    }
}

/// One batch handed to a sending task.
struct Dispatch {
    topic: String,
    partition: u32,
    batch: Batch,
    /// `None`: get a fresh producer id first (the partition's was stale).
    producer_id: Option<u64>,
    sequence: u64,
    _slot: OwnedSemaphorePermit,
}

struct Outcome {
    result: Result<pb::ProduceResponse, ClientError>,
    /// The id the batch was sent under; `None` if no fresh id could be had.
    producer_id: Option<u64>,
    sequence: u64,
    /// Some attempt may have been written.
    maybe_written: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State is updated under short critical sections with no await and no user code; a panic
    // elsewhere does not leave it half-updated in a way later calls could not cope with.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Producer {
    /// Starts a producer on `client`. With `idempotent`, first asks the cluster for a producer id.
    pub async fn new(client: Client, config: ProducerConfig) -> Result<Self, ClientError> {
        if config.max_batch_bytes == 0 || config.max_in_flight == 0 || config.max_buffer_bytes == 0 {
            return Err(ClientError::InvalidArgument(
                "max_batch_bytes, max_in_flight and max_buffer_bytes must be above 0".into(),
            ));
        }
        let mut config = config;
        // Semaphore permits are acquired as u32: keep the whole buffer within that.
        config.max_buffer_bytes = config.max_buffer_bytes.min(u32::MAX as usize);
        let leader = LeaderCache::new(client.clone());
        let shared = Arc::new(Shared {
            buffer: Arc::new(Semaphore::new(config.max_buffer_bytes)),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            client,
            leader,
            state: Mutex::new(State {
                topics: HashMap::new(),
                producer_id: 0,
                next_id: 0,
                unfinished: BTreeSet::new(),
                flush_below: 0,
                closing: false,
                in_flight: 0,
            }),
            wake: Notify::new(),
            done: Notify::new(),
            config,
        });
        if shared.config.idempotent {
            let deadline = Instant::now() + shared.config.delivery_timeout;
            lock(&shared.state).producer_id = shared.fresh_producer_id(deadline).await?;
        }
        let driver = tokio::spawn(run(shared.clone()));
        Ok(Self { shared, driver: Mutex::new(Some(driver)) })
    }

    /// Queues `record` for `topic` and returns once it is buffered; the returned future resolves
    /// when it is acknowledged or has failed. A keyed record goes to
    /// [`for_key`](busbar_proto::partition::for_key)`(key, partitions)` (the partition Kafka would
    /// pick); a keyless one joins the current batch of a partition chosen per batch.
    ///
    /// Fails at once for an unknown topic (UNKNOWN_TOPIC_OR_PARTITION, code 3) and after
    /// [`close`](Self::close). Waits while `max_buffer_bytes` are buffered.
    pub async fn send(&self, topic: &str, record: Record) -> Result<DeliveryFuture, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(topic, None, record, Waiter::Future(tx)).await?;
        Ok(DeliveryFuture { rx })
    }

    /// Like [`send`](Self::send), to a given partition whatever the key.
    pub async fn send_to(&self, topic: &str, partition: u32, record: Record) -> Result<DeliveryFuture, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(topic, Some(partition), record, Waiter::Future(tx)).await?;
        Ok(DeliveryFuture { rx })
    }

    /// Like [`send`](Self::send), but the outcome goes to `callback` instead of a future (as
    /// Kafka's `send(record, callback)`): the cheapest way to follow many records, with no future
    /// to poll per record. When this returns `Ok`, `callback` is called exactly once, with the
    /// record's metadata or its error (also if the producer stops first); when it returns `Err`,
    /// never. It runs on the producer's task that received the answer, in record order within a
    /// batch: keep it short and never block in it.
    pub async fn send_with_callback(
        &self,
        topic: &str,
        record: Record,
        callback: impl FnOnce(Result<RecordMetadata, ClientError>) + Send + 'static,
    ) -> Result<(), ClientError> {
        self.enqueue(topic, None, record, Waiter::Callback(Box::new(callback))).await
    }

    /// Sends everything buffered now and waits until every record sent before this call is
    /// acknowledged or has failed (each record's outcome is in its [`DeliveryFuture`]).
    pub async fn flush(&self) {
        let target = {
            let mut st = lock(&self.shared.state);
            st.flush_below = st.flush_below.max(st.next_id);
            st.next_id
        };
        self.shared.wake.notify_one();
        self.shared.wait_finished(target).await;
    }

    /// Stops taking records, delivers the buffered ones (as [`flush`](Self::flush)) and stops the
    /// background task. Later sends fail with [`ClientError::Closed`].
    pub async fn close(&self) {
        let target = {
            let mut st = lock(&self.shared.state);
            st.closing = true;
            st.next_id
        };
        self.shared.wake.notify_one();
        self.shared.wait_finished(target).await;
        let driver = lock(&self.driver).take();
        if let Some(d) = driver {
            if let Err(e) = d.await {
                tracing::warn!(error = %e, "producer task ended abnormally");
            }
        }
    }

    /// Partition counts of the topics this producer has sent to, as last described.
    pub fn partitions(&self, topic: &str) -> Option<u32> {
        lock(&self.shared.state).topics.get(topic).map(|t| t.parts.len() as u32)
    }

    /// Buffers `record`; `waiter` learns its outcome. On `Err` the waiter is dropped unanswered.
    async fn enqueue(
        &self,
        topic: &str,
        partition: Option<u32>,
        record: Record,
        waiter: Waiter,
    ) -> Result<(), ClientError> {
        if lock(&self.shared.state).closing {
            return Err(closed());
        }
        let partitions = self.shared.partition_count(topic, partition).await?;
        if let Some(p) = partition {
            if p >= partitions {
                return Err(ClientError::Api {
                    code: codes::UNKNOWN_TOPIC_OR_PARTITION,
                    message: format!("topic {topic} has partitions 0..{partitions}; {p} does not exist"),
                    leader_addr: None,
                });
            }
        }
        let size = record.size_hint();
        let cfg = &self.shared.config;
        // A record larger than the whole buffer takes all of it rather than waiting forever.
        let want = u32::try_from(size.min(cfg.max_buffer_bytes)).unwrap_or(u32::MAX);
        let memory = self.shared.buffer.clone().acquire_many_owned(want).await.map_err(|_| closed())?;
        let wake = {
            let mut guard = lock(&self.shared.state);
            let st = &mut *guard;
            if st.closing {
                return Err(closed());
            }
            let Some(t) = st.topics.get_mut(topic) else {
                return Err(ClientError::Closed(format!("topic {topic} vanished from the producer's cache")));
            };
            let n = t.parts.len() as u32;
            let p = match (partition, &record.key) {
                (Some(p), _) => p,
                (None, Some(k)) => busbar_proto::partition::for_key(k, n),
                (None, None) => {
                    // Switch partitions when the sticky one's batch cannot take this record, so
                    // keyless records do not pile up behind a partition that is still sending.
                    let s = t.sticky as usize;
                    if t.parts.get(s).is_some_and(|ps| !ps.can_take(size, cfg.max_batch_bytes)) {
                        t.sticky = (t.sticky + 1) % n.max(1);
                    }
                    t.sticky
                }
            };
            let Some(ps) = t.parts.get_mut(p as usize) else {
                return Err(ClientError::InvalidArgument(format!("partition {p} of {topic} is not known")));
            };
            let id = st.next_id;
            st.next_id += 1;
            st.unfinished.insert(id);
            ps.append(record.into_wire(), size, id, waiter, memory, cfg.max_batch_bytes)
        };
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }
}

impl Drop for Producer {
    /// Buffered records are still delivered by the background task; it stops once they are.
    fn drop(&mut self) {
        lock(&self.shared.state).closing = true;
        self.shared.wake.notify_one();
    }
}

fn closed() -> ClientError {
    ClientError::Closed("the producer is closed".into())
}

impl PartState {
    fn new(producer_id: u64) -> Self {
        Self { queue: VecDeque::new(), in_flight: false, producer_id, next_seq: 0, stale_id: false }
    }

    /// Whether a record of `size` joins the open batch (or starts one in an empty queue) rather
    /// than closing a batch that is waiting.
    fn can_take(&self, size: usize, max: usize) -> bool {
        match self.queue.back() {
            None => true,
            Some(b) => !b.full && b.bytes + size <= max,
        }
    }

    /// Adds a record to the open batch or a new one; true when the sending task should look (a new
    /// batch to time, or a full one to send).
    fn append(
        &mut self,
        record: pb::Record,
        size: usize,
        id: u64,
        waiter: Waiter,
        memory: OwnedSemaphorePermit,
        max: usize,
    ) -> bool {
        let mut wake = false;
        let open = match self.queue.back_mut() {
            Some(b) if !b.full && (b.records.is_empty() || b.bytes + size <= max) => true,
            Some(b) => {
                b.full = true;
                false
            }
            None => false,
        };
        if !open {
            self.queue.push_back(Batch {
                records: Vec::new(),
                waiters: Vec::new(),
                bytes: 0,
                created: Instant::now(),
                full: false,
                memory: None,
            });
            wake = true;
        }
        if let Some(b) = self.queue.back_mut() {
            b.records.push(record);
            b.waiters.push((id, waiter));
            b.bytes += size;
            match &mut b.memory {
                Some(m) => m.merge(memory),
                None => b.memory = Some(memory),
            }
            if b.bytes >= max {
                b.full = true;
                wake = true;
            }
        }
        wake
    }
}

/// The sending task: starts batches that are ready, and sleeps until the next one will be.
async fn run(shared: Arc<Shared>) {
    loop {
        let mut dispatch = Vec::new();
        let mut next: Option<Instant> = None;
        let finished = {
            let mut guard = lock(&shared.state);
            let st = &mut *guard;
            let now = Instant::now();
            let linger = shared.config.linger;
            let mut ready: Vec<(Instant, String, u32)> = Vec::new();
            for (name, t) in &st.topics {
                for (p, ps) in t.parts.iter().enumerate() {
                    let Some(front) = ps.queue.front() else { continue };
                    if ps.in_flight {
                        continue;
                    }
                    let due = front.created + linger;
                    let flushing = front.waiters.first().is_some_and(|(id, _)| *id < st.flush_below);
                    if front.full || ps.queue.len() > 1 || due <= now || flushing || st.closing {
                        ready.push((front.created, name.clone(), p as u32));
                    } else {
                        next = Some(next.map_or(due, |n| n.min(due)));
                    }
                }
            }
            // Oldest first, so a partition is not starved while in-flight slots are scarce.
            ready.sort_by_key(|r| r.0);
            for (_, name, p) in ready {
                let Ok(slot) = shared.in_flight.clone().try_acquire_owned() else { break };
                let Some(t) = st.topics.get_mut(&name) else { continue };
                let n = t.parts.len() as u32;
                let Some(ps) = t.parts.get_mut(p as usize) else { continue };
                let Some(batch) = ps.queue.pop_front() else { continue };
                ps.in_flight = true;
                let (producer_id, sequence) = if !shared.config.idempotent {
                    (Some(0), 0)
                } else if ps.stale_id {
                    (None, 0)
                } else {
                    (Some(ps.producer_id), ps.next_seq)
                };
                if t.sticky == p {
                    t.sticky = (p + 1) % n.max(1);
                }
                st.in_flight += 1;
                dispatch.push(Dispatch { topic: name, partition: p, batch, producer_id, sequence, _slot: slot });
            }
            st.closing && st.in_flight == 0 && st.topics.values().all(|t| t.parts.iter().all(|p| p.queue.is_empty()))
        };
        if finished {
            return;
        }
        for d in dispatch {
            tokio::spawn(deliver(shared.clone(), d));
        }
        match next {
            Some(at) => {
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

/// Sends one batch (with retries), then records the outcome and answers its records.
async fn deliver(shared: Arc<Shared>, d: Dispatch) {
    let Dispatch { topic, partition, mut batch, producer_id, sequence, _slot } = d;
    let records = std::mem::take(&mut batch.records);
    let count = records.len();
    let out = shared.send_batch(&topic, partition, records, producer_id, sequence).await;
    let acked = out.result.is_ok();
    let result = out.result.and_then(|ack| {
        // Invariant: the answer covers exactly this batch. A mismatch means the cluster matched
        // our sequence to some other batch; fail rather than report wrong offsets.
        if ack.count as usize == count && ack.partition == partition {
            Ok(ack)
        } else {
            Err(ClientError::Api {
                code: codes::UNKNOWN_SERVER_ERROR,
                message: format!(
                    "sent {count} records to {topic}/{partition}; the answer covers {} records in partition {}",
                    ack.count, ack.partition
                ),
                leader_addr: None,
            })
        }
    });
    let mismatch = acked && result.is_err();
    // The cluster no longer agrees with us on this partition's sequence (it may hold the batch, or
    // matched our sequence elsewhere): continue under a fresh producer id.
    let resequence = out.maybe_written
        || mismatch
        || matches!(
            result.as_ref().err().and_then(ClientError::code),
            Some(codes::OUT_OF_ORDER_SEQUENCE_NUMBER | codes::DUPLICATE_SEQUENCE_NUMBER | codes::UNKNOWN_PRODUCER_ID)
        );
    let waiters = std::mem::take(&mut batch.waiters);
    let ids: Vec<u64> = waiters.iter().map(|(id, _)| *id).collect();
    match &result {
        Ok(ack) => {
            for (i, (_, w)) in waiters.into_iter().enumerate() {
                w.answer(Ok(RecordMetadata { topic: topic.clone(), partition, offset: ack.base_offset + i as u64 }));
            }
        }
        Err(e) => {
            for (_, w) in waiters {
                w.answer(Err(e.clone()));
            }
        }
    }
    {
        let mut st = lock(&shared.state);
        st.in_flight -= 1;
        for id in &ids {
            st.unfinished.remove(id);
        }
        if let Some(ps) = st.topics.get_mut(&topic).and_then(|t| t.parts.get_mut(partition as usize)) {
            ps.in_flight = false;
            if shared.config.idempotent {
                if let Some(pid) = out.producer_id {
                    ps.producer_id = pid;
                    ps.stale_id = false;
                    ps.next_seq = out.sequence;
                    if result.is_ok() {
                        ps.next_seq = out.sequence + 1;
                    } else if resequence {
                        ps.stale_id = true;
                    }
                }
            }
        }
    }
    // Gives the batch's buffer bytes back before waking anyone who waits on them.
    drop(batch);
    shared.done.notify_waiters();
    shared.wake.notify_one();
}

/// What a failed attempt means for the next one.
struct Verdict {
    retry: bool,
    /// The batch may have been written by this attempt.
    maybe_written: bool,
    /// Retry at once: a redirect to a leader not tried yet.
    at_once: bool,
}

impl Shared {
    /// Waits until every record with an id below `target` is answered.
    async fn wait_finished(&self, target: u64) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            // Registered before the check, so a completion between the check and the wait is seen.
            notified.as_mut().enable();
            if lock(&self.state).unfinished.first().is_none_or(|first| *first >= target) {
                return;
            }
            notified.await;
        }
    }

    /// The partition count of `topic`, described once and cached; described again when a
    /// partition beyond the cached count is asked for.
    async fn partition_count(&self, topic: &str, partition: Option<u32>) -> Result<u32, ClientError> {
        if let Some(n) = lock(&self.state).topics.get(topic).map(|t| t.parts.len() as u32) {
            if partition.is_none_or(|p| p < n) {
                return Ok(n);
            }
        }
        let d = self.describe(topic).await?;
        let n = d.topic.map_or(0, |t| t.partitions);
        if n == 0 {
            return Err(ClientError::Api {
                code: codes::UNKNOWN_TOPIC_OR_PARTITION,
                message: format!("topic {topic} has no partitions"),
                leader_addr: None,
            });
        }
        let mut st = lock(&self.state);
        let pid = st.producer_id;
        let t = st.topics.entry(topic.to_string()).or_insert_with(|| TopicState { parts: Vec::new(), sticky: 0 });
        while t.parts.len() < n as usize {
            t.parts.push(PartState::new(pid));
        }
        Ok(t.parts.len() as u32)
    }

    /// Describes a topic on the leader, which has applied every topic created so far; a follower
    /// may not yet know a topic created a moment ago.
    async fn describe(&self, topic: &str) -> Result<pb::DescribeTopicResponse, ClientError> {
        let req = pb::DescribeTopicRequest { name: topic.to_string() };
        if let Ok((addr, ch)) = self.leader.channel().await {
            match self.client.api(ch).describe_topic(req.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(st) => {
                    let e = ClientError::from_status(&st);
                    if !e.is_retriable() {
                        return Err(e);
                    }
                    self.leader.forget(&addr);
                }
            }
        }
        self.client.describe_topic(topic).await
    }

    /// A new producer id, retrying until `deadline`: a lost answer only wastes an id.
    async fn fresh_producer_id(&self, deadline: Instant) -> Result<u64, ClientError> {
        let mut backoff = self.config.retry_backoff;
        loop {
            match self.client.init_producer_id().await {
                Ok(id) => return Ok(id),
                Err(e) if (e.is_retriable() || e.is_indeterminate()) && Instant::now() + backoff < deadline => {
                    tracing::debug!(error = %e, "init producer id failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_retry_backoff);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn send_batch(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<pb::Record>,
        producer_id: Option<u64>,
        sequence: u64,
    ) -> Outcome {
        let deadline = Instant::now() + self.config.delivery_timeout;
        let (mut producer_id, mut sequence) = match producer_id {
            Some(pid) => (pid, sequence),
            None => match self.fresh_producer_id(deadline).await {
                Ok(pid) => (pid, 0),
                Err(e) => return Outcome { result: Err(e), producer_id: None, sequence, maybe_written: false },
            },
        };
        let mut req =
            pb::ProduceRequest { topic: topic.to_string(), partition: Some(partition), records, producer_id, sequence };
        // Sent again under a fresh id already (see UNKNOWN_PRODUCER_ID below): at most once.
        let mut renewed = false;
        let idempotent = self.config.idempotent;
        let mut backoff = self.config.retry_backoff;
        let mut maybe_written = false;
        let mut last_redirect: Option<String> = None;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let (err, v) = match self.attempt(req.clone(), &mut last_redirect).await {
                Ok(ack) => return Outcome { result: Ok(ack), producer_id: Some(producer_id), sequence, maybe_written },
                Err(ev) => ev,
            };
            maybe_written |= v.maybe_written;
            let give_up =
                |e: ClientError| Outcome { result: Err(e), producer_id: Some(producer_id), sequence, maybe_written };
            if !v.retry {
                if idempotent && err.code() == Some(codes::UNKNOWN_PRODUCER_ID) {
                    // The cluster holds no state for this id in the partition (evicted past the
                    // node's bound, or the topic was recreated): it wrote nothing for this attempt.
                    if maybe_written {
                        // An earlier attempt may have: the outcome is unknown, not refused.
                        let message = format!(
                            "the batch may or may not have been committed: an earlier attempt may have written it, \
                             and the cluster no longer knows producer {producer_id} ({err})"
                        );
                        return give_up(ClientError::Api { code: codes::INDETERMINATE, message, leader_addr: None });
                    }
                    if !renewed && sequence > 0 {
                        // Nothing was written at all: the same batch under a fresh id, from 0.
                        match self.fresh_producer_id(deadline).await {
                            Ok(pid) => {
                                tracing::info!(
                                    topic,
                                    partition,
                                    old = producer_id,
                                    new = pid,
                                    "producer id unknown to the cluster; sending under a fresh one"
                                );
                                (producer_id, sequence, renewed) = (pid, 0, true);
                                (req.producer_id, req.sequence) = (pid, 0);
                                continue;
                            }
                            Err(e) => return give_up(e),
                        }
                    }
                }
                return give_up(err);
            }
            if v.maybe_written && !idempotent {
                // Without deduplication a resend could append the batch twice: report it as
                // possibly written and let the caller decide.
                let message = match err {
                    ClientError::Api { code: codes::INDETERMINATE, message, .. } => message,
                    other => format!("the batch may or may not have been committed: {other}"),
                };
                return give_up(ClientError::Api { code: codes::INDETERMINATE, message, leader_addr: None });
            }
            if Instant::now() + backoff >= deadline {
                tracing::warn!(topic, partition, attempts, error = %err, "giving up on a batch after its delivery timeout");
                return give_up(err);
            }
            tracing::debug!(topic, partition, attempts, error = %err, "produce failed; retrying");
            if !v.at_once {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(self.config.max_retry_backoff);
            }
        }
    }

    /// One produce call to the believed leader, updating that belief from the answer.
    async fn attempt(
        &self,
        req: pb::ProduceRequest,
        last_redirect: &mut Option<String>,
    ) -> Result<pb::ProduceResponse, (ClientError, Verdict)> {
        let (addr, ch) = match self.leader.channel().await {
            Ok(c) => c,
            // Nothing was sent.
            Err(e) => return Err((e, Verdict { retry: true, maybe_written: false, at_once: false })),
        };
        let st = match self.client.api(ch).produce(req).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(st) => st,
        };
        let e = ClientError::from_status(&st);
        let v = match &e {
            ClientError::Api { code: codes::NOT_LEADER, leader_addr: Some(to), .. } if *to != addr => {
                self.leader.redirect(to);
                // Follow a redirect at once, but only once to the same place: two nodes that
                // each name the other (mid-election) must not make us spin.
                let fresh = last_redirect.as_deref() != Some(to.as_str());
                *last_redirect = Some(to.clone());
                Verdict { retry: true, maybe_written: false, at_once: fresh }
            }
            ClientError::Api {
                code: codes::NOT_LEADER | codes::LEADER_NOT_AVAILABLE | codes::SHUTTING_DOWN, ..
            } => {
                self.leader.forget(&addr);
                Verdict { retry: true, maybe_written: false, at_once: false }
            }
            ClientError::Api { code: codes::INDETERMINATE | codes::REQUEST_TIMED_OUT, .. } => {
                // The leader may have lost its quorum or its place: ask again who leads.
                self.leader.forget(&addr);
                Verdict { retry: true, maybe_written: true, at_once: false }
            }
            // No Busbar code: the connection failed. One that never carried the request (see
            // `never_sent`) wrote nothing; anything else may have been cut after the leader
            // received it.
            ClientError::NoBroker { .. } => {
                self.leader.forget(&addr);
                Verdict { retry: true, maybe_written: !crate::error::never_sent(&st), at_once: false }
            }
            _ => Verdict { retry: false, maybe_written: false, at_once: false },
        };
        Err((e, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(ps: &mut PartState, sem: &Arc<Semaphore>, size: usize, max: usize) -> bool {
        let (tx, _rx) = oneshot::channel();
        let permit = sem.clone().try_acquire_many_owned(size as u32).unwrap();
        ps.append(pb::Record::default(), size, 0, Waiter::Future(tx), permit, max)
    }

    #[test]
    fn batches_split_at_max_bytes_and_hold_their_memory() {
        let sem = Arc::new(Semaphore::new(10_000));
        let mut ps = PartState::new(1);
        assert!(add(&mut ps, &sem, 40, 100), "a new batch must be timed");
        assert!(!add(&mut ps, &sem, 40, 100), "joining an open batch needs no wake-up");
        assert!(ps.can_take(20, 100));
        assert!(!ps.can_take(21, 100));
        // Does not fit: the open batch closes and a new one starts.
        assert!(add(&mut ps, &sem, 30, 100));
        assert_eq!(ps.queue.len(), 2);
        assert!(ps.queue[0].full && !ps.queue[1].full);
        assert_eq!((ps.queue[0].records.len(), ps.queue[0].bytes), (2, 80));
        // A record larger than a batch still travels, alone, and closes its batch at once.
        assert!(add(&mut ps, &sem, 500, 100));
        assert_eq!(ps.queue.len(), 3);
        assert!(ps.queue[2].full && ps.queue[2].records.len() == 1);
        assert_eq!(sem.available_permits(), 10_000 - 610);
        ps.queue.clear();
        assert_eq!(sem.available_permits(), 10_000, "answered batches give their bytes back");
    }

    #[test]
    fn record_size_counts_like_the_broker() {
        let r = Record::keyed("ab", "cde").header("h", "12");
        // key 2 + value 3 + header (1 + 2 + 8) + 24
        assert_eq!(r.size_hint(), 40);
    }
}
