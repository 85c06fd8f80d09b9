//! Reliability on a simulated node: endpoint churn under sustained traffic, and the agent
//! killed and restarted during traffic.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use xtask::testbed::{Pod, Testbed};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const VIP: &str = "198.19.0.7:7";

fn testbed() -> Testbed {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "namespace tests need root (run `cargo xtask test`)"
    );
    Testbed::new("lbt", Path::new(env!("CARGO_BIN_EXE_lb"))).expect("testbed")
}

fn pod_manifest(name: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: echo}}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo}\nspec:\n  clusterIP: 198.19.0.7\n  selector: {app: echo}\n  ports: [{port: 7, targetPort: 7000}]\n";

/// Echo pods `name-<i>` at 198.18.<subnet>.<i>, with their manifests written if `manifest`.
fn echo_pods(bed: &mut Testbed, name: &str, subnet: u8, n: u8, manifest: bool) -> Vec<Pod> {
    (1..=n)
        .map(|i| {
            let pod_name = format!("{name}-{i}");
            let ip = Ipv4Addr::new(198, 18, subnet, i);
            let pod = bed.add_pod(&pod_name, ip).unwrap();
            bed.serve_echo(&pod, 7000).unwrap();
            if manifest {
                bed.write_manifest(&format!("{pod_name}.yaml"), &pod_manifest(&pod_name, ip))
                    .unwrap();
            }
            pod
        })
        .collect()
}

/// One line out, one line back: the name of the pod that answered.
fn exchange(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    msg: &str,
) -> std::io::Result<String> {
    writer.write_all(format!("{msg}\n").as_bytes())?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let (server, echoed) = line
        .trim()
        .split_once(": ")
        .ok_or(std::io::ErrorKind::InvalidData)?;
    if echoed != msg {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok(server.to_string())
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    server: String,
}

fn open(vip: SocketAddr) -> std::io::Result<Conn> {
    let s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_nodelay(true)?;
    let mut writer = s.try_clone()?;
    let mut reader = BufReader::new(s);
    let server = exchange(&mut reader, &mut writer, "hello")?;
    Ok(Conn {
        reader,
        writer,
        server,
    })
}

/// Long-lived connections exchanging a line every `every` until `stop`: returns the number
/// of exchanges and the failures (a failed exchange, or an answer from another pod).
fn keep_talking(conns: Vec<Conn>, stop: Arc<AtomicBool>, every: Duration) -> (u64, Vec<String>) {
    let (mut exchanges, mut failures) = (0, Vec::new());
    let mut conns = conns;
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for (i, c) in conns.iter_mut().enumerate() {
            match exchange(&mut c.reader, &mut c.writer, &format!("c{i} r{round}")) {
                Ok(server) if server == c.server => exchanges += 1,
                Ok(server) => failures.push(format!(
                    "connection {i} moved from {} to {server}",
                    c.server
                )),
                Err(e) => failures.push(format!("connection {i} to {}: {e}", c.server)),
            }
        }
        round += 1;
        std::thread::sleep(every);
    }
    (exchanges, failures)
}

#[test]
fn agent_killed_and_restarted_during_traffic() {
    let mut bed = testbed();
    let client = bed.add_pod("client", CLIENT_IP).unwrap();
    echo_pods(&mut bed, "echo", 2, 3, true);
    bed.write_manifest("svc.yaml", SERVICE).unwrap();
    bed.write_manifest(
        "old.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: old}\nspec: {clusterIP: 198.19.0.99, selector: {app: echo}, ports: [{port: 99, targetPort: 7000}]}\n",
    )
    .unwrap();
    bed.start_agent().unwrap();
    let vip: SocketAddr = VIP.parse().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let long_lived = {
        let stop = stop.clone();
        let conns = bed
            .in_pod(&client, move || {
                (0..10).map(|_| open(vip).unwrap()).collect::<Vec<_>>()
            })
            .unwrap();
        let path = format!("/run/netns/{}", client.netns);
        std::thread::spawn(move || {
            enter(&path);
            keep_talking(conns, stop, Duration::from_millis(20))
        })
    };
    let new_connections = {
        let stop = stop.clone();
        let path = format!("/run/netns/{}", client.netns);
        std::thread::spawn(move || {
            enter(&path);
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match open(vip) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        })
    };

    std::thread::sleep(Duration::from_secs(1));
    bed.stop_agent(true).unwrap();
    // While no agent runs: one Service goes away, another comes.
    bed.remove_manifest("old.yaml").unwrap();
    bed.write_manifest(
        "new.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: new}\nspec: {clusterIP: 198.19.0.77, selector: {app: echo}, ports: [{port: 77, targetPort: 7000}]}\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    bed.start_agent().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);

    let (exchanges, failures) = long_lived.join().unwrap();
    assert!(
        failures.is_empty(),
        "established connections dropped: {failures:?}"
    );
    assert!(exchanges > 500, "{exchanges} exchanges");
    let (ok, failed) = new_connections.join().unwrap();
    assert!(
        failed.is_empty(),
        "new connections failed during the restart: {failed:?}"
    );
    assert!(ok > 50, "{ok} new connections");

    // Reconciled: the removed Service's frontend is gone from the map, the new one works.
    let svc = bed.lb(&["get", "svc"]).unwrap();
    assert!(!svc.contains("old ") && svc.contains("new "), "{svc}");
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(bed.bpffs.join(lb_common::FRONTENDS_MAP))
        .output()
        .unwrap();
    let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    let ports: BTreeSet<u16> = dump
        .as_array()
        .unwrap()
        .iter()
        // Ports are kept in network byte order; bpftool prints the stored u16.
        .map(|e| u16::from_be(e["formatted"]["key"]["port"].as_u64().unwrap() as u16))
        .collect();
    assert_eq!(
        ports,
        BTreeSet::from([7, 77]),
        "frontends after reconcile: {dump}"
    );
    let new_vip: SocketAddr = "198.19.0.77:77".parse().unwrap();
    let server = bed
        .in_pod(&client, move || open(new_vip).map(|c| c.server))
        .unwrap()
        .unwrap();
    assert!(server.starts_with("echo-"));
}

fn enter(path: &str) {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    assert_eq!(
        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
        0
    );
}

/// When each churning pod was in the manifests: (pod, from, until).
type Presence = Arc<Mutex<Vec<(String, Instant, Option<Instant>)>>>;

#[test]
fn endpoint_churn_under_sustained_traffic() {
    const DURATION: Duration = Duration::from_secs(30);
    const CHURN_EVERY: Duration = Duration::from_millis(100);
    let mut bed = testbed();
    let client = bed.add_pod("client", CLIENT_IP).unwrap();
    let stable = echo_pods(&mut bed, "stable", 2, 3, true);
    let churning = echo_pods(&mut bed, "churn", 3, 3, false);
    bed.write_manifest("svc.yaml", SERVICE).unwrap();
    bed.start_agent().unwrap();
    let vip: SocketAddr = VIP.parse().unwrap();
    let stable_names: BTreeSet<String> = stable.iter().map(|p| p.name.clone()).collect();

    // Long-lived connections opened while only the stable pods are endpoints.
    let stop = Arc::new(AtomicBool::new(false));
    let conns = bed
        .in_pod(&client, move || {
            (0..10).map(|_| open(vip).unwrap()).collect::<Vec<_>>()
        })
        .unwrap();
    assert!(conns.iter().all(|c| stable_names.contains(&c.server)));
    let path = format!("/run/netns/{}", client.netns);
    let long_lived = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            enter(&path);
            keep_talking(conns, stop, Duration::from_millis(50))
        })
    };
    // New connections all the time: (local address, opened, closed, answering pod or error).
    let new_connections = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            enter(&path);
            let mut results = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let opened = Instant::now();
                let attempt =
                    TcpStream::connect_timeout(&vip, Duration::from_secs(2)).and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        let local = s.local_addr()?;
                        let mut writer = s.try_clone()?;
                        let mut reader = BufReader::new(s);
                        Ok((local, exchange(&mut reader, &mut writer, "new")))
                    });
                let (local, answer) = match attempt {
                    Ok((local, answer)) => {
                        (Some(local), answer.map_err(|e| (e.kind(), e.to_string())))
                    }
                    Err(e) => (None, Err((e.kind(), e.to_string()))),
                };
                results.push((local, opened, Instant::now(), answer));
                std::thread::sleep(Duration::from_millis(5));
            }
            results
        })
    };

    // Churn: every 100 ms one churning pod joins or leaves the endpoints.
    let presence: Presence = Default::default();
    let started = Instant::now();
    let mut present = vec![false; churning.len()];
    let mut i = 0usize;
    while started.elapsed() < DURATION {
        let k = i % churning.len();
        let pod = &churning[k];
        let file = format!("{}.yaml", pod.name);
        let now = Instant::now();
        let mut log = presence.lock().unwrap();
        if present[k] {
            bed.remove_manifest(&file).unwrap();
            if let Some(entry) = log.iter_mut().rev().find(|e| e.0 == pod.name) {
                entry.2 = Some(now);
            }
        } else {
            bed.write_manifest(&file, &pod_manifest(&pod.name, pod.ip))
                .unwrap();
            log.push((pod.name.clone(), now, None));
        }
        drop(log);
        present[k] = !present[k];
        i += 1;
        std::thread::sleep(CHURN_EVERY);
    }
    stop.store(true, Ordering::Relaxed);

    let (exchanges, failures) = long_lived.join().unwrap();
    assert!(
        failures.is_empty(),
        "connections to endpoints that stayed ready failed: {failures:?}"
    );
    assert!(exchanges > 1000, "{exchanges} exchanges");

    let results = new_connections.join().unwrap();
    let presence = presence.lock().unwrap();
    // The agent applies a change within a second: a pod counts as ready from its manifest's
    // write until a second after its removal.
    let grace = Duration::from_secs(1);
    let was_ready = |pod: &str, from: Instant, to: Instant| {
        stable_names.contains(pod)
            || presence.iter().any(|(p, added, removed)| {
                p == pod && *added <= to && removed.is_none_or(|r| r + grace >= from)
            })
    };
    // A client port is reused over 30 s of connections: one accepted by a churning pod as
    // well cannot be told apart from a connection that went there (seen: a port accepted by
    // stable-1 and by churn-1, the latter's connection reset when churn-1 left).
    let accepted_by_churning: BTreeSet<SocketAddr> = churning
        .iter()
        .flat_map(|p| bed.accepted(&p.name))
        .collect();
    let accepted_by_stable: BTreeSet<SocketAddr> = stable
        .iter()
        .flat_map(|p| bed.accepted(&p.name))
        .filter(|a| !accepted_by_churning.contains(a))
        .collect();
    // For a failure's message: who accepted the connection, and the endpoint changes around
    // it (ms from the connection's start).
    let timeline = |local: SocketAddr, opened: Instant, closed: Instant| {
        let ms = |t: Instant| {
            t.saturating_duration_since(opened).as_millis() as i128
                - opened.saturating_duration_since(t).as_millis() as i128
        };
        let accepted_by: Vec<&str> = stable
            .iter()
            .chain(&churning)
            .filter(|p| bed.accepted(&p.name).contains(&local))
            .map(|p| p.name.as_str())
            .collect();
        let near = |t: Instant| t + grace >= opened && t <= closed + grace;
        let changes: Vec<String> = presence
            .iter()
            .flat_map(|(p, added, removed)| {
                let added = near(*added).then(|| format!("{p} added at {} ms", ms(*added)));
                let removed = removed
                    .filter(|r| near(*r))
                    .map(|r| format!("{p} removed at {} ms", ms(r)));
                added.into_iter().chain(removed)
            })
            .collect();
        format!(
            "closed after {} ms; accepted by {accepted_by:?}; endpoint changes: {changes:?}",
            ms(closed)
        )
    };
    let (mut ok, mut failed) = (0, 0);
    for (local, opened, closed, answer) in &results {
        match answer {
            Ok(pod) => {
                assert!(
                    was_ready(pod, *opened, *closed),
                    "a new connection reached {pod}, which was not a ready endpoint"
                );
                ok += 1;
            }
            Err((kind, e)) => {
                // A connection may fail only if its endpoint left during it: a churning pod
                // answered the SYN, left, and the next packet went to a pod that knows
                // nothing of it and reset it. A stable pod never accepted it.
                match local {
                    Some(local) => assert!(
                        !accepted_by_stable.contains(local),
                        "a connection to a stable endpoint failed: {local}: {e}; {}",
                        timeline(*local, *opened, *closed)
                    ),
                    None => assert_eq!(
                        *kind,
                        std::io::ErrorKind::ConnectionReset,
                        "connect failed with endpoints present: {e}"
                    ),
                }
                failed += 1;
            }
        }
    }
    eprintln!(
        "churn: {i} endpoint changes in {DURATION:?}; long-lived: {exchanges} exchanges, 0 failures; new connections: {ok} ok, {failed} cut by their endpoint leaving"
    );
    assert!(ok > 1000, "{ok} new connections");
}
