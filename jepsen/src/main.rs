//! `busbar-jepsen`: runs a fault-injection test against a docker cluster of Busbar nodes
//! (`run`), or checks a recorded history (`check`). See `docs/jepsen.md`.
//!
//! Modules, one concept each: [`cluster`] (docker containers, network, iptables), [`nemesis`]
//! (faults and their schedule), [`workload`] (the recorded clients), [`final_phase`] (heal,
//! converge, read everything from every node), [`recorder`] (the history as it is written),
//! [`results`] (the results directory and the verdict).

mod cluster;
mod final_phase;
mod nemesis;
mod recorder;
mod results;
mod rng;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use busbar_client::{Admin, Client};
use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cluster::{Cluster, NodeSettings};
use crate::nemesis::{Nemesis, NemesisRunner, Schedule};
use crate::recorder::Recorder;
use crate::rng::Rng;
use crate::workload::{client_options, Brokers, WorkloadConfig, TOPIC};

#[derive(Parser)]
#[command(name = "busbar-jepsen", about = "Fault injection against a docker cluster of Busbar nodes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster, run clients under faults, heal, read everything back, check the history.
    Run(RunArgs),
    /// Check a recorded history (history.jsonl); exits 0 only when it is valid.
    Check {
        history: PathBuf,
        /// Also print the full report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Nodes in the cluster (3 or 5).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Faults to inject, comma-separated: kill, pause, partition, pause-kill, partition-kill,
    /// member, disk. Empty: no faults.
    #[arg(long, value_delimiter = ',', default_value = "kill,partition")]
    nemesis: Vec<String>,
    /// Seconds of workload under faults (the final phase comes after).
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    /// Where the results go; default jepsen/results/<unix time>-<nemeses>.
    #[arg(long)]
    results_dir: Option<PathBuf>,
    #[arg(long, default_value = "busbar:local")]
    image: String,
    /// Seed of every random choice (printed at the start); default from the clock.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 5)]
    partitions: u32,
    #[arg(long, default_value_t = 6)]
    producers: usize,
    /// Records per second over all producers.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    #[arg(long, default_value_t = 3)]
    group_members: usize,
    /// Raft snapshot every this many entries (low: snapshots and catch-up happen often).
    #[arg(long, default_value_t = 300)]
    snapshot_every: u64,
    #[arg(long, default_value_t = 100)]
    logs_to_keep: u64,
    /// Keep the containers and network after the run (for a look); the default removes them.
    #[arg(long)]
    keep: bool,
    /// Keep the nodes' data dirs (results/<run>/data/) of a valid run too; by default only an
    /// invalid or failed run keeps them.
    #[arg(long)]
    keep_data: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("busbar-jepsen: {e}");
            return ExitCode::from(2);
        }
    };
    let r = match cli.cmd {
        Cmd::Run(args) => rt.block_on(run(args)),
        Cmd::Check { history, json } => check(&history, json),
    };
    // Client tasks still winding down must not hold the exit.
    rt.shutdown_timeout(Duration::from_secs(2));
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("busbar-jepsen: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn check(path: &std::path::Path, print_json: bool) -> anyhow::Result<bool> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let entries = busbar_jepsen::history::read_history(std::io::BufReader::new(file))?;
    let report = busbar_jepsen::checker::check(&entries);
    if print_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    print!("{}", report.summary());
    Ok(report.valid)
}

async fn run(args: RunArgs) -> anyhow::Result<bool> {
    if !(1..=9).contains(&args.nodes) {
        bail!("--nodes must be between 1 and 9");
    }
    let nemeses: Vec<Nemesis> =
        args.nemesis.iter().filter(|s| !s.is_empty()).map(|s| s.parse()).collect::<anyhow::Result<_>>()?;
    let seed = args.seed.unwrap_or_else(rng::time_seed);
    let label = if nemeses.is_empty() {
        "none".to_string()
    } else {
        nemeses.iter().map(|n| n.name()).collect::<Vec<_>>().join(",")
    };
    let results = args.results_dir.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        PathBuf::from("jepsen/results").join(format!("{t}-{label}"))
    });
    std::fs::create_dir_all(results.join("data"))?;
    let results = std::fs::canonicalize(&results)?;
    println!(
        "busbar-jepsen: {} nodes, nemeses [{label}], {} s, seed {seed}; results in {}",
        args.nodes,
        args.time_limit,
        results.display()
    );
    cluster::preflight(&args.image).await?;
    init_client_log(&results.join("client.log"))?;

    let run_id = format!("bbj{}-{}", std::process::id(), seed % 100_000);
    let settings = NodeSettings {
        image: args.image.clone(),
        snapshot_every: args.snapshot_every,
        logs_to_keep: args.logs_to_keep,
    };
    let mut cluster = Cluster::create(&run_id, &results.join("data"), settings).await?;

    // Whatever happens inside (an error, Ctrl-C, SIGTERM), the containers and network go.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        r = test(&args, &nemeses, seed, &label, &results, &mut cluster) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    cluster.save_logs(&results).await;
    if args.keep {
        println!("kept: containers of {run_id}, network {}", cluster.network);
    } else {
        cluster.destroy().await;
    }
    let valid = outcome?;
    // The nodes' data dirs are hundreds of MB after a few minutes; they matter only for a run to
    // investigate.
    if valid && !args.keep_data {
        if let Err(e) = std::fs::remove_dir_all(results.join("data")) {
            eprintln!("removing the data dirs of a valid run: {e}");
        }
    }
    println!("results: {}", results.display());
    Ok(valid)
}

/// The client library's own log (rebalances, retries, redirects) goes to `client.log`: what a
/// history entry does not say about why an operation ended as it did. `JEPSEN_LOG` overrides the
/// filter (default: the client at debug, everything else at warn).
fn init_client_log(path: &std::path::Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)?;
    let filter = std::env::var("JEPSEN_LOG").unwrap_or_else(|_| "warn,busbar_client=debug".to_string());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init()
        .map_err(|e| anyhow::anyhow!("client log: {e}"))
}

/// Waits until the cluster has a leader and `n` voters.
async fn wait_ready(cluster: &Cluster, n: usize, bound: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + bound;
    loop {
        let addrs = cluster.member_addrs();
        if let Some(ids) = nemesis::membership(&addrs).await {
            if ids.len() == n && nemesis::leader_of(&addrs).await.is_some() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("the cluster did not form ({n} voters and a leader) within {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn create_topic(addrs: &[String], partitions: u32) -> anyhow::Result<()> {
    let mut last = String::new();
    for _ in 0..30 {
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            let admin = Admin::new(Client::connect_with(addrs.to_vec(), client_options()).await?);
            match admin.create_topic(TOPIC, partitions).await {
                Err(e) if e.code() == Some(busbar_client::codes::TOPIC_ALREADY_EXISTS) => Ok(()),
                r => r,
            }
        })
        .await;
        match r {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("could not create the topic: {last}")
}

async fn test(
    args: &RunArgs,
    nemeses: &[Nemesis],
    seed: u64,
    label: &str,
    results: &std::path::Path,
    cluster: &mut Cluster,
) -> anyhow::Result<bool> {
    let mut rng = Rng::new(seed);
    cluster.start_initial(args.nodes).await?;
    wait_ready(cluster, args.nodes, Duration::from_secs(90)).await?;
    create_topic(&cluster.member_addrs(), args.partitions).await?;
    println!("cluster up: {:?}; topic {TOPIC} with {} partitions", cluster.member_addrs(), args.partitions);

    let rec = Arc::new(Recorder::create(&results.join("history.jsonl"), &results.join("nemesis.jsonl"))?);
    let brokers = Brokers::default();
    brokers.set(cluster.member_addrs());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut clients = JoinSet::new();
    let wl = WorkloadConfig {
        partitions: args.partitions,
        producers: args.producers,
        rate: args.rate,
        group_members: args.group_members,
    };
    workload::spawn(&mut clients, &wl, rec.clone(), brokers.clone(), stop_rx, &mut rng);

    // Progress every 10 s while the faults run.
    let progress = {
        let rec = rec.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let (i, ok, fail, info) = rec.counts();
                println!("[{:>6.1}s] {i} invoked, {ok} ok, {fail} fail, {info} info", rec.elapsed_s());
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(args.time_limit);
    let mut runner = NemesisRunner::new(
        cluster,
        rec.clone(),
        brokers.clone(),
        rng.fork(),
        Schedule { healthy: (4, 10), fault: (5, 15) },
    );
    runner.run(nemeses, deadline).await;

    // The final phase: heal, let the clients see a healthy cluster for a moment, stop them.
    rec.nemesis("final-heal", json!({}));
    runner.heal_all().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(Duration::from_secs(30), async { while clients.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        eprintln!("some clients did not stop within 30 s; aborting them (their open operations stay incomplete)");
        clients.abort_all();
    }
    progress.abort();
    runner.heal_all().await;

    let members = runner.cluster.member_nodes();
    let (converged, seen) = final_phase::wait_converged(&members, args.partitions, Duration::from_secs(120)).await;
    rec.nemesis("final-converged", final_phase::convergence_json(converged, &seen));
    final_phase::read_all(&rec, &members, args.partitions).await;

    let entries = rec.finish()?;
    let report = busbar_jepsen::checker::check(&entries);
    let summary = results::write(
        results,
        &report,
        &json!({
            "nodes": args.nodes,
            "nemesis": label,
            "time_limit_s": args.time_limit,
            "seed": seed,
            "partitions": args.partitions,
            "producers": args.producers,
            "rate": args.rate,
            "group_members": args.group_members,
            "snapshot_every": args.snapshot_every,
            "logs_to_keep": args.logs_to_keep,
            "converged": converged,
            "end_offsets": seen,
            "final_members": members.iter().map(|n| n.name()).collect::<Vec<_>>(),
        }),
    )?;
    print!("{summary}");
    if !converged {
        println!("liveness: the nodes did NOT converge to the same end offsets within 120 s after healing");
    }
    Ok(report.valid && converged)
}
