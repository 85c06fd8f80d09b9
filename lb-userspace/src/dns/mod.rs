//! Cluster DNS served by the agent: the names of Kubernetes' DNS-based service discovery
//! specification for the Services the datapath serves.
mod forward;
mod server;
mod udp;
pub mod zone;

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;

use crate::{controlplane::ServiceState, model::ObjectName};
use hickory_server::{Server, proto::rr::Name};
use tracing::{error, info};

pub use server::SharedZone;
use zone::{Zone, ZoneConfig};

/// `lb agent`'s DNS flags.
#[derive(clap::Args, Clone, Debug)]
pub struct DnsConfig {
    /// Serve cluster DNS (Service and endpoint names) on this address, over UDP and TCP.
    /// Off by default.
    #[arg(long, value_name = "ADDR:PORT")]
    pub dns_listen: Option<SocketAddr>,
    /// The cluster's DNS domain: Services are `<service>.<namespace>.svc.<domain>`.
    #[arg(long, default_value = "cluster.local", value_parser = domain)]
    pub cluster_domain: Name,
    /// TTL of DNS answers (and of negative answers): `5s`, or seconds.
    #[arg(long, default_value = "5s", value_parser = ttl)]
    pub dns_ttl: u32,
    /// Where names outside the cluster domain are forwarded (ADDR or ADDR:PORT); without it
    /// they are refused.
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = upstream)]
    pub dns_upstream: Option<SocketAddr>,
}

fn domain(value: &str) -> Result<Name, String> {
    let mut name = Name::from_ascii(value.trim_end_matches('.'))
        .map_err(|e| format!("{value:?} is not a domain name: {e}"))?;
    if name.is_root() {
        return Err("the cluster domain cannot be the root".into());
    }
    name.set_fqdn(true);
    Ok(name)
}

fn ttl(value: &str) -> Result<u32, String> {
    let seconds = match value.parse::<u32>() {
        Ok(seconds) => seconds,
        Err(_) => humantime::parse_duration(value)
            .map_err(|e| format!("{value:?}: {e}"))?
            .as_secs()
            .try_into()
            .map_err(|_| format!("{value:?} is too long"))?,
    };
    Ok(seconds)
}

fn upstream(value: &str) -> Result<SocketAddr, String> {
    value
        .parse::<SocketAddr>()
        .or_else(|_| {
            value
                .parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{value:?} is not an address (ADDR or ADDR:PORT)"))
}

/// TCP connections that send no query for this long are closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The UDP socket's receive buffer: room for bursts while the server thread is busy.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// Starts the DNS server on a thread of its own (one core, apart from the agent's syncs) when
/// `--dns-listen` is given; returns the zone the agent keeps up to date.
pub fn start(config: &DnsConfig) -> anyhow::Result<Option<SharedZone>> {
    let Some(listen) = config.dns_listen else {
        return Ok(None);
    };
    let zone = Arc::new(RwLock::new(Zone::new(ZoneConfig {
        domain: config.cluster_domain.clone(),
        ttl: config.dns_ttl,
    })));
    // Bound here so that a taken port is an error at start, not a log line later.
    let udp = UdpSocket::bind(listen).with_context(|| format!("--dns-listen {listen} (UDP)"))?;
    let tcp = TcpListener::bind(listen).with_context(|| format!("--dns-listen {listen} (TCP)"))?;
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ =
        nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::RcvBuf, &UDP_RECEIVE_BUFFER);
    let handler = server::Handler {
        zone: zone.clone(),
        upstream: config.dns_upstream,
    };
    std::thread::Builder::new()
        .name("dns".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return error!("DNS server: {e}"),
            };
            runtime.block_on(async move {
                let mut server = Server::new(handler.clone());
                match (
                    tokio::net::UdpSocket::from_std(udp),
                    tokio::net::TcpListener::from_std(tcp),
                ) {
                    (Ok(udp), Ok(tcp)) => {
                        tokio::spawn(udp::serve(udp, Arc::new(handler)));
                        server.register_listener(tcp, TCP_IDLE, 64);
                    }
                    (Err(e), _) | (_, Err(e)) => return error!("DNS server: {e}"),
                }
                if let Err(e) = server.block_until_done().await {
                    error!("DNS server stopped: {e}");
                }
            });
        })
        .context("starting the DNS server's thread")?;
    info!(
        %listen,
        domain = %config.cluster_domain,
        upstream = ?config.dns_upstream,
        "serving cluster DNS"
    );
    Ok(Some(zone))
}

/// Brings the zone up to date with Services that changed and marks it complete. The records
/// are made under the read lock, which queries share; the write lock, which stops them, only
/// swaps them in.
pub fn update<'s>(
    zone: &SharedZone,
    changed: impl Iterator<Item = (&'s ObjectName, Option<&'s ServiceState>)>,
) {
    let records: Vec<_> = {
        let zone = zone.read().unwrap_or_else(|e| e.into_inner());
        changed
            .map(|(name, state)| (name, state.and_then(|s| zone.records(s))))
            .collect()
    };
    let mut zone = zone.write().unwrap_or_else(|e| e.into_inner());
    for (name, records) in records {
        zone.replace(name, records);
    }
    zone.set_ready();
}
