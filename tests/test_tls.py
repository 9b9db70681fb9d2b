"""TLS on every listener through endpoint strings, checked by clients that verify the certificate."""

from __future__ import annotations

import datetime
import ipaddress
import json

import pytest
import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseNeverReceived

from construct.protocol import codec
from tests.clients import TcpClient, WsClient, _LineProtocol, _WsProtocol
from tests.helpers import PASSWORD, make_bundle
from tests.processes import ServerProcess

pytestmark = pytest.mark.integration


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(directory) -> tuple[bytes, bytes]:
    """A throwaway CA and a server certificate for localhost and 127.0.0.1; returns (CA PEM, other CA PEM)."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def ca(name: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = ca("Construct test CA")
    _, other_cert = ca("Some other CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "server.key").write_bytes(
        server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "server.crt").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    pem = serialization.Encoding.PEM
    return ca_cert.public_bytes(pem), other_cert.public_bytes(pem)


def _tls_endpoint(port: int, ca_pem: bytes):
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca_pem))
    return wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))


async def _wss(port: int, ca_pem: bytes, path: str = "/ws") -> WsClient:
    client = WsClient(codec.MSGPACK)
    factory = WebSocketClientFactory(f"wss://localhost:{port}{path}")
    factory.protocol = _WsProtocol
    factory.client = client
    factory.opened = defer.Deferred()
    await _tls_endpoint(port, ca_pem).connect(factory)
    await factory.opened.addTimeout(10, reactor)
    return client


async def _tls_lines(port: int, ca_pem: bytes) -> TcpClient:
    client = TcpClient()
    client.protocol = await _tls_endpoint(port, ca_pem).connect(protocol.Factory.forProtocol(_LineProtocol))
    client.protocol.client = client
    return client


@pytest_twisted.ensureDeferred
async def test_tls_on_websocket_tcp_http_and_health(tmp_path):
    """With ssl: endpoints, verifying clients reach every listener; a client trusting another CA is refused."""
    ca_pem, other_ca_pem = make_certificates(tmp_path)
    tls = f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'server.key'}:certKey={tmp_path / 'server.crt'}"
    server = ServerProcess(
        tmp_path, "--data-dir", "data", "--bcrypt-cost", "4", "--listen", tls, "--tcp", tls, "--health", tls
    ).start()
    try:
        ws = await _wss(server.ports["http"], ca_pem)
        reply = await ws.request("register", {"username": "alice", "password": PASSWORD, "publicKey": make_bundle()})
        assert reply["type"] == "registerSuccess"

        lines = await _tls_lines(server.ports["tcp"], ca_pem)
        assert (await lines.request("login", {"username": "alice", "password": PASSWORD}))["type"] == "loginSuccess"

        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca_pem)))
        http = treq.client.HTTPClient(agent)
        response = await http.post(
            f"https://localhost:{server.ports['http']}/v1/sessions",
            data=json.dumps({"username": "alice", "password": PASSWORD}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert response.code == 200 and (await response.json())["username"] == "alice"
        health = await http.get(f"https://localhost:{server.ports['health']}/health")
        assert health.code == 200

        with pytest.raises(ConnectionError, match="certificate verify failed"):
            await _wss(server.ports["http"], other_ca_pem)
        untrusting = treq.client.HTTPClient(
            Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(other_ca_pem)))
        )
        with pytest.raises(ResponseNeverReceived) as refused:
            await untrusting.get(f"https://localhost:{server.ports['health']}/health")
        assert "certificate verify failed" in repr(refused.value.reasons[0].value)
        await ws.close()
        await lines.close()
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_timeouts_close_tls_connections_too(tmp_path):
    """Over ssl: TCP and WebSocket, a connection that does not authenticate in time is told so and closed."""
    ca_pem, _ = make_certificates(tmp_path)
    tls = f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'server.key'}:certKey={tmp_path / 'server.crt'}"
    server = await ServerProcess(
        tmp_path, "--bcrypt-cost", "4", "--listen", tls, "--tcp", tls, "--auth-timeout", "1"
    ).start_async()
    try:
        lines = await _tls_lines(server.ports["tcp"], ca_pem)
        ws = await _wss(server.ports["http"], ca_pem)
        for client in (lines, ws):
            assert (await client.request("ping"))["type"] == "pong"
        for client in (lines, ws):
            # The sweep runs every 5 seconds.
            await client.closed.addTimeout(15, reactor)
            assert (await client.next_of("error"))["payload"]["code"] == "CONNECTION_TIMEOUT"
    finally:
        server.stop()
