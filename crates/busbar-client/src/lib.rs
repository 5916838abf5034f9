//! Rust client for Busbar. Depends only on the protocol crate.
//!
//! [`Client::connect`] takes a list of brokers; every call tries them until one answers (a dead
//! broker costs one bounded connect timeout), and writes follow NOT_LEADER redirects to the leader.
//!
//! ```no_run
//! # async fn demo() -> Result<(), busbar_client::ClientError> {
//! let client = busbar_client::Client::connect(["127.0.0.1:9501"]).await?;
//! client.create_topic("orders", 3).await?;
//! let ack = client.produce("orders", 0, vec![busbar_client::Record::value("hello")]).await?;
//! let fetched = client.fetch("orders", 0, ack.base_offset, 100).await?;
//! assert_eq!(fetched.records[0].record.as_ref().map(|r| r.value.as_slice()), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```

mod client;
mod error;

pub use busbar_proto::v1::{
    ClusterStatusResponse, ConsumedRecord, DescribeTopicResponse, FetchResponse, MetadataResponse, NodeRole,
    NodeStatus, PartitionOffsets, ProduceRequest, ProduceResponse, TopicInfo,
};
pub use client::{Client, ClientOptions, Record};
pub use error::{codes, ClientError};
