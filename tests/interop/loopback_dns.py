"""A small authoritative DNS server on loopback whose A records a test changes while it runs.

gRPC's c-ares resolver takes a DNS server in the target's authority
(``dns://127.0.0.1:PORT/name:8500``), so a test can stand in for the DNS of a
Kubernetes headless Service: add an address when a replica becomes ready,
remove it before the replica stops.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

# Seconds resolvers may cache an answer: 0, as the test changes records while it runs.
TTL_S = 0


class _Records(BaseResolver):
    """Answers A queries for the names it holds; AAAA and other types get no records."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._addresses: dict[str, tuple[str, ...]] = {}
        self.queries = 0

    def set(self, name: str, addresses: Iterable[str]) -> None:
        with self._lock:
            self._addresses[_canonical(name)] = tuple(addresses)

    def get(self, name: str) -> tuple[str, ...]:
        with self._lock:
            return self._addresses.get(_canonical(name), ())

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        name = _canonical(str(request.q.qname))
        with self._lock:
            self.queries += 1
            addresses = self._addresses.get(name)
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for address in addresses:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=TTL_S))
        # Any other type of a known name: NOERROR without records (no IPv6 addresses).
        return reply


def _canonical(name: str) -> str:
    return name.rstrip(".").lower()


class LoopbackDns:
    """A DNS server on 127.0.0.1, UDP and TCP on the same free port (TCP for long answers).

    Use as a context manager; `set_addresses` changes a name's A records at once.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.records = _Records()
        quiet = DNSLogger(log="-recv,-send,-request,-reply,-truncated,-data", prefix=False)
        self._udp = DNSServer(self.records, address=host, port=0, logger=quiet)
        self.host = host
        self.port: int = self._udp.server.server_address[1]
        self._tcp = DNSServer(self.records, address=host, port=self.port, tcp=True, logger=quiet)

    def __enter__(self) -> LoopbackDns:
        self._udp.start_thread()
        self._tcp.start_thread()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for server in (self._udp, self._tcp):
            server.stop()
            server.server.server_close()

    def set_addresses(self, name: str, addresses: Iterable[str]) -> None:
        self.records.set(name, addresses)

    def addresses(self, name: str) -> tuple[str, ...]:
        return self.records.get(name)

    def target(self, name: str, port: int) -> str:
        """A gRPC target resolving `name` with this server: ``dns://HOST:PORT/name:port``."""
        return f"dns://{self.host}:{self.port}/{name}:{port}"
