//! The results directory of a run: `history.jsonl` and `nemesis.jsonl` (written as the run goes),
//! `check.json` (the checker's report), `run.json` (parameters, seed, convergence), one log file
//! per node (`n<ID>.log`) and the nodes' data dirs (`data/n<ID>/`).

use std::path::Path;

use busbar_jepsen::checker::Report;

/// Writes `check.json` and `run.json`; returns the summary to print.
pub fn write(dir: &Path, report: &Report, run: &serde_json::Value) -> anyhow::Result<String> {
    std::fs::write(dir.join("check.json"), serde_json::to_vec_pretty(report)?)?;
    std::fs::write(dir.join("run.json"), serde_json::to_vec_pretty(run)?)?;
    let mut out = report.summary();
    for (name, cases) in &report.anomalies {
        out.push_str(&format!("{name} (first of {}):\n", cases.len()));
        for c in cases.iter().take(3) {
            out.push_str(&format!("  {c}\n"));
        }
    }
    Ok(out)
}
