"""ZeroMQ sockets built under the project's wire rules: size limits, no linger, CurveZMQ beyond loopback.

Every role builds its sockets here so that the rules live in one place: a service that binds to
anything but loopback must have CurveZMQ keys (so no one joins a run who was not given a key), every
socket has a hard maximum message size, and sockets never block process exit on unsent messages.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from common.config import TransportConfig

KEYS_HINT = "run `at2po keys gen --out DIR --name NAME` to create a key pair"


class SecurityError(RuntimeError):
    """The transport configuration would expose a socket or cannot be honoured; names the config key."""


def is_loopback_endpoint(endpoint: str) -> bool:
    """True when only this machine can reach the endpoint (ipc, inproc, tcp on a loopback address).

    Conservative on purpose: wildcards, interface names and host names other than `localhost`
    count as reachable from outside, because what they resolve to is not known here.
    """
    scheme, sep, address = endpoint.partition("://")
    if not sep:
        return False
    scheme = scheme.lower()
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    # `source;destination` (connect with an explicit source): every part must be loopback.
    return all(_is_loopback_tcp_address(part) for part in address.split(";"))


def _is_loopback_tcp_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


@dataclass
class ServerSocket:
    """A bound socket plus the ZAP authenticator that guards it (None when running without keys)."""

    socket: zmq.Socket
    authenticator: ThreadAuthenticator | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint actually bound (resolves `tcp://host:*` to the chosen port)."""
        value = self.socket.getsockopt(zmq.LAST_ENDPOINT)
        return value.decode() if isinstance(value, bytes) else str(value)

    def close(self) -> None:
        """Close the socket without lingering, then release the context's authenticator."""
        if not self.socket.closed:
            self.socket.close(linger=0)
        if self.authenticator is not None:
            _release_authenticator(self.authenticator)
            self.authenticator = None

    def __enter__(self) -> ServerSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# libzmq has one ZAP endpoint per context (inproc://zeromq.zap.01), so every CURVE server socket of a
# context must share one authenticator; it is reference-counted and stopped with its last socket.
_auth_lock = threading.Lock()
_authenticators: dict[int, tuple[ThreadAuthenticator, Path, int]] = {}


def _acquire_authenticator(ctx: zmq.Context, keys_dir: Path) -> ThreadAuthenticator:
    with _auth_lock:
        entry = _authenticators.get(id(ctx))
        if entry is not None and not (entry[0].context is ctx and entry[0].is_alive()):
            # A dead handler would leave CURVE open to any client: never reuse it.
            del _authenticators[id(ctx)]
            entry = None
        if entry is not None:
            auth, current_dir, users = entry
            if current_dir != keys_dir:
                raise SecurityError(
                    f"transport.authorized_keys_dir: this ZeroMQ context already authenticates against "
                    f"{current_dir}; a second directory ({keys_dir}) needs its own context"
                )
            _authenticators[id(ctx)] = (auth, current_dir, users + 1)
            return auth
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(keys_dir))
        _authenticators[id(ctx)] = (auth, keys_dir, 1)
        return auth


def _release_authenticator(auth: ThreadAuthenticator) -> None:
    with _auth_lock:
        for key, (known, keys_dir, users) in list(_authenticators.items()):
            if known is auth:
                if users > 1:
                    _authenticators[key] = (known, keys_dir, users - 1)
                    return
                del _authenticators[key]
                break
    auth.stop()


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CURVE support; CurveZMQ keys cannot be used")


def _load_keys(path_text: str, config_key: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    path = Path(path_text).expanduser()
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise SecurityError(f"{config_key}: cannot read key file {path}: {error}. {KEYS_HINT}") from None
    if need_secret and not secret:
        raise SecurityError(
            f"{config_key}: {path} holds no secret key; give the `.key_secret` file written by `at2po keys gen`"
        )
    return public, secret


def _authorized_dir(path_text: str) -> Path:
    path = Path(path_text).expanduser().resolve()
    if not path.is_dir():
        raise SecurityError(f"transport.authorized_keys_dir: {path} is not a directory. {KEYS_HINT}")
    if not any(path.glob("*.key")):
        # libzmq would silently refuse every client; say so now instead of hanging later.
        raise SecurityError(
            f"transport.authorized_keys_dir: {path} holds no client `.key` files, so no client could "
            "connect; copy each client's public `.key` file there"
        )
    return path


def _apply_limits(sock: zmq.Socket, transport: TransportConfig) -> None:
    # A hard guard against memory blow-up; the application checks max_message_bytes itself and answers
    # an oversized request with an error, so the socket limit sits well above it.
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * transport.max_message_bytes)
    sock.setsockopt(zmq.LINGER, 0)


def bind_server_socket(ctx: zmq.Context, socket_type: int, endpoint: str, transport: TransportConfig) -> ServerSocket:
    """Create and bind a service socket; refuses a non-loopback endpoint without CurveZMQ keys."""
    secret_file = transport.server_secret_key
    keys_dir = transport.authorized_keys_dir
    if secret_file is None or keys_dir is None:
        missing = " and ".join(
            name
            for name, value in (
                ("transport.server_secret_key", secret_file),
                ("transport.authorized_keys_dir", keys_dir),
            )
            if value is None
        )
        if not is_loopback_endpoint(endpoint):
            raise SecurityError(
                f"binding {endpoint} is reachable beyond this machine and needs CurveZMQ keys: set "
                f"{missing} ({KEYS_HINT}; then put the clients' public `.key` files in the "
                "authorized_keys_dir), or bind a loopback endpoint such as tcp://127.0.0.1:PORT"
            )
        if secret_file is not None or keys_dir is not None:
            raise SecurityError(f"CurveZMQ is half configured: {missing} is unset. {KEYS_HINT}")

    authenticator: ThreadAuthenticator | None = None
    sock = ctx.socket(socket_type)
    try:
        _apply_limits(sock, transport)
        if secret_file is not None and keys_dir is not None:
            _require_curve()
            public, secret = _load_keys(secret_file, "transport.server_secret_key", need_secret=True)
            allowed_dir = _authorized_dir(keys_dir)
            # The authenticator must run before the bind: a CURVE server with no ZAP handler on its
            # context accepts every client that knows the server's public key.
            authenticator = _acquire_authenticator(ctx, allowed_dir)
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_server = True
        sock.bind(endpoint)
    except BaseException:
        sock.close(linger=0)
        if authenticator is not None:
            _release_authenticator(authenticator)
        raise
    return ServerSocket(socket=sock, authenticator=authenticator)


def connect_client_socket(ctx: zmq.Context, socket_type: int, endpoint: str, transport: TransportConfig) -> zmq.Socket:
    """Create and connect a client socket, with CurveZMQ when the service's public key is configured."""
    if transport.server_public_key is None and transport.client_secret_key is not None:
        raise SecurityError(
            "transport.client_secret_key is set but transport.server_public_key is not; a client needs "
            "the service's public `.key` file to use CurveZMQ"
        )
    sock = ctx.socket(socket_type)
    try:
        _apply_limits(sock, transport)
        if transport.server_public_key is not None:
            if transport.client_secret_key is None:
                raise SecurityError(
                    "transport.server_public_key is set but transport.client_secret_key is not; the "
                    f"client needs its own key pair too ({KEYS_HINT}, and put its `.key` file in the "
                    "service's authorized_keys_dir)"
                )
            _require_curve()
            server_public, _ = _load_keys(transport.server_public_key, "transport.server_public_key", need_secret=False)
            public, secret = _load_keys(transport.client_secret_key, "transport.client_secret_key", True)
            sock.curve_serverkey = server_public
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def generate_keypair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write `NAME.key` (public) and `NAME.key_secret` (mode 0600) into out_dir; never overwrites.

    The files are written in a private temporary directory and hard-linked into place, so the secret
    is never world-readable and an existing key is never replaced, even by a concurrent run.
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\x00" in name:
        raise ValueError(f"key name {name!r} must be a plain file name")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public_path = out_dir / f"{name}.key"
    secret_path = out_dir / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; refusing to overwrite a key (pick another name)")
    staging = Path(tempfile.mkdtemp(prefix=".keygen-", dir=out_dir))  # mode 0700
    placed: list[Path] = []
    try:
        tmp_public, tmp_secret = (Path(p) for p in zmq.auth.create_certificates(staging, name))
        tmp_secret.chmod(0o600)
        tmp_public.chmod(0o644)
        for source, target in ((tmp_public, public_path), (tmp_secret, secret_path)):
            try:
                os.link(source, target)
            except FileExistsError:
                raise FileExistsError(
                    f"{target} already exists; refusing to overwrite a key (pick another name)"
                ) from None
            placed.append(target)
    except BaseException:
        for path in placed:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return public_path, secret_path
