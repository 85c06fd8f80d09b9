//! Cluster mode at 100,000 Services x 10 endpoints, against the stand-in API server of the
//! tests (the real list/watch protocol over HTTP, paged lists): the real `lb agent` from its
//! start to every Service programmed, its resident memory then, and the time from one
//! EndpointSlice change leaving the API server to the maps holding it.
#[path = "../tests/support/apiserver.rs"]
mod apiserver;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{FRONTENDS_MAP, Frontend, FrontendKey, PROTO_TCP, SCOPE_CLUSTER, net_port};
use serde::Serialize;
use serde_json::{Value, json};
use xtask::testbed::Testbed;

use apiserver::FakeApiServer;

const DEFAULT_SERVICES: u32 = 100_000;
const ENDPOINTS: u32 = 10;
const API_ADDR: &str = "127.0.0.1:16443";
const CHANGES: u32 = 101;
/// How often the maps are looked at while a change is on its way (with a timer slack of 1 µs:
/// the times are late by at most about this).
const POLL_EVERY: Duration = Duration::from_micros(20);

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + 1 + i)
}

/// Endpoints live in 198.18.0.0/15 too: 1,000,000 distinct addresses from 198.18.16.0 on.
fn endpoint(i: u32, k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + i * ENDPOINTS + k)
}

fn service(i: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
           "spec": {"type": "ClusterIP", "clusterIP": vip(i).to_string(),
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

/// Service `i`'s slice of ENDPOINTS endpoints, the first `ready` of them ready.
fn slice(i: u32, ready: u32) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|k| {
            json!({"addresses": [endpoint(i, k).to_string()],
                   "conditions": {"ready": k < ready, "serving": k < ready, "terminating": false}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

#[derive(Serialize)]
struct Results {
    services: u32,
    endpoints_per_service: u32,
    /// From `lb agent` started to every Service's frontend in the maps (process start, eBPF
    /// load, paged lists of both kinds, conversion, one sync).
    start_to_programmed_ms: f64,
    /// CPU the agent used up to then (user and system, every thread): above the wall time,
    /// start-up used both CPUs at once.
    start_cpu_ms: f64,
    /// Frontends in the maps after it, and those a full map left out.
    frontends_programmed: usize,
    frontends_not_programmed: u64,
    /// From the agent's log: watches started -> both kinds listed and converted.
    listing_logged_ms: Option<f64>,
    /// The agent's own log of that first sync (compute, diff, map writes).
    first_sync_logged_ms: Option<f64>,
    agent_rss_mib: f64,
    agent_peak_rss_mib: f64,
    /// One EndpointSlice change (an endpoint no longer ready) from the API server's watch to the
    /// frontend in the maps: median, 90th percentile and slowest of CHANGES.
    event_to_maps_median_ms: f64,
    event_to_maps_p90_ms: f64,
    event_to_maps_slowest_ms: f64,
    /// The agent's own log of the syncs those changes made (change received -> maps written),
    /// median: the rest of the time above is the watch's transport and decoding.
    event_sync_logged_median_ms: Option<f64>,
    /// One scrape of /metrics with every Service port's traffic.
    metrics_scrape_ms: f64,
    /// CPU the agent used in a minute with nothing changing (its periodic work: two full
    /// resyncs of the maps with the cluster, conntrack GC, link scans), ms per minute.
    idle_cpu_ms_per_minute: f64,
}

/// CPU time the process has used (user and system), from /proc/PID/stat.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i - 3)
            .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
            .parse()?)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_millis((ticks(14)? + ticks(15)?) * 1000 / hz))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn frontend_key(i: u32) -> FrontendKey {
    FrontendKey {
        addr: vip(i).octets(),
        port: net_port(80),
        protocol: PROTO_TCP,
        scope: SCOPE_CLUSTER,
    }
}

fn main() -> anyhow::Result<()> {
    // LB_BENCH_SERVICES: another size (to see how the times grow).
    let services: u32 = std::env::var("LB_BENCH_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SERVICES);
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask bench)"
    );
    let lb = Path::new(env!("CARGO_BIN_EXE_lb"));
    let mut bed = Testbed::new("lbbench", lb)?;
    let listener = bed.listen_on_node(0, API_ADDR.parse::<SocketAddr>()?)?;
    let api = FakeApiServer::start(listener);
    for i in 0..services {
        api.apply(service(i));
        api.apply(slice(i, ENDPOINTS));
    }
    // The objects were there before the agent: no watch history to replay.
    api.compact();
    bed.kubeconfig = Some(api.write_kubeconfig(&bed.dir));

    let started = Instant::now();
    eprintln!(
        "bench: agent started at {}",
        humantime::format_rfc3339_micros(std::time::SystemTime::now())
    );
    bed.start_agent()?;
    let frontends_pin = bed.bpffs_of(0).join(FRONTENDS_MAP);
    let frontends: BpfHashMap<MapData, FrontendKey, Frontend> =
        BpfHashMap::try_from(Map::HashMap(MapData::from_pin(&frontends_pin)?))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    // The first sync after both lists writes every Service that fits in the maps.
    let status = loop {
        let status: Value = bed
            .exec_node(&["curl", "-sS", "http://127.0.0.1:10249/v1/status"])
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        if status["syncs"].as_u64().is_some_and(|n| n >= 1) {
            break status;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(bed.agent_log()).unwrap_or_default();
            anyhow::bail!("the agent did not sync {services} Services in 300 s; its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let start_to_programmed = started.elapsed();
    let start_cpu = cpu_time(bed.agent_pid().context("the agent's pid")?)?;
    let programmed = frontends.keys().count();
    let not_programmed = status["frontends_not_programmed"].as_u64().unwrap_or(0);
    anyhow::ensure!(
        programmed + not_programmed as usize == services as usize,
        "{programmed} frontends programmed and {not_programmed} left out, of {services}"
    );
    let (rss_mib, peak_rss_mib) = bed.agent_memory_mib()?;

    // SAFETY: PR_SET_TIMERSLACK takes a value and changes only this thread's timers.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
    let mut times = Vec::new();
    let mut candidates = (0..).map(|n: u32| (n * 7919) % services);
    for _ in 0..CHANGES {
        // Services the maps hold (a full map leaves some out).
        let (i, key) = candidates
            .by_ref()
            .map(|i| (i, frontend_key(i)))
            .find(|(_, key)| frontends.get(key, 0).is_ok())
            .expect("a programmed Service");
        // One endpoint stops being ready: it takes no new flow (its backend stays, draining,
        // so the change needs no free backend id even when the map is full).
        let changed = slice(i, ENDPOINTS - 1);
        let sent = Instant::now();
        api.apply(changed);
        let deadline = sent + Duration::from_secs(10);
        loop {
            if frontends
                .get(&key, 0)
                .is_ok_and(|f| f.backend_count == ENDPOINTS - 1)
            {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the change to svc-{i} did not reach the maps in 10 s"
            );
            // Not a spin: on 2 CPUs a spinning probe would take one from the API server and
            // the agent it measures.
            std::thread::sleep(POLL_EVERY);
        }
        times.push(sent.elapsed());
        // Apart, so that each change is a sync of its own.
        std::thread::sleep(Duration::from_millis(20));
    }
    times.sort();

    let log = std::fs::read_to_string(bed.agent_log())?;
    // The agent's start, up to its first sync, for where the time went.
    for line in log.lines() {
        eprintln!("agent: {line}");
        if line.contains("maps updated") {
            break;
        }
    }
    let sync_logged_ms = |line: &str| {
        line.split("took_us=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
            .map(|us| us / 1e3)
    };
    let mut syncs_logged_ms = log
        .lines()
        .filter(|l| l.contains("maps updated"))
        .filter_map(sync_logged_ms);
    let first_sync_logged_ms = syncs_logged_ms.next();
    let mut event_syncs_logged_ms: Vec<f64> = syncs_logged_ms.collect();
    event_syncs_logged_ms.sort_by(f64::total_cmp);
    let event_sync_logged_median_ms = event_syncs_logged_ms
        .get(event_syncs_logged_ms.len() / 2)
        .copied();
    // From the agent's log: watching started -> both kinds listed (lists, decoding,
    // conversion into the control plane's changes).
    let logged_at = |what: &str| {
        log.lines()
            .find(|l| l.contains(what))
            .and_then(|l| humantime::parse_rfc3339_weak(l.split_whitespace().next()?).ok())
    };
    let listing_logged_ms = match (
        logged_at("watching the API server"),
        logged_at("Services and EndpointSlices listed"),
    ) {
        (Some(a), Some(b)) => b.duration_since(a).ok().map(ms),
        _ => None,
    };
    let scrape_started = Instant::now();
    let metrics = bed.exec_node(&["curl", "-sS", "http://127.0.0.1:10249/metrics"])?;
    let metrics_scrape = scrape_started.elapsed();
    anyhow::ensure!(
        metrics.contains("lb_service_packets_total{"),
        "per Service port traffic in /metrics"
    );

    // A quiet minute: whatever the agent does now is its periodic work.
    let pid = bed.agent_pid().context("the agent's pid")?;
    let cpu_before = cpu_time(pid)?;
    std::thread::sleep(Duration::from_secs(60));
    let idle_cpu = cpu_time(pid)? - cpu_before;

    let results = Results {
        services,
        endpoints_per_service: ENDPOINTS,
        start_to_programmed_ms: ms(start_to_programmed),
        start_cpu_ms: ms(start_cpu),
        frontends_programmed: programmed,
        frontends_not_programmed: not_programmed,
        first_sync_logged_ms,
        listing_logged_ms,
        agent_rss_mib: rss_mib,
        agent_peak_rss_mib: peak_rss_mib,
        event_to_maps_median_ms: ms(times[times.len() / 2]),
        event_to_maps_p90_ms: ms(times[times.len() * 9 / 10]),
        event_to_maps_slowest_ms: ms(times[times.len() - 1]),
        event_sync_logged_median_ms,
        metrics_scrape_ms: ms(metrics_scrape),
        idle_cpu_ms_per_minute: ms(idle_cpu),
    };
    let mut json = serde_json::to_value(&results)?;
    json["machine"] = serde_json::to_value(xtask::machine::Machine::read())?;
    let text = serde_json::to_string_pretty(&json)?;
    println!("{text}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("cluster_mode.json"), text)?;
    drop(bed);
    Ok(())
}
