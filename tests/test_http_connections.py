"""Sockets of the HTTP/WebSocket port: counted per client address from the accept, and closed when
a request's headers are late however they trickle in (a fake clock, no network)."""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from construct.http.camouflage import CamouflagedSite
from construct.http.site import REFUSAL_LINGER_SECONDS, ConstructSite
from construct.protocol.connection import AddressCounts
from construct.protocol.timeouts import ConnectionLimits

REQUEST = b"GET /ok HTTP/1.1\r\nHost: chat.example.org\r\n\r\n"


class _Ok(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"ok"


def _site(per_address: int = 2, header_timeout: float = 10, kind: type = ConstructSite):
    clock = task.Clock()
    root = Resource()
    root.putChild(b"ok", _Ok())
    limits = ConnectionLimits(per_address=per_address, header_timeout=header_timeout)
    addresses = AddressCounts(per_address)
    return kind(root, 1024, addresses, limits, clock), addresses, clock


def _connect(site, host: str = "203.0.113.5"):
    channel = site.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    channel.makeConnection(transport)
    return channel, transport


def _gone(channel, transport) -> None:
    """What the reactor does once a closed socket is gone."""
    channel.connectionLost(Failure(ConnectionDone()))


def test_a_request_trickled_in_a_byte_at_a_time_is_cut_at_the_deadline_from_the_accept():
    site, addresses, clock = _site(header_timeout=10)
    channel, transport = _connect(site)
    # One byte a second: twisted.web's idle timeout (75 s) would start again at each of them.
    for byte in b"GET /ws HTTP/1.1\r\nHost: x\r\n"[:9]:
        clock.advance(1)
        channel.dataReceived(bytes([byte]))
    assert not transport.disconnected
    clock.advance(1)
    assert transport.disconnected, "10 s after the accept, whatever arrived meanwhile"
    _gone(channel, transport)
    assert addresses._open == {}


def test_a_silent_socket_is_cut_at_the_deadline_and_a_prompt_request_is_served():
    site, _, clock = _site(header_timeout=10)
    silent, silent_transport = _connect(site)
    prompt, prompt_transport = _connect(site, "198.51.100.1")
    prompt.dataReceived(REQUEST)
    assert prompt_transport.value().startswith(b"HTTP/1.1 200") and prompt_transport.value().endswith(b"ok")
    clock.advance(10)
    assert silent_transport.disconnected
    # Kept alive and idle between requests (twisted.web's idle timeout covers that): no deadline
    # runs until the next request begins, and then its own.
    clock.advance(30)
    assert not prompt_transport.disconnected
    prompt.dataReceived(REQUEST[:5])
    clock.advance(9)
    assert not prompt_transport.disconnected
    clock.advance(1)
    assert prompt_transport.disconnected


def test_sockets_are_counted_per_address_from_the_accept_and_refused_past_the_limit():
    site, addresses, clock = _site(per_address=2)
    held = [_connect(site) for _ in range(2)]  # silent: they count all the same
    other, other_transport = _connect(site, "198.51.100.1")
    refused, refused_transport = _connect(site)
    answer = refused_transport.value()
    assert answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n") and b"Retry-After: 10\r\n" in answer
    assert b'"code":"RATE_LIMITED"' in answer and b"At most 2 connections per address" in answer
    # Closed once its request is read, so the client reads the answer before the socket goes.
    assert not refused_transport.disconnecting
    refused.dataReceived(REQUEST)
    assert refused_transport.disconnecting and refused_transport.value() == answer
    _gone(refused, refused_transport)
    # One that never sends is not held for long either.
    silent_refused, silent_refused_transport = _connect(site)
    clock.advance(REFUSAL_LINGER_SECONDS)
    assert silent_refused_transport.disconnected
    _gone(silent_refused, silent_refused_transport)
    assert addresses._open == {"203.0.113.5": 2, "198.51.100.1": 1}
    # A closed socket frees its slot.
    _gone(*held[0])
    again, again_transport = _connect(site)
    again.dataReceived(REQUEST)
    assert again_transport.value().startswith(b"HTTP/1.1 200")
    assert not other_transport.disconnecting


def test_behind_the_proxy_protocol_a_socket_is_counted_at_its_first_bytes():
    """Only then does getPeer() give the client's address (not the proxy's)."""
    site, addresses, _ = _site(per_address=1)
    site.proxied = True
    channel, transport = _connect(site)
    assert addresses._open == {}
    channel.dataReceived(REQUEST)
    assert addresses._open == {"203.0.113.5": 1} and transport.value().startswith(b"HTTP/1.1 200")
    refused, refused_transport = _connect(site)
    refused.dataReceived(REQUEST)
    assert refused_transport.value().startswith(b"HTTP/1.1 429") and refused_transport.disconnecting


def test_the_camouflaged_site_refuses_as_nginx_does():
    site, _, _ = _site(per_address=1, kind=CamouflagedSite)
    _connect(site)
    _, transport = _connect(site)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 503 Service Temporarily Unavailable\r\nServer: nginx\r\n")
    assert b"Construct" not in answer and b"RATE_LIMITED" not in answer
