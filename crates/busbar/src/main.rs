//! The `busbar` binary: a thin shell over the server and client crates.

mod cli;
mod cluster_cmd;
mod common;
mod consume_cmd;
mod dev_cmd;
mod group_cmd;
mod produce_cmd;
mod topic_cmd;

use clap::Parser;

/// jemalloc rather than glibc's malloc: with glibc, a node's RSS grew about twice as fast as its
/// live heap under a steady produce load (freed chunks stayed resident); jemalloc hands idle pages
/// back to the kernel (docs/benchmarks.md, "Memory over a long run"). Off only for heap profiling.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    cli::init_tracing(&cli);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli::runtime_workers(&cli) {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let is_server = matches!(cli.command, cli::Command::Server(_));
    let result = rt.block_on(cli::dispatch(cli));
    if !is_server {
        // A client command may leave a task in a blocking read of stdin (produce stopped early):
        // do not wait for it. A server waits for all of its tasks, as dropping the runtime does.
        rt.shutdown_timeout(std::time::Duration::from_millis(100));
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Our error types already include their source in their
/// message, so a cause whose text is already there is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}
