use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use busbar_proto::v1 as pb;
use busbar_proto::v1::busbar_client::BusbarClient;
use busbar_proto::v1::cluster_client::ClusterClient;
use bytes::Bytes;
use tonic::transport::{Channel, Endpoint};

use crate::connection::{ConnectOnce, Link};
use crate::error::{codes, never_sent, ClientError};

/// Timeouts and retry bounds of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Bound on connecting to one broker.
    pub connect_timeout: Duration,
    /// Bound on one request.
    pub request_timeout: Duration,
    /// How many times a call retries on NOT_LEADER / no leader / unreachable broker.
    pub max_retries: u32,
    /// Largest gRPC message sent or accepted.
    pub max_message_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            max_retries: 20,
            max_message_bytes: 80 << 20,
        }
    }
}

/// A record to produce.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Records with the same key go to the same partition (Kafka's murmur2 partitioner).
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// Name and value pairs, kept in order; names may repeat.
    pub headers: Vec<(String, Vec<u8>)>,
    /// 0: the broker sets it.
    pub timestamp_ms: i64,
}

impl Record {
    /// A record with this value and nothing else (no key, no headers, broker-set timestamp).
    pub fn value(v: impl Into<Vec<u8>>) -> Self {
        Self { value: v.into(), ..Default::default() }
    }

    /// A keyed record: every record with the same key goes to the same partition, in order.
    pub fn keyed(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self { key: Some(key.into()), value: value.into(), ..Default::default() }
    }

    /// Adds a header. Names may repeat; order is kept.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the timestamp (milliseconds since the Unix epoch); 0 lets the broker set it.
    pub fn with_timestamp_ms(mut self, ms: i64) -> Self {
        self.timestamp_ms = ms;
        self
    }

    /// Roughly the bytes this record takes in a batch, counted as the broker counts them against
    /// its `max_record_bytes` and `max_batch_bytes` limits.
    pub fn size_hint(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(n, v)| n.len() + v.len() + 8).sum();
        self.key.as_ref().map_or(0, Vec::len) + self.value.len() + headers + 24
    }

    pub(crate) fn into_wire(self) -> pb::Record {
        pb::Record {
            key: self.key.map(Bytes::from),
            value: Bytes::from(self.value),
            headers: self.headers.into_iter().map(|(name, value)| pb::Header { name, value: value.into() }).collect(),
            timestamp_ms: self.timestamp_ms,
        }
    }
}

/// Most broker connections one [`Client`] keeps open (its brokers and the leaders it was sent
/// to); past it the cache starts over.
const MAX_CACHED_CHANNELS: usize = 64;
/// HTTP/2 ping interval on kept connections, and how long a ping may go unanswered (room for a
/// busy broker). Writes sent on a connection that went silent (a broker cut off or paused) come
/// back INDETERMINATE within their sum; later calls connect afresh, to another broker if need be.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A broker's channel, and whether its connection is gone.
type KeptChannel = (Channel, Arc<Link>);

/// A connection to a Busbar cluster. Cheap to clone; clones share their connections.
#[derive(Clone)]
pub struct Client {
    brokers: Vec<String>,
    pub(crate) opts: ClientOptions,
    /// One HTTP/2 connection per broker, reused by every call (requests multiplex on it). A
    /// channel never reconnects (see `connection`): once its connection is gone the next call
    /// here gets a new one. A call that fails at the transport level drops the channel from here;
    /// it is retried if it may be repeated, or if it was never sent (see [`never_sent`]);
    /// otherwise a write that must not be applied twice (`with_retry_unsent`) is reported as
    /// INDETERMINATE.
    channels: Arc<Mutex<HashMap<String, KeptChannel>>>,
    /// Where the leader is believed to be: named by the last NOT_LEADER answer, or found by the
    /// `Producer`'s and consumers' leader cache (`leader::LeaderCache`, which keeps it here too).
    /// Calls start there, so a client whose first broker is a follower does not pay a redirect on
    /// every write. Forgotten when a call there fails.
    leader_hint: Arc<Mutex<Option<String>>>,
}

impl Client {
    /// Checks that at least one broker answers.
    pub async fn connect<I, S>(brokers: I) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::connect_with(brokers, ClientOptions::default()).await
    }

    /// [`connect`](Self::connect) with explicit options.
    pub async fn connect_with<I, S>(brokers: I, opts: ClientOptions) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let brokers: Vec<String> = brokers.into_iter().map(Into::into).filter(|b: &String| !b.is_empty()).collect();
        if brokers.is_empty() {
            return Err(ClientError::InvalidArgument("no brokers given".into()));
        }
        let client = Self { brokers, opts, channels: Arc::default(), leader_hint: Arc::default() };
        client.channel_any().await?;
        Ok(client)
    }

    /// The brokers this client was given, in order.
    pub fn brokers(&self) -> &[String] {
        &self.brokers
    }

    /// The kept channel to `addr`, or a new one if there is none or its connection is gone. Cheap:
    /// callers ask for it per call rather than keep a channel of their own, which would outlive
    /// its connection.
    pub(crate) async fn channel_to(&self, addr: &str) -> Result<Channel, String> {
        if let Some((ch, link)) = self.channels.lock().unwrap_or_else(PoisonError::into_inner).get(addr) {
            if !link.is_closed() {
                return Ok(ch.clone());
            }
        }
        let (ch, link) = self.connect_to(addr).await?;
        let mut cache = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED_CHANNELS {
            cache.clear();
        }
        cache.insert(addr.to_string(), (ch.clone(), link));
        Ok(ch)
    }

    /// Forgets the connection to `addr` (its call failed at the transport level).
    pub(crate) fn drop_channel(&self, addr: &str) {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner).remove(addr);
    }

    pub(crate) fn leader_hint(&self) -> Option<String> {
        self.leader_hint.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(crate) fn set_leader_hint(&self, addr: &str) {
        *self.leader_hint.lock().unwrap_or_else(PoisonError::into_inner) = Some(addr.to_string());
    }

    /// `addr` failed or is no longer the leader. Only forgotten if still the hint, so a failure of
    /// an old attempt does not discard a leader someone else has just found.
    pub(crate) fn forget_leader_hint(&self, addr: &str) {
        let mut hint = self.leader_hint.lock().unwrap_or_else(PoisonError::into_inner);
        if hint.as_deref() == Some(addr) {
            *hint = None;
        }
    }

    /// A channel on one new connection to `addr`, which it never replaces (see `connection`), and
    /// that connection's link.
    async fn connect_to(&self, addr: &str) -> Result<(Channel, Arc<Link>), String> {
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("{addr}: {e}"))?
            .connect_timeout(self.opts.connect_timeout)
            .timeout(self.opts.request_timeout)
            // A kept connection to a broker that stopped answering (paused, cut off) is noticed
            // within seconds instead of at each request's timeout.
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let connector = ConnectOnce::default();
        let link = connector.link();
        match tokio::time::timeout(self.opts.connect_timeout, ep.connect_with_connector(connector)).await {
            Ok(Ok(ch)) => Ok((ch, link)),
            Ok(Err(e)) => Err(format!("{addr}: {e}")),
            Err(_) => Err(format!("{addr}: connect timed out after {:?}", self.opts.connect_timeout)),
        }
    }

    /// The first broker that accepts a connection.
    pub(crate) async fn channel_any(&self) -> Result<(String, Channel), ClientError> {
        self.channel_any_from(0).await
    }

    /// The first broker that accepts a connection, trying them in order from the `start`-th
    /// (wrapping around).
    async fn channel_any_from(&self, start: usize) -> Result<(String, Channel), ClientError> {
        let mut last = String::new();
        let n = self.brokers.len();
        for b in self.brokers.iter().cycle().skip(start % n.max(1)).take(n) {
            match self.channel_to(b).await {
                Ok(ch) => return Ok((b.clone(), ch)),
                Err(e) => last = e,
            }
        }
        Err(ClientError::NoBroker { brokers: self.brokers.clone(), last })
    }

    /// Runs `call` against a broker, retrying on another broker or the named leader when the
    /// answer says so. `call` must be safe to repeat (reads, and writes the server deduplicates or
    /// that fail definitely).
    pub(crate) async fn with_retry<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.retry(call, true).await
    }

    /// Like [`Client::with_retry`] for a write that must not be applied twice: once the request may
    /// have reached a broker, a failed connection is reported as INDETERMINATE, not retried. One
    /// that failed before it was sent (see [`never_sent`]) is retried.
    pub(crate) async fn with_retry_unsent<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.retry(call, false).await
    }

    async fn retry<T, F, Fut>(&self, mut call: F, resend_after_transport_error: bool) -> Result<T, ClientError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut preferred: Option<String> = self.leader_hint();
        let mut last = ClientError::NoBroker { brokers: self.brokers.clone(), last: "no attempt made".into() };
        let mut backoff = Duration::from_millis(50);
        for attempt in 0..=self.opts.max_retries {
            let ch = match &preferred {
                Some(addr) => self
                    .channel_to(addr)
                    .await
                    .map(|ch| (addr.clone(), ch))
                    .map_err(|e| ClientError::NoBroker { brokers: vec![addr.clone()], last: e }),
                // Each retry starts at the next broker: the first one that accepts a connection
                // may be a node that knows no leader (cut off, or removed from the cluster), and
                // asking it again and again would never reach the others.
                None => self.channel_any_from(attempt as usize).await,
            };
            let (addr, ch) = match ch {
                Ok(ch) => ch,
                Err(e) => {
                    if let Some(addr) = preferred.take() {
                        self.forget_leader_hint(&addr);
                    }
                    last = e;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            match call(ch).await {
                Ok(v) => return Ok(v),
                Err(st) => {
                    let err = ClientError::from_status(&st);
                    // Whatever failed there, later calls stop starting there: a leader cut off from
                    // the others answers INDETERMINATE (its writes cannot commit), never NOT_LEADER.
                    self.forget_leader_hint(&addr);
                    if matches!(err, ClientError::NoBroker { .. }) {
                        self.drop_channel(&addr);
                    }
                    match &err {
                        // (A node naming itself is treated as knowing no leader: no tight loop.)
                        ClientError::Api { code: codes::NOT_LEADER, leader_addr: Some(leader), .. }
                            if *leader != addr =>
                        {
                            self.set_leader_hint(leader);
                            preferred = Some(leader.clone());
                        }
                        ClientError::Api {
                            code: codes::NOT_LEADER | codes::LEADER_NOT_AVAILABLE | codes::SHUTTING_DOWN,
                            ..
                        } => {
                            preferred = None;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                        ClientError::NoBroker { last, .. } if !resend_after_transport_error && !never_sent(&st) => {
                            return Err(ClientError::Api {
                                code: codes::INDETERMINATE,
                                message: format!(
                                    "the connection failed with the request in flight ({last}): it may or may not have \
                                     been applied"
                                ),
                                leader_addr: None,
                            });
                        }
                        ClientError::NoBroker { .. } => {
                            preferred = None;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                        _ => return Err(err),
                    }
                    last = err;
                }
            }
        }
        Err(last)
    }

    pub(crate) fn api(&self, ch: Channel) -> BusbarClient<Channel> {
        BusbarClient::new(ch)
            .max_decoding_message_size(self.opts.max_message_bytes)
            .max_encoding_message_size(self.opts.max_message_bytes)
    }

    /// Creates a topic with `partitions` partitions.
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<(), ClientError> {
        self.create_topic_with_config(name, partitions, &[]).await
    }

    /// Creates a topic with configuration keys (`retention.ms`, `retention.bytes`,
    /// `max.message.bytes`); keys left out take the cluster defaults.
    pub async fn create_topic_with_config(
        &self,
        name: &str,
        partitions: u32,
        config: &[(String, String)],
    ) -> Result<(), ClientError> {
        let req = pb::CreateTopicRequest { name: name.into(), partitions, config: config.iter().cloned().collect() };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.api(ch);
            async move { c.create_topic(req).await.map(|_| ()) }
        })
        .await
    }

    /// Sets and clears topic configuration keys; returns the effective configuration.
    pub async fn alter_topic_config(
        &self,
        name: &str,
        set: &[(String, String)],
        unset: &[String],
    ) -> Result<std::collections::HashMap<String, String>, ClientError> {
        let req = pb::AlterTopicConfigRequest {
            name: name.into(),
            set: set.iter().cloned().collect(),
            unset: unset.to_vec(),
        };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.api(ch);
            async move { c.alter_topic_config(req).await.map(|r| r.into_inner().config) }
        })
        .await
    }

    /// Deletes a topic and its records.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let req = pb::DeleteTopicRequest { name: name.into() };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.api(ch);
            async move { c.delete_topic(req).await.map(|_| ()) }
        })
        .await
    }

    /// Every topic with its partition count.
    pub async fn list_topics(&self) -> Result<Vec<pb::TopicInfo>, ClientError> {
        self.with_retry(|ch| {
            let mut c = self.api(ch);
            async move { c.list_topics(pb::ListTopicsRequest {}).await.map(|r| r.into_inner().topics) }
        })
        .await
    }

    /// Appends one batch to one partition; returns once it is committed on a quorum and applied.
    ///
    /// Retries (up to [`ClientOptions::max_retries`]) only when the batch was certainly not
    /// written: answers that say so (NOT_LEADER, no leader) and failures before it was sent (no
    /// connection). An INDETERMINATE error means it may have been written; retrying could then
    /// duplicate it.
    pub async fn produce(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<pb::ProduceResponse, ClientError> {
        let req = pb::ProduceRequest {
            topic: topic.into(),
            partition: Some(partition),
            records: records.into_iter().map(Record::into_wire).collect(),
            producer_id: 0,
            sequence: 0,
        };
        self.produce_request(req).await
    }

    /// Like [`Client::fetch`], but when no record is at `offset` yet, waits up to `max_wait` for one
    /// (long poll) and returns as soon as data arrives.
    pub async fn fetch_wait(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: u32,
        max_wait: Duration,
    ) -> Result<pb::FetchResponse, ClientError> {
        let wait_ms = u32::try_from(max_wait.as_millis()).unwrap_or(u32::MAX);
        let req = pb::FetchRequest {
            topic: topic.into(),
            partition,
            offset,
            max_records,
            max_bytes: 0,
            max_wait_ms: wait_ms,
        };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.api(ch);
            async move {
                let mut r = tonic::Request::new(req);
                // The server may hold a long poll up to max_wait: allow for it beyond the usual bound.
                r.set_timeout(max_wait + Duration::from_secs(10));
                c.fetch(r).await.map(|r| r.into_inner())
            }
        })
        .await
    }

    /// A topic's partition count and each partition's offsets.
    pub async fn describe_topic(&self, name: &str) -> Result<pb::DescribeTopicResponse, ClientError> {
        let req = pb::DescribeTopicRequest { name: name.into() };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.api(ch);
            async move { c.describe_topic(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// The cluster's nodes and leader.
    pub async fn metadata(&self) -> Result<pb::MetadataResponse, ClientError> {
        self.with_retry(|ch| {
            let mut c = self.api(ch);
            async move { c.metadata(pb::MetadataRequest {}).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// A new producer id for idempotent produce requests.
    pub async fn init_producer_id(&self) -> Result<u64, ClientError> {
        self.with_retry(|ch| {
            let mut c = self.api(ch);
            async move { c.init_producer_id(pb::InitProducerIdRequest {}).await.map(|r| r.into_inner().producer_id) }
        })
        .await
    }

    /// Sends one produce request as given (partition, producer id and sequence included),
    /// following leader redirects. With a producer id the request is resent after a connection
    /// failure (the cluster answers a repeat with the original offsets); without one, a connection
    /// failure once the request may have been sent is reported as INDETERMINATE instead.
    pub async fn produce_request(&self, req: pb::ProduceRequest) -> Result<pb::ProduceResponse, ClientError> {
        let idempotent = req.producer_id != 0;
        let call = |ch| {
            let req = req.clone();
            let mut c = self.api(ch);
            async move { c.produce(req).await.map(|r| r.into_inner()) }
        };
        if idempotent {
            self.with_retry(call).await
        } else {
            self.with_retry_unsent(call).await
        }
    }

    /// Up to `max_records` committed records of a partition from `offset`, from any node.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: u32,
    ) -> Result<pb::FetchResponse, ClientError> {
        let req =
            pb::FetchRequest { topic: topic.into(), partition, offset, max_records, max_bytes: 0, max_wait_ms: 0 };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.api(ch);
            async move { c.fetch(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Reads from one specific broker, not any: to check what a given node holds.
    pub async fn fetch_from(
        &self,
        broker: &str,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: u32,
    ) -> Result<pb::FetchResponse, ClientError> {
        let ch = self
            .channel_to(broker)
            .await
            .map_err(|e| ClientError::NoBroker { brokers: vec![broker.into()], last: e })?;
        let req =
            pb::FetchRequest { topic: topic.into(), partition, offset, max_records, max_bytes: 0, max_wait_ms: 0 };
        self.api(ch).fetch(req).await.map(|r| r.into_inner()).map_err(|st| ClientError::from_status(&st))
    }

    /// Each partition's first retained offset and end offset, from the leader after a quorum
    /// round: the end counts every record whose produce was acknowledged before this call.
    pub async fn list_offsets(&self, topic: &str) -> Result<Vec<pb::PartitionOffsets>, ClientError> {
        let req = pb::ListOffsetsRequest { topic: topic.into() };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.api(ch);
            async move { c.list_offsets(req).await.map(|r| r.into_inner().partitions) }
        })
        .await
    }

    /// Every member of the cluster, as each reports itself.
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, ClientError> {
        self.with_retry(|ch| async move {
            ClusterClient::new(ch).status(pb::ClusterStatusRequest {}).await.map(|r| r.into_inner())
        })
        .await
    }

    /// One node's own view of itself.
    pub async fn node_status(&self, broker: &str) -> Result<pb::NodeStatus, ClientError> {
        let ch = self
            .channel_to(broker)
            .await
            .map_err(|e| ClientError::NoBroker { brokers: vec![broker.into()], last: e })?;
        ClusterClient::new(ch)
            .local_status(pb::LocalStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|st| ClientError::from_status(&st))
    }

    /// Adds a node as a learner, then promotes it to voter once it has caught up.
    pub async fn add_node(&self, id: u64, addr: &str) -> Result<(), ClientError> {
        let req = pb::AddNodeRequest { id, addr: addr.into() };
        self.with_retry(|ch| {
            let req = req.clone();
            async move {
                let mut c = ClusterClient::new(ch);
                let mut r = tonic::Request::new(req);
                // Adding a node waits for it to catch up: longer than an ordinary request.
                r.set_timeout(Duration::from_secs(600));
                c.add_node(r).await.map(|_| ())
            }
        })
        .await
    }

    /// Removes a node from the membership.
    pub async fn remove_node(&self, id: u64) -> Result<(), ClientError> {
        self.with_retry(|ch| async move {
            ClusterClient::new(ch).remove_node(pb::RemoveNodeRequest { id }).await.map(|_| ())
        })
        .await
    }
}
