//! Rust client for Busbar. Depends only on the protocol crate.
//!
//! - [`Client`]: one call, one request. [`Client::connect`] takes a list of brokers; every call
//!   tries them until one answers (a dead broker costs one bounded connect timeout), and writes
//!   follow NOT_LEADER redirects to the leader.
//! - [`Producer`]: batches records per partition (linger, max batch bytes), keeps a bounded number
//!   of batches in flight and a bounded buffer, retries with backoff, and finds the leader itself.
//! - [`PartitionConsumer`]: assign a partition, seek, then [`poll`](PartitionConsumer::poll) (long
//!   poll) or [`stream`](PartitionConsumer::stream) (pushed as records commit).
//! - [`GroupConsumer`]: a member of a consumer group: the group shares the partitions of its topics
//!   among its members and keeps its committed offsets; delivery is at least once (see its docs for
//!   exactly when a record is seen twice).
//! - [`Admin`]: topics, offsets, consumer groups and cluster membership.
//!
//! ```no_run
//! use std::time::Duration;
//! use busbar_client::{Admin, Client, PartitionConsumer, Producer, ProducerConfig, Record};
//! # async fn demo() -> Result<(), busbar_client::ClientError> {
//! let client = Client::connect(["127.0.0.1:9501", "127.0.0.1:9502", "127.0.0.1:9503"]).await?;
//! Admin::new(client.clone()).create_topic("orders", 3).await?;
//!
//! let producer = Producer::new(client.clone(), ProducerConfig::default()).await?;
//! let delivery = producer.send("orders", Record::keyed("customer-7", "created").header("trace", "42")).await?;
//! let written = delivery.await?; // committed on a quorum
//! producer.close().await;
//!
//! let mut consumer = PartitionConsumer::new(client);
//! consumer.assign("orders", written.partition).await?;
//! consumer.seek(written.offset);
//! let records = consumer.poll(Duration::from_secs(1)).await?;
//! assert_eq!(&records[0].value[..], b"created");
//! # Ok(()) }
//! ```
//!
//! # Delivery guarantees
//!
//! A record is acknowledged once it is committed on a quorum and applied: it survives the loss of
//! any minority of nodes. Reads, from any node, only ever show committed records.
//!
//! A write whose outcome is unknown (the leader changed or lost its quorum while it waited; the
//! connection broke after sending) is *indeterminate*: it may or may not be in the log.
//!
//! - With [`ProducerConfig::idempotent`] (the default) the producer resends such a batch under the
//!   same producer id and sequence number, and the cluster appends it at most once: the resend is
//!   answered with the original offsets. So each acknowledged batch is in the log exactly once,
//!   across retries and leader changes. The cluster remembers the 5 most recent batches per
//!   producer and partition; the producer keeps one batch in flight per partition, well inside
//!   that window. If a batch still fails after it may have been written, the producer continues
//!   that partition under a fresh producer id, so no later batch is mistaken for it.
//! - Without idempotence, an indeterminate batch is not resent: its records fail with an error for
//!   which [`ClientError::is_indeterminate`] is true. Resending it is the caller's choice (at least
//!   once, possibly twice).
//! - A write that failed before anything was sent (its connection could not be made, or closed
//!   with the request still queued in the client) is not indeterminate: it is retried, on another
//!   broker if need be, within [`ClientOptions::max_retries`]. A failure after the connection was
//!   made (an HTTP/2 handshake refused, a reset stream, an unanswered keep-alive ping) counts as
//!   possibly sent.
//!
//! Connections: a [`Client`] (and its clones) keeps one HTTP/2 connection per broker, shared by
//! every call, and remembers the leader a NOT_LEADER answer named, so writes go straight to it.
//! A connection that closes is replaced at the next call, not reconnected underneath the calls
//! queued on it: those fail at once as never sent. A broker that goes silent (cut off, paused)
//! is noticed by keep-alive pings within 7 s.
//!
//! Order: records with the same key go to the same partition
//! ([`busbar_proto::partition::for_key`], Kafka's murmur2 partitioner, so the same partition number
//! as Kafka) and are acknowledged at increasing offsets in the order they were sent.

mod admin;
mod client;
mod connection;
mod consumer;
mod error;
mod group;
mod leader;
mod producer;

pub use admin::Admin;
pub use busbar_proto::v1::{
    ClusterStatusResponse, ConsumedRecord, DescribeGroupResponse, DescribeTopicResponse, FetchResponse, GroupMember,
    GroupPartition, MetadataResponse, NodeRole, NodeStatus, PartitionOffsets, ProduceRequest, ProduceResponse,
    TopicInfo,
};
/// Consumed records' keys and values; re-exported so applications need not depend on `bytes`.
/// A consumed record's bytes are a slice of the message it came in: copy out (`to_vec()`) what
/// is kept long, or it keeps that message's buffer alive (see [`ConsumerRecord`]).
pub use bytes::Bytes;
pub use client::{Client, ClientOptions, Record};
pub use consumer::{ConsumerConfig, ConsumerRecord, PartitionConsumer, RecordStream};
pub use error::{codes, ClientError};
pub use group::{
    GroupConsumer, GroupConsumerConfig, GroupEvent, RebalanceCallback, ResetTo, StartFrom, TopicPartition,
};
pub use producer::{DeliveryCallback, DeliveryFuture, Producer, ProducerConfig, RecordMetadata};
