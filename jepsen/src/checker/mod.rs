//! The history checker: every anomaly of Jepsen's Kafka workload, plus consumer-group offset
//! checks and per-node divergence. See `docs/jepsen.md`.
