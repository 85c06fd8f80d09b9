# A client that reports what its sockets see, one JSON line per attempt: the socket
# programs' tests run it inside a cgroup and a network namespace.
#   tcp ADDR PORT N          N connections: peer (getpeername), answer to an HTTP request
#   udp-connected ADDR PORT N   one connected socket, N datagrams: peer, answer, its source
#   udp-unconnected ADDR PORT N one unconnected socket, N sendto/recvfrom
#   udp-stream ADDR PORT SECONDS  one connected socket, a datagram every 100 ms until an
#                            error or SECONDS: each answer or the error
import errno, json, socket, sys, time

mode, addr, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
target = (addr, port)


def report(**fields):
    print(json.dumps(fields), flush=True)


def failure(e, started):
    ms = (time.monotonic() - started) * 1000
    report(error=errno.errorcode.get(e.errno, str(e)) if e.errno else str(e), ms=round(ms, 1))


def peer(s):
    a, p = s.getpeername()
    return f"{a}:{p}"


if mode == "tcp":
    for _ in range(int(count)):
        started = time.monotonic()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(target)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            body = data.split(b"\r\n\r\n", 1)[-1].decode().strip()
            report(peer=peer(s), body=body)
        except OSError as e:
            failure(e, started)
        finally:
            s.close()
elif mode in ("udp-connected", "udp-unconnected"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    started = time.monotonic()
    try:
        if mode == "udp-connected":
            s.connect(target)
        for i in range(int(count)):
            if mode == "udp-connected":
                s.send(f"ping {i}".encode())
            else:
                s.sendto(f"ping {i}".encode(), target)
            data, source = s.recvfrom(4096)
            fields = dict(body=data.decode(), source=f"{source[0]}:{source[1]}")
            if mode == "udp-connected":
                fields["peer"] = peer(s)
            report(**fields)
    except OSError as e:
        failure(e, started)
elif mode == "udp-stream":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    started = time.monotonic()
    try:
        s.connect(target)
        report(peer=peer(s))
        i = 0
        while time.monotonic() - started < count:
            try:
                s.send(f"ping {i}".encode())
                data = s.recv(4096)
                report(body=data.decode())
            except socket.timeout:
                report(timeout=i)
            i += 1
            time.sleep(0.1)
    except OSError as e:
        failure(e, started)
else:
    sys.exit(f"unknown mode {mode}")
