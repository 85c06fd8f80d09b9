//! `cargo xtask demo`: the Kubernetes Services walk-through on a simulated node.
use std::{
    collections::BTreeMap,
    fs,
    io::ErrorKind,
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Deserialize as _;
use xtask::testbed::{self, Pod, Testbed};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("examples")
}

/// A Pod of the examples: name, podIP and container ports.
struct ExamplePod {
    file: String,
    name: String,
    ip: Ipv4Addr,
    ports: Vec<u16>,
}

fn example_pods(dir: &Path) -> anyhow::Result<Vec<ExamplePod>> {
    let mut pods = Vec::new();
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    for path in files {
        let text = fs::read_to_string(&path)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v =
                serde_yaml::Value::deserialize(doc).with_context(|| path.display().to_string())?;
            if v["kind"].as_str() != Some("Pod") {
                continue;
            }
            let name = v["metadata"]["name"]
                .as_str()
                .context("Pod without name")?
                .to_string();
            let ip = v["status"]["podIP"]
                .as_str()
                .context("Pod without status.podIP")?
                .parse()?;
            let ports = v["spec"]["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|c| c["ports"].as_sequence().cloned().unwrap_or_default())
                .filter_map(|p| p["containerPort"].as_u64().map(|p| p as u16))
                .collect();
            pods.push(ExamplePod {
                file: path.file_name().unwrap().to_string_lossy().into(),
                name,
                ip,
                ports,
            });
        }
    }
    Ok(pods)
}

struct Demo {
    bed: Testbed,
    client: Pod,
}

fn heading(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

fn say(text: &str) {
    println!("   {text}");
}

impl Demo {
    fn apply(&self, file: &str) -> anyhow::Result<()> {
        self.apply_as(file, file)
    }

    /// Copies an example into the manifest folder under another name (a new version of the
    /// object another file held).
    fn apply_as(&self, file: &str, name: &str) -> anyhow::Result<()> {
        let text = fs::read_to_string(examples_dir().join(file))?;
        if file == name {
            println!("$ cp examples/{file} <manifests>/");
        } else {
            println!("$ cp examples/{file} <manifests>/{name}");
        }
        self.bed.write_manifest(name, &text)?;
        // The agent applies a change within a second; wait until it has.
        std::thread::sleep(Duration::from_millis(600));
        Ok(())
    }

    /// How many of `n` new connections each pod answered, printed as `uniq -c` prints it.
    fn answers(&self, ip: &str, n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..n {
            let body = self.bed.curl(
                &self.client,
                &format!("http://{ip}/"),
                Duration::from_secs(2),
            )?;
            *counts.entry(body.trim().to_string()).or_default() += 1;
        }
        for (pod, n) in &counts {
            println!("{n:>7} {pod}");
        }
        Ok(counts)
    }

    fn lb(&self, args: &[&str]) -> anyhow::Result<()> {
        println!("$ lb {}", args.join(" "));
        print!("{}", self.bed.lb(args)?);
        Ok(())
    }

    fn get(&self) -> anyhow::Result<()> {
        self.lb(&["get", "svc"])?;
        self.lb(&["get", "ep"])
    }

    fn cluster_ip(&self, service: &str) -> anyhow::Result<String> {
        let out = self.bed.lb(&["get", "svc"])?;
        let row = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(service))
            .context("service not listed")?;
        Ok(row
            .split_whitespace()
            .nth(2)
            .context("no CLUSTER-IP column")?
            .to_string())
    }

    fn curl(&self, url: &str) -> anyhow::Result<String> {
        println!("$ curl {url}    (from the client pod)");
        let body = self.bed.curl(&self.client, url, Duration::from_secs(2))?;
        print!("{body}");
        Ok(body)
    }

    /// An HTTP GET from the host outside the cluster.
    fn curl_outside(&self, url: &str) -> anyhow::Result<String> {
        println!("$ curl {url}    (from the host outside the cluster)");
        let body = self
            .bed
            .exec_outside(&["curl", "-s", "--max-time", "2", url])?;
        print!("{body}");
        Ok(body)
    }

    /// A command in the client pod, shown with its output.
    fn in_client(&self, args: &[&str]) -> anyhow::Result<String> {
        println!("$ {}    (from the client pod)", args.join(" "));
        let out = self.bed.exec(&self.client, args)?;
        print!("{out}");
        Ok(out)
    }

    fn connect_refused(&self, addr: &str) -> anyhow::Result<()> {
        println!("$ curl http://{addr}/    (from the client pod)");
        let target = addr.parse()?;
        let (result, took) = self.bed.in_pod(&self.client, move || {
            let started = Instant::now();
            let r = TcpStream::connect_timeout(&target, Duration::from_secs(3)).map(|_| ());
            (r.map_err(|e| e.kind()), started.elapsed())
        })?;
        match result {
            Err(ErrorKind::ConnectionRefused) => say(&format!(
                "connection refused after {:.1} ms (ICMP port unreachable from the ClusterIP)",
                took.as_secs_f64() * 1e3
            )),
            other => anyhow::bail!("expected a refusal, got {other:?}"),
        }
        Ok(())
    }
}

pub fn run(lb: &Path) -> anyhow::Result<()> {
    let left = testbed::cleanup_leftovers("lbdemo")?;
    if left > 0 {
        eprintln!("==> removed {left} leftovers of earlier runs");
    }
    // Ctrl-C: the agent gets the same SIGINT; remove namespaces and pins, then leave.
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: removing the demo's namespaces and pins");
        let _ = testbed::cleanup_leftovers("lbdemo");
        std::process::exit(130);
    })?;

    heading("Setting up two simulated nodes in network namespaces");
    let mut bed = Testbed::with_nodes("lbdemo", lb, 2)?;
    // XDP on the uplinks: senders compute their checksums, as behind a real NIC.
    bed.for_xdp()?;
    let client = bed.add_pod("client", CLIENT_IP)?;
    for (i, ns) in bed.node_netns_list().iter().enumerate() {
        say(&format!(
            "node-{} (namespace {ns}, {} on the LAN) runs `lb agent --external-iface {}`; its pods link to it with veth pairs",
            i + 1,
            testbed::lan_ip(i),
            testbed::UPLINK
        ));
    }
    say(&format!("client pod {CLIENT_IP} on node-1"));
    let pods = example_pods(&examples_dir())?;
    for (i, p) in pods.iter().enumerate() {
        // Pods alternate between the nodes: Services balance across both.
        let node = i % 2;
        let pod = bed.add_pod_on(node, &p.name, p.ip)?;
        for port in &p.ports {
            bed.serve_http(&pod, *port)?;
        }
        say(&format!(
            "pod {:<14} {:<12} on node-{} serves HTTP on {:?} answering with its name  ({})",
            p.name,
            p.ip.to_string(),
            node + 1,
            p.ports,
            p.file
        ));
    }
    let outside = bed.add_pod("outside-host", OUTSIDE_IP)?;
    bed.serve_http(&outside, 80)?;
    say(&format!("a host outside the cluster at {OUTSIDE_IP}:80"));
    // Each node's agent attaches its socket programs to a cgroup the demo made (never the
    // machine's root cgroup: cgroup programs see every process in it).
    bed.enable_socket_lb()?;
    bed.start_agent_with(&["--dns-listen", "0.0.0.0:53"])?;
    let cgroup = bed.cgroup_of(0).context("no cgroup")?.display().to_string();
    say(&format!(
        "lb agent --manifests <dir> --service-cidr {} --dns-listen 0.0.0.0:53 --cgroup {cgroup} is running",
        testbed::SERVICE_CIDR
    ));
    let demo = Demo { bed, client };

    heading("1. A Service whose selector matches no pod yet");
    demo.apply("01-hello-nasa-svc.yaml")?;
    demo.get()?;
    demo.connect_refused("198.19.10.10:80")?;

    heading("2. A Pod with app: hello-nasa appears: it becomes the endpoint");
    demo.apply("02-hello-nasa-pod.yaml")?;
    demo.lb(&["get", "ep"])?;
    demo.curl("http://198.19.10.10/")?;

    heading("3. Multi-port Service (and a headless one, CLUSTER-IP None)");
    demo.apply("03-nasa-node-svc.yaml")?;
    demo.lb(&["get", "ep"])?;
    demo.apply("04-nasa-node-pod.yaml")?;
    demo.get()?;
    let ip = demo.cluster_ip("nasa-node-svc")?;
    demo.curl(&format!("http://{ip}:80/"))?;
    demo.curl(&format!("http://{ip}:443/"))?;
    say("(port 443 goes to the pod's 8082; the demo's pods speak plain HTTP there)");

    heading("4. Four replicas behind one Service: load balancing");
    demo.apply("05-nasa-rs-pods.yaml")?;
    demo.apply("06-nasa-rs-svc.yaml")?;
    demo.get()?;
    let ip = demo.cluster_ip("nasa-rs-svc")?;
    println!("$ for i in $(seq 100); do curl -s http://{ip}/; done | sort | uniq -c");
    let counts = demo.answers(&ip, 100)?;
    anyhow::ensure!(
        counts.len() == 4,
        "expected all 4 replicas to answer, got {counts:?}"
    );

    heading("4b. From outside the cluster: the nodePort on every node, and the externalIP");
    let lan = |node: usize| testbed::lan_ip(node).to_string();
    for node in [0, 1] {
        let body = demo.curl_outside(&format!("http://{}:30850/", lan(node)))?;
        anyhow::ensure!(
            body.starts_with("nasa-rs-pod"),
            "nodePort answered {body:?}"
        );
    }
    println!(
        "$ ip route add 198.18.200.1 via {}    (on the outside host, as a router would)",
        lan(0)
    );
    demo.bed
        .exec_outside(&["ip", "route", "add", "198.18.200.1", "via", &lan(0)])?;
    let body = demo.curl_outside("http://198.18.200.1/")?;
    anyhow::ensure!(
        body.starts_with("nasa-rs-pod"),
        "externalIP answered {body:?}"
    );
    say(
        "(a pod on the other node answers through node-1 from node-1's address: SNAT; its reply comes back through node-1, translated by XDP)",
    );

    heading("4c. Session affinity: sessionAffinity: ClientIP sends a client to one pod");
    demo.apply_as("08-nasa-rs-svc-affinity.yaml", "06-nasa-rs-svc.yaml")?;
    println!("$ for i in $(seq 20); do curl -s http://{ip}/; done | sort | uniq -c");
    let counts = demo.answers(&ip, 20)?;
    anyhow::ensure!(
        counts.len() == 1,
        "expected one pod for one client, got {counts:?}"
    );
    say(
        "(the pinned pod is in LB_AFFINITY4_V1: bpftool map dump pinned /sys/fs/bpf/lb/LB_AFFINITY4_V1)",
    );

    heading("5. A Service without selector plus manual Endpoints (and an ExternalName)");
    demo.apply("07-external-db.yaml")?;
    demo.get()?;
    let ip = demo.cluster_ip("external-web")?;
    demo.curl(&format!("http://{ip}/"))?;

    heading("5b. DNS: every Service has a name, answered by the agent in kube-dns's place");
    demo.apply("09-kube-dns.yaml")?;
    let resolv = "nameserver 198.19.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n";
    demo.bed.set_resolv_conf(&demo.client, resolv)?;
    say("the client pod's /etc/resolv.conf, as kubelet writes it:");
    for line in resolv.lines() {
        say(&format!("  {line}"));
    }
    let out = demo.in_client(&["nslookup", "nasa-node-svc-headless"])?;
    anyhow::ensure!(
        out.contains("nasa-node-svc-headless.default.svc.cluster.local")
            && out.contains("198.18.1.20"),
        "the headless Service did not resolve to its pod: {out}"
    );
    say("(headless: one address per ready pod, no ClusterIP)");
    let out = demo.in_client(&[
        "dig",
        "+noall",
        "+answer",
        "my-database.default.svc.cluster.local",
    ])?;
    anyhow::ensure!(
        out.contains("CNAME") && out.contains("my.database.example.com."),
        "the ExternalName Service is not an alias: {out}"
    );
    say("(ExternalName: a CNAME to spec.externalName)");
    demo.in_client(&[
        "dig",
        "+noall",
        "+answer",
        "+additional",
        "_http._tcp.nasa-node-svc.default.svc.cluster.local",
        "SRV",
    ])?;
    say("(SRV: one per named port)");
    let body = demo.in_client(&["curl", "-s", "--max-time", "2", "http://hello-nasa-svc/"])?;
    anyhow::ensure!(
        body.contains("hello-nasa"),
        "curl by name answered {body:?}"
    );
    say("(curl resolves hello-nasa-svc through the search path, then goes through the ClusterIP)");

    heading("5c. Processes on the node itself: connect-time load balancing");
    say(
        "(a host-network process sends packets no pod link sees: the socket programs in its cgroup give its connect() a backend's address)",
    );
    let ip = demo.cluster_ip("hello-nasa-svc")?;
    let url = format!("http://{ip}/");
    println!("$ curl -s {url}    (in node-1's own namespace, a process of {cgroup})");
    let body = demo
        .bed
        .exec_node_in_cgroup(0, &["curl", "-s", "--max-time", "2", &url])?;
    print!("{body}");
    anyhow::ensure!(
        body.contains("hello-nasa"),
        "a node process reached {url} with {body:?}"
    );
    say("(sock_connect counts it in `lb status`; no packet of it was translated)");

    heading("6. A pod goes away: its endpoint goes with it");
    demo.bed.remove_manifest("05-nasa-rs-pods.yaml")?;
    println!("$ rm <manifests>/05-nasa-rs-pods.yaml");
    std::thread::sleep(Duration::from_millis(600));
    demo.lb(&["get", "ep"])?;
    let ip = demo.cluster_ip("nasa-rs-svc")?;
    demo.connect_refused(&format!("{ip}:80"))?;

    heading("Datapath counters");
    demo.lb(&["status"])?;

    heading("Cleaning up");
    drop(demo);
    say("namespaces, links and pins removed");
    Ok(())
}
