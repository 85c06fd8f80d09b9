//! The manifests in deploy/ are valid Kubernetes objects, and every flag the DaemonSet gives the
//! agent is one `lb agent` has.
use std::{path::Path, process::Command};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize as _;

fn deploy_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

/// Every document of every YAML file in deploy/, with its file name.
fn documents() -> Vec<(String, serde_yaml::Value)> {
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(deploy_dir()).expect("deploy/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read manifest");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).expect("YAML");
            if !value.is_null() {
                docs.push((path.display().to_string(), value));
            }
        }
    }
    docs
}

fn parse<T: serde::de::DeserializeOwned>(file: &str, value: &serde_yaml::Value) -> T {
    serde_path_to_error::deserialize(value.clone()).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn every_manifest_is_a_valid_object_and_the_rbac_only_reads() {
    let mut kinds = Vec::new();
    for (file, doc) in documents() {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "DaemonSet" => {
                let _: DaemonSet = parse(&file, &doc);
            }
            "ServiceAccount" => {
                let _: ServiceAccount = parse(&file, &doc);
            }
            "ClusterRole" => {
                let role: ClusterRole = parse(&file, &doc);
                for rule in role.rules.iter().flatten() {
                    for verb in &rule.verbs {
                        assert!(
                            ["get", "list", "watch"].contains(&verb.as_str()),
                            "{file}: the agent only reads, not {verb}"
                        );
                    }
                }
            }
            "ClusterRoleBinding" => {
                let _: ClusterRoleBinding = parse(&file, &doc);
            }
            other => panic!("{file}: unexpected kind {other:?}"),
        }
        kinds.push(kind);
    }
    for wanted in [
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
    ] {
        assert!(kinds.iter().any(|k| k == wanted), "no {wanted} in deploy/");
    }
}

#[test]
fn every_flag_the_daemonset_passes_is_one_lb_agent_has() {
    let help = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["agent", "--help"])
        .output()
        .expect("lb agent --help");
    let help = String::from_utf8(help.stdout).expect("UTF-8 help");
    let (file, doc) = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let daemonset: DaemonSet = parse(&file, &doc);
    let spec = daemonset
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    let container = &spec.containers[0];
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("agent"));
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap();
        assert!(flag.starts_with("--"), "{arg}: flags only");
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{file}: {flag} is not a flag of `lb agent`"
        );
    }
    // Cluster mode on the host network, with the node's name and kube-proxy's health probes.
    assert!(!args.iter().any(|a| a.starts_with("--manifests")));
    assert_eq!(spec.host_network, Some(true));
    let env = container.env.clone().unwrap_or_default();
    assert!(env.iter().any(|e| {
        e.name == "NODE_NAME"
            && e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str())
                == Some("spec.nodeName")
    }));
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(
        probe_path(&container.liveness_probe).as_deref(),
        Some("/livez")
    );
    assert_eq!(
        probe_path(&container.readiness_probe).as_deref(),
        Some("/healthz")
    );
}
