//! Forwarding a query to the upstream server, as it came, over UDP or TCP.
use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};

/// How long the upstream server has to answer (resolvers retry after about this long).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The upstream server's answer to `query` (a whole DNS message).
pub async fn exchange(upstream: SocketAddr, query: &[u8], tcp: bool) -> io::Result<Vec<u8>> {
    let exchange = async {
        if tcp {
            over_tcp(upstream, query).await
        } else {
            over_udp(upstream, query).await
        }
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))?
}

async fn over_udp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    // A socket per query: its port and the message ID pair the answer with this query only.
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buffer = vec![0; 65535];
    loop {
        let n = socket.recv(&mut buffer).await?;
        if n >= 12 && buffer[..2] == query[..2] {
            buffer.truncate(n);
            return Ok(buffer);
        }
    }
}

async fn over_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let length = u16::try_from(query.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
    let mut stream = TcpStream::connect(upstream).await?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let length = stream.read_u16().await?;
    let mut answer = vec![0; length as usize];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}
