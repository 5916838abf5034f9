use busbar_proto::{ERROR_CODE_KEY, LEADER_ADDR_KEY};

/// An error from the cluster or from reaching it. `code` is the numbered Busbar error code
/// (Kafka's numbers where they match; see `proto/busbar/v1/busbar.proto`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The cluster answered with a numbered error (see [`codes`]).
    #[error("error {code}: {message}")]
    Api { code: i32, message: String, leader_addr: Option<String> },
    /// No broker could be reached, or the connection failed mid-call (no Busbar code).
    #[error("no broker reachable among {brokers:?}: {last}")]
    NoBroker { brokers: Vec<String>, last: String },
    /// Refused before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The producer or stream was closed before the operation completed.
    #[error("closed: {0}")]
    Closed(String),
}

/// Codes worth knowing by name on the client side.
pub mod codes {
    pub const UNKNOWN_SERVER_ERROR: i32 = -1;
    pub const OFFSET_OUT_OF_RANGE: i32 = 1;
    pub const CORRUPT_MESSAGE: i32 = 2;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i32 = 3;
    pub const LEADER_NOT_AVAILABLE: i32 = 5;
    pub const NOT_LEADER: i32 = 6;
    pub const REQUEST_TIMED_OUT: i32 = 7;
    pub const RECORD_TOO_LARGE: i32 = 10;
    pub const INVALID_TOPIC: i32 = 17;
    pub const RECORD_LIST_TOO_LARGE: i32 = 18;
    pub const ILLEGAL_GENERATION: i32 = 22;
    pub const INVALID_GROUP_ID: i32 = 24;
    pub const UNKNOWN_MEMBER_ID: i32 = 25;
    pub const INVALID_SESSION_TIMEOUT: i32 = 26;
    pub const TOPIC_ALREADY_EXISTS: i32 = 36;
    pub const INVALID_PARTITIONS: i32 = 37;
    pub const INVALID_REQUEST: i32 = 42;
    pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i32 = 45;
    pub const DUPLICATE_SEQUENCE_NUMBER: i32 = 46;
    pub const KAFKA_STORAGE_ERROR: i32 = 56;
    pub const UNKNOWN_PRODUCER_ID: i32 = 59;
    pub const NON_EMPTY_GROUP: i32 = 68;
    pub const GROUP_ID_NOT_FOUND: i32 = 69;
    pub const INDETERMINATE: i32 = 1000;
    pub const MEMBERSHIP_CHANGE_FAILED: i32 = 1001;
    pub const SHUTTING_DOWN: i32 = 1002;
}

impl ClientError {
    /// The numbered Busbar error code, for an answer from the cluster.
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

    /// The same request may succeed later: the leader moved or is being elected, the node is
    /// stopping, or no broker could be reached. Not INDETERMINATE: repeating a write that may have
    /// committed is only safe when the cluster deduplicates it (an idempotent producer).
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Api { code, .. } => {
                matches!(*code, codes::NOT_LEADER | codes::LEADER_NOT_AVAILABLE | codes::SHUTTING_DOWN)
            }
            ClientError::NoBroker { .. } => true,
            ClientError::InvalidArgument(_) | ClientError::Closed(_) => false,
        }
    }

    /// The error message the cluster sent, or this error's description.
    pub fn message(&self) -> String {
        match self {
            ClientError::Api { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    pub(crate) fn from_status(st: &tonic::Status) -> Self {
        let meta = |k: &str| st.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        match meta(ERROR_CODE_KEY).and_then(|c| c.parse().ok()) {
            Some(code) => {
                ClientError::Api { code, message: st.message().to_string(), leader_addr: meta(LEADER_ADDR_KEY) }
            }
            // No Busbar code: the broker did not handle the request itself. Either the transport
            // failed (refused, reset, deadline: try elsewhere), or gRPC refused the request before our
            // code saw it (its size above the broker's limit, a malformed message): that is the
            // request's fault and must not be retried.
            None => match st.code() {
                tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Aborted => {
                    ClientError::NoBroker { brokers: vec![], last: format!("{:?}: {}", st.code(), st.message()) }
                }
                // The HTTP/2 stream or connection was reset with INTERNAL_ERROR (tonic maps h2's
                // reason to Internal): seen when a node dies with requests in flight. The transport
                // broke; the request may or may not have reached the node.
                tonic::Code::Internal if st.message().starts_with(H2_ERROR_PREFIX) => {
                    ClientError::NoBroker { brokers: vec![], last: format!("{:?}: {}", st.code(), st.message()) }
                }
                tonic::Code::ResourceExhausted | tonic::Code::OutOfRange => ClientError::Api {
                    code: codes::RECORD_LIST_TOO_LARGE,
                    message: format!("the broker refused the request's size: {}", st.message()),
                    leader_addr: None,
                },
                tonic::Code::InvalidArgument | tonic::Code::Unimplemented => ClientError::Api {
                    code: codes::INVALID_REQUEST,
                    message: format!("the broker refused the request: {}", st.message()),
                    leader_addr: None,
                },
                other => ClientError::Api {
                    code: codes::UNKNOWN_SERVER_ERROR,
                    message: format!("{other:?}: {}", st.message()),
                    leader_addr: None,
                },
            },
        }
    }
}

/// How tonic words a status it made from an HTTP/2 error (`Status::from_h2_error`).
const H2_ERROR_PREFIX: &str = "h2 protocol error";

/// Whether a call that failed at the transport level certainly never reached a broker, so a write
/// may be sent again without risk of applying it twice. True when its error comes from
/// - connecting (`tonic::ConnectError`: the call needed a new connection, it failed, so nothing
///   was written to any), or
/// - hyper's dispatch before the request was handed to HTTP/2 (`hyper::Error::is_canceled`: the
///   connection closed with the request still queued in front of it).
///
/// Anything else (a reset stream, a deadline, a keep-alive that went unanswered) may have
/// happened with the request on the wire.
pub(crate) fn never_sent(st: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(st);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() || e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled) {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure to connect counts as never sent; a status without a transport error behind it
    /// (a deadline, a reset stream) may have been sent. (hyper's "canceled" is not built here: it
    /// needs a real HTTP/2 connection.)
    #[test]
    fn a_connect_failure_is_never_sent_a_reset_may_have_been() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let connect = tonic::ConnectError(Box::new(refused));
        let st = tonic::Status::from_error(Box::new(connect));
        assert_eq!(st.code(), tonic::Code::Unavailable);
        assert!(never_sent(&st));
        assert!(!never_sent(&tonic::Status::unavailable("no source")));
        assert!(!never_sent(&tonic::Status::internal("h2 protocol error: http2 error")));
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(!never_sent(&tonic::Status::from_error(Box::new(reset))));
    }

    /// A leader crash resets streams with INTERNAL_ERROR; an idempotent producer must see a broken
    /// transport it may resend over, not a refusal it gives up on.
    #[test]
    fn an_http2_reset_is_a_transport_failure_but_a_plain_internal_status_is_not() {
        let reset = tonic::Status::internal("h2 protocol error: http2 error");
        let e = ClientError::from_status(&reset);
        assert!(matches!(e, ClientError::NoBroker { .. }), "{e:?}");
        assert!(e.is_retriable());
        let other = ClientError::from_status(&tonic::Status::internal("failed to decode Protobuf message"));
        assert_eq!(other.code(), Some(codes::UNKNOWN_SERVER_ERROR));
        assert!(!other.is_retriable());
    }
}
