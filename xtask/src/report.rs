//! `cargo xtask bench --report`: BENCHMARKS.md and its charts from the measured data the
//! benchmarks wrote to target/bench/*.json.
use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::Context as _;
use serde_json::Value;

use xtask::{cmd::run, machine::Machine};

/// A grouped bar chart as SVG: one group per category, one bar per series.
pub fn bar_chart_svg(
    title: &str,
    unit: &str,
    categories: &[String],
    series: &[(String, Vec<Option<f64>>)],
) -> String {
    const W: f64 = 900.0;
    const H: f64 = 420.0;
    const LEFT: f64 = 80.0;
    const RIGHT: f64 = 190.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 50.0;
    const COLORS: [&str; 6] = [
        "#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#c53030", "#718096",
    ];
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .fold(0.0f64, |m, v| m.max(*v));
    let max = if max <= 0.0 { 1.0 } else { nice_ceiling(max) };
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="DejaVu Sans, sans-serif" font-size="13">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="28" font-size="17" text-anchor="middle">{}</text>
"#,
        LEFT + plot_w / 2.0,
        escape(title)
    );
    for i in 0..=5 {
        let v = max * i as f64 / 5.0;
        let y = TOP + plot_h - plot_h * i as f64 / 5.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e2e8f0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            short(v)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(unit)
    );
    let group_w = plot_w / categories.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    for (c, category) in categories.iter().enumerate() {
        let gx = LEFT + group_w * c as f64 + group_w * 0.1;
        for (s, (_, values)) in series.iter().enumerate() {
            if let Some(Some(v)) = values.get(c) {
                let h = plot_h * v / max;
                let _ = writeln!(
                    svg,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"/>"#,
                    gx + bar_w * s as f64,
                    TOP + plot_h - h,
                    bar_w * 0.92,
                    COLORS[s % COLORS.len()]
                );
            }
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + group_w * (c as f64 + 0.5),
            TOP + plot_h + 22.0,
            escape(category)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#4a5568"/>"##,
        TOP + plot_h,
        LEFT + plot_w,
        TOP + plot_h
    );
    for (s, (name, _)) in series.iter().enumerate() {
        let y = TOP + 10.0 + 22.0 * s as f64;
        let x = W - RIGHT + 20.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{:.1}" width="14" height="14" fill="{}"/><text x="{}" y="{:.1}">{}</text>"#,
            y - 11.0,
            COLORS[s % COLORS.len()],
            x + 20.0,
            y,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn nice_ceiling(v: f64) -> f64 {
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn write_png(svg: &str, png: &Path) -> anyhow::Result<()> {
    let svg_path = png.with_extension("svg");
    std::fs::write(&svg_path, svg)?;
    run(Command::new("rsvg-convert")
        .arg("-o")
        .arg(png)
        .arg(&svg_path))
    .context("rsvg-convert (Debian librsvg2-bin)")?;
    std::fs::remove_file(svg_path)?;
    Ok(())
}

fn read(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Writes BENCHMARKS.md and the charts it shows.
pub fn write(root: &Path) -> anyhow::Result<()> {
    let data = root.join("target/bench");
    let charts = root.join("lb-userspace/benches/charts");
    std::fs::create_dir_all(&charts)?;
    let mut md = String::from(
        "# Benchmarks\n\nRegenerated by `cargo xtask bench --report` on the machine it runs on (2 cores, \
shared and noisy): compare figures measured side by side in one run, not across runs.\n",
    );
    let sections: [Section; 6] = [
        ("kube-proxy", KUBE_PROXY_INTRO, kube_proxy_section),
        ("nodeport", NODE_PORT_INTRO, node_port_section),
        ("dns", DNS_INTRO, dns_section),
        ("controlplane", CONTROL_PLANE_INTRO, controlplane_section),
        ("cluster_mode", CLUSTER_MODE_INTRO, cluster_mode_section),
        ("datapath", DATAPATH_INTRO, datapath_section),
    ];
    let previous = std::fs::read_to_string(root.join("BENCHMARKS.md")).unwrap_or_default();
    for (file, intro, render) in sections {
        match read(&data.join(format!("{file}.json"))) {
            Some(json) => {
                md.push_str(intro);
                md.push_str(&measured_on(&json));
                render(&mut md, &json, &charts)?;
            }
            // Not measured this time: the figures of the run before stay, as they were.
            None => md.push_str(&previous_section(&previous, intro)),
        }
    }
    std::fs::write(root.join("BENCHMARKS.md"), md)?;
    Ok(())
}

/// A section of BENCHMARKS.md: its data file (`target/bench/<name>.json`), its text before the
/// figures (starting with its `## ` heading) and what writes its tables and charts.
type Section = (
    &'static str,
    &'static str,
    fn(&mut String, &Value, &Path) -> anyhow::Result<()>,
);

/// The section of `previous` under `intro`'s heading, up to the next heading of its level;
/// empty if it has none.
fn previous_section(previous: &str, intro: &str) -> String {
    let Some(heading) = intro.lines().find(|l| l.starts_with("## ")) else {
        return String::new();
    };
    let Some(start) = previous.find(&format!("\n{heading}\n")) else {
        return String::new();
    };
    let rest = &previous[start..];
    let end = rest[1..].find("\n## ").map_or(rest.len(), |e| e + 1);
    rest[..end].to_string()
}

fn kube_proxy_section(md: &mut String, kp: &Value, charts: &Path) -> anyhow::Result<()> {
    requests_section(md, kp, charts, "kube-proxy", "HTTP through a ClusterIP")
}

fn node_port_section(md: &mut String, np: &Value, charts: &Path) -> anyhow::Result<()> {
    requests_section(
        md,
        np,
        charts,
        "nodeport",
        "HTTP from outside through a NodePort",
    )
}

/// The tables and charts of a side-by-side HTTP benchmark ([`xtask::wrk::Measurement`] rows):
/// one table and one chart (`<chart>-<workload>.png`) per workload, each mode as a share of
/// `direct`.
fn requests_section(
    md: &mut String,
    kp: &Value,
    charts: &Path,
    chart: &str,
    title: &str,
) -> anyhow::Result<()> {
    let rows = kp["rows"].as_array().cloned().unwrap_or_default();
    let mut modes: Vec<&str> = Vec::new();
    for mode in rows.iter().filter_map(|r| r["mode"].as_str()) {
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    let mut scales: Vec<u64> = rows.iter().filter_map(|r| r["services"].as_u64()).collect();
    scales.dedup();
    for workload in ["new connections", "kept-alive"] {
        let _ = writeln!(md, "\n### {workload}\n");
        md.push_str("| Services | mode | requests/s | % of direct | p50 (µs) | p99 (µs) | every run (req/s) | client SYN retransmits |\n|---:|---|---:|---:|---:|---:|---|---:|\n");
        let get = |n: u64, mode: &str| {
            rows.iter().find(|r| {
                r["services"].as_u64() == Some(n) && r["mode"] == mode && r["workload"] == workload
            })
        };
        let mut series: Vec<(String, Vec<Option<f64>>)> =
            modes.iter().map(|m| (m.to_string(), Vec::new())).collect();
        for &n in &scales {
            let direct = get(n, "direct").and_then(|r| r["requests_per_second"].as_f64());
            for (m, mode) in modes.iter().enumerate() {
                let r = get(n, mode);
                let rps = r.and_then(|r| r["requests_per_second"].as_f64());
                series[m].1.push(rps);
                if let Some(r) = r {
                    let pct = match (rps, direct) {
                        (Some(a), Some(d)) if d > 0.0 => format!("{:.0}%", a / d * 100.0),
                        _ => "-".into(),
                    };
                    let _ = writeln!(
                        md,
                        "| {n} | {mode} | {:.0} | {pct} | {:.0} | {:.0} | {} | {} |",
                        rps.unwrap_or(0.0),
                        r["p50_us"].as_f64().unwrap_or(0.0),
                        r["p99_us"].as_f64().unwrap_or(0.0),
                        r["runs_requests_per_second"]
                            .as_array()
                            .map(|runs| runs
                                .iter()
                                .filter_map(|v| v.as_f64())
                                .map(|v| format!("{v:.0}"))
                                .collect::<Vec<_>>()
                                .join(", "))
                            .unwrap_or_default(),
                        r["client_syn_retransmits"]
                            .as_u64()
                            .map_or("-".into(), |n| n.to_string())
                    );
                }
            }
        }
        let file = format!("{chart}-{}.png", workload.replace(' ', "-"));
        let categories: Vec<String> = scales.iter().map(|n| format!("{n} Services")).collect();
        write_png(
            &bar_chart_svg(
                &format!("{title}, {workload}"),
                "requests per second",
                &categories,
                &series,
            ),
            &charts.join(&file),
        )?;
        let _ = writeln!(md, "\n![{workload}](lb-userspace/benches/charts/{file})");
    }
    Ok(())
}

/// dnsperf against the agent's DNS server and dnsmasq (`lb-userspace/benches/dns.rs`).
fn dns_section(md: &mut String, dns: &Value, _charts: &Path) -> anyhow::Result<()> {
    let _ = writeln!(
        md,
        "{} Services; {} of them change their endpoints every second in the runs marked so.\n",
        dns["services"], dns["changes_per_second"]
    );
    let _ = writeln!(
        md,
        "| server | run | answered/s | p50 (us) | p99 (us) | lost | NOERROR | probe: checked / wrong | Services changed | every run (p99 us, or answered/s) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    let us = |v: &Value| v.as_f64().map_or("-".to_string(), |v| format!("{v:.0}"));
    for row in dns["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {} | {} | {:.2} % | {} / {} | {} | {} |",
            row["server"].as_str().unwrap_or("?"),
            row["run"].as_str().unwrap_or("?"),
            row["queries_per_second"].as_f64().unwrap_or(0.0),
            us(&row["p50_us"]),
            us(&row["p99_us"]),
            row["queries_lost"],
            row["noerror_percent"].as_f64().unwrap_or(0.0),
            row["probe_checked"],
            row["probe_wrong"],
            row["services_changed"],
            row["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(us)
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    Ok(())
}

fn controlplane_section(md: &mut String, cp: &Value, charts: &Path) -> anyhow::Result<()> {
    let f = |k: &str| cp[k].as_f64();
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let _ = writeln!(md, "| what | time (ms) |\n|---|---:|");
    let _ = writeln!(
        md,
        "| lb: full sync, objects in memory -> maps ({} map writes) | {} |",
        cp["map_operations"],
        fmt(f("full_sync_ms"))
    );
    if let Some(b) = cp["full_sync_breakdown_ms"].as_object() {
        for (k, v) in b {
            let _ = writeln!(
                md,
                "| &nbsp;&nbsp;{} | {:.1} |",
                &k[2..],
                v.as_f64().unwrap_or(0.0)
            );
        }
    }
    let _ = writeln!(
        md,
        "| lb: one endpoint change, 10,000 Services present ({} map writes), median of 101 | {:.2} |",
        cp["one_change_map_operations"],
        f("one_change_ms").unwrap_or(0.0)
    );
    if let Some(slowest) = f("one_change_slowest_ms") {
        let _ = writeln!(md, "| &nbsp;&nbsp;slowest of the 101 | {slowest:.2} |");
    }
    let _ = writeln!(
        md,
        "| lb agent: full sync from JSON manifest files (read, parse, program) | {} |",
        fmt(f("agent_sync_from_files_ms"))
    );
    if let Some(ms) = f("agent_one_change_file_per_object_ms") {
        let _ = writeln!(
            md,
            "| lb agent: one endpoint change in a folder of 20,000 files, one per object (read the file the watcher reported, parse, compute, program) | {ms:.1} |"
        );
    }
    let _ = writeln!(
        md,
        "| kube-proxy rules: iptables-legacy-restore | {} |",
        fmt(f("iptables_legacy_restore_ms"))
    );
    let _ = writeln!(
        md,
        "| kube-proxy rules: iptables-nft-restore | {} |",
        fmt(f("iptables_nft_restore_ms"))
    );
    let _ = writeln!(md, "| kube-proxy rules: nft -f | {} |", fmt(f("nft_ms")));
    let _ = writeln!(
        md,
        "\nAgent resident memory with 10,000 Services x 10 endpoints programmed: **{:.0} MiB**.",
        f("agent_rss_mib").unwrap_or(0.0)
    );
    let series = vec![(
        "full sync".to_string(),
        vec![
            f("full_sync_ms").map(|v| v / 1e3),
            f("iptables_legacy_restore_ms").map(|v| v / 1e3),
            f("iptables_nft_restore_ms").map(|v| v / 1e3),
            f("nft_ms").map(|v| v / 1e3),
        ],
    )];
    let categories = ["lb (eBPF maps)", "iptables-legacy", "iptables-nft", "nft"].map(String::from);
    write_png(
        &bar_chart_svg(
            "10,000 Services x 10 endpoints: full sync",
            "seconds",
            &categories,
            &series,
        ),
        &charts.join("control-plane.png"),
    )?;
    md.push_str("\n![control plane](lb-userspace/benches/charts/control-plane.png)\n");
    Ok(())
}

fn cluster_mode_section(md: &mut String, cm: &Value, _charts: &Path) -> anyhow::Result<()> {
    let f = |k: &str| cm[k].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        md,
        "| what ({} Services x {} endpoints) | measured | target |\n|---|---:|---:|",
        cm["services"], cm["endpoints_per_service"]
    );
    let rows = [
        (
            "`lb agent` started -> every Service in the maps (ms)",
            f("start_to_programmed_ms"),
            "2,000",
        ),
        (
            "&nbsp;&nbsp;agent CPU up to then, every thread (ms)",
            f("start_cpu_ms"),
            "",
        ),
        (
            "&nbsp;&nbsp;both lists, decoded and converted, as the agent logs them; the datapath loads meanwhile (ms)",
            f("listing_logged_ms"),
            "",
        ),
        (
            "&nbsp;&nbsp;then the first sync, as the agent logs it (ms)",
            f("first_sync_logged_ms"),
            "",
        ),
        ("Services programmed", f("frontends_programmed"), ""),
        (
            "Services left out (a map full)",
            f("frontends_not_programmed"),
            "0",
        ),
        (
            "agent resident memory then (MiB)",
            f("agent_rss_mib"),
            "512",
        ),
        ("&nbsp;&nbsp;peak (MiB)", f("agent_peak_rss_mib"), ""),
        (
            "one EndpointSlice change, watch -> maps, median of 101 (ms)",
            f("event_to_maps_median_ms"),
            "1",
        ),
        (
            "&nbsp;&nbsp;the agent's sync in it, as the agent logs it, median (ms)",
            f("event_sync_logged_median_ms"),
            "",
        ),
        (
            "&nbsp;&nbsp;90th percentile (ms)",
            f("event_to_maps_p90_ms"),
            "",
        ),
        (
            "&nbsp;&nbsp;slowest (ms)",
            f("event_to_maps_slowest_ms"),
            "",
        ),
        (
            "one /metrics scrape with every Service port's traffic (ms)",
            f("metrics_scrape_ms"),
            "",
        ),
        (
            "agent CPU in a quiet minute: two resyncs, conntrack GC, link scans (ms)",
            f("idle_cpu_ms_per_minute"),
            "",
        ),
    ];
    for (what, value, target) in rows {
        let value = if value.fract() == 0.0 {
            format!("{value:.0}")
        } else {
            format!("{value:.2}")
        };
        let _ = writeln!(md, "| {what} | {value} | {target} |");
    }
    Ok(())
}

fn datapath_section(md: &mut String, dp: &Value, charts: &Path) -> anyhow::Result<()> {
    md.push_str("| case | Services | ns above floor (kernel stats) | ns above floor (test-run durations) | x reference |\n|---|---:|---:|---:|---:|\n");
    let rows = dp["rows"].as_array().cloned().unwrap_or_default();
    let mut cases: Vec<String> = Vec::new();
    let mut scales: Vec<u64> = Vec::new();
    for r in &rows {
        let case = r["case"].as_str().unwrap_or("").to_string();
        if !cases.contains(&case) {
            cases.push(case.clone());
        }
        if let Some(n) = r["services"].as_u64()
            && !scales.contains(&n)
        {
            scales.push(n);
        }
        let times = if case.contains("floor") {
            String::new()
        } else {
            format!("{:.2}", r["x_reference"].as_f64().unwrap_or(0.0))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {} |",
            case,
            r["services"],
            r["stats_ns"].as_f64().unwrap_or(0.0),
            r["loop_ns"].as_f64().unwrap_or(0.0),
            times
        );
    }
    let series: Vec<(String, Vec<Option<f64>>)> = scales
        .iter()
        .map(|n| {
            let values = cases
                .iter()
                .filter(|c| *c != "new flow" && !c.contains("floor"))
                .map(|c| {
                    rows.iter()
                        .find(|r| r["services"].as_u64() == Some(*n) && r["case"] == c.as_str())
                        .and_then(|r| r["stats_ns"].as_f64())
                })
                .collect();
            (format!("{n} Services"), values)
        })
        .collect();
    let categories: Vec<String> = cases
        .iter()
        .filter(|c| *c != "new flow" && !c.contains("floor"))
        .cloned()
        .collect();
    write_png(
        &bar_chart_svg(
            "TC and XDP programs: cost per packet (BPF_PROG_TEST_RUN)",
            "ns above the floor",
            &categories,
            &series,
        ),
        &charts.join("per-packet.png"),
    )?;
    md.push_str("\n![per packet](lb-userspace/benches/charts/per-packet.png)\n");
    Ok(())
}

/// The machine a benchmark's JSON says its figures came from.
fn measured_on(json: &serde_json::Value) -> String {
    match serde_json::from_value::<Machine>(json["machine"].clone()) {
        Ok(machine) => format!("\nMeasured on: {}.\n\n", machine.describe()),
        Err(_) => "\nMeasured on: (not recorded with these figures).\n\n".to_string(),
    }
}

const KUBE_PROXY_INTRO: &str = "
## Datapath against kube-proxy, side by side

A client pod on one simulated node sends HTTP to a ClusterIP whose 10 endpoints are
addresses of one server pod on a second node (network namespaces routed to each other over
a veth pair): every request and reply crosses from node to node. The same Services (each with 10 endpoints; the
measured one chosen at random) are programmed in turn as this project's eBPF maps, as
kube-proxy's iptables mode would write them (KUBE-SERVICES, a KUBE-SVC chain per Service
with statistic-random jumps to KUBE-SEP chains that DNAT), loaded through iptables-legacy and
through iptables-nft, and as its nftables mode would (a verdict map on address . protocol .
port), on both nodes as kube-proxy would; `direct` is the client talking to the server pod's address, no Service at all;
`lb, agent stopped` is the same eBPF datapath with the agent not running (what the agent's
own work costs the traffic); `lb, connect-time` is the same client in the cgroup the agent
attached its socket programs to: its connect() gets the backend's address at once, so no
packet is translated (the TC programs still see each one, and pass it).
Load: wrk, 1 thread, 8 connections, 3 s, over new connections (the server closes each after
one response) and over kept-alive connections, the two taking turns; each figure is the
median of 3 runs (every run is listed). wrk is kept on CPU 0 and the server's threads on
CPU 1 of this 2-core machine. Source:
`lb-userspace/benches/kube_proxy.rs`.

How to read them: with the load generator and the server on separate cores, every mode
repeats within a few per cent from run to run (every run is listed; a run far below the
others is a slow spell of this shared machine). Each mode starts clean of the connections of
the modes before it: the server's and client's TIME_WAIT sockets are killed (`ss -K`) and
netfilter's connection table is emptied (`conntrack -F`). Without that, thousands of SYNs
that reused the address pair of a connection another mode had left in TIME_WAIT got through
only when sent again 1 s later (most likely the server's timestamp check: the client's
timestamp clock has a different offset per destination, the pod address or the ClusterIP),
which made whichever mode came later look slow. The last column counts such SYNs.
";

const NODE_PORT_INTRO: &str = "
## NodePort from outside the cluster, side by side

A host outside the cluster sends HTTP to a nodePort of one simulated node (node 0); the
Service's 10 endpoints are addresses of one server pod on the other node, so node 0 sends
every connection on to it from its own address (externalTrafficPolicy Cluster) and
translates the replies back: outside host -> node 0 -> node 1 -> pod, over one LAN (a bridge,
veth links). Programmed in turn as this project's eBPF maps with XDP on the nodes' uplinks
(generic XDP: veth's native XDP falls back to it, see the README) and with XDP off (the TC
programs do it all), and as kube-proxy's iptables mode (KUBE-NODEPORTS reached from the last
rule of KUBE-SERVICES, a KUBE-EXT chain that marks for masquerade, MASQUERADE in
KUBE-POSTROUTING; iptables-legacy and iptables-nft) and nftables mode (a verdict map on
protocol . nodePort, masquerade) would program both nodes. `direct` is the outside host
routed straight to the pod through node 0 both ways: the same path, no Service and no NAT. Every
fourth Service is a NodePort (2,500 at 10,000 Services), and so is the measured one.
Load as above: wrk, 1 thread, 8 connections, 3 s, new and kept-alive connections taking
turns, each figure the median of the runs listed (`BENCH_RUNS`, 3 unless more were asked
for), after unmeasured seconds until two in a row agree within 20 %. The client reuses its
TIME_WAIT ports (`net.ipv4.tcp_tw_reuse=1`, ports 1024-65535): wrk closes first, and with
the default settings the client ran out of ephemeral ports at about 470 connections/s
whatever the path (an earlier version of this benchmark measured that limit).
Source: `lb-userspace/benches/nodeport.rs`.
";

const CONTROL_PLANE_INTRO: &str = "
## Control plane: 10,000 Services x 10 endpoints

From Service and EndpointSlice objects in memory (as a watch delivers them) to the BPF maps
written, against loading kube-proxy's equivalent rules with iptables-restore / nft into a
fresh network namespace. One endpoint change goes the way the agent takes it: the control
plane recomputes only the Service the changed EndpointSlice belongs to, and only that
Service's frontend is compared with the maps; after the 101 changes the maps are checked
equal to what a full plan from scratch makes. Source: `lb-userspace/benches/controlplane.rs`.

";

const CLUSTER_MODE_INTRO: &str = "
## Cluster mode: the agent against an API server

The real `lb agent` in a node namespace, watching the stand-in API server of the tests (the
list/watch protocol over HTTP, served from the benchmark process on the same CPUs). Source:
`lb-userspace/benches/cluster_mode.rs`; `LB_BENCH_SERVICES=N` measures another size.

Where the start-up goes on this 2-CPU VM. Loading the datapath (the verifier) takes about
2.5 s of one CPU; the lists start before it, so the two overlap. kube's watcher lists in
pages of 500 (with a page size it sends no resourceVersion: the API server reads a
consistent list), and each page is decoded and converted as it arrives, on one CPU:
4.5-5 s for both kinds with the computation below beside them (about 4 s without), most of
it the EndpointSlices (about 150 MB of JSON). The first list's objects are taken into the control plane while the rest are listed, and the Services that
have come with their EndpointSlices are computed then, with their frontends (nothing is
written before both lists end). The first sync computes the rest (0.2-0.4 s), plans every
frontend (0.5-0.6 s) and writes 2.2 million map entries in batches, a large batch shared
among threads (1.2-1.4 s, mostly the kernel's hash-map updates). The row *agent CPU* is the
bound: start-up needs 9-10.5 s of CPU, so on 2 CPUs it cannot end before 4.5-5 s
however it overlaps, and the verifier and the map updates alone, both in the kernel, take
about 3.3 s of it. Computing ahead took 0.8 s out of the first sync, but these 2 CPUs are
already busy with the lists: start-up went from 7.4-7.8 s to 6.9-7.9 s, within this
machine's noise. With more CPUs the computation runs beside the lists. Resident memory
grows to about 260 MiB while listing; the first sync's plan, written and freed part by part,
makes the peak. A change's time is taken by looking at the frontend every 20 µs (a probe
spinning on one of the 2 CPUs made the 90th percentile 4 ms), and the stand-in sets
TCP_NODELAY as the real API server does (without it the slowest change waited about 25 ms
for a delayed ACK); the agent's own sync is about 0.2 ms of it, the rest the API server,
the watch connection and kube's decoding. The quiet minute holds two resyncs, which read the maps back (about 1 s each at this size, mostly the
kernel's batch lookups) and plan nothing when the maps are as the agent wrote them.

";

const DNS_INTRO: &str = "
## Cluster DNS: dnsperf against the agent, and against dnsmasq

`lb agent --dns-listen` in a node namespace, asked by dnsperf from a pod for the A records of
10,000 Services (every tenth headless, with two endpoints) in random order. The agent's DNS
thread runs alone on CPU 0; dnsperf, a probe and the agent's other threads (syncs, conntrack
garbage collection, full resyncs) on CPU 1. The probe asks one Service after another beside
dnsperf and checks each answer against the manifests (the ClusterIP, or both endpoints of a
headless Service as its file was around that time). dnsmasq serves the same names from a
hosts file on CPU 0, beside the same agent without its DNS server. Two runs per server: as many
queries as it answers with 100 outstanding, and 50,000 queries/s, whose latencies come from
dnsperf's log of every answer; each `BENCH_RUNS` times (default 3), the median run shown
(by p99, or by answers per second). Source: `lb-userspace/benches/dns.rs`; `BENCH_SECONDS`.

";

const DATAPATH_INTRO: &str = "
## Per packet: the TC and XDP programs with BPF_PROG_TEST_RUN

Single runs (repeat = 1) in a loop: with repeat > 1 the kernel reruns the program on the
buffer it already rewrote, so a DNAT program would time its own output. The cases take turns
(15 rounds of 30,000 runs each), so a slow spell of the machine falls on all of them; each
figure is the median round. After every round the datapath's counters must show that each
run took the path the case names (the replies measured before this check was added went
half the time untranslated: the new-flow rounds rebuilt the datapath and re-picked the
established flow's backend, which made the reply figure bimodal). Figures are ns above a
program that only returns, timed the same way, and multiples of a reference program's cost
above that floor: the reference parses the packet and looks its flow up in the conntrack
map, nothing more, so the multiple says what a path adds to the least any load balancer
does, on whatever machine it runs. Source: `lb-userspace/benches/datapath.rs`.

Where the time goes on a machine with return-thunk mitigations (AMD EPYC under KVM,
retpolines and SRSO \"Safe RET\": every return in the kernel and in JIT-compiled BPF goes
through a thunk). `LB_BENCH_CASE=established perf record -e cpu-clock -a -g
target/release/deps/datapath-*` with the JIT's symbols (`net.core.bpf_jit_kallsyms=1`),
samples inside the ingress program on the established path: 49 % in the program's own
instructions, most of them on the instruction after each call (the return thunk's cost
lands there) and at its entry; 32 % in `bpf_l4_csum_replace` (two calls: the address and
the port; each enters `skb_ensure_writable` and `inet_proto_csum_replace*`, three returns);
19 % in the conntrack lookup (`__htab_map_lookup_elem`, `lookup_nulls_elem_raw`, `memcmp`).
Each call into the kernel costs some 20-50 ns there, against a few ns on a CPU without
such thunks, which is why the same build measures several times slower above the floor on
such a machine. What was taken out of that path: a call to a BPF `memset` subprogram
(zeroing a 3-byte padding array of the conntrack key) and the clock helper (the conntrack
clock is now the kernel's tick counter, `bpf_jiffies64`, which the verifier inlines into a
load; the agent measures the tick). What stays: the two checksum helpers. The L4 checksum
must change one way for a packet the kernel will checksum later (CHECKSUM_PARTIAL, what
every pod's own socket sends) and the other way for one already checksummed, and
`skb->csum` must follow for CHECKSUM_COMPLETE; a TC program cannot read `ip_summed`, so
only the helper can do it right, and address and port changes take one call each (Cilium's
datapath makes the same two calls). The established path therefore stays near 3x the
reference on such a machine; the XDP path (no skb checksum states) will not need them.

Backend selection. `affinity, known client`: new flows of a client that has an entry in the
affinity map (a lookup and a time update take the place of the random pick). `affinity, new
client`: every flow from a client never seen, so each run also inserts the client's entry
into the LRU affinity map. `maglev`: the pick is a hash of the 5-tuple and a lookup in the
Service port's table (a map of maps: two lookups), on a datapath where every Service has a
table of 251 entries (the smallest size, so that 100,000 tables fit; a lookup costs the same
in any size). The established rows of both run the same conntrack path as the plain one:
selection is only ever done for new flows. An insert into an LRU hash map costs about as
much as each of the two a new flow's conntrack entries take, which is what a new client
adds.

XDP (`XDP ...` rows): the program of the external links, as ns above an XDP program that
only returns (`XDP floor`), run as if the frame arrived on an uplink of a namespace whose
routes and neighbours its FIB lookups find. `established nodePort, local pod`: a flow from
outside to a nodePort whose pod is on this node (conntrack hit, DNAT with incremental
checksums, XDP_PASS). `established nodePort, other node`: the same to a pod on another node
(SNAT and DNAT, the next hop the conntrack entry keeps from the flow's first FIB lookup,
XDP_TX; a `bpf_fib_lookup` per packet cost four times the rest of the way). `packet it does
not own`: TCP to the node's own address on another port (conntrack miss, two frontend scopes
at the address, the node-address check, two at the nodePort wildcard), passed untouched to
the TC program. The issue's target for the established nodePort flow, 40 ns above the floor,
is not met: on this machine the reference alone (parsing and one conntrack lookup) costs
35-40 ns; the rest is the backend's validity check, the clock and timeouts, the per-CPU
counters and the rewrite.

";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_not_measured_keeps_its_previous_text() {
        let previous = "# Benchmarks\n\nintro\n\n## First\n\nold figures\n\n### sub\n\nmore\n\n## Second\n\nother\n";
        assert_eq!(
            previous_section(previous, "\n## First\n\nnew text"),
            "\n## First\n\nold figures\n\n### sub\n\nmore\n"
        );
        assert_eq!(
            previous_section(previous, "\n## Second\n"),
            "\n## Second\n\nother\n"
        );
        assert_eq!(previous_section(previous, "\n## Third\n"), "");
    }
}
