"""CurveZMQ over real loopback TCP sockets: who gets an answer, who does not, and what is refused."""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from common.config import TransportConfig
from common.transport import (
    SecurityError,
    ServerSocket,
    bind_server_socket,
    connect_client_socket,
    generate_keypair,
    is_loopback_endpoint,
)

NO_ANSWER_MS = 800


@dataclass
class Keys:
    server_public: Path
    server_secret: Path
    client_secret: Path
    stranger_secret: Path
    authorized_dir: Path

    def server(self, **overrides: object) -> TransportConfig:
        fields: dict[str, object] = {
            "server_secret_key": str(self.server_secret),
            "authorized_keys_dir": str(self.authorized_dir),
        }
        return TransportConfig.model_validate({**fields, **overrides})

    def client(self, secret: Path | None = None) -> TransportConfig:
        return TransportConfig(
            server_public_key=str(self.server_public), client_secret_key=str(secret or self.client_secret)
        )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    root = tmp_path_factory.mktemp("keys")
    server_public, server_secret = generate_keypair(root / "server", "replay")
    client_public, client_secret = generate_keypair(root / "clients", "actor-0")
    _, stranger_secret = generate_keypair(root / "strangers", "stranger")
    authorized = root / "authorized"
    authorized.mkdir()
    (authorized / client_public.name).write_bytes(client_public.read_bytes())
    return Keys(server_public, server_secret, client_secret, stranger_secret, authorized)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def servers(ctx: zmq.Context) -> Iterator[list[ServerSocket]]:
    """Server sockets a test opened; closed (authenticator stopped) before the context is destroyed."""
    opened: list[ServerSocket] = []
    yield opened
    for server in opened:
        server.close()


class EchoLoop:
    """A ROUTER echo service on its own thread; counts what actually reached the application."""

    def __init__(self, server: ServerSocket) -> None:
        self.server = server
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self.server.socket
        while not self._stop.is_set():
            if sock.poll(20):
                frames = sock.recv_multipart()
                self.received += 1
                sock.send_multipart(frames)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()


@pytest.fixture
def echo_server(ctx: zmq.Context, keys: Keys, servers: list[ServerSocket]) -> Iterator[tuple[EchoLoop, str]]:
    """A CURVE echo service bound on all interfaces (the real deployment case), reached via loopback."""
    server = bind_server_socket(ctx, zmq.ROUTER, "tcp://0.0.0.0:*", keys.server())
    servers.append(server)
    port = server.endpoint.rsplit(":", 1)[1]
    loop = EchoLoop(server)
    yield loop, f"tcp://127.0.0.1:{port}"
    loop.stop()


def _request(sock: zmq.Socket, payload: bytes, timeout_ms: int = 2000) -> bytes | None:
    sock.send(payload)
    if not sock.poll(timeout_ms):
        return None
    return sock.recv()


# (a) exposure without keys
@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5599", "tcp://*:5599", "tcp://192.0.2.1:5599"])
def test_non_loopback_bind_without_keys_is_refused(ctx: zmq.Context, endpoint: str) -> None:
    with pytest.raises(SecurityError) as info:
        bind_server_socket(ctx, zmq.ROUTER, endpoint, TransportConfig())
    message = str(info.value)
    assert "transport.server_secret_key" in message
    assert "transport.authorized_keys_dir" in message
    assert "at2po keys gen" in message


def test_non_loopback_bind_with_only_secret_key_names_missing_dir(ctx: zmq.Context, keys: Keys) -> None:
    transport = TransportConfig(server_secret_key=str(keys.server_secret))
    with pytest.raises(SecurityError) as info:
        bind_server_socket(ctx, zmq.ROUTER, "tcp://0.0.0.0:*", transport)
    assert "set transport.authorized_keys_dir (" in str(info.value)


def test_loopback_without_keys_binds_and_answers(ctx: zmq.Context, servers: list[ServerSocket]) -> None:
    transport = TransportConfig(max_message_bytes=4096)
    server = bind_server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", transport)
    servers.append(server)
    assert server.authenticator is None
    assert server.socket.getsockopt(zmq.MAXMSGSIZE) == 2 * 4096
    assert server.socket.getsockopt(zmq.LINGER) == 0
    loop = EchoLoop(server)
    try:
        client = connect_client_socket(ctx, zmq.DEALER, server.endpoint, transport)
        assert client.getsockopt(zmq.MAXMSGSIZE) == 2 * 4096
        assert _request(client, b"plain") == b"plain"
    finally:
        loop.stop()


# (b) the authorised client
def test_authorised_client_gets_echo(ctx: zmq.Context, keys: Keys, echo_server: tuple[EchoLoop, str]) -> None:
    loop, endpoint = echo_server
    assert loop.server.authenticator is not None
    assert loop.server.socket.curve_server
    client = connect_client_socket(ctx, zmq.DEALER, endpoint, keys.client())
    assert _request(client, b"hello over curve") == b"hello over curve"
    assert loop.received == 1


# (c) a key pair the service was not given
def test_unauthorised_key_gets_no_answer(ctx: zmq.Context, keys: Keys, echo_server: tuple[EchoLoop, str]) -> None:
    loop, endpoint = echo_server
    stranger = connect_client_socket(ctx, zmq.DEALER, endpoint, keys.client(secret=keys.stranger_secret))
    monitor = stranger.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        assert _request(stranger, b"let me in", timeout_ms=NO_ANSWER_MS) is None
        # The refusal came from the ZAP handler (status 400), not from a dead server.
        assert monitor.poll(1000), "expected a handshake auth failure event"
        event = recv_monitor_message(monitor)
        assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert event["value"] == 400
    finally:
        stranger.disable_monitor()
        monitor.close(linger=0)
    assert loop.received == 0
    # The same service still answers the authorised client.
    client = connect_client_socket(ctx, zmq.DEALER, endpoint, keys.client())
    assert _request(client, b"ok") == b"ok"
    assert loop.received == 1


# (d) no CURVE at all
def test_plain_client_gets_no_answer(ctx: zmq.Context, echo_server: tuple[EchoLoop, str]) -> None:
    loop, endpoint = echo_server
    plain = connect_client_socket(ctx, zmq.DEALER, endpoint, TransportConfig())
    assert plain.getsockopt(zmq.MECHANISM) == zmq.NULL
    assert _request(plain, b"anyone home?", timeout_ms=NO_ANSWER_MS) is None
    assert loop.received == 0


# (e) half-configured client
def test_client_with_server_key_but_no_secret_is_refused(ctx: zmq.Context, keys: Keys) -> None:
    transport = TransportConfig(server_public_key=str(keys.server_public))
    with pytest.raises(SecurityError, match=r"transport\.client_secret_key"):
        connect_client_socket(ctx, zmq.DEALER, "tcp://127.0.0.1:5599", transport)


def test_client_secret_without_server_key_is_refused(ctx: zmq.Context, keys: Keys) -> None:
    transport = TransportConfig(client_secret_key=str(keys.client_secret))
    with pytest.raises(SecurityError, match=r"transport\.server_public_key"):
        connect_client_socket(ctx, zmq.DEALER, "tcp://127.0.0.1:5599", transport)


def test_public_key_file_given_as_client_secret_is_refused(ctx: zmq.Context, keys: Keys) -> None:
    with pytest.raises(SecurityError, match=r"transport\.client_secret_key.*no secret key"):
        connect_client_socket(ctx, zmq.DEALER, "tcp://127.0.0.1:5599", keys.client(secret=keys.server_public))


def test_missing_key_files_name_the_config_key(ctx: zmq.Context, keys: Keys, tmp_path: Path) -> None:
    missing = tmp_path / "nope.key_secret"
    bad_secret = TransportConfig(server_secret_key=str(missing), authorized_keys_dir=str(keys.authorized_dir))
    with pytest.raises(SecurityError, match=r"transport\.server_secret_key.*nope\.key_secret"):
        bind_server_socket(ctx, zmq.ROUTER, "tcp://0.0.0.0:*", bad_secret)
    bad_dir = keys.server(authorized_keys_dir=str(tmp_path / "absent"))
    with pytest.raises(SecurityError, match=r"transport\.authorized_keys_dir.*absent"):
        bind_server_socket(ctx, zmq.ROUTER, "tcp://0.0.0.0:*", bad_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SecurityError, match=r"transport\.authorized_keys_dir.*no client"):
        bind_server_socket(ctx, zmq.ROUTER, "tcp://0.0.0.0:*", keys.server(authorized_keys_dir=str(empty)))
    client = TransportConfig(server_public_key=str(missing), client_secret_key=str(keys.client_secret))
    with pytest.raises(SecurityError, match=r"transport\.server_public_key"):
        connect_client_socket(ctx, zmq.DEALER, "tcp://127.0.0.1:5599", client)


def test_two_servers_share_one_authenticator(ctx: zmq.Context, keys: Keys, servers: list[ServerSocket]) -> None:
    first = bind_server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", keys.server())
    servers.append(first)
    second = bind_server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", keys.server())
    servers.append(second)
    assert first.authenticator is second.authenticator
    auth = first.authenticator
    assert auth is not None
    first.close()
    assert auth.is_alive(), "the authenticator must outlive the first of two sockets"
    loop = EchoLoop(second)
    try:
        client = connect_client_socket(ctx, zmq.DEALER, second.endpoint, keys.client())
        assert _request(client, b"still guarded") == b"still guarded"
    finally:
        loop.stop()
    second.close()
    assert not auth.is_alive()


def test_oversized_frame_is_dropped_by_the_socket(ctx: zmq.Context, keys: Keys, servers: list[ServerSocket]) -> None:
    server = bind_server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", keys.server(max_message_bytes=2048))
    servers.append(server)
    loop = EchoLoop(server)
    try:
        client_config = keys.client()
        client_config.max_message_bytes = 2048
        client = connect_client_socket(ctx, zmq.DEALER, server.endpoint, client_config)
        assert _request(client, b"x" * 3000) == b"x" * 3000  # above the app limit, below the hard guard
        assert _request(client, b"y" * 5000, timeout_ms=NO_ANSWER_MS) is None  # above 2 x 2048
        assert loop.received == 1
    finally:
        loop.stop()


# (f)
@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("ipc:///tmp/at2po.sock", True),
        ("inproc://replay", True),
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.1:*", True),
        ("tcp://127.1.2.3:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://LOCALHOST:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://127.0.0.1:5555;127.0.0.1:5556", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://192.168.1.10:5555", False),
        ("tcp://10.0.0.1:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://lo:5555", False),
        ("tcp://replay.example.org:5555", False),
        ("tcp://127.0.0.1", False),
        ("tcp://10.0.0.1:5555;127.0.0.1:5556", False),
        ("ws://127.0.0.1:5555", False),
        ("pgm://eth0;239.192.1.1:5555", False),
        ("127.0.0.1:5555", False),
    ],
)
def test_is_loopback_endpoint(endpoint: str, expected: bool) -> None:
    assert is_loopback_endpoint(endpoint) is expected


def test_generate_keypair_secret_is_private_and_never_overwritten(tmp_path: Path) -> None:
    public, secret = generate_keypair(tmp_path / "k", "svc")
    assert (public.name, secret.name) == ("svc.key", "svc.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" in secret.read_text() and "secret-key" not in public.read_text()
    before = secret.read_bytes()
    with pytest.raises(FileExistsError, match=r"svc\.key"):
        generate_keypair(tmp_path / "k", "svc")
    assert secret.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["svc.key", "svc.key_secret"]
    public.unlink()  # one half present is still refused
    with pytest.raises(FileExistsError, match=r"svc\.key_secret"):
        generate_keypair(tmp_path / "k", "svc")
    with pytest.raises(ValueError, match="plain file name"):
        generate_keypair(tmp_path / "k", "../evil")
