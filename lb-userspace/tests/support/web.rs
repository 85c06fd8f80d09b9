//! The `web` Service and its pods, shared by the namespace tests: manifests, servers, and
//! clients that pick their own source address and port.
#![allow(dead_code)]

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use xtask::testbed::{Pod, Testbed};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const VIP: &str = "198.19.0.10";

pub fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, i)
}

/// A Pod manifest; `extra_meta` and `status` add lines to metadata and status.
pub fn pod_manifest(name: &str, ip: Ipv4Addr, extra_meta: &str, status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: web}}\n{extra_meta}spec:\n  containers: [{{name: server, image: example}}]\nstatus:\n  podIP: {ip}\n{status}"
    )
}

pub const NOT_READY: &str = "  conditions: [{type: Ready, status: \"False\"}]\n";
pub const DELETING: &str = "  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n";

/// The `web` Service: TCP 80 -> 8080 (HTTP) and 7 -> 7000 (line echo), UDP 53 -> 5353.
pub fn web_service(extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: {VIP}\n  selector: {{app: web}}\n{extra_spec}  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: echo, port: 7, targetPort: 7000}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n"
    )
}

/// A client on node 0 and `n` server pods `web-<i>` on `node`, serving HTTP, echo and UDP.
pub fn web_pods(bed: &mut Testbed, n: u8, node: usize) -> (Pod, Vec<Pod>) {
    let client = bed.add_pod_on(0, "client", CLIENT_IP).unwrap();
    let mut servers = Vec::new();
    for i in 1..=n {
        let name = format!("web-{i}");
        let pod = bed.add_pod_on(node, &name, backend_ip(i)).unwrap();
        bed.serve_http(&pod, 8080).unwrap();
        bed.serve_echo(&pod, 7000).unwrap();
        bed.serve_udp(&pod, 5353).unwrap();
        bed.write_manifest(
            &format!("{name}.yaml"),
            &pod_manifest(&name, backend_ip(i), "", ""),
        )
        .unwrap();
        servers.push(pod);
    }
    (client, servers)
}

pub fn curl(bed: &Testbed, client: &Pod, url: &str) -> anyhow::Result<String> {
    Ok(bed
        .curl(client, url, Duration::from_secs(2))?
        .trim()
        .to_string())
}

/// Pod names answering over `count` new connections.
pub fn spread(bed: &Testbed, client: &Pod, count: usize) -> std::collections::BTreeSet<String> {
    (0..count)
        .map(|_| curl(bed, client, &format!("http://{VIP}/")).expect("curl through the ClusterIP"))
        .collect()
}

/// A TCP connection from `local` (SO_REUSEADDR, so the port's TIME_WAIT from an
/// earlier connection does not stop it), opened in the calling thread's namespace within 2 s
/// (before the closing timeout could end the earlier flow's conntrack entries).
pub fn connect_from(local: SocketAddrV4, to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(to) = to else {
        unreachable!("IPv4 only")
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned here, handed to TcpStream at the end.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        // connect() gives up after this long (a blocking connect honours SO_SNDTIMEO).
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let local = sockaddr(*local.ip(), local.port());
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(*to.ip(), to.port());
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// One HTTP request on a connection from `local`; the answer's body.
pub fn http_from(local: SocketAddrV4, to: &str) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut stream = connect_from(local, to.parse().unwrap())?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// The endpoint Maglev gives a TCP flow `from` -> `to` among `endpoints`, computed here from
/// the endpoints alone, as every node's agent computes it.
pub fn maglev_endpoint(
    endpoints: &[SocketAddrV4],
    table_size: u32,
    from: SocketAddrV4,
    to: SocketAddrV4,
) -> SocketAddrV4 {
    use lb_common::{maglev, net_port};
    let keys: Vec<u64> = endpoints
        .iter()
        .map(|e| maglev::endpoint_key(e.ip().octets(), e.port()))
        .collect();
    let mut table = vec![0u32; table_size as usize];
    maglev::populate(&keys, &mut table);
    let hash = maglev::flow_hash(
        from.ip().octets(),
        to.ip().octets(),
        net_port(from.port()),
        net_port(to.port()),
        lb_common::PROTO_TCP,
    );
    endpoints[table[maglev::table_index(hash, table_size) as usize] as usize]
}

/// Whether node `node`'s agent no longer lists `endpoint` (read as JSON: the table shortens
/// long endpoint lists).
pub fn endpoint_gone(bed: &Testbed, node: usize, endpoint: SocketAddrV4) -> bool {
    !bed.lb_on(node, &["get", "ep", "-o", "json"])
        .unwrap()
        .contains(&format!("\"{endpoint}\""))
}

/// A datapath counter of node `node`, as `lb status` shows it.
pub fn counter(bed: &Testbed, node: usize, name: &str) -> u64 {
    bed.lb_on(node, &["status"])
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}
