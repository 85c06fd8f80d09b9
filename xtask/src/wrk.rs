//! HTTP load with wrk for the side-by-side benchmarks: runs it bounded in connections and
//! time, reads its figures, and measures a mode as its median of several runs over new and
//! kept-alive connections taking turns.
use serde::Serialize;

/// Runs a command where the load comes from (a pod, the host outside the cluster).
pub type Exec<'a> = &'a dyn Fn(&[&str]) -> anyhow::Result<String>;

/// Runs of each workload per mode: BENCH_RUNS, default 3.
pub fn runs_per_figure() -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(3)
}

/// Unmeasured seconds before a mode's runs: at least, at most.
const WARM_UP_MIN_SECONDS: usize = 2;
const WARM_UP_MAX_SECONDS: usize = 15;

#[derive(Serialize, Clone)]
pub struct Measurement {
    pub services: u32,
    pub mode: &'static str,
    pub workload: &'static str,
    pub requests_per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Every run, slowest first; the figures above are the median run's.
    pub runs_requests_per_second: Vec<f64>,
    /// SYNs the client had to send again over all runs: each is a connection that waited a
    /// retransmission timeout (1 s) because its first SYN got no answer.
    pub client_syn_retransmits: u64,
}

/// One wrk run's figures.
pub struct Wrk {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

fn duration_us(text: &str) -> Option<f64> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => return None,
    })
}

/// Requests per second and the median and 99th percentile latency of wrk's `--latency` output.
pub fn parse(out: &str) -> anyhow::Result<Wrk> {
    let find = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let rps = find("Requests/sec:").and_then(|v| v.parse().ok());
    let p50 = find("50%").and_then(|v| duration_us(&v));
    let p99 = find("99%").and_then(|v| duration_us(&v));
    match (rps, p50, p99) {
        (Some(rps), Some(p50_us), Some(p99_us)) => Ok(Wrk {
            rps,
            p50_us,
            p99_us,
        }),
        _ => anyhow::bail!("cannot read wrk output:\n{out}"),
    }
}

/// The client's SYN retransmissions so far (its namespace's counter).
pub fn syn_retransmits(exec: Exec) -> u64 {
    exec(&["nstat", "-az", "TcpExtTCPSynRetrans"])
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("TcpExtTCPSynRetrans"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One wrk run: 1 thread, 8 connections, on CPU 0 (the server runs on CPU 1: neither steals
/// the other's core); `new_connections` asks the server to close after each response.
pub fn run(exec: Exec, url: &str, new_connections: bool, seconds: u64) -> anyhow::Result<Wrk> {
    let secs = format!("{seconds}s");
    let mut args = vec![
        "taskset",
        "-c",
        "0",
        "wrk",
        "-t1",
        "-c8",
        "-d",
        &secs,
        "--latency",
        "--timeout",
        "2s",
    ];
    if new_connections {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    parse(&exec(&args)?)
}

/// Measures `mode` at `url`: [`runs_per_figure`] runs of each workload, the two taking turns
/// so that a slow spell of this shared machine falls on both; each figure is the median run
/// by requests per second.
pub fn measure(
    exec: Exec,
    services: u32,
    mode: &'static str,
    url: &str,
    seconds: u64,
) -> anyhow::Result<Vec<Measurement>> {
    prepare_client(exec)?;
    let workloads = [("new connections", true), ("kept-alive", false)];
    // Unmeasured seconds first, at least WARM_UP_MIN_SECONDS and until two in a row agree
    // within 20 %: the path's caches and the server's threads warm up.
    let mut last = 0.0;
    for second in 0..WARM_UP_MAX_SECONDS {
        let rps = run(exec, url, true, 1)?.rps;
        if second + 1 >= WARM_UP_MIN_SECONDS && (rps - last).abs() <= 0.2 * rps {
            break;
        }
        last = rps;
    }
    let mut runs: Vec<Vec<Wrk>> = vec![Vec::new(), Vec::new()];
    let mut retransmits = [0u64; 2];
    for _ in 0..runs_per_figure() {
        for (i, (_, new_connections)) in workloads.iter().enumerate() {
            let before = syn_retransmits(exec);
            runs[i].push(run(exec, url, *new_connections, seconds)?);
            retransmits[i] += syn_retransmits(exec) - before;
        }
    }
    let mut results = Vec::new();
    for (((workload, _), mut runs), retransmits) in workloads.into_iter().zip(runs).zip(retransmits)
    {
        runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        let spread = runs
            .iter()
            .map(|w| format!("{:.0}", w.rps))
            .collect::<Vec<_>>();
        let w = &runs[runs.len() / 2];
        eprintln!(
            "   {mode:<18} {workload:<16} {:>9.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us  (runs: {}; SYN retransmits: {retransmits})",
            w.rps,
            w.p50_us,
            w.p99_us,
            spread.join(", ")
        );
        results.push(Measurement {
            services,
            mode,
            workload,
            requests_per_second: w.rps,
            p50_us: w.p50_us,
            p99_us: w.p99_us,
            runs_requests_per_second: runs.iter().map(|w| w.rps).collect(),
            client_syn_retransmits: retransmits,
        });
    }
    Ok(results)
}

/// Lets the client open new connections as fast as the path allows: wrk closes first, so
/// every connection leaves the client a TIME_WAIT socket for 60 s, and with the default
/// 28,232 ephemeral ports the client ran out of them at about 470 connections/s (wrk then
/// spins on connect() failing: about 300 requests/s at 100 % CPU, p50 10 ms), whatever the
/// path. Reusing TIME_WAIT ports for outgoing connections (timestamps tell old segments
/// apart) and the whole port range lift that, as on any load generator.
fn prepare_client(exec: Exec) -> anyhow::Result<()> {
    exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
    Ok(())
}

/// BENCH_MODES (comma-separated, e.g. `direct,lb`) limits the modes measured.
pub fn wanted(mode: &str) -> bool {
    std::env::var("BENCH_MODES").map_or(true, |modes| {
        modes.split(',').any(|m| mode.starts_with(m.trim()))
    })
}

/// BENCH_SECONDS per wrk run (default 3) and BENCH_SCALES, the numbers of Services
/// (default 1, 1000 and 10000).
pub fn seconds_and_scales() -> (u64, Vec<u32>) {
    let seconds = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let scales = std::env::var("BENCH_SCALES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 1_000, 10_000]);
    (seconds, scales)
}

/// Writes a benchmark's rows, with the machine they were measured on, to
/// `target/bench/<name>.json` (where `cargo xtask report` reads them), and prints them.
pub fn write_json(name: &str, rows: &[Measurement]) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(
        &serde_json::json!({"machine": crate::machine::Machine::read(), "rows": rows}),
    )?;
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join(format!("{name}.json")), &text)?;
    println!("{text}");
    Ok(())
}
