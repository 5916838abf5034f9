//! Helpers shared by Busbar's benchmarks: where their files go, how noisy the machine was while they ran
//! (CPU steal, this process's CPU time), payload bytes that no layer below can compress, and one plain-text
//! table for the results.
//!
//! The machines we measure on are shared: the host takes CPU time back ("steal") and the same run can vary
//! several-fold, so every figure a bench prints comes with the steal seen while it was taken.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Kernel clock ticks per second in /proc (USER_HZ). It is 100 on every Linux architecture we run on;
/// asking sysconf would need libc and `unsafe`, which the workspace denies.
pub const USER_HZ: f64 = 100.0;

/// One reading of the machine-wide CPU counters and of this process's CPU time.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    /// Sum of the first eight fields of /proc/stat's `cpu` line; guest time is already inside `user`.
    pub total_ticks: u64,
    pub steal_ticks: u64,
    /// utime + stime of this process, all its threads.
    pub process_ticks: u64,
}

impl CpuSample {
    /// Reads /proc/stat and /proc/self/stat; fails where there is no Linux /proc.
    pub fn now() -> io::Result<CpuSample> {
        let stat = fs::read_to_string("/proc/stat")?;
        let cpu = stat.lines().find(|l| l.starts_with("cpu ")).ok_or_else(|| bad("/proc/stat has no cpu line"))?;
        let fields: Vec<u64> = cpu.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
        if fields.len() < 8 {
            return Err(bad("/proc/stat cpu line has fewer than 8 fields"));
        }
        let total_ticks = fields[..8].iter().sum();
        let steal_ticks = fields[7];

        // The command name (field 2) may contain spaces and parentheses; the fields after its last ')'
        // start at field 3 (state), so utime and stime (fields 14 and 15) are at positions 11 and 12.
        let own = fs::read_to_string("/proc/self/stat")?;
        let after = own.rfind(')').map(|i| &own[i + 1..]).ok_or_else(|| bad("/proc/self/stat has no ')'"))?;
        let own: Vec<&str> = after.split_whitespace().collect();
        let field = |i: usize| own.get(i).and_then(|f| f.parse::<u64>().ok()).ok_or_else(|| bad("/proc/self/stat"));
        let process_ticks = field(11)? + field(12)?;
        Ok(CpuSample { total_ticks, steal_ticks, process_ticks })
    }

    /// Percent of all CPU time (every core) the host stole between `self` and `later`.
    pub fn steal_pct(&self, later: &CpuSample) -> f64 {
        let total = later.total_ticks.saturating_sub(self.total_ticks);
        let steal = later.steal_ticks.saturating_sub(self.steal_ticks);
        if total == 0 {
            0.0
        } else {
            100.0 * steal as f64 / total as f64
        }
    }

    /// CPU seconds this process used between `self` and `later`; steal does not inflate it.
    pub fn process_secs(&self, later: &CpuSample) -> f64 {
        later.process_ticks.saturating_sub(self.process_ticks) as f64 / USER_HZ
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// `BENCH_SCALE` (default 1), which every long bench multiplies its sizes and durations by: a
/// finite number in (0, 100].
pub fn bench_scale() -> io::Result<f64> {
    let scale = match std::env::var("BENCH_SCALE") {
        Ok(s) => s.trim().parse::<f64>().map_err(|_| bad(&format!("BENCH_SCALE={s:?} is not a number")))?,
        Err(_) => 1.0,
    };
    if !(scale.is_finite() && scale > 0.0 && scale <= 100.0) {
        return Err(bad(&format!("BENCH_SCALE must be in (0, 100], got {scale}")));
    }
    Ok(scale)
}

/// Where benches put their files: `$BENCH_DIR` if set, else the cargo target directory the running bench
/// binary was built into. That is on the repository's disk, which is what we want to measure; `/tmp` may be
/// a tmpfs, where fdatasync costs nothing.
pub fn bench_root() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BENCH_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    // cargo marks its target directory with CACHEDIR.TAG; the binary sits in <target>/<profile>/deps.
    if let Some(target) = exe.ancestors().skip(1).find(|d| d.join("CACHEDIR.TAG").is_file()) {
        return Ok(target.to_path_buf());
    }
    exe.parent().map(Path::to_path_buf).ok_or_else(|| bad("the bench binary has no parent directory"))
}

/// The mount holding `path`, from /proc/self/mounts: (filesystem type, device, mount point).
pub fn filesystem_of(path: &Path) -> Option<(String, String, String)> {
    let path = path.canonicalize().ok()?;
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, mnt, fstype) = (f.next()?, f.next()?, f.next()?);
            Some((fstype.to_string(), dev.to_string(), mnt.replace("\\040", " ")))
        })
        .filter(|(_, _, mnt)| path.starts_with(mnt))
        // Later lines shadow earlier ones mounted at the same point, hence max_by_key keeping the last.
        .max_by_key(|(_, _, mnt)| mnt.len())
}

/// Filesystems that live in memory: benchmarking durability on them measures nothing.
pub fn is_memory_fs(fstype: &str) -> bool {
    matches!(fstype, "tmpfs" | "ramfs" | "devtmpfs")
}

/// Fills `buf` with xorshift64* bytes from `seed`. Payloads are random so that nothing below us (a
/// compressing or zero-detecting virtual disk) can make them cheaper than real data.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_random(&mut v, seed);
    v
}

/// The `p`-th percentile (0.0..=1.0, nearest rank) of `samples`, which this sorts.
pub fn percentile(samples: &mut [Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = ((samples.len() as f64 * p.clamp(0.0, 1.0)).ceil() as usize).clamp(1, samples.len());
    Some(samples[rank - 1])
}

/// The current time as `YYYY-MM-DD HH:MM UTC`, without a date crate.
pub fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", rem / 3_600, rem % 3_600 / 60)
}

/// A plain-text table: the first column left-aligned, the others right-aligned (they hold numbers).
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table { header: header.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).chain([self.header.len()]).max().unwrap_or(0);
        let mut width = vec![0usize; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            let mut s = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = r.get(i).map_or("", String::as_str);
                let pad = w.saturating_sub(c.chars().count());
                if i == 0 {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str("  ");
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
            }
            s.trim_end().to_string()
        };
        let mut out = line(&self.header);
        out.push('\n');
        out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * cols.saturating_sub(1)));
        for r in &self.rows {
            out.push('\n');
            out.push_str(&line(r));
        }
        out.push('\n');
        out
    }
}

/// Formats a figure with about three significant digits, or `-` when there is none.
pub fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if !v.is_finite() => "-".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 1.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
    }
}

/// CPU time (utime + stime, all threads) of process `pid` so far, in clock ticks ([`USER_HZ`]).
/// Reaped children's time is not included: server processes are measured while they run.
pub fn process_ticks(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rfind(')').map(|i| &stat[i + 1..]).ok_or_else(|| bad("/proc/PID/stat has no ')'"))?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| bad("/proc/PID/stat"));
    Ok(field(11)? + field(12)?)
}

/// A `kB` line of /proc/PID/status, e.g. `VmHWM` (peak resident set) or `VmRSS`.
pub fn status_kb(pid: u32, key: &str) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| bad("no such line in /proc/PID/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut v, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&mut v, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&mut [], 0.5), None);
    }

    #[test]
    fn random_bytes_differ_by_seed_and_fill_odd_lengths() {
        assert_ne!(random_bytes(13, 1), random_bytes(13, 2));
        assert_eq!(random_bytes(13, 7), random_bytes(13, 7));
    }

    #[test]
    fn utc_now_is_shaped_like_a_date() {
        let s = utc_now();
        assert_eq!(s.len(), "2025-01-01 00:00 UTC".len(), "{s}");
    }
}
