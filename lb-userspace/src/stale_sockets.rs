//! Connected UDP sockets that connect-time load balancing sent to a backend that has since
//! gone: without more they would send into the void until the application reconnects. They
//! are closed through the kernel's sock_diag SOCK_DESTROY (the same `udp_abort` that
//! `bpf_sock_destroy` calls): the application's next receive fails with ECONNABORTED (a send
//! with EDESTADDRREQ), it reconnects, and the connect gets a live backend. TCP sockets are
//! left to end by themselves (their backend is gone: they reset or time out).
use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use lb_common::{Backend, SockRevKey, SockService, host_port};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    message::SockDiagDestroy,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// A socket (by its cookie) and the backend it was sent to.
pub type SocketToBackend = (u64, SocketAddrV4);

/// The remembered sockets whose backend no longer serves the Service they called: its id is
/// free, or holds another endpoint or another Service's. `backends`: those in use.
pub fn stale(
    entries: &[(SockRevKey, SockService)],
    backends: &BTreeMap<u32, Backend>,
) -> Vec<SockRevKey> {
    entries
        .iter()
        .filter(|(key, service)| {
            backends.get(&service.backend_id).is_none_or(|b| {
                b.service_id != service.service_id
                    || b.port != key.backend_port
                    || b.addr[..4] != key.backend_addr
            })
        })
        .map(|(key, _)| *key)
        .collect()
}

/// [`stale`] entries as the sockets to close.
pub fn targets(stale: &[SockRevKey]) -> HashSet<SocketToBackend> {
    stale
        .iter()
        .map(|k| {
            let addr = SocketAddrV4::new(Ipv4Addr::from(k.backend_addr), host_port(k.backend_port));
            (k.cookie, addr)
        })
        .collect()
}

/// The network namespaces of the processes in `cgroup` and every cgroup below it, one path
/// (`/proc/<pid>/ns/net`) per namespace.
pub fn namespaces_in(cgroup: &Path) -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            // Processes that ended meanwhile are skipped.
            if let Ok(meta) = std::fs::metadata(&path)
                && seen.insert((meta.dev(), meta.ino()))
            {
                found.push(path);
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    found
}

/// Closes the connected UDP sockets of these namespaces that `targets` names (cookie and
/// peer both must match). Runs on a thread of its own, which enters each namespace in turn.
/// Returns how many were closed.
pub fn close(
    namespaces: Vec<PathBuf>,
    targets: HashSet<SocketToBackend>,
) -> std::io::Result<usize> {
    std::thread::spawn(move || {
        let mut closed = 0;
        for ns in namespaces {
            // A namespace gone meanwhile has no sockets left to close.
            let Ok(file) = std::fs::File::open(&ns) else {
                continue;
            };
            // SAFETY: setns on a namespace fd; it moves only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            closed += close_here(&targets)?;
        }
        Ok(closed)
    })
    .join()
    .map_err(|_| std::io::Error::other("the thread closing sockets panicked"))?
}

/// [`close`] in the calling thread's network namespace.
fn close_here(targets: &HashSet<SocketToBackend>) -> std::io::Result<usize> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let connected_udp = InetRequest {
        family: AF_INET,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        // A connected UDP socket is in TCP_ESTABLISHED.
        states: StateFlags::ESTABLISHED,
        socket_id: SocketId::new_v4(),
    };
    let doomed: Vec<SocketId> = dump(&mut socket, connected_udp)?
        .into_iter()
        .filter(|id| {
            let IpAddr::V4(peer) = id.destination_address else {
                return false;
            };
            let cookie = u64::from_ne_bytes(id.cookie);
            targets.contains(&(cookie, SocketAddrV4::new(peer, id.destination_port)))
        })
        .collect();
    let mut closed = 0;
    for id in doomed {
        let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family: AF_INET,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id,
        }));
        match request_ack(&mut socket, request) {
            Ok(()) => closed += 1,
            // Closed by its application meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(closed)
}

fn send<T: netlink_packet_core::NetlinkSerializable + std::fmt::Debug>(
    socket: &mut Socket,
    flags: u16,
    payload: T,
) -> std::io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// The ids of the sockets `request` matches.
fn dump(socket: &mut Socket, request: InetRequest) -> std::io::Result<Vec<SocketId>> {
    send(
        socket,
        NLM_F_REQUEST | NLM_F_DUMP,
        SockDiagMessage::InetRequest(request),
    )?;
    let mut ids = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..size])
                .map_err(|e| std::io::Error::other(format!("sock_diag answer: {e}")))?;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    ids.push(r.header.socket_id.clone());
                }
                NetlinkPayload::Done(_) => return Ok(ids),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                _ => {}
            }
            if message.header.length == 0 {
                break;
            }
            offset += message.header.length as usize;
        }
    }
}

/// Sends `request` and waits for its acknowledgement.
fn request_ack(socket: &mut Socket, request: SockDiagDestroy) -> std::io::Result<()> {
    send(socket, NLM_F_REQUEST | NLM_F_ACK, request)?;
    let mut buf = vec![0u8; 4096];
    let size = socket.recv(&mut &mut buf[..], 0)?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[..size])
        .map_err(|e| std::io::Error::other(format!("sock_diag answer: {e}")))?;
    match message.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(addr: [u8; 4], port: u16, service_id: u32) -> Backend {
        let mut b = Backend {
            port: lb_common::net_port(port),
            service_id,
            state: lb_common::BACKEND_ACTIVE,
            ..Backend::default()
        };
        b.addr[..4].copy_from_slice(&addr);
        b
    }

    fn entry(
        cookie: u64,
        addr: [u8; 4],
        port: u16,
        service_id: u32,
        id: u32,
    ) -> (SockRevKey, SockService) {
        (
            SockRevKey {
                cookie,
                backend_addr: addr,
                backend_port: lb_common::net_port(port),
                _pad: 0,
            },
            SockService {
                addr: [198, 19, 0, 10],
                port: lb_common::net_port(53),
                _pad: 0,
                service_id,
                backend_id: id,
            },
        )
    }

    #[test]
    fn a_socket_is_stale_once_its_backend_id_is_free_or_holds_another_endpoint() {
        let backends = BTreeMap::from([
            (1, backend([198, 18, 2, 1], 5353, 7)),
            // Id 2 went to another endpoint; id 3 to another Service.
            (2, backend([198, 18, 2, 9], 5353, 7)),
            (3, backend([198, 18, 2, 3], 5353, 8)),
        ]);
        let entries = [
            entry(100, [198, 18, 2, 1], 5353, 7, 1),
            entry(101, [198, 18, 2, 2], 5353, 7, 2),
            entry(102, [198, 18, 2, 3], 5353, 7, 3),
            entry(103, [198, 18, 2, 4], 5353, 7, 4),
            entry(104, [198, 18, 2, 1], 5354, 7, 1),
        ];
        let stale: Vec<u64> = stale(&entries, &backends)
            .iter()
            .map(|k| k.cookie)
            .collect();
        assert_eq!(stale, [101, 102, 103, 104]);
        let targets = targets(&stale_keys(&entries[1..2]));
        assert_eq!(
            targets,
            HashSet::from([(101, "198.18.2.2:5353".parse().unwrap())])
        );
    }

    fn stale_keys(entries: &[(SockRevKey, SockService)]) -> Vec<SockRevKey> {
        entries.iter().map(|(k, _)| *k).collect()
    }
}
