//! Topic and cluster administration: thin wrappers over [`Client`] under one name.

use busbar_proto::v1 as pb;

use crate::client::Client;
use crate::error::ClientError;
use crate::group::ResetTo;

/// Topics, offsets, consumer groups and cluster membership. Every call finds the leader itself where it must.
///
/// ```no_run
/// use busbar_client::{Admin, Client};
/// # async fn demo() -> Result<(), busbar_client::ClientError> {
/// let admin = Admin::new(Client::connect(["127.0.0.1:9501", "127.0.0.1:9502"]).await?);
/// admin.create_topic("orders", 6).await?;
/// let described = admin.describe_topic("orders").await?;
/// assert_eq!(described.topic.map(|t| t.partitions), Some(6));
/// let status = admin.cluster_status().await?;
/// println!("leader: {} of {} nodes", status.leader_id, status.nodes.len());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Connects as [`Client::connect`] does.
    pub async fn connect<I, S>(brokers: I) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Ok(Self::new(Client::connect(brokers).await?))
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates a topic. Names: 1 to 249 of `[A-Za-z0-9._-]` (INVALID_TOPIC, 17); partitions:
    /// 1 up to the cluster's limit (INVALID_PARTITIONS, 37); TOPIC_ALREADY_EXISTS (36).
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<(), ClientError> {
        self.client.create_topic(name, partitions).await
    }

    /// Deletes a topic and its records.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        self.client.delete_topic(name).await
    }

    pub async fn list_topics(&self) -> Result<Vec<pb::TopicInfo>, ClientError> {
        self.client.list_topics().await
    }

    /// The topic's partition count and each partition's offsets.
    pub async fn describe_topic(&self, name: &str) -> Result<pb::DescribeTopicResponse, ClientError> {
        self.client.describe_topic(name).await
    }

    /// Each partition's first retained offset and end offset (the next offset to be assigned).
    pub async fn list_offsets(&self, topic: &str) -> Result<Vec<pb::PartitionOffsets>, ClientError> {
        self.client.list_offsets(topic).await
    }

    /// Every consumer group's name.
    pub async fn list_groups(&self) -> Result<Vec<String>, ClientError> {
        self.client.list_groups().await
    }

    /// A group's members, and per partition its committed offset, end offset and lag; see
    /// [`Client::describe_group`].
    pub async fn describe_group(&self, group: &str) -> Result<pb::DescribeGroupResponse, ClientError> {
        self.client.describe_group(group).await
    }

    /// Moves an inactive group's offsets of a topic; see [`Client::reset_group_offsets`].
    pub async fn reset_group_offsets(&self, group: &str, topic: &str, to: ResetTo) -> Result<(), ClientError> {
        self.client.reset_group_offsets(group, topic, to).await
    }

    /// Deletes an inactive group and its offsets.
    pub async fn delete_group(&self, group: &str) -> Result<(), ClientError> {
        self.client.delete_group(group).await
    }

    /// The nodes and the leader.
    pub async fn metadata(&self) -> Result<pb::MetadataResponse, ClientError> {
        self.client.metadata().await
    }

    /// Every member, as each reports itself (unreachable ones marked).
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, ClientError> {
        self.client.cluster_status().await
    }

    /// One node's own view of itself.
    pub async fn node_status(&self, broker: &str) -> Result<pb::NodeStatus, ClientError> {
        self.client.node_status(broker).await
    }

    /// Adds a node: as a learner until it has caught up, then as a voter. Idempotent.
    pub async fn add_node(&self, id: u64, addr: &str) -> Result<(), ClientError> {
        self.client.add_node(id, addr).await
    }

    /// Removes a node from the membership. Idempotent.
    pub async fn remove_node(&self, id: u64) -> Result<(), ClientError> {
        self.client.remove_node(id).await
    }
}
