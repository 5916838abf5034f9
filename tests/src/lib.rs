//! Test harnesses shared by Busbar's integration tests.
//!
//! - [`inprocess`]: clusters of real nodes (real gRPC, real storage) inside the test process, with a
//!   partition table to cut links between them. Fast; the default for cluster behaviour.
//! - [`process`]: clusters of real `busbar server` processes, killed with SIGKILL and restarted.
//! - [`wait`]: bounded polling, so no test waits forever.

pub mod inprocess;
pub mod process;
pub mod wait;
