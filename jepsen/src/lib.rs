//! Busbar's fault-injection suite (see `jepsen/README.md` and `docs/jepsen.md`).
//!
//! - [`history`]: the JSON-lines history every run writes and the checker reads.
//! - [`checker`]: reads a history and reports every anomaly, with the offending operations.

pub mod checker;
pub mod history;
