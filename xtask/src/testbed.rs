//! Simulated nodes in network namespaces: a node namespace per node (where its agent runs and
//! its pods' links end), one namespace per pod joined to its node by a veth pair, and with
//! several nodes a LAN namespace whose bridge joins the nodes' uplinks (`eth0`) and a host
//! outside the cluster. Addresses come from 198.18.0.0/15 only and no route leaves the
//! namespaces. Everything is removed on drop, also when a test panics; `cleanup_leftovers`
//! removes what a killed run left behind.
use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::cmd::{run, sh};

/// The node's address on every pod-facing link: each pod's default gateway.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Where tests and the demo allocate ClusterIPs.
pub const SERVICE_CIDR: &str = "198.19.0.0/16";
pub const ADMIN: &str = "127.0.0.1:10249";
/// Where `ip netns exec` finds files it shows in place of /etc ones, per namespace.
const NETNS_ETC: &str = "/etc/netns";
/// The nodes' uplink name, in every node namespace.
pub const UPLINK: &str = "eth0";
/// The address of the host outside the cluster on the nodes' LAN.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 100);

/// A node's address on the LAN (node 0 is 198.18.254.1).
pub fn lan_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 254, 1 + node as u8)
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The pod's link as seen from the node namespace.
    pub node_iface: String,
    /// Index of the node the pod runs on.
    pub node: usize,
}

/// One simulated node: its namespace, its agent's folder, pins and process.
struct Node {
    name: String,
    netns: String,
    bpffs: PathBuf,
    manifests: PathBuf,
    log: PathBuf,
    agent: Option<Child>,
    /// The cgroup the node's agent attaches its socket programs to
    /// ([`Testbed::enable_socket_lb`]); without one the agent runs with `--socket-lb=false`.
    cgroup: Option<PathBuf>,
}

struct Server {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

pub struct Testbed {
    pub prefix: String,
    /// Node 0's namespace, pins and manifest folder.
    pub node_netns: String,
    pub bpffs: PathBuf,
    pub dir: PathBuf,
    pub manifests: PathBuf,
    lb: PathBuf,
    nodes: Vec<Node>,
    /// The LAN namespace (bridge) and the outside host, with more than one node.
    lan_netns: Option<String>,
    pub outside_netns: Option<String>,
    pods: Vec<Pod>,
    servers: Vec<Server>,
    next_iface: u32,
    /// Peer addresses every TCP server accepted, by pod name.
    accepted: std::collections::HashMap<String, Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>>,
    /// CPU the next TCP server's threads are kept on.
    pin_next_server: Option<usize>,
    /// Cluster mode: agents watch the API server this kubeconfig names instead of reading
    /// their manifest folders.
    pub kubeconfig: Option<PathBuf>,
    /// Pods and the outside host send full checksums (see [`Testbed::for_xdp`]).
    full_checksums: bool,
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

impl Testbed {
    /// `kind` starts the name of everything the testbed makes (`lbt`, `lbdemo`, `lbbench`), so
    /// that [`cleanup_leftovers`] finds it; `lb` is the agent binary.
    pub fn new(kind: &str, lb: &Path) -> anyhow::Result<Self> {
        Self::with_nodes(kind, lb, 1)
    }

    /// `nodes` nodes; with more than one, joined by a LAN with a host outside the cluster.
    pub fn with_nodes(kind: &str, lb: &Path, nodes: usize) -> anyhow::Result<Self> {
        let prefix = format!(
            "{kind}-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(&prefix);
        let manifests = dir.join("manifests");
        fs::create_dir_all(&manifests)?;
        let node = |i: usize| {
            let suffix = if i == 0 {
                String::new()
            } else {
                format!("-n{i}")
            };
            Node {
                name: format!("node-{}", i + 1),
                netns: format!("{prefix}-node{suffix}"),
                bpffs: PathBuf::from("/sys/fs/bpf").join(format!("{prefix}{suffix}")),
                manifests: if i == 0 {
                    manifests.clone()
                } else {
                    dir.join(format!("manifests{suffix}"))
                },
                log: dir.join(format!("agent{suffix}.log")),
                agent: None,
                cgroup: None,
            }
        };
        let nodes: Vec<Node> = (0..nodes.max(1)).map(node).collect();
        let mut bed = Self {
            node_netns: nodes[0].netns.clone(),
            bpffs: nodes[0].bpffs.clone(),
            lan_netns: None,
            outside_netns: None,
            prefix,
            dir,
            manifests,
            lb: lb.to_path_buf(),
            nodes: Vec::new(),
            pods: Vec::new(),
            servers: Vec::new(),
            next_iface: 0,
            accepted: Default::default(),
            pin_next_server: None,
            kubeconfig: None,
            full_checksums: false,
        };
        for node in nodes {
            fs::create_dir_all(&node.manifests)?;
            setup_node(&node.netns)?;
            bed.nodes.push(node);
        }
        if bed.nodes.len() > 1 {
            bed.setup_lan()?;
        }
        Ok(bed)
    }

    /// The LAN: a bridge in its own namespace, every node's `eth0` on it, and a host outside
    /// the cluster that reaches pods through their nodes.
    fn setup_lan(&mut self) -> anyhow::Result<()> {
        let lan = format!("{}-lan", self.prefix);
        sh(&format!("ip netns add {lan}"))?;
        self.lan_netns = Some(lan.clone());
        sh(&format!("ip -n {lan} link add br0 type bridge"))?;
        sh(&format!("ip -n {lan} link set br0 up"))?;
        let mut hosts: Vec<(String, Ipv4Addr)> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.netns.clone(), lan_ip(i)))
            .collect();
        let outside = format!("{}-outside", self.prefix);
        sh(&format!("ip netns add {outside}"))?;
        sh(&format!("ip -n {outside} link set lo up"))?;
        self.outside_netns = Some(outside.clone());
        hosts.push((outside, OUTSIDE_IP));
        for (i, (ns, ip)) in hosts.iter().enumerate() {
            let port = format!("port{i}");
            for line in [
                format!("ip link add {port} netns {lan} type veth peer name {UPLINK} netns {ns}"),
                format!("ip -n {lan} link set {port} master br0 up"),
                format!("ip -n {ns} addr add {ip}/24 dev {UPLINK}"),
                format!("ip -n {ns} link set {UPLINK} up"),
            ] {
                sh(&line)?;
            }
        }
        Ok(())
    }

    /// Makes the LAN fit for XDP on the nodes' uplinks, as a real network is: every sender
    /// (pods, the outside host, now and later) computes its checksums instead of leaving them
    /// to an offload that veth never does (XDP cannot tell such a CHECKSUM_PARTIAL packet from
    /// a full one), and the bridge's ports take XDP_TX frames (GRO on: veth delivers to a peer
    /// with NAPI only).
    pub fn for_xdp(&mut self) -> anyhow::Result<()> {
        self.full_checksums = true;
        let lan = self.lan_netns.clone().context("no LAN")?;
        for i in 0..=self.nodes.len() {
            sh(&format!("ip netns exec {lan} ethtool -K port{i} gro on"))?;
        }
        let senders = self.pods.iter().map(|p| p.netns.clone());
        for ns in senders.chain(self.outside_netns.clone()) {
            sh(&format!("ip netns exec {ns} ethtool -K eth0 tx off"))?;
        }
        Ok(())
    }

    /// Names of the nodes' namespaces, node 0 first.
    pub fn node_netns_list(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.netns.clone()).collect()
    }

    /// Runs a command in the namespace of the host outside the cluster.
    pub fn exec_outside(&self, args: &[&str]) -> anyhow::Result<String> {
        let ns = self.outside_netns.as_ref().context("no outside host")?;
        let out = run(Command::new("ip").args(["netns", "exec", ns]).args(args))?;
        Ok(String::from_utf8(out.stdout)?)
    }
}

fn setup_node(ns: &str) -> anyhow::Result<()> {
    sh(&format!("ip netns add {ns}"))?;
    sh(&format!("ip -n {ns} link set lo up"))?;
    // IPv4 sysctls of a new namespace are copied from the host's: set what routing needs.
    for setting in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ] {
        sh(&format!("ip netns exec {ns} sysctl -qw {setting}"))?;
    }
    Ok(())
}

impl Testbed {
    /// A pod namespace with `ip` on node 0, linked to the node by `veth<N>` (node side) / `eth0`.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> anyhow::Result<Pod> {
        self.add_pod_on(0, name, ip)
    }

    /// A pod on node `node`; the other nodes and the outside host route its address there.
    pub fn add_pod_on(&mut self, node: usize, name: &str, ip: Ipv4Addr) -> anyhow::Result<Pod> {
        let pod = Pod {
            name: name.to_string(),
            netns: format!("{}-{name}", self.prefix),
            ip,
            node_iface: format!("veth{}", self.next_iface),
            node,
        };
        self.next_iface += 1;
        let node_netns = self.nodes[node].netns.clone();
        let (ns, node_ns, iface) = (&pod.netns, &node_netns, &pod.node_iface);
        sh(&format!("ip netns add {ns}"))?;
        self.pods.push(pod.clone());
        for line in [
            format!("ip link add {iface} netns {node_ns} type veth peer name eth0 netns {ns}"),
            format!("ip -n {ns} link set lo up"),
            format!("ip -n {ns} addr add {ip}/32 dev eth0"),
            format!("ip -n {ns} link set eth0 up"),
            format!("ip -n {ns} route add {GATEWAY} dev eth0 scope link"),
            format!("ip -n {ns} route add 198.18.0.0/15 via {GATEWAY} dev eth0"),
            format!("ip -n {node_ns} addr add {GATEWAY}/32 dev {iface}"),
            format!("ip -n {node_ns} link set {iface} up"),
            format!("ip -n {node_ns} route add {ip}/32 dev {iface}"),
        ] {
            sh(&line)?;
        }
        self.route_to_node(ip, node)?;
        if self.full_checksums {
            sh(&format!("ip netns exec {ns} ethtool -K eth0 tx off"))?;
        }
        Ok(pod)
    }

    /// Every other node, and the outside host, route `ip` to `node` over the LAN.
    fn route_to_node(&self, ip: Ipv4Addr, node: usize) -> anyhow::Result<()> {
        if self.lan_netns.is_none() {
            return Ok(());
        }
        let via = lan_ip(node);
        let others = self.nodes.iter().enumerate().filter(|(i, _)| *i != node);
        for ns in others
            .map(|(_, n)| &n.netns)
            .chain(self.outside_netns.as_ref())
        {
            sh(&format!(
                "ip -n {ns} route add {ip}/32 via {via} dev {UPLINK}"
            ))?;
        }
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Serves HTTP on `port` on every address of the pod, answering every request with
    /// `<pod name>\n`; connections are kept alive unless the client asks to close.
    pub fn serve_http(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        self.serve_http_on(pod, port, None)
    }

    /// [`Self::serve_http`], with the server's threads kept on one CPU (benchmarks pin the
    /// load generator to another, so that neither steals the other's core).
    pub fn serve_http_on(
        &mut self,
        pod: &Pod,
        port: u16,
        cpu: Option<usize>,
    ) -> anyhow::Result<()> {
        let body = format!("{}\n", pod.name);
        self.pin_next_server = cpu;
        self.serve_tcp(pod, Ipv4Addr::UNSPECIFIED, port, move |mut stream| {
            let _ = stream.set_nodelay(true);
            let mut pending = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                    continue;
                };
                let request = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                pending.drain(..end + 4);
                let close = request.contains("connection: close") || request.lines().next().is_some_and(|l| l.ends_with("http/1.0"));
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
                    body.len(),
                    if close { "Connection: close\r\n" } else { "" }
                );
                if stream.write_all(response.as_bytes()).is_err() || close {
                    return;
                }
            }
        })
    }

    /// Adds another address to a pod (routed to it from the node).
    pub fn add_address(&self, pod: &Pod, ip: Ipv4Addr) -> anyhow::Result<()> {
        sh(&format!("ip -n {} addr add {ip}/32 dev eth0", pod.netns))?;
        sh(&format!(
            "ip -n {} route add {ip}/32 dev {}",
            self.nodes[pod.node].netns, pod.node_iface
        ))?;
        self.route_to_node(ip, pod.node)?;
        Ok(())
    }

    /// Serves line echo on `port`: every line comes back as `<pod name>: <line>`.
    pub fn serve_echo(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        let name = pod.name.clone();
        self.serve_tcp(pod, pod.ip, port, move |stream| {
            let mut writer = match stream.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            let _ = writer.set_nodelay(true);
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                // One write per line: with Nagle off, one segment per answer.
                if writer
                    .write_all(format!("{name}: {line}\n").as_bytes())
                    .is_err()
                {
                    return;
                }
            }
        })
    }

    /// Serves bulk transfers on `port`: `GET <n>\n` is answered with `n` bytes, then the
    /// connection closes; `PUT <n>\n` followed by `n` bytes is answered with `<n>\n` once
    /// they have all arrived.
    pub fn serve_bytes(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        self.serve_tcp(pod, Ipv4Addr::UNSPECIFIED, port, move |stream| {
            let mut writer = match stream.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                return;
            }
            let mut words = line.split_whitespace();
            let (Some(verb), Some(Ok(n))) = (words.next(), words.next().map(str::parse::<u64>))
            else {
                return;
            };
            match verb {
                "GET" => {
                    let chunk = vec![b'x'; 16 * 1024];
                    let mut left = n;
                    while left > 0 {
                        let take = left.min(chunk.len() as u64) as usize;
                        if writer.write_all(&chunk[..take]).is_err() {
                            return;
                        }
                        left -= take as u64;
                    }
                }
                "PUT" => {
                    let got = std::io::copy(&mut (&mut reader).take(n), &mut std::io::sink());
                    if let Ok(got) = got {
                        let _ = writer.write_all(format!("{got}\n").as_bytes());
                    }
                }
                _ => {}
            }
        })
    }

    /// Sets the MTU of a link in a namespace (a pod's, a node's or the LAN's).
    pub fn set_mtu(&self, netns: &str, iface: &str, mtu: u32) -> anyhow::Result<()> {
        sh(&format!("ip -n {netns} link set {iface} mtu {mtu}"))?;
        Ok(())
    }

    fn serve_tcp(
        &mut self,
        pod: &Pod,
        ip: Ipv4Addr,
        port: u16,
        handle: impl Fn(TcpStream) + Send + Sync + Clone + 'static,
    ) -> anyhow::Result<()> {
        let netns = pod.netns.clone();
        let log = self.accepted.entry(pod.name.clone()).or_default().clone();
        let cpu = self.pin_next_server.take();
        self.spawn_server(&netns, move |stop| {
            if let Some(cpu) = cpu {
                // Threads started from this one (one per connection) inherit the mask.
                // SAFETY: a zeroed cpu_set_t with one CPU set, applied to this thread.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
            }
            let listener =
                TcpListener::bind((ip, port)).with_context(|| format!("bind {ip}:{port}"))?;
            listener.set_nonblocking(true)?;
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        log.lock().expect("accept log").push(peer);
                        stream.set_nonblocking(false)?;
                        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                        let handle = handle.clone();
                        std::thread::spawn(move || handle(stream));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Wait for the next connection, waking up now and then to see `stop`.
                        let mut fd = libc::pollfd {
                            fd: listener.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd, owned here.
                        unsafe { libc::poll(&mut fd, 1, 100) };
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })
    }

    /// Every peer the pod's TCP servers accepted so far.
    pub fn accepted(&self, pod: &str) -> Vec<std::net::SocketAddr> {
        self.accepted
            .get(pod)
            .map(|l| l.lock().expect("accept log").clone())
            .unwrap_or_default()
    }

    /// Answers every UDP datagram on `port` with `<pod name>: <datagram>`.
    pub fn serve_udp(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        let (netns, ip, name) = (pod.netns.clone(), pod.ip, pod.name.clone());
        self.spawn_server(&netns, move |stop| {
            let socket =
                UdpSocket::bind((ip, port)).with_context(|| format!("bind udp {ip}:{port}"))?;
            socket.set_read_timeout(Some(Duration::from_millis(20)))?;
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let mut reply = format!("{name}: ").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, from);
                }
            }
            Ok(())
        })
    }

    /// A stand-in DNS server on `port` (UDP and TCP): every query gets one A record,
    /// `address`, for the name it asks.
    pub fn serve_dns_stub(
        &mut self,
        pod: &Pod,
        port: u16,
        address: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let (netns, ip) = (pod.netns.clone(), pod.ip);
        self.spawn_server(&netns, move |stop| {
            let socket =
                UdpSocket::bind((ip, port)).with_context(|| format!("bind udp {ip}:{port}"))?;
            socket.set_read_timeout(Some(Duration::from_millis(20)))?;
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf)
                    && let Some(answer) = stub_dns_answer(&buf[..n], address)
                {
                    let _ = socket.send_to(&answer, from);
                }
            }
            Ok(())
        })?;
        self.spawn_server(&pod.netns.clone(), move |stop| {
            let listener = std::net::TcpListener::bind((ip, port))
                .with_context(|| format!("bind tcp {ip}:{port}"))?;
            listener.set_nonblocking(true)?;
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut length = [0u8; 2];
                if stream.read_exact(&mut length).is_err() {
                    continue;
                }
                let mut query = vec![0u8; u16::from_be_bytes(length) as usize];
                if stream.read_exact(&mut query).is_err() {
                    continue;
                }
                if let Some(answer) = stub_dns_answer(&query, address) {
                    let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&answer);
                    let _ = stream.write_all(&framed);
                }
            }
            Ok(())
        })
    }

    /// Runs `serve` on a thread that has entered `netns`; returns once it is listening.
    fn spawn_server(
        &mut self,
        netns: &str,
        serve: impl FnOnce(Arc<AtomicBool>) -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let path = format!("/run/netns/{netns}");
        let thread_stop = stop.clone();
        let thread = std::thread::spawn(move || {
            if let Err(e) = enter_netns(&path) {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            if let Err(e) = serve(thread_stop) {
                eprintln!("server in {path}: {e:#}");
            }
        });
        ready_rx.recv().context("server thread died")??;
        // Give bind() a moment; clients retry anyway.
        std::thread::sleep(Duration::from_millis(20));
        self.servers.push(Server { stop, thread });
        Ok(())
    }

    /// Runs `f` on a thread inside the pod's network namespace (its sockets are the pod's).
    pub fn in_pod<T: Send + 'static>(
        &self,
        pod: &Pod,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", pod.netns);
        std::thread::spawn(move || -> anyhow::Result<T> {
            enter_netns(&path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", pod.netns))?
    }

    /// Runs `f` on a thread inside the namespace of the host outside the cluster.
    pub fn in_outside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let ns = self.outside_netns.as_ref().context("no outside host")?;
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || -> anyhow::Result<T> {
            enter_netns(&path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread outside the cluster panicked"))?
    }

    /// A TCP socket listening on `addr` in node `node`'s namespace (for a service the agents
    /// reach, such as a stand-in API server).
    pub fn listen_on_node(
        &self,
        node: usize,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<std::net::TcpListener> {
        let path = format!("/run/netns/{}", self.nodes[node].netns);
        std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
            enter_netns(&path)?;
            let socket = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(128)?;
            Ok(socket.into())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("listening thread panicked"))?
    }

    /// Writes a manifest into every node's folder (each node's agent reads the same objects).
    pub fn write_manifest(&self, name: &str, content: &str) -> anyhow::Result<()> {
        for node in &self.nodes {
            // Write then rename, so the agent never reads half a file.
            let tmp = self.dir.join(format!(".{name}.tmp"));
            fs::write(&tmp, content)?;
            fs::rename(&tmp, node.manifests.join(name))?;
        }
        Ok(())
    }

    pub fn remove_manifest(&self, name: &str) -> anyhow::Result<()> {
        for node in &self.nodes {
            fs::remove_file(node.manifests.join(name))?;
        }
        Ok(())
    }

    /// Node 0's agent log.
    pub fn agent_log(&self) -> PathBuf {
        self.nodes[0].log.clone()
    }

    /// Starts `lb agent` in every node namespace and waits until each serves its admin
    /// endpoint and has attached to its node's pod links (and uplink).
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        self.start_agent_with(&[])
    }

    /// [`Self::start_agent`] with extra `lb agent` flags.
    pub fn start_agent_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        for node in 0..self.nodes.len() {
            self.start_node_agent(node, extra)?;
        }
        Ok(())
    }

    fn start_node_agent(&mut self, index: usize, extra: &[&str]) -> anyhow::Result<()> {
        let several = self.nodes.len() > 1;
        let node = &mut self.nodes[index];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", node.netns))
            .arg(&self.lb)
            .arg("agent");
        match &self.kubeconfig {
            Some(kubeconfig) => command.arg("--kubeconfig").arg(kubeconfig),
            None => command.arg("--manifests").arg(&node.manifests),
        };
        command
            .arg("--bpffs")
            .arg(&node.bpffs)
            .args([
                "--admin",
                ADMIN,
                "--service-cidr",
                SERVICE_CIDR,
                "--node-name",
                &node.name,
            ])
            .args(if several {
                &["--external-iface", UPLINK][..]
            } else {
                &[]
            })
            .args(extra)
            // cgroup programs see every process in their cgroup, whatever its namespace: a
            // node's agent gets a cgroup of the test's own, or none.
            .args(
                match (
                    &node.cgroup,
                    extra
                        .iter()
                        .any(|a| a.starts_with("--socket-lb") || *a == "--cgroup"),
                ) {
                    (_, true) => vec![],
                    (Some(cgroup), false) => vec!["--cgroup".into(), cgroup.display().to_string()],
                    (None, false) => vec!["--socket-lb=false".to_string()],
                },
            )
            // The namespace tests run once per attach mode (`cargo xtask test`), the
            // external ones once per XDP mode too.
            .args(
                std::env::var("LB_TEST_TC_ATTACH")
                    .ok()
                    .filter(|_| !extra.contains(&"--tc-attach"))
                    .map(|mode| vec!["--tc-attach".to_string(), mode])
                    .unwrap_or_default(),
            )
            .args(
                std::env::var("LB_TEST_XDP_MODE")
                    .ok()
                    .filter(|_| !extra.contains(&"--xdp-mode"))
                    .map(|mode| vec!["--xdp-mode".to_string(), mode])
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe. The agent dies with the thread that started it,
        // so a killed test run leaves no agent behind.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().context("starting lb agent")?;
        node.agent = Some(child);
        let log_path = node.log.clone();
        let mut links: Vec<String> = self
            .pods
            .iter()
            .filter(|p| p.node == index)
            .map(|p| p.node_iface.clone())
            .collect();
        if several {
            links.push(UPLINK.to_string());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.nodes[index]
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "lb agent exited ({status}); log:\n{}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if let Ok(status) = self.lb_on(index, &["status", "-o", "json"]) {
                let all_attached = links.iter().all(|l| status.contains(&format!("\"{l}\"")));
                // Standalone, the folder is always there to sync from: ready once the maps
                // hold it (tests connect at once). In cluster mode a test may start the agent
                // while the API server is down: the pinned maps serve meanwhile.
                let synced = self.kubeconfig.is_some()
                    || serde_json::from_str::<serde_json::Value>(&status)
                        .ok()
                        .and_then(|s| s["syncs"].as_u64())
                        .is_some_and(|n| n > 0);
                if all_attached && synced {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "lb agent not ready after 20 s; log:\n{}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Node 0's agent's resident memory now and at its peak, in MiB (VmRSS, VmHWM).
    pub fn agent_memory_mib(&self) -> anyhow::Result<(f64, f64)> {
        let pid = self.agent_pid().context("no agent running")?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let mib = |field: &str| -> f64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        Ok((mib("VmRSS:"), mib("VmHWM:")))
    }

    /// `lb reset` on every node: the stopped agents' programs detach, their maps go.
    pub fn reset_datapaths(&self) -> anyhow::Result<()> {
        for node in 0..self.nodes.len() {
            self.lb_on(
                node,
                &["reset", "--bpffs", &self.bpffs_of(node).to_string_lossy()],
            )?;
        }
        Ok(())
    }

    /// Waits (up to 60 s) until node 0's agent reports `n` Services programmed.
    pub fn wait_services_programmed(&self, n: u32) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self
            .exec_node(&["curl", "-sS", &format!("http://{ADMIN}/metrics")])
            .unwrap_or_default()
            .contains(&format!("lb_services {n}\n"))
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "agent did not program {n} services"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Node 0's agent process id (nsenter execs it in place).
    pub fn agent_pid(&self) -> Option<u32> {
        self.nodes[0].agent.as_ref().map(|c| c.id())
    }

    /// Stops every agent: SIGTERM (`kill = false`) or SIGKILL. Their programs stay attached.
    pub fn stop_agent(&mut self, kill: bool) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            if let Some(mut child) = node.agent.take() {
                let signal = if kill { libc::SIGKILL } else { libc::SIGTERM };
                // SAFETY: signalling our own child.
                unsafe { libc::kill(child.id() as i32, signal) };
                child.wait()?;
            }
        }
        Ok(())
    }

    /// Runs `lb <args>` in node 0's namespace and returns its stdout.
    pub fn lb(&self, args: &[&str]) -> anyhow::Result<String> {
        self.lb_on(0, args)
    }

    /// Runs `lb <args>` in node `node`'s namespace and returns its stdout.
    pub fn lb_on(&self, node: usize, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.nodes[node].netns))
            .arg(&self.lb)
            .args(args);
        if args
            .first()
            .is_some_and(|a| matches!(*a, "get" | "status" | "events"))
        {
            cmd.args(["--admin", ADMIN]);
        }
        Ok(String::from_utf8(run(&mut cmd)?.stdout)?)
    }

    /// The pinned-map directory of node `node`'s agent.
    pub fn bpffs_of(&self, node: usize) -> &Path {
        &self.nodes[node].bpffs
    }

    /// The pod's /etc/resolv.conf, as `ip netns exec` shows it to the commands it runs there
    /// (removed with the pod).
    pub fn set_resolv_conf(&self, pod: &Pod, content: &str) -> anyhow::Result<()> {
        let dir = Path::new(NETNS_ETC).join(&pod.netns);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("resolv.conf"), content)?;
        Ok(())
    }

    /// Runs a command inside a pod's namespace.
    pub fn exec(&self, pod: &Pod, args: &[&str]) -> anyhow::Result<String> {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &pod.netns])
            .args(args))?;
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Gives every node's agent, from its next start, a cgroup of its own to attach its socket
    /// programs to (`--cgroup`); processes join it through [`Testbed::exec_in_cgroup`].
    pub fn enable_socket_lb(&mut self) -> anyhow::Result<()> {
        let root = cgroup2_root()?;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let cgroup = root.join(format!("{}-n{i}", self.prefix));
            fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
            node.cgroup = Some(cgroup);
        }
        Ok(())
    }

    /// Node `node`'s cgroup ([`Testbed::enable_socket_lb`]).
    pub fn cgroup_of(&self, node: usize) -> Option<&Path> {
        self.nodes[node].cgroup.as_deref()
    }

    /// Runs a command in `netns` as a process of `cgroup` (and returns its stdout): what a
    /// pod's or a node's process in the cgroup the socket programs are attached to does.
    pub fn exec_in_cgroup(
        &self,
        cgroup: &Path,
        netns: &str,
        args: &[&str],
    ) -> anyhow::Result<String> {
        let mut command = command_in_cgroup(cgroup, netns, args)?;
        Ok(String::from_utf8(run(&mut command)?.stdout)?)
    }

    /// Starts a command in a pod as a process of its node's cgroup, its stdout piped.
    pub fn spawn_pod_in_cgroup(&self, pod: &Pod, args: &[&str]) -> anyhow::Result<Child> {
        let cgroup = self
            .cgroup_of(pod.node)
            .context("no cgroup: enable_socket_lb first")?;
        let mut command = command_in_cgroup(cgroup, &pod.netns, args)?;
        Ok(command.stdout(Stdio::piped()).spawn()?)
    }

    /// [`Testbed::exec`] as a process of the cgroup of the pod's node.
    pub fn exec_pod_in_cgroup(&self, pod: &Pod, args: &[&str]) -> anyhow::Result<String> {
        let cgroup = self
            .cgroup_of(pod.node)
            .context("no cgroup: enable_socket_lb first")?;
        self.exec_in_cgroup(cgroup, &pod.netns, args)
    }

    /// [`Testbed::exec_on_node`] as a process of the node's cgroup.
    pub fn exec_node_in_cgroup(&self, node: usize, args: &[&str]) -> anyhow::Result<String> {
        let cgroup = self
            .cgroup_of(node)
            .context("no cgroup: enable_socket_lb first")?;
        self.exec_in_cgroup(cgroup, &self.nodes[node].netns, args)
    }

    /// Runs a command in node 0's namespace.
    pub fn exec_node(&self, args: &[&str]) -> anyhow::Result<String> {
        self.exec_on_node(0, args)
    }

    /// Runs a command in node `node`'s namespace.
    pub fn exec_on_node(&self, node: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.nodes[node].netns])
            .args(args))?;
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `curl` from a pod; the body on success.
    pub fn curl(&self, from: &Pod, url: &str, timeout: Duration) -> anyhow::Result<String> {
        let secs = format!("{:.3}", timeout.as_secs_f64());
        self.exec(from, &["curl", "-sS", "--max-time", &secs, url])
    }

    /// Tears everything down; also done on drop.
    pub fn cleanup(&mut self) {
        for s in &self.servers {
            s.stop.store(true, Ordering::Relaxed);
        }
        for s in self.servers.drain(..) {
            let _ = s.thread.join();
        }
        let _ = self.stop_agent(true);
        for node in &self.nodes {
            if node.bpffs.exists() {
                let _ = run(Command::new(&self.lb)
                    .arg("reset")
                    .arg("--bpffs")
                    .arg(&node.bpffs));
                let _ = fs::remove_dir_all(&node.bpffs);
            }
        }
        for node in &mut self.nodes {
            if let Some(cgroup) = node.cgroup.take() {
                remove_cgroup(&cgroup);
            }
        }
        for pod in self.pods.drain(..) {
            let _ = sh(&format!("ip netns del {}", pod.netns));
            let _ = fs::remove_dir_all(Path::new(NETNS_ETC).join(&pod.netns));
        }
        for ns in self
            .nodes
            .iter()
            .map(|n| n.netns.clone())
            .chain(self.lan_netns.take())
            .chain(self.outside_netns.take())
        {
            let _ = sh(&format!("ip netns del {ns}"));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                let Ok(log) = fs::read_to_string(&node.log) else {
                    continue;
                };
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!(
                    "--- agent log ({}, {}), last lines ---",
                    self.prefix, node.name
                );
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        self.cleanup();
    }
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Moves the calling thread into the network namespace at `path` (`/run/netns/<name>`).
pub fn enter_netns(path: &str) -> anyhow::Result<()> {
    let file = fs::File::open(path).with_context(|| format!("open {path}"))?;
    // SAFETY: setns on a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `args` in `netns`, started as a process of `cgroup`.
fn command_in_cgroup(cgroup: &Path, netns: &str, args: &[&str]) -> anyhow::Result<Command> {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns]).args(args);
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())?;
    // SAFETY: open, write and close are async-signal-safe; "0" moves the writing process.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

/// Where cgroup v2 is mounted.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let out = run(Command::new("findmnt").args(["-n", "-t", "cgroup2", "-o", "TARGET"]))?;
    let root = String::from_utf8(out.stdout)?;
    let root = root.lines().next().context("no cgroup v2 is mounted")?;
    Ok(PathBuf::from(root))
}

/// Kills what is left in a cgroup the testbed made, then removes it.
fn remove_cgroup(cgroup: &Path) {
    let _ = fs::write(cgroup.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = fs::remove_dir(cgroup);
}

/// Removes namespaces, bpffs directories and temp folders that killed runs of testbeds of this
/// `kind` left behind.
pub fn cleanup_leftovers(kind: &str) -> anyhow::Result<usize> {
    let mut removed = 0;
    let prefix = format!("{kind}-");
    let ours = |name: &str| name.starts_with(&prefix);
    // Agents of killed runs: their command line names a bpffs directory of this kind.
    let marker = format!("/sys/fs/bpf/{prefix}");
    for entry in fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(" agent ") && cmdline.contains(&marker) {
            // SAFETY: signalling a leftover agent of ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            removed += 1;
        }
    }
    let list = sh("ip netns list")?;
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if ours(name) {
            let _ = sh(&format!("ip netns del {name}"));
            removed += 1;
        }
    }
    if let Ok(root) = cgroup2_root()
        && let Ok(entries) = fs::read_dir(&root)
    {
        for e in entries.flatten() {
            if ours(&e.file_name().to_string_lossy()) {
                remove_cgroup(&e.path());
                removed += 1;
            }
        }
    }
    for root in [
        Path::new("/sys/fs/bpf"),
        &std::env::temp_dir(),
        Path::new(NETNS_ETC),
    ] {
        if let Ok(entries) = fs::read_dir(root) {
            for e in entries.flatten() {
                if ours(&e.file_name().to_string_lossy()) {
                    let _ = fs::remove_dir_all(e.path());
                    removed += 1;
                }
            }
        }
    }
    Ok(removed)
}

/// A DNS query for `name` A with `id` and recursion desired, as a resolver sends it.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut message = id.to_be_bytes().to_vec();
    message.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.extend_from_slice(&[0, 0, 1, 0, 1]);
    message
}

/// The answer of [`Testbed::serve_dns_stub`]: the query's header and question, flagged as an
/// answer with recursion available, and one A record pointing back at the question's name.
fn stub_dns_answer(query: &[u8], address: Ipv4Addr) -> Option<Vec<u8>> {
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + query[end] as usize;
    }
    // The root label, then type and class.
    end += 5;
    if query.len() < end {
        return None;
    }
    let mut answer = query[..end].to_vec();
    answer[2] = 0x80 | (query[2] & 0x79);
    answer[3] = 0x80;
    answer[4..12].copy_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0]);
    answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    answer.extend_from_slice(&address.octets());
    Some(answer)
}
