use busbar_proto::{ERROR_CODE_KEY, LEADER_ADDR_KEY};

/// An error from the cluster or from reaching it. `code` is the numbered Busbar error code
/// (Kafka's numbers where they match; see `proto/busbar/v1/busbar.proto`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("error {code}: {message}")]
    Api { code: i32, message: String, leader_addr: Option<String> },
    #[error("no broker reachable among {brokers:?}: {last}")]
    NoBroker { brokers: Vec<String>, last: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Codes worth knowing by name on the client side.
pub mod codes {
    pub const OFFSET_OUT_OF_RANGE: i32 = 1;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i32 = 3;
    pub const LEADER_NOT_AVAILABLE: i32 = 5;
    pub const NOT_LEADER: i32 = 6;
    pub const REQUEST_TIMED_OUT: i32 = 7;
    pub const INDETERMINATE: i32 = 1000;
    pub const SHUTTING_DOWN: i32 = 1002;
}

impl ClientError {
    pub fn code(&self) -> Option<i32> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The write may have been committed even though this call failed.
    pub fn is_indeterminate(&self) -> bool {
        matches!(self.code(), Some(codes::INDETERMINATE))
    }

    pub(crate) fn from_status(st: &tonic::Status) -> Self {
        let meta = |k: &str| st.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        match meta(ERROR_CODE_KEY).and_then(|c| c.parse().ok()) {
            Some(code) => {
                ClientError::Api { code, message: st.message().to_string(), leader_addr: meta(LEADER_ADDR_KEY) }
            }
            // No Busbar code: the transport failed (connection refused, reset, deadline).
            None => ClientError::NoBroker { brokers: vec![], last: format!("{:?}: {}", st.code(), st.message()) },
        }
    }
}
