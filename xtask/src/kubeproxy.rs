//! The rules kube-proxy would program for a set of ClusterIP and NodePort Services, in its
//! iptables mode (KUBE-SERVICES, a KUBE-SVC chain per service with statistic-random jumps to
//! KUBE-SEP chains that DNAT; nodePorts in KUBE-NODEPORTS, reached from the last rule of
//! KUBE-SERVICES, through a KUBE-EXT chain that marks for masquerade) and its nftables mode
//! (verdict maps on address . protocol . port and on protocol . nodePort). Used to compare
//! this project's datapath and control plane with kube-proxy's, side by side.
use std::{fmt::Write as _, net::SocketAddrV4, time::Instant};

use crate::{testbed::Testbed, wrk::wanted};

/// A ClusterIP Service port with its endpoints, and its nodePort if it has one
/// (externalTrafficPolicy Cluster: traffic to it is masqueraded).
pub struct ServiceRules {
    pub name: String,
    pub vip: SocketAddrV4,
    pub endpoints: Vec<SocketAddrV4>,
    pub node_port: Option<u16>,
}

fn chain_id(kind: &str, service: usize, endpoint: Option<usize>) -> String {
    // kube-proxy uses a 16-character hash; a counter has the same shape and length.
    match endpoint {
        None => format!("KUBE-{kind}-{service:016X}"),
        Some(e) => format!("KUBE-{kind}-{:016X}", (service as u64) << 8 | e as u64),
    }
}

/// An `iptables-restore` input for the nat table, as kube-proxy's iptables mode writes it.
pub fn iptables_restore(services: &[ServiceRules]) -> String {
    let mut out = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    out.push_str(
        ":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
    );
    for (i, s) in services.iter().enumerate() {
        let _ = writeln!(out, ":{} - [0:0]", chain_id("SVC", i, None));
        if s.node_port.is_some() {
            let _ = writeln!(out, ":{} - [0:0]", chain_id("EXT", i, None));
        }
        for e in 0..s.endpoints.len() {
            let _ = writeln!(out, ":{} - [0:0]", chain_id("SEP", i, Some(e)));
        }
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str(
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    );
    out.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    for (i, s) in services.iter().enumerate() {
        let svc = chain_id("SVC", i, None);
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"default/{}:http cluster IP\" -m tcp --dport {} -j {svc}",
            s.vip.ip(),
            s.name,
            s.vip.port()
        );
        if let Some(node_port) = s.node_port {
            let ext = chain_id("EXT", i, None);
            let _ = writeln!(
                out,
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"default/{}:http\" -m tcp --dport {node_port} -j {ext}",
                s.name
            );
            let _ = writeln!(
                out,
                "-A {ext} -m comment --comment \"masquerade traffic for default/{}:http external destinations\" -j KUBE-MARK-MASQ",
                s.name
            );
            let _ = writeln!(out, "-A {ext} -j {svc}");
        }
        let n = s.endpoints.len();
        for (e, ep) in s.endpoints.iter().enumerate() {
            let sep = chain_id("SEP", i, Some(e));
            if e + 1 < n {
                let _ = writeln!(
                    out,
                    "-A {svc} -m comment --comment \"default/{}:http -> {ep}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    s.name,
                    1.0 / (n - e) as f64
                );
            } else {
                let _ = writeln!(
                    out,
                    "-A {svc} -m comment --comment \"default/{}:http -> {ep}\" -j {sep}",
                    s.name
                );
            }
            let _ = writeln!(
                out,
                "-A {sep} -s {}/32 -m comment --comment \"default/{}:http\" -j KUBE-MARK-MASQ",
                ep.ip(),
                s.name
            );
            let _ = writeln!(
                out,
                "-A {sep} -p tcp -m comment --comment \"default/{}:http\" -m tcp -j DNAT --to-destination {ep}",
                s.name
            );
        }
    }
    // After every ClusterIP rule: each new connection to a nodePort walks them all first.
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    out.push_str("COMMIT\n");
    out
}

/// An `nft -f` input, as kube-proxy's nftables mode structures it.
pub fn nft_ruleset(services: &[ServiceRules]) -> String {
    let mut out = String::from("table ip kube-proxy {\n");
    out.push_str("  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n");
    if !services.is_empty() {
        out.push_str("    elements = {\n");
        for (i, s) in services.iter().enumerate() {
            let _ = writeln!(
                out,
                "      {} . tcp . {} : goto service-{i},",
                s.vip.ip(),
                s.vip.port()
            );
        }
        out.push_str("    }\n");
    }
    out.push_str("  }\n");
    out.push_str("  map service-nodeports {\n    type inet_proto . inet_service : verdict\n");
    let node_ports: Vec<(usize, u16)> = services
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((i, s.node_port?)))
        .collect();
    if !node_ports.is_empty() {
        out.push_str("    elements = {\n");
        for (i, node_port) in &node_ports {
            let _ = writeln!(out, "      tcp . {node_port} : goto external-{i},");
        }
        out.push_str("    }\n");
    }
    out.push_str("  }\n");
    out.push_str(
        "  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n",
    );
    out.push_str(
        "  chain nat-postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    jump masquerading\n  }\n",
    );
    out.push_str("  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n");
    out.push_str("    fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n  }\n");
    out.push_str("  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n");
    out.push_str("  chain masquerading {\n    meta mark & 0x4000 == 0 return\n    meta mark set meta mark ^ 0x4000\n    masquerade fully-random\n  }\n");
    for (i, _) in &node_ports {
        let _ = writeln!(
            out,
            "  chain external-{i} {{\n    jump mark-for-masquerade\n    goto service-{i}\n  }}"
        );
    }
    for (i, s) in services.iter().enumerate() {
        if s.endpoints.is_empty() {
            continue;
        }
        let _ = write!(
            out,
            "  chain service-{i} {{\n    numgen random mod {} vmap {{ ",
            s.endpoints.len()
        );
        for e in 0..s.endpoints.len() {
            let _ = write!(out, "{e} : goto endpoint-{i}-{e}, ");
        }
        out.push_str("}\n  }\n");
        for (e, ep) in s.endpoints.iter().enumerate() {
            let _ = writeln!(
                out,
                "  chain endpoint-{i}-{e} {{\n    ip saddr {} mark set mark or 0x4000\n    meta l4proto tcp dnat to {ep}\n  }}",
                ep.ip()
            );
        }
    }
    out.push_str("}\n");
    out
}

/// The same Services as the manifests `lb` reads (a List of Services and EndpointSlices):
/// ClusterIP, or NodePort at the given nodePort.
pub fn manifest_list(services: &[ServiceRules]) -> String {
    let mut items = Vec::new();
    for s in services {
        let mut spec = serde_json::json!({
            "clusterIP": s.vip.ip().to_string(),
            "ports": [{"port": s.vip.port(), "targetPort": 8080}]
        });
        if let Some(node_port) = s.node_port {
            spec["type"] = "NodePort".into();
            spec["ports"][0]["nodePort"] = node_port.into();
        }
        items.push(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.name},
            "spec": spec
        }));
        items.push(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-abcde", s.name), "labels": {"kubernetes.io/service-name": s.name}},
            "addressType": "IPv4",
            "endpoints": s.endpoints.iter().map(|e| serde_json::json!({"addresses": [e.ip().to_string()]})).collect::<Vec<_>>(),
            "ports": [{"port": 8080}]
        }));
    }
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// Programs `services` on every node of `bed` as kube-proxy would (a Service's traffic may
/// meet the rules on both nodes), in turn through iptables-legacy, iptables-nft and nftables,
/// and calls `measure` with each mode's name while its rules are loaded. Modes BENCH_MODES
/// leaves out are skipped.
pub fn measure_each_mode(
    bed: &Testbed,
    services: &[ServiceRules],
    mut measure: impl FnMut(&'static str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let on_every_node = |args: &[&str]| -> anyhow::Result<()> {
        for node in 0..bed.node_netns_list().len() {
            bed.exec_on_node(node, args)?;
        }
        Ok(())
    };
    let rules_file = bed.dir.join("rules");
    let rules = rules_file.to_string_lossy().into_owned();
    std::fs::write(&rules_file, iptables_restore(services))?;
    for (mode, restore, flush) in [
        (
            "iptables-legacy",
            "iptables-legacy-restore",
            "iptables-legacy",
        ),
        ("iptables-nft", "iptables-nft-restore", "iptables-nft"),
    ] {
        if !wanted(mode) {
            continue;
        }
        let started = Instant::now();
        on_every_node(&[restore, &rules])?;
        eprintln!("   {mode}: rules loaded in {:.1?}", started.elapsed());
        measure(mode)?;
        on_every_node(&[flush, "-t", "nat", "-F"])?;
        on_every_node(&[flush, "-t", "nat", "-X"])?;
    }
    if wanted("nftables") {
        std::fs::write(&rules_file, nft_ruleset(services))?;
        let started = Instant::now();
        on_every_node(&["nft", "-f", &rules])?;
        eprintln!("   nftables: rules loaded in {:.1?}", started.elapsed());
        measure("nftables")?;
        on_every_node(&["nft", "flush", "ruleset"])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<ServiceRules> {
        vec![ServiceRules {
            name: "web".into(),
            vip: "198.19.0.10:80".parse().unwrap(),
            endpoints: vec![
                "198.18.2.1:8080".parse().unwrap(),
                "198.18.2.2:8080".parse().unwrap(),
            ],
            node_port: Some(30080),
        }]
    }

    #[test]
    fn iptables_rules_have_kube_proxy_shape() {
        let rules = iptables_restore(&services());
        assert!(rules.contains("-A KUBE-SERVICES -d 198.19.0.10/32 -p tcp"));
        assert!(rules.contains("--dport 80 -j KUBE-SVC-0000000000000000"));
        assert!(rules.contains(
            "-m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-0000000000000000"
        ));
        assert!(rules.contains("-j DNAT --to-destination 198.18.2.2:8080"));
        assert!(rules.contains("--dport 30080 -j KUBE-EXT-0000000000000000"));
        assert!(rules.contains("-A KUBE-EXT-0000000000000000 -j KUBE-SVC-0000000000000000"));
        assert!(rules.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n"));
    }

    #[test]
    fn nft_rules_use_a_verdict_map() {
        let rules = nft_ruleset(&services());
        assert!(rules.contains("198.19.0.10 . tcp . 80 : goto service-0"));
        assert!(rules.contains(
            "numgen random mod 2 vmap { 0 : goto endpoint-0-0, 1 : goto endpoint-0-1, }"
        ));
        assert!(rules.contains("dnat to 198.18.2.1:8080"));
        assert!(rules.contains("tcp . 30080 : goto external-0"));
        assert!(rules.contains("masquerade fully-random"));
    }
}
