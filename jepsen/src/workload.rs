//! The clients: tokio tasks on the host, each one Jepsen *process* at a time, recording every
//! operation (invoke, then ok / fail / info) in the history.
//!
//! - producers: idempotent [`Producer`]s, one record in flight each, every value unique;
//! - direct readers: a [`PartitionConsumer`] per partition, polling from the start, now and then
//!   starting over (a new `assign`);
//! - group members: [`GroupConsumer`]s of one group, committing explicitly (every commit recorded
//!   with its offsets), committing on revocation, recording every assignment change;
//! - an offsets reader: the group's committed offsets, read now and then (`fetch-committed`).
//!
//! A process that gets `info` never invokes again: the task continues under a new process number
//! and with a new client (built from the current brokers, as membership changes move them).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_client::{
    codes, Admin, Client, ClientError, ClientOptions, ConsumerRecord, GroupConsumer, GroupConsumerConfig, GroupEvent,
    PartitionConsumer, Producer, ProducerConfig, Record, StartFrom,
};
use busbar_jepsen::history::{GroupOffset, Op, OpType, Read};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::recorder::Recorder;
use crate::rng::Rng;

pub const TOPIC: &str = "jepsen";
pub const GROUP: &str = "jepsen-group";

/// Bound on any one client operation, beyond the client's own bounds.
const OP_TIMEOUT: Duration = Duration::from_secs(12);
/// A poll waits this long for records.
const POLL_WAIT: Duration = Duration::from_millis(500);
/// Pause after an error before trying again (bounded retry rate).
const ERROR_PAUSE: Duration = Duration::from_millis(300);

/// The brokers clients should use: the current members, as the nemesis changes them.
#[derive(Clone, Default)]
pub struct Brokers(Arc<Mutex<Vec<String>>>);

impl Brokers {
    pub fn set(&self, addrs: Vec<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = addrs;
    }

    pub fn get(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    pub partitions: u32,
    pub producers: usize,
    /// Records per second over all producers.
    pub rate: u64,
    pub group_members: usize,
}

pub fn client_options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(5),
        max_retries: 6,
        max_message_bytes: 16 << 20,
    }
}

/// A client over the current brokers, in a random order (spreads the first contact).
async fn connect(brokers: &Brokers, rng: &mut Rng) -> Result<Client, ClientError> {
    let mut b = brokers.get();
    rng.shuffle(&mut b);
    Client::connect_with(b, client_options()).await
}

/// Did a write definitely not happen? Only answers that refuse the request before it is applied;
/// everything else (timeouts, lost connections, INDETERMINATE, a producer's final retry error) may
/// have been written.
fn write_failed_definitely(e: &ClientError) -> bool {
    match e {
        ClientError::InvalidArgument(_) => true,
        ClientError::Api { code, .. } => matches!(
            *code,
            codes::INVALID_TOPIC
                | codes::UNKNOWN_TOPIC_OR_PARTITION
                | codes::RECORD_TOO_LARGE
                | codes::RECORD_LIST_TOO_LARGE
                | codes::INVALID_REQUEST
        ),
        ClientError::NoBroker { .. } | ClientError::Closed(_) => false,
    }
}

/// Did a commit definitely not happen? ILLEGAL_GENERATION and UNKNOWN_MEMBER_ID do not say so:
/// the client retries a fenced commit with what the member still owns, and a retried request may
/// have been applied before the group moved on.
fn commit_failed_definitely(e: &ClientError) -> bool {
    matches!(e.code(), Some(codes::INVALID_GROUP_ID))
}

fn err_text(e: &ClientError) -> String {
    match e.code() {
        Some(c) => format!("{c}: {}", e.message()),
        None => e.to_string(),
    }
}

fn value_of(r: &ConsumerRecord) -> Option<u64> {
    std::str::from_utf8(&r.value).ok()?.parse().ok()
}

fn reads_of(records: &[ConsumerRecord]) -> Vec<Read> {
    records
        .iter()
        .filter_map(|r| {
            let value = value_of(r);
            if value.is_none() {
                eprintln!("a record that is not a workload value at {}/{}: {:?}", r.partition, r.offset, r.value);
            }
            Some(Read { partition: r.partition, offset: r.offset, value: value? })
        })
        .collect()
}

fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

/// Sleeps, or returns early (true) when the run stops.
async fn nap(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if stopped(stop) {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => stopped(stop),
        _ = stop.changed() => true,
    }
}

/// Spawns every client task; they run until `stop` turns true.
pub fn spawn(
    set: &mut JoinSet<()>,
    cfg: &WorkloadConfig,
    rec: Arc<Recorder>,
    brokers: Brokers,
    stop: watch::Receiver<bool>,
    rng: &mut Rng,
) {
    let values = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let producers = cfg.producers.max(1);
    // Each producer sends one record at a time; this spacing gives `rate` in total when answers are quick.
    let spacing = Duration::from_micros(1_000_000 * producers as u64 / cfg.rate.max(1));
    for i in 0..producers {
        let w = ProducerWorker {
            name: format!("producer-{i}"),
            partitions: cfg.partitions,
            spacing,
            values: values.clone(),
            rec: rec.clone(),
            brokers: brokers.clone(),
            stop: stop.clone(),
            rng: rng.fork(),
        };
        set.spawn(w.run());
    }
    for p in 0..cfg.partitions {
        let r = DirectReader {
            name: format!("reader-{p}"),
            partition: p,
            rec: rec.clone(),
            brokers: brokers.clone(),
            stop: stop.clone(),
            rng: rng.fork(),
        };
        set.spawn(r.run());
    }
    for i in 0..cfg.group_members {
        let m =
            GroupMember { slot: i, rec: rec.clone(), brokers: brokers.clone(), stop: stop.clone(), rng: rng.fork() };
        set.spawn(m.run());
    }
    set.spawn(fetch_committed_loop(rec, brokers, stop, rng.fork()));
}

struct ProducerWorker {
    name: String,
    partitions: u32,
    spacing: Duration,
    values: Arc<std::sync::atomic::AtomicU64>,
    rec: Arc<Recorder>,
    brokers: Brokers,
    stop: watch::Receiver<bool>,
    rng: Rng,
}

impl ProducerWorker {
    async fn new_producer(&mut self) -> Option<Producer> {
        let config = ProducerConfig {
            linger: Duration::from_millis(1),
            delivery_timeout: Duration::from_secs(10),
            max_buffer_bytes: 1 << 20,
            ..ProducerConfig::default()
        };
        for _ in 0..1000 {
            if stopped(&self.stop) {
                return None;
            }
            let made = async {
                let client = connect(&self.brokers, &mut self.rng).await?;
                Producer::new(client, config.clone()).await
            };
            match tokio::time::timeout(OP_TIMEOUT, made).await {
                Ok(Ok(p)) => return Some(p),
                Ok(Err(e)) => eprintln!("{}: no producer yet: {}", self.name, err_text(&e)),
                Err(_) => eprintln!("{}: no producer yet: timed out", self.name),
            }
            if nap(&mut self.stop, Duration::from_secs(1)).await {
                return None;
            }
        }
        None
    }

    async fn run(mut self) {
        let mut process = self.rec.new_process();
        let Some(mut producer) = self.new_producer().await else { return };
        let mut next = tokio::time::Instant::now();
        while !stopped(&self.stop) {
            next += self.spacing;
            tokio::time::sleep_until(next).await;
            let now = tokio::time::Instant::now();
            if next < now {
                // Behind (slow answers): do not burst to catch up.
                next = now;
            }
            let value = self.values.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let partition = self.rng.below(self.partitions as usize) as u32;
            self.rec.invoke(process, Op::Send { partition, value, offset: None });
            let send = async {
                let d = producer.send_to(TOPIC, partition, Record::value(value.to_string())).await?;
                d.await
            };
            let outcome = match tokio::time::timeout(OP_TIMEOUT, send).await {
                Ok(Ok(meta)) if meta.partition == partition => Ok(meta.offset),
                Ok(Ok(meta)) => Err((OpType::Info, format!("acknowledged in partition {} instead", meta.partition))),
                Ok(Err(e)) if write_failed_definitely(&e) => Err((OpType::Fail, err_text(&e))),
                Ok(Err(e)) => Err((OpType::Info, err_text(&e))),
                Err(_) => Err((OpType::Info, format!("no answer within {OP_TIMEOUT:?}"))),
            };
            match outcome {
                Ok(offset) => self.rec.ok(process, Op::Send { partition, value, offset: Some(offset) }, None),
                Err((kind, error)) => {
                    self.rec.record(process, kind, Op::Send { partition, value, offset: None }, None, Some(error));
                    if kind == OpType::Info {
                        // Jepsen's rule: this process may still have a write in flight; a new one continues.
                        process = self.rec.new_process();
                        // The old producer may still be retrying that batch; drop it (bounded by its
                        // delivery timeout) and start a fresh one, with a fresh producer id.
                        drop(producer);
                        let Some(p) = self.new_producer().await else { return };
                        producer = p;
                        next = tokio::time::Instant::now();
                    } else if nap(&mut self.stop, ERROR_PAUSE).await {
                        break;
                    }
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), producer.close()).await;
    }
}

struct DirectReader {
    name: String,
    partition: u32,
    rec: Arc<Recorder>,
    brokers: Brokers,
    stop: watch::Receiver<bool>,
    rng: Rng,
}

impl DirectReader {
    async fn consumer(&mut self, position: u64) -> Option<PartitionConsumer> {
        for _ in 0..1000 {
            if stopped(&self.stop) {
                return None;
            }
            let made = async {
                let client = connect(&self.brokers, &mut self.rng).await?;
                let mut c = PartitionConsumer::new(client);
                c.assign(TOPIC, self.partition).await?;
                c.seek(position);
                Ok::<_, ClientError>(c)
            };
            match tokio::time::timeout(OP_TIMEOUT, made).await {
                Ok(Ok(c)) => return Some(c),
                Ok(Err(e)) => eprintln!("{}: no consumer yet: {}", self.name, err_text(&e)),
                Err(_) => eprintln!("{}: no consumer yet: timed out", self.name),
            }
            if nap(&mut self.stop, Duration::from_secs(1)).await {
                return None;
            }
        }
        None
    }

    fn record_assign(&self, process: u64) {
        let op =
            Op::Assign { consumer: self.name.clone(), group: None, generation: None, partitions: vec![self.partition] };
        self.rec.invoke(process, op.clone());
        self.rec.ok(process, op, None);
    }

    async fn run(mut self) {
        let mut process = self.rec.new_process();
        let mut position = 0u64;
        self.record_assign(process);
        let Some(mut consumer) = self.consumer(position).await else { return };
        // Start over from offset 0 every so often: a re-read must see the same values at the same offsets.
        let mut restart_at = tokio::time::Instant::now() + Duration::from_secs(self.rng.range(20, 45));
        while !stopped(&self.stop) {
            if tokio::time::Instant::now() >= restart_at {
                restart_at = tokio::time::Instant::now() + Duration::from_secs(self.rng.range(20, 45));
                position = 0;
                self.record_assign(process);
                consumer.seek(position);
            }
            self.rec.invoke(process, Op::Poll { consumer: self.name.clone(), reads: vec![] });
            let outcome = tokio::time::timeout(OP_TIMEOUT, consumer.poll(POLL_WAIT)).await;
            match outcome {
                Ok(Ok(records)) => {
                    if let Some(last) = records.last() {
                        position = last.offset + 1;
                    }
                    let reads = reads_of(&records);
                    self.rec.ok(process, Op::Poll { consumer: self.name.clone(), reads }, None);
                }
                Ok(Err(e)) => {
                    // A failed read changed nothing; `info` keeps the bookkeeping uniform with writes.
                    self.rec.record(
                        process,
                        OpType::Fail,
                        Op::Poll { consumer: self.name.clone(), reads: vec![] },
                        None,
                        Some(err_text(&e)),
                    );
                    if nap(&mut self.stop, ERROR_PAUSE).await {
                        break;
                    }
                    if matches!(e, ClientError::NoBroker { .. }) {
                        // The brokers may have moved (membership changes): a new client.
                        let Some(c) = self.consumer(position).await else { return };
                        consumer = c;
                    }
                }
                Err(_) => {
                    self.rec.record(
                        process,
                        OpType::Info,
                        Op::Poll { consumer: self.name.clone(), reads: vec![] },
                        None,
                        Some(format!("no answer within {OP_TIMEOUT:?}")),
                    );
                    process = self.rec.new_process();
                    let Some(c) = self.consumer(position).await else { return };
                    consumer = c;
                }
            }
        }
    }
}

struct GroupMember {
    slot: usize,
    rec: Arc<Recorder>,
    brokers: Brokers,
    stop: watch::Receiver<bool>,
    rng: Rng,
}

/// One incarnation of a group member: a `GroupConsumer` and what it was given.
struct Incarnation {
    name: String,
    consumer: GroupConsumer,
    events: tokio::sync::mpsc::Receiver<GroupEvent>,
    owned: BTreeSet<u32>,
    /// Next offset to consume, per owned partition, from what polls returned since it was assigned.
    positions: BTreeMap<u32, u64>,
    /// Events taken from the channel, not handled yet (in order).
    pending: VecDeque<GroupEvent>,
    /// The process that records this incarnation's `assign` entries: an assignment is seen between
    /// a poll's return and its recording, while the member's own process is mid-operation.
    assign_process: u64,
}

impl GroupMember {
    async fn join(&mut self, incarnation: u64) -> Option<Incarnation> {
        for _ in 0..1000 {
            if stopped(&self.stop) {
                return None;
            }
            let config = GroupConsumerConfig {
                session_timeout: Duration::from_secs(6),
                start: StartFrom::Earliest,
                auto_commit_interval: None,
                max_poll_records: 200,
                revoke_timeout: Duration::from_secs(5),
                ..GroupConsumerConfig::new(GROUP, [TOPIC])
            };
            let made = async {
                let client = connect(&self.brokers, &mut self.rng).await?;
                GroupConsumer::subscribe(client, config).await
            };
            match tokio::time::timeout(OP_TIMEOUT, made).await {
                Ok(Ok(mut consumer)) => {
                    let events = consumer.events()?;
                    return Some(Incarnation {
                        name: format!("member-{}-{incarnation}", self.slot),
                        consumer,
                        events,
                        owned: BTreeSet::new(),
                        positions: BTreeMap::new(),
                        pending: VecDeque::new(),
                        assign_process: self.rec.new_process(),
                    });
                }
                Ok(Err(e)) => eprintln!("member-{}: not joined yet: {}", self.slot, err_text(&e)),
                Err(_) => eprintln!("member-{}: not joined yet: timed out", self.slot),
            }
            if nap(&mut self.stop, Duration::from_secs(1)).await {
                return None;
            }
        }
        None
    }

    fn record_assign(&self, inc: &Incarnation) {
        let process = inc.assign_process;
        let op = Op::Assign {
            consumer: inc.name.clone(),
            group: Some(GROUP.to_string()),
            generation: Some(inc.consumer.generation()),
            partitions: inc.owned.iter().copied().collect(),
        };
        self.rec.invoke(process, op.clone());
        self.rec.ok(process, op, None);
    }

    /// Commits what was delivered; records it. Returns the process to continue with.
    async fn commit(&self, process: u64, inc: &Incarnation) -> u64 {
        let offsets: Vec<GroupOffset> =
            inc.positions.iter().map(|(p, o)| GroupOffset { partition: *p, offset: *o }).collect();
        let op = Op::Commit { consumer: inc.name.clone(), group: GROUP.to_string(), offsets };
        self.rec.invoke(process, op.clone());
        match tokio::time::timeout(OP_TIMEOUT, inc.consumer.commit()).await {
            Ok(Ok(())) => {
                self.rec.ok(process, op, None);
                process
            }
            Ok(Err(e)) if commit_failed_definitely(&e) => {
                self.rec.record(process, OpType::Fail, op, None, Some(err_text(&e)));
                process
            }
            Ok(Err(e)) => {
                self.rec.record(process, OpType::Info, op, None, Some(err_text(&e)));
                self.rec.new_process()
            }
            Err(_) => {
                self.rec.record(process, OpType::Info, op, None, Some(format!("no answer within {OP_TIMEOUT:?}")));
                self.rec.new_process()
            }
        }
    }

    /// Takes the events that arrived into `pending` (bounded: the client keeps at most 64).
    fn take_events(inc: &mut Incarnation) {
        while inc.pending.len() < 256 {
            let Ok(ev) = inc.events.try_recv() else { break };
            inc.pending.push_back(ev);
        }
    }

    /// Applies and records the leading events that need no commit (assigned, lost): done between a
    /// poll's return and its recording, so the assignment precedes the records it delivered.
    fn apply_leading_assignments(&self, inc: &mut Incarnation) {
        Self::take_events(inc);
        while matches!(inc.pending.front(), Some(GroupEvent::Assigned(_) | GroupEvent::Lost(_))) {
            let Some(ev) = inc.pending.pop_front() else { break };
            Self::apply(inc, &ev);
            self.record_assign(inc);
        }
    }

    fn apply(inc: &mut Incarnation, ev: &GroupEvent) {
        match ev {
            GroupEvent::Assigned(tps) => {
                for tp in tps {
                    inc.owned.insert(tp.partition);
                    inc.positions.remove(&tp.partition);
                }
            }
            GroupEvent::Revoked(tps) | GroupEvent::Lost(tps) => {
                for tp in tps {
                    inc.owned.remove(&tp.partition);
                    inc.positions.remove(&tp.partition);
                }
            }
        }
    }

    /// Handles every assignment change that arrived; returns the process to continue with.
    async fn handle_events(&self, mut process: u64, inc: &mut Incarnation) -> u64 {
        Self::take_events(inc);
        while let Some(ev) = inc.pending.pop_front() {
            if matches!(ev, GroupEvent::Revoked(_)) {
                // The consumer waits for this commit before it lets the partitions go.
                process = self.commit(process, inc).await;
            }
            Self::apply(inc, &ev);
            self.record_assign(inc);
        }
        process
    }

    async fn run(mut self) {
        let mut process = self.rec.new_process();
        let mut incarnation = 0u64;
        let Some(mut inc) = self.join(incarnation).await else { return };
        let mut commit_at = tokio::time::Instant::now() + Duration::from_secs(2);
        while !stopped(&self.stop) {
            process = self.handle_events(process, &mut inc).await;
            if tokio::time::Instant::now() >= commit_at {
                commit_at = tokio::time::Instant::now() + Duration::from_millis(self.rng.range(1000, 3000));
                if !inc.positions.is_empty() {
                    process = self.commit(process, &inc).await;
                }
            }
            self.rec.invoke(process, Op::Poll { consumer: inc.name.clone(), reads: vec![] });
            match tokio::time::timeout(OP_TIMEOUT, inc.consumer.poll(POLL_WAIT)).await {
                Ok(Ok(records)) => {
                    self.apply_leading_assignments(&mut inc);
                    for r in &records {
                        inc.positions.insert(r.partition, r.offset + 1);
                    }
                    let reads = reads_of(&records);
                    self.rec.ok(process, Op::Poll { consumer: inc.name.clone(), reads }, None);
                }
                outcome => {
                    let error = match outcome {
                        Ok(Err(e)) => err_text(&e),
                        _ => format!("no answer within {OP_TIMEOUT:?}"),
                    };
                    self.rec.record(
                        process,
                        OpType::Fail,
                        Op::Poll { consumer: inc.name.clone(), reads: vec![] },
                        None,
                        Some(error),
                    );
                    // The consumer stopped (its poll fails only then): leave it, join anew under a
                    // new name, as a new member.
                    inc.owned.clear();
                    inc.positions.clear();
                    self.record_assign(&inc);
                    let old = inc;
                    let _ = tokio::time::timeout(Duration::from_secs(5), old.consumer.leave()).await;
                    incarnation += 1;
                    process = self.rec.new_process();
                    let Some(next) = self.join(incarnation).await else { return };
                    inc = next;
                }
            }
        }
        // Stop without committing more: what was committed is recorded.
        drop(inc);
    }
}

async fn fetch_committed_loop(rec: Arc<Recorder>, brokers: Brokers, mut stop: watch::Receiver<bool>, mut rng: Rng) {
    let mut process = rec.new_process();
    let mut admin: Option<Admin> = None;
    while !nap(&mut stop, Duration::from_millis(rng.range(500, 1500))).await {
        let a = match &admin {
            Some(a) => a.clone(),
            None => match tokio::time::timeout(OP_TIMEOUT, connect(&brokers, &mut rng)).await {
                Ok(Ok(c)) => {
                    let a = Admin::new(c);
                    admin = Some(a.clone());
                    a
                }
                _ => continue,
            },
        };
        rec.invoke(process, Op::FetchCommitted { group: GROUP.to_string(), offsets: vec![] });
        match tokio::time::timeout(OP_TIMEOUT, a.describe_group(GROUP)).await {
            Ok(Ok(d)) => {
                let offsets = d
                    .partitions
                    .iter()
                    .filter(|p| p.topic == TOPIC && p.has_committed)
                    .map(|p| GroupOffset { partition: p.partition, offset: p.committed })
                    .collect();
                rec.ok(process, Op::FetchCommitted { group: GROUP.to_string(), offsets }, None);
            }
            outcome => {
                let (kind, error) = match outcome {
                    Ok(Err(e)) => (OpType::Fail, err_text(&e)),
                    _ => (OpType::Info, format!("no answer within {OP_TIMEOUT:?}")),
                };
                rec.record(
                    process,
                    kind,
                    Op::FetchCommitted { group: GROUP.to_string(), offsets: vec![] },
                    None,
                    Some(error),
                );
                if kind == OpType::Info {
                    process = rec.new_process();
                }
                admin = None;
            }
        }
    }
}
