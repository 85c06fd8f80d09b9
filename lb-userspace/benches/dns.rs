//! Cluster DNS under load: dnsperf from a pod against the agent's listener, with 10,000
//! Services (every tenth headless, with two endpoints) while 100 Services change their
//! endpoints every second; a probe beside dnsperf checks every answer it gets against what the
//! manifests say. Side by side with dnsmasq serving the same names from a hosts file (no
//! changes: it has no notion of them). The DNS servers run alone on CPU 0 (the agent's DNS
//! thread, or dnsmasq); dnsperf, the probe and the agent's other threads (which run in both
//! cases) on CPU 1.
//!
//! Two runs per server: as many queries per second as it answers (100 queries outstanding),
//! and 50,000 queries per second for the latency (dnsperf's verbose log of every answer).
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hickory_server::proto::{op::Message, rr::RData};
use serde::Serialize;
use xtask::testbed::{GATEWAY, Pod, Testbed, dns_query, enter_netns, wait_for};

const SERVICES: u32 = 10_000;
/// Services per manifest file: one file is rewritten per change step.
const PER_FILE: u32 = 100;
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const RATE: u32 = 50_000;

fn headless(i: u32) -> bool {
    i.is_multiple_of(10)
}

fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + 1 + i)
}

/// Endpoint `j` of Service `i` at generation `generation` of its file.
fn endpoint(i: u32, j: u32, generation: u32) -> Ipv4Addr {
    let offset = (i * 2 + j + generation * 7919) % 60_000;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + offset)
}

fn name(i: u32) -> String {
    format!("svc-{i}.bench.svc.cluster.local")
}

/// Manifest file `file` at `generation`: its Services and their Endpoints.
fn manifest(file: u32, generation: u32) -> String {
    let mut out = String::new();
    for i in file * PER_FILE..(file + 1) * PER_FILE {
        let ip = if headless(i) {
            "None".to_string()
        } else {
            cluster_ip(i).to_string()
        };
        let (a, b) = (endpoint(i, 0, generation), endpoint(i, 1, generation));
        out.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: svc-{i}, namespace: bench}}\nsubsets:\n- addresses: [{{ip: {a}}}, {{ip: {b}}}]\n  ports: [{{name: http, port: 80}}]\n---\n"
        ));
    }
    out
}

#[derive(Serialize)]
struct Row {
    server: &'static str,
    run: &'static str,
    queries_per_second: f64,
    /// Over every answer dnsperf logged (the 50,000/s run only).
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    queries_lost: u64,
    /// Share of answers with NOERROR (every name asked exists).
    noerror_percent: f64,
    /// The probe's queries during the run, and those whose answer was not the manifests'.
    probe_checked: u64,
    probe_wrong: u64,
    /// Services changed during the run.
    services_changed: u64,
    /// Every run's figure (p99 for the latency runs, queries/s otherwise), slowest first; the
    /// row shows the median run's, with probe counts and changes summed over all runs.
    runs: Vec<f64>,
}

/// What dnsperf printed.
struct Dnsperf {
    qps: f64,
    lost: u64,
    noerror_percent: f64,
    latencies_us: Vec<f64>,
}

fn parse_dnsperf(out: &str) -> anyhow::Result<Dnsperf> {
    let value = |key: &str| -> Option<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(str::trim)
    };
    let qps = value("Queries per second:")
        .context("no queries per second in dnsperf's output")?
        .parse()?;
    let lost = value("Queries lost:")
        .and_then(|v| v.split_whitespace().next())
        .context("no queries lost line")?
        .parse()?;
    let noerror_percent = value("Response codes:")
        .and_then(|codes| {
            let at = codes.find("NOERROR ")?;
            let rest = &codes[at..];
            rest.split('(').nth(1)?.split('%').next()?.parse().ok()
        })
        .unwrap_or(0.0);
    // Verbose lines: `> NOERROR svc-1.bench.svc.cluster.local A 0.000123`.
    let mut latencies_us: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    latencies_us.sort_by(f64::total_cmp);
    Ok(Dnsperf {
        qps,
        lost,
        noerror_percent,
        latencies_us,
    })
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

/// Queries Services one after another until `stop`, and checks each answer: a ClusterIP
/// Service's address, or a headless Service's two endpoints of a generation its file had
/// around the time of the answer. Returns (checked, wrong).
fn probe(
    server: SocketAddr,
    generations: Arc<Vec<AtomicU32>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(u64, u64)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let (mut checked, mut wrong) = (0u64, 0u64);
    let mut buffer = [0u8; 4096];
    let mut i = 0u32;
    while !stop.load(Ordering::Relaxed) {
        i = (i + 7919) % SERVICES;
        let id = (checked & 0xffff) as u16;
        socket.send(&dns_query(id, &name(i)))?;
        // Pacing: the probe checks, dnsperf loads.
        std::thread::sleep(Duration::from_micros(500));
        let Ok(n) = socket.recv(&mut buffer) else {
            wrong += 1;
            checked += 1;
            continue;
        };
        checked += 1;
        let Ok(answer) = Message::from_vec(&buffer[..n]) else {
            wrong += 1;
            continue;
        };
        let mut got: Vec<Ipv4Addr> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        got.sort();
        let right = if headless(i) {
            let now = generations[(i / PER_FILE) as usize].load(Ordering::Relaxed);
            // The file may be written a step ahead of the count, or the agent a step behind.
            (now.saturating_sub(1)..=now + 1).any(|g| {
                let mut want = vec![endpoint(i, 0, g), endpoint(i, 1, g)];
                want.sort();
                want == got
            })
        } else {
            got == [cluster_ip(i)]
        };
        if answer.metadata.id != id || !right {
            wrong += 1;
        }
    }
    Ok((checked, wrong))
}

struct Load {
    client: Pod,
    queries: String,
    seconds: u64,
    generations: Arc<Vec<AtomicU32>>,
}

impl Load {
    /// `wrk::runs_per_figure()` runs (BENCH_RUNS): the machine's own stalls of tens of
    /// milliseconds, which dnsmasq meets as well, move a single run's 99th percentile by
    /// several hundred microseconds.
    fn measure(
        &self,
        bed: &Testbed,
        server: &'static str,
        run: &'static str,
        rate: Option<u32>,
        churn: bool,
    ) -> anyhow::Result<Row> {
        let mut rows = Vec::new();
        for _ in 0..xtask::wrk::runs_per_figure() {
            rows.push(self.run(bed, server, run, rate, churn)?);
        }
        let figure = |r: &Row| match rate {
            Some(_) => -r.p99_us.unwrap_or(f64::INFINITY),
            None => r.queries_per_second,
        };
        rows.sort_by(|a, b| figure(a).total_cmp(&figure(b)));
        let runs: Vec<f64> = rows.iter().map(|r| figure(r).abs()).collect();
        let (checked, wrong, changed) = rows.iter().fold((0, 0, 0), |(c, w, s), r| {
            (
                c + r.probe_checked,
                w + r.probe_wrong,
                s + r.services_changed,
            )
        });
        let mut median = rows.swap_remove(rows.len() / 2);
        median.probe_checked = checked;
        median.probe_wrong = wrong;
        median.services_changed = changed;
        median.runs = runs;
        Ok(median)
    }

    /// One dnsperf run against `server`, with the probe beside it and, with `churn`, 100
    /// Services changed every second.
    fn run(
        &self,
        bed: &Testbed,
        server: &'static str,
        run: &'static str,
        rate: Option<u32>,
        churn: bool,
    ) -> anyhow::Result<Row> {
        let stop = Arc::new(AtomicBool::new(false));
        let probe_thread = {
            let (stop, generations) = (stop.clone(), self.generations.clone());
            let netns = format!("/run/netns/{}", self.client.netns);
            std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
                enter_netns(&netns)?;
                pin_self(1)?;
                probe((GATEWAY, 53).into(), generations, stop)
            })
        };
        let churn_thread = churn.then(|| {
            let (stop, generations) = (stop.clone(), self.generations.clone());
            let manifests = bed.manifests.clone();
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut changed = 0u64;
                let mut file = 0u32;
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let step = started + Duration::from_secs(changed / PER_FILE as u64 + 1);
                    std::thread::sleep(step.saturating_duration_since(Instant::now()));
                    let generation = generations[file as usize].load(Ordering::Relaxed) + 1;
                    let tmp = manifests.join(format!(".svc-{file}.tmp"));
                    std::fs::write(&tmp, manifest(file, generation))?;
                    std::fs::rename(&tmp, manifests.join(format!("svc-{file}.yaml")))?;
                    generations[file as usize].store(generation, Ordering::Relaxed);
                    changed += PER_FILE as u64;
                    file = (file + 1) % (SERVICES / PER_FILE);
                }
                Ok(changed)
            })
        });
        let seconds = self.seconds.to_string();
        let rate_arg = rate.map(|r| r.to_string());
        let mut args = vec![
            "taskset",
            "-c",
            "1",
            "dnsperf",
            "-s",
            "198.18.0.1",
            "-d",
            &self.queries,
            "-l",
            &seconds,
            "-c",
            "1",
            "-T",
            "1",
            "-q",
            "100",
            "-t",
            "1",
        ];
        if let Some(rate) = &rate_arg {
            args.extend(["-Q", rate, "-v"]);
        }
        let out = bed.exec(&self.client, &args);
        stop.store(true, Ordering::Relaxed);
        let (checked, wrong) = probe_thread
            .join()
            .map_err(|_| anyhow::anyhow!("probe panicked"))??;
        let changed = match churn_thread {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("churn panicked"))??,
            None => 0,
        };
        let perf = parse_dnsperf(&out?)?;
        let row = Row {
            server,
            run,
            queries_per_second: perf.qps,
            p50_us: percentile(&perf.latencies_us, 0.5),
            p99_us: percentile(&perf.latencies_us, 0.99),
            queries_lost: perf.lost,
            noerror_percent: perf.noerror_percent,
            probe_checked: checked,
            probe_wrong: wrong,
            services_changed: changed,
            runs: Vec::new(),
        };
        eprintln!(
            "   {server}, {run}: {:.0} queries/s, p50 {:?} us, p99 {:?} us, lost {}, NOERROR {:.2} %, probe {checked} checked / {wrong} wrong, {changed} Services changed",
            row.queries_per_second,
            row.p50_us.map(|v| v.round()),
            row.p99_us.map(|v| v.round()),
            row.queries_lost,
            row.noerror_percent
        );
        Ok(row)
    }
}

fn pin_self(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// Every thread of process `pid` on `cpu`.
fn pin_process(pid: u32, cpu: usize) -> anyhow::Result<()> {
    xtask::cmd::run(std::process::Command::new("taskset").args([
        "-a",
        "-p",
        "-c",
        &cpu.to_string(),
        &pid.to_string(),
    ]))?;
    Ok(())
}

/// The thread named `name` of process `pid` on `cpu`.
fn pin_thread(pid: u32, name: &str, cpu: usize) -> anyhow::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        if std::fs::read_to_string(task.join("comm"))?.trim() == name {
            let tid = task
                .file_name()
                .context("tid")?
                .to_string_lossy()
                .into_owned();
            xtask::cmd::run(std::process::Command::new("taskset").args([
                "-p",
                "-c",
                &cpu.to_string(),
                &tid,
            ]))?;
            return Ok(());
        }
    }
    anyhow::bail!("no thread {name} in process {pid}")
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask bench --report)"
    );
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let lb = Path::new(env!("CARGO_BIN_EXE_lb"));
    // This process and what it starts on CPU 1 (the servers are moved to CPU 0).
    pin_self(1)?;
    let mut bed = Testbed::with_nodes("lbbench", lb, 1)?;
    let client = bed.add_pod("client", CLIENT_IP)?;
    for file in 0..SERVICES / PER_FILE {
        bed.write_manifest(&format!("svc-{file}.yaml"), &manifest(file, 0))?;
    }
    // Every name once, in an order that mixes the files.
    let queries = bed.dir.join("queries.txt");
    let lines: String = (0..SERVICES)
        .map(|k| format!("{} A\n", name((k * 7919) % SERVICES)))
        .collect();
    std::fs::write(&queries, lines)?;
    let queries = queries.to_string_lossy().into_owned();
    let generations: Arc<Vec<AtomicU32>> = Arc::new(
        (0..SERVICES / PER_FILE)
            .map(|_| AtomicU32::new(0))
            .collect(),
    );
    let load = Load {
        client: client.clone(),
        queries,
        seconds,
        generations,
    };
    let mut rows = Vec::new();

    eprintln!("== lb agent --dns-listen, {SERVICES} Services");
    bed.start_agent_with(&["--dns-listen", "0.0.0.0:53"])?;
    bed.wait_services_programmed(SERVICES)?;
    let last = name(SERVICES - 1);
    wait_for("the last Service's name", Duration::from_secs(30), || {
        bed.exec(&client, &["dig", "+short", "@198.18.0.1", &last])
            .is_ok_and(|out| !out.trim().is_empty())
    });
    // The DNS server's thread alone on CPU 0. The agent's other threads (the syncs of the
    // changes, conntrack garbage collection, full resyncs) share CPU 1 with dnsperf and the
    // probe: their system calls would otherwise hold the server's core for milliseconds.
    let agent = bed.agent_pid().context("agent")?;
    pin_process(agent, 1)?;
    pin_thread(agent, "dns", 0)?;
    std::thread::sleep(Duration::from_secs(1));
    rows.push(load.measure(&bed, "lb", "most queries/s", None, true)?);
    rows.push(load.measure(&bed, "lb", "50,000 queries/s", Some(RATE), true)?);
    rows.push(load.measure(
        &bed,
        "lb",
        "50,000 queries/s, no changes",
        Some(RATE),
        false,
    )?);
    // dnsmasq beside the same agent (without its DNS server), doing the same housekeeping on
    // CPU 1 as it did above.
    bed.stop_agent(false)?;
    bed.start_agent()?;
    bed.wait_services_programmed(SERVICES)?;
    pin_process(bed.agent_pid().context("agent")?, 1)?;

    eprintln!("== dnsmasq, the same names from a hosts file");
    let hosts = bed.dir.join("hosts");
    let mut lines = String::new();
    for i in 0..SERVICES {
        // As the files are now, after the changes of the runs before.
        let generation = load.generations[(i / PER_FILE) as usize].load(Ordering::Relaxed);
        let addresses = if headless(i) {
            vec![endpoint(i, 0, generation), endpoint(i, 1, generation)]
        } else {
            vec![cluster_ip(i)]
        };
        for ip in addresses {
            lines.push_str(&format!("{ip} {}\n", name(i)));
        }
    }
    std::fs::write(&hosts, lines)?;
    let hosts_arg = format!("--addn-hosts={}", hosts.display());
    let mut dnsmasq = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.node_netns,
            "dnsmasq",
            "--keep-in-foreground",
        ])
        .args([
            "--no-resolv",
            "--no-hosts",
            &hosts_arg,
            "--listen-address=198.18.0.1",
            "--bind-interfaces",
            "--port=53",
            "--cache-size=10000",
            "--dns-forward-max=1000",
            "--pid-file=",
            "--user=root",
            "--local-ttl=5",
        ])
        .spawn()
        .context("dnsmasq (apt-get install dnsmasq-base)")?;
    wait_for("dnsmasq", Duration::from_secs(10), || {
        bed.exec(&client, &["dig", "+short", "@198.18.0.1", &last])
            .is_ok_and(|out| !out.trim().is_empty())
    });
    pin_process(dnsmasq.id(), 0)?;
    let dnsmasq_rows = [
        load.measure(&bed, "dnsmasq", "most queries/s", None, false),
        load.measure(&bed, "dnsmasq", "50,000 queries/s", Some(RATE), false),
    ];
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    bed.stop_agent(false)?;
    bed.reset_datapaths()?;
    for row in dnsmasq_rows {
        rows.push(row?);
    }
    drop(bed);

    let text = serde_json::to_string_pretty(&serde_json::json!({
        "machine": xtask::machine::Machine::read(),
        "services": SERVICES,
        "changes_per_second": PER_FILE,
        "rows": rows,
    }))?;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("dns.json"), &text)?;
    println!("{text}");
    Ok(())
}
