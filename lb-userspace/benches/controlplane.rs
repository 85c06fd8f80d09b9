//! Control plane at 10,000 Services x 10 endpoints: time from the objects arriving to the maps
//! programmed (full sync) and for one endpoint change, compared with kube-proxy's rules loaded
//! by iptables-restore (legacy and nft) and nft; and the agent's resident memory at that size.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use lb::{
    controlplane::{Change, ControlPlane},
    dataplane::Dataplane,
    desired::DesiredDataplane,
    diff::{self, ActualDataplane},
    model::{self, Object},
};
use serde::Serialize;
use xtask::{
    kubeproxy::{ServiceRules, iptables_restore, nft_ruleset},
    testbed::Testbed,
};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + 1 + i)
}

fn endpoint(i: u32, k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 256 + i * ENDPOINTS + k)
}

fn service(i: u32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip(i).to_string()),
            ports: Some(vec![ServicePort {
                port: 80,
                target_port: Some(IntOrString::Int(8080)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(i: u32, first_endpoint: u32) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-abcde")),
            labels: Some(BTreeMap::from([(
                model::SERVICE_NAME_LABEL.to_string(),
                format!("svc-{i}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: (first_endpoint..first_endpoint + ENDPOINTS)
            .map(|k| Endpoint {
                addresses: vec![endpoint(i, k).to_string()],
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            port: Some(8080),
            ..Default::default()
        }]),
    }
}

#[derive(Serialize)]
struct Results {
    services: u32,
    endpoints_per_service: u32,
    full_sync_ms: f64,
    full_sync_breakdown_ms: BTreeMap<&'static str, f64>,
    map_operations: usize,
    one_change_ms: f64,
    one_change_slowest_ms: f64,
    one_change_map_operations: usize,
    agent_rss_mib: f64,
    agent_sync_from_files_ms: Option<f64>,
    /// One endpoint changed in a folder of one file per object: the agent's sync, from reading
    /// the reported file to the maps written.
    agent_one_change_file_per_object_ms: f64,
    iptables_legacy_restore_ms: Option<f64>,
    iptables_nft_restore_ms: Option<f64>,
    nft_ms: Option<f64>,
}

/// BENCH_MODES (comma-separated, e.g. `lb`) limits the rule loaders measured beside lb.
fn wanted(tool: &str) -> bool {
    std::env::var("BENCH_MODES").map_or(true, |modes| {
        modes.split(',').any(|m| tool.starts_with(m.trim()))
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask bench)"
    );
    let services: Vec<Service> = (0..SERVICES).map(service).collect();
    let slices: Vec<EndpointSlice> = (0..SERVICES).map(|i| slice(i, 0)).collect();
    let mut dp = Dataplane::load_unpinned()?;

    // Full sync: objects in memory (as a watch delivers them) -> maps written.
    let mut breakdown = BTreeMap::new();
    let started = Instant::now();
    let mut objects: Vec<Object> = Vec::with_capacity(2 * SERVICES as usize);
    for s in &services {
        objects.push(Object::Service(model::service(s)?));
    }
    for s in &slices {
        objects.push(Object::EndpointSlice(model::endpoint_slice(s)?));
    }
    let t_model = started.elapsed();
    let mut control = ControlPlane::new("198.19.0.0/16".parse()?);
    for object in objects {
        control.apply(Change::Upsert(object));
    }
    let t_apply = started.elapsed();
    let changed = control.compute(SystemTime::now());
    anyhow::ensure!(control.errors().next().is_none());
    let t_compute = started.elapsed();
    let mut want = DesiredDataplane::default();
    want.update(&control, &changed);
    let t_desired = started.elapsed();
    let mut actual = ActualDataplane::default();
    let plan = diff::diff(&want, &actual);
    anyhow::ensure!(plan.skipped.is_empty());
    let t_diff = started.elapsed();
    for part in &plan.parts {
        dp.write(part)?;
    }
    let full = started.elapsed();
    for part in &plan.parts {
        diff::apply(&mut actual, part);
    }
    breakdown.insert("1 model", ms(t_model));
    breakdown.insert("2 control plane: objects in", ms(t_apply - t_model));
    breakdown.insert("3 control plane: compute", ms(t_compute - t_apply));
    breakdown.insert("4 desired", ms(t_desired - t_compute));
    breakdown.insert("5 diff", ms(t_diff - t_desired));
    breakdown.insert("6 map writes", ms(full - t_diff));
    let map_operations = plan.len();

    // One endpoint change with everything present (in a slice, one endpoint is replaced by a
    // new address), as a watch delivers it: median and slowest of 101.
    let mut changes = Vec::new();
    let mut change_ops = 0;
    for round in 0..101u32 {
        let i = (round * 7919) % SERVICES;
        let mut changed = slice(i, 0);
        changed.endpoints[(round % ENDPOINTS) as usize].addresses =
            vec![Ipv4Addr::new(198, 18, 0, 1 + round as u8).to_string()];
        let started = Instant::now();
        let slice = Object::EndpointSlice(model::endpoint_slice(&changed)?);
        control.apply(Change::Upsert(slice));
        let changed = control.compute(SystemTime::now());
        let touched = want.update(&control, &changed);
        let plan = diff::diff_frontends(&want, &actual, &touched);
        for part in &plan.parts {
            dp.write(part)?;
        }
        changes.push(started.elapsed());
        change_ops = plan.len();
        for part in &plan.parts {
            diff::apply(&mut actual, part);
        }
    }
    changes.sort();
    let one_change = changes[changes.len() / 2];
    let one_change_slowest = changes[changes.len() - 1];
    // The maps are what a full plan from scratch would make them.
    anyhow::ensure!(
        diff::diff(&want, &actual).is_empty(),
        "incremental changes left the maps different from the objects"
    );

    // kube-proxy's rules for the same Services, loaded into a fresh node namespace each.
    let rules: Vec<ServiceRules> = (0..SERVICES)
        .map(|i| ServiceRules {
            name: format!("svc-{i}"),
            vip: SocketAddrV4::new(vip(i), 80),
            endpoints: (0..ENDPOINTS)
                .map(|k| SocketAddrV4::new(endpoint(i, k), 8080))
                .collect(),
            node_port: None,
        })
        .collect();
    let lb = Path::new(env!("CARGO_BIN_EXE_lb"));
    let restore = |tool: &str, text: &str| -> Option<f64> {
        if !wanted(tool) {
            return None;
        }
        let bed = Testbed::new("lbbench", lb).ok()?;
        let file = bed.dir.join("rules");
        std::fs::write(&file, text).ok()?;
        let started = Instant::now();
        let args: Vec<&str> = match tool {
            "nft" => vec!["nft", "-f"],
            other => vec![other],
        };
        let mut full: Vec<&str> = args;
        let file = file.to_string_lossy().into_owned();
        full.push(&file);
        match bed.exec_node(&full) {
            Ok(_) => Some(ms(started.elapsed())),
            Err(e) => {
                eprintln!("{tool}: {e}");
                None
            }
        }
    };
    let ipt = iptables_restore(&rules);
    let iptables_legacy_restore_ms = restore("iptables-legacy-restore", &ipt);
    let iptables_nft_restore_ms = restore("iptables-nft-restore", &ipt);
    let nft_ms = restore("nft", &nft_ruleset(&rules));

    // The real agent on the same Services as manifest files: its resident memory.
    let agent = agent_at_size(lb, &services, &slices)?;
    let agent_one_change_ms = agent_one_change_file_per_object(lb, &services, &slices)?;

    let results = Results {
        services: SERVICES,
        endpoints_per_service: ENDPOINTS,
        full_sync_ms: ms(full),
        full_sync_breakdown_ms: breakdown,
        map_operations,
        one_change_ms: ms(one_change),
        one_change_slowest_ms: ms(one_change_slowest),
        one_change_map_operations: change_ops,
        agent_rss_mib: agent.rss_mib,
        agent_sync_from_files_ms: agent.sync_from_files_ms,
        agent_one_change_file_per_object_ms: agent_one_change_ms,
        iptables_legacy_restore_ms,
        iptables_nft_restore_ms,
        nft_ms,
    };
    let mut json = serde_json::to_value(&results)?;
    json["machine"] = serde_json::to_value(xtask::machine::Machine::read())?;
    let text = serde_json::to_string_pretty(&json)?;
    println!("{text}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("controlplane.json"), text)?;
    Ok(())
}

struct AgentAtSize {
    rss_mib: f64,
    sync_from_files_ms: Option<f64>,
}

fn service_json(s: &Service) -> serde_json::Value {
    let mut v = serde_json::to_value(s).expect("a Service serializes");
    v["apiVersion"] = "v1".into();
    v["kind"] = "Service".into();
    v
}

fn slice_json(s: &EndpointSlice) -> serde_json::Value {
    let mut v = serde_json::to_value(s).expect("an EndpointSlice serializes");
    v["apiVersion"] = "discovery.k8s.io/v1".into();
    v["kind"] = "EndpointSlice".into();
    v
}

/// Waits until the agent has computed every Service and written the maps once.
fn wait_synced(bed: &Testbed) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = bed
            .exec_node(&["curl", "-sS", "http://127.0.0.1:10249/metrics"])
            .unwrap_or_default();
        // The Services are known once computed; a sync is counted once its maps are written.
        let synced = metrics
            .lines()
            .find_map(|l| l.strip_prefix("lb_syncs_total "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0);
        if synced && metrics.contains(&format!("lb_services {SERVICES}")) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "agent did not program {SERVICES} services in 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The agent's log lines of syncs that wrote the maps.
fn map_updates(bed: &Testbed) -> anyhow::Result<Vec<String>> {
    let log = std::fs::read_to_string(bed.agent_log())?;
    Ok(log
        .lines()
        .filter(|l| l.contains("maps updated"))
        .map(String::from)
        .collect())
}

/// The time a logged sync took, in ms.
fn sync_ms(line: &str) -> Option<f64> {
    let us: f64 = line
        .split("took_us=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(us / 1e3)
}

/// Runs `lb agent` on the objects written as JSON manifests; returns its memory once it has
/// programmed them all, and the sync time it logged.
fn agent_at_size(
    lb: &Path,
    services: &[Service],
    slices: &[EndpointSlice],
) -> anyhow::Result<AgentAtSize> {
    let mut bed = Testbed::new("lbbench", lb)?;
    let list = |items: Vec<serde_json::Value>| {
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
    };
    bed.write_manifest(
        "services.json",
        &list(services.iter().map(service_json).collect()),
    )?;
    bed.write_manifest(
        "slices.json",
        &list(slices.iter().map(slice_json).collect()),
    )?;
    bed.start_agent()?;
    wait_synced(&bed)?;
    let (rss_mib, _) = bed.agent_memory_mib()?;
    Ok(AgentAtSize {
        rss_mib,
        sync_from_files_ms: map_updates(&bed)?.last().and_then(|l| sync_ms(l)),
    })
}

/// Runs `lb agent` on a folder with one file per object (20,000 files), changes one endpoint
/// in one file, and returns the time the agent logged for that sync (from reading the file the
/// watcher reported to the maps written; inotify and the 50 ms debounce come before it):
/// median of 5 changes.
fn agent_one_change_file_per_object(
    lb: &Path,
    services: &[Service],
    slices: &[EndpointSlice],
) -> anyhow::Result<f64> {
    let mut bed = Testbed::new("lbbench", lb)?;
    for (i, (service, slice)) in services.iter().zip(slices).enumerate() {
        bed.write_manifest(&format!("svc-{i}.json"), &service_json(service).to_string())?;
        bed.write_manifest(
            &format!("svc-{i}-slice.json"),
            &slice_json(slice).to_string(),
        )?;
    }
    bed.start_agent()?;
    wait_synced(&bed)?;
    let mut times = Vec::new();
    for round in 0..5u32 {
        let i = (round * 3457) as usize % slices.len();
        let before = map_updates(&bed)?.len();
        let mut changed = slices[i].clone();
        changed.endpoints[0].addresses =
            vec![Ipv4Addr::new(198, 18, 0, 200 + round as u8).to_string()];
        bed.write_manifest(
            &format!("svc-{i}-slice.json"),
            &slice_json(&changed).to_string(),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let line = loop {
            if let Some(line) = map_updates(&bed)?.get(before) {
                break line.clone();
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent did not apply the change in 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        times.push(sync_ms(&line).unwrap_or(f64::NAN));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
