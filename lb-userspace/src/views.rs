//! What `lb get` shows, computed from service states, and its kubectl-style formatting. Pure.
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::{
    controlplane::ServiceState,
    model::{ClusterIpRequest, ServiceType},
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub service_type: String,
    pub cluster_ip: String,
    pub external_ip: String,
    pub ports: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointsView {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints as `ip:port`, port by port in the Service's port order.
    pub endpoints: Vec<String>,
    pub created: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn service_view(state: &ServiceState) -> ServiceView {
    let svc = &state.service;
    let cluster_ip = match (svc.service_type, svc.cluster_ip, state.cluster_ip) {
        (ServiceType::ExternalName, _, _) => "<none>".to_string(),
        (_, ClusterIpRequest::Headless, _) => "None".to_string(),
        (_, _, Some(ip)) => ip.to_string(),
        _ => "<none>".to_string(),
    };
    // As kubectl: the load balancer's addresses, then the externalIPs.
    let external: Vec<String> = state
        .external
        .load_balancer_ips
        .iter()
        .chain(&svc.external_ips)
        .map(|ip| ip.to_string())
        .collect();
    let external_ip = match svc.service_type {
        ServiceType::ExternalName => svc.external_name.clone().unwrap_or_default(),
        ServiceType::LoadBalancer if external.is_empty() => "<pending>".to_string(),
        _ if external.is_empty() => "<none>".to_string(),
        _ => external.join(","),
    };
    let ports = if svc.ports.is_empty() {
        "<none>".to_string()
    } else {
        let node_ports = state.external.node_ports.iter().copied();
        svc.ports
            .iter()
            .zip(node_ports.chain(std::iter::repeat(None)))
            .map(|(p, node_port)| match node_port.or(p.node_port) {
                Some(np) => format!("{}:{}/{}", p.port, np, p.protocol.as_str()),
                None => format!("{}/{}", p.port, p.protocol.as_str()),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    ServiceView {
        namespace: svc.id.namespace.clone(),
        name: svc.id.name.clone(),
        service_type: svc.service_type.as_str().to_string(),
        cluster_ip,
        external_ip,
        ports,
        created: unix(state.created),
    }
}

/// Endpoints exist for every Service except ExternalName ones, as in a cluster.
pub fn endpoints_view(state: &ServiceState) -> Option<EndpointsView> {
    if state.service.service_type == ServiceType::ExternalName {
        return None;
    }
    Some(EndpointsView {
        namespace: state.service.id.namespace.clone(),
        name: state.service.id.name.clone(),
        endpoints: state
            .ports
            .iter()
            .flat_map(|p| p.ready.iter().map(|a| a.to_string()))
            .collect(),
        created: unix(state.created),
    })
}

/// kubectl's ENDPOINTS column: `<none>`, or up to three then `+ N more...`.
pub fn endpoints_column(endpoints: &[String]) -> String {
    const MAX: usize = 3;
    match endpoints.len() {
        0 => "<none>".to_string(),
        n if n <= MAX => endpoints.join(","),
        n => format!("{} + {} more...", endpoints[..MAX].join(","), n - MAX),
    }
}

/// kubectl's AGE column (apimachinery's HumanDuration).
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 * 2 {
        return format!("{s}s");
    }
    let m = s / 60;
    if m < 10 {
        let rest = s % 60;
        return if rest == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{rest}s")
        };
    }
    if m < 60 * 3 {
        return format!("{m}m");
    }
    let h = m / 60;
    if h < 8 {
        let rest = m % 60;
        return if rest == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{rest}m")
        };
    }
    if h < 48 {
        return format!("{h}h");
    }
    if h < 24 * 8 {
        let (d, rest) = (h / 24, h % 24);
        return if rest == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{rest}h")
        };
    }
    if h < 24 * 365 * 2 {
        return format!("{}d", h / 24);
    }
    let y = h / (24 * 365);
    if y < 8 {
        let rest = (h / 24) % 365;
        return if rest == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{rest}d")
        };
    }
    format!("{y}y")
}

pub fn age(created: u64, now: SystemTime) -> String {
    human_duration(Duration::from_secs(unix(now).saturating_sub(created)))
}

/// Left-aligned columns separated by three spaces, as kubectl prints them.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push('\n');
    }
    out
}

pub fn services_table(views: &[ServiceView], all_namespaces: bool, now: SystemTime) -> String {
    let mut header = vec![
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "AGE",
    ];
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let mut row = vec![
                v.name.clone(),
                v.service_type.clone(),
                v.cluster_ip.clone(),
                v.external_ip.clone(),
                v.ports.clone(),
                age(v.created, now),
            ];
            if all_namespaces {
                row.insert(0, v.namespace.clone());
            }
            row
        })
        .collect();
    table(&header, &rows)
}

pub fn endpoints_table(views: &[EndpointsView], all_namespaces: bool, now: SystemTime) -> String {
    let mut header = vec!["NAME", "ENDPOINTS", "AGE"];
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let mut row = vec![
                v.name.clone(),
                endpoints_column(&v.endpoints),
                age(v.created, now),
            ];
            if all_namespaces {
                row.insert(0, v.namespace.clone());
            }
            row
        })
        .collect();
    table(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::states_from_yaml;

    #[test]
    fn human_durations_match_kubectl() {
        let cases = [
            (5, "5s"),
            (119, "119s"),
            (120, "2m"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 - 1, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 120, "3h2m"),
            (47 * 3600, "47h"),
            (2 * 86400, "2d"),
            (2 * 86400 + 3600, "2d1h"),
            (30 * 86400, "30d"),
            (3 * 365 * 86400, "3y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(Duration::from_secs(secs)), want, "{secs}s");
        }
    }

    #[test]
    fn all_namespaces_adds_the_namespace_column() {
        let v = EndpointsView {
            namespace: "kube-system".into(),
            name: "dns".into(),
            endpoints: vec![],
            created: 0,
        };
        let t = endpoints_table(&[v], true, SystemTime::UNIX_EPOCH + Duration::from_secs(3));
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            lines,
            [
                vec!["NAMESPACE", "NAME", "ENDPOINTS", "AGE"],
                vec!["kube-system", "dns", "<none>", "3s"]
            ]
        );
    }

    #[test]
    fn endpoints_column_truncates_after_three() {
        let e: Vec<String> = (1..=4).map(|i| format!("198.18.1.{i}:80")).collect();
        assert_eq!(
            endpoints_column(&e),
            "198.18.1.1:80,198.18.1.2:80,198.18.1.3:80 + 1 more..."
        );
        assert_eq!(endpoints_column(&e[..2]), "198.18.1.1:80,198.18.1.2:80");
        assert_eq!(endpoints_column(&[]), "<none>");
    }

    #[test]
    fn service_rows_like_kubectl() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, creationTimestamp: \"1970-01-01T00:00:00Z\"}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{name: http, port: 80}, {name: https, port: 443}]\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec:\n  type: LoadBalancer\n  externalIPs: [198.18.200.1]\n  ports: [{port: 80, nodePort: 30850}]\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: headless}\nspec: {clusterIP: None, ports: [{port: 80}]}\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {type: ExternalName, externalName: my.database.example.com}\n";
        let states = states_from_yaml(yaml);
        let views: Vec<ServiceView> = states.iter().map(service_view).collect();
        let table = services_table(
            &views,
            false,
            SystemTime::UNIX_EPOCH + Duration::from_secs(65),
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("NAME       TYPE           CLUSTER-IP "),
            "{table}"
        );
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "NAME",
                "TYPE",
                "CLUSTER-IP",
                "EXTERNAL-IP",
                "PORT(S)",
                "AGE"
            ]
        );
        let web: Vec<&str> = lines
            .iter()
            .find(|l| l.starts_with("web "))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(
            web,
            [
                "web",
                "ClusterIP",
                "198.19.0.10",
                "<none>",
                "80/TCP,443/TCP",
                "65s"
            ]
        );
        // Every column starts where its header does.
        let web_line = lines.iter().find(|l| l.starts_with("web ")).unwrap();
        for (header, cell) in [
            ("CLUSTER-IP", "198.19.0.10"),
            ("PORT(S)", "80/TCP,443/TCP"),
            ("AGE", "65s"),
        ] {
            assert_eq!(lines[0].find(header), web_line.find(cell), "{table}");
        }
        let row = |name: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(name))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(row("headless ")[..3], ["headless", "ClusterIP", "None"]);
        assert_eq!(
            row("db ")[..5],
            [
                "db",
                "ExternalName",
                "<none>",
                "my.database.example.com",
                "<none>"
            ]
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("198.18.200.1") && l.contains("80:30850/TCP")),
            "{table}"
        );
        assert!(
            endpoints_view(
                &states
                    .iter()
                    .find(|s| s.service.id.name == "db")
                    .unwrap()
                    .clone()
            )
            .is_none()
        );
    }
}
