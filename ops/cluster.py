"""`at2po cluster`: replay, the actors and the learner as Ray actors on an existing Ray cluster.

Ray only places the roles and keeps them alive; the data plane stays ZeroMQ + LMDB, exactly as when
the roles are started by hand (`ops/deploy/README.md`). Decided here:

- **One Ray actor per role** (`RoleHost`): detached, named `replay`, `learner`, `actor-0`.. in the
  Ray namespace `cluster.name` (so `status` and `stop` from another driver find them), with the
  CPUs/GPUs the `cluster` section asks for, replay pinned to `cluster.replay_node_ip` (its disk) when
  set, and Ray's `max_restarts = cluster.max_restarts` for the actor itself (a lost worker or node).
- The host runs the role's own CLI command (`at2po replay serve | actor run | learner run --config
  F`) as a child process on its node and restarts it when it exits non-zero, up to
  `cluster.max_restarts` times (the learner restarts with `--resume`, also when Ray re-created its
  host); a clean exit is `finished`. The child gets SIGTERM when its host dies (PR_SET_PDEATHSIG),
  so a killed Ray actor leaves no orphan holding the ports or the store.
- **No shared file system is needed for the run itself**: the driver sends the config as TOML text
  (and the run's keys); each host writes `<cluster.node_dir>/<name>/<role>/config.toml` with the
  role's own settings (endpoints, key files, `actor.actor_id`, `actor.seed + i`, its own
  `logging.metrics_path` as `<stem>.<role><suffix>`) and appends the role's output to `role.log`
  beside it. The model directory and the task data must be at the same paths on every node; roles
  run in `cluster.cwd` (default: the driver's working directory), where relative paths resolve.
- **Endpoints**: replay and the learner bind on their node's IP (the address Ray knows the node
  by), on a free port there (or the configured port with `cluster.fixed_ports`). Clients ask the
  named replay/learner hosts for the endpoints each time their process (re)starts. A host that Ray
  re-creates on the same node takes its previous ports back (waiting for the old process to let
  go), so clients that kept the old endpoint reconnect without a restart.
- **Keys**: binding beyond loopback needs CurveZMQ keys (`common/transport.py`; 127.0.0.0/8 counts
  as loopback there). With `cluster.curve_keys = "generate"` (or `"auto"` on a cluster with a
  non-loopback node and no `transport.*` keys configured) the driver makes one server key pair
  (replay and the learner's weight sockets share it: a client has one `server_public_key`), one
  client pair per role and one for the operator. They travel to the hosts as actor arguments (held
  by Ray's control plane, which token auth protects) and are written 0600 into the role's
  directory; the operator's go to `<cluster.node_dir>/<name>/operator/` on the driver's machine, for
  `at2po replay stats`. `stop` deletes them. With `"config"` the `transport.*` key files are used as
  given and must exist on every node.
- **Order**: replay first (the driver waits until it accepts connections), then the learner, then
  the actors; if placing fails, the hosts this launch created are removed (never another run's).
  `stop` sends SIGTERM to the actors, then the learner (which checkpoints), then replay (which
  commits what it acked), each with `cluster.stop_grace_s` before SIGKILL, and then removes the
  named actors.
- **Logs**: each host keeps the last `LOG_LINES_KEPT` lines of its role's output; `at2po cluster run`
  polls them and prints them prefixed with `role@node`. Lines the driver missed stay in `role.log`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from common.config import ClusterConfig, RunConfig, build_config, dump_config
from common.transport import generate_keypair, is_loopback_endpoint

RoleKind = Literal["replay", "learner", "actor"]
RoleState = Literal["starting", "running", "finished", "failed", "stopping", "stopped"]

REPLAY, LEARNER = "replay", "learner"
ROLE_COMMANDS: dict[RoleKind, tuple[str, str]] = {
    "replay": ("replay", "serve"),
    "learner": ("learner", "run"),
    "actor": ("actor", "run"),
}
# The endpoints each binding role owns (TransportConfig keys).
BIND_KEYS: dict[RoleKind, tuple[str, ...]] = {
    "replay": ("replay_endpoint",),
    "learner": ("weights_pub_endpoint", "weights_endpoint"),
    "actor": (),
}
LOG_LINES_KEPT = 5000
RESTART_BACKOFF_S = 1.0
PORT_REUSE_WAIT_S = 20.0


class ClusterError(RuntimeError):
    """The run cannot be placed or started on this Ray cluster; the message says why."""


# ------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RolePlan:
    """Where and with what one role runs (what the Ray actor options are made from)."""

    name: str
    kind: RoleKind
    index: int
    cpus: float
    gpus: float
    node_ip: str | None = None


def plan_roles(cluster: ClusterConfig) -> list[RolePlan]:
    """The run's roles in start order: replay, the learner (if any), then the actors."""
    roles = [RolePlan(REPLAY, "replay", 0, cluster.replay_cpus, 0.0, cluster.replay_node_ip)]
    if cluster.learner:
        roles.append(RolePlan(LEARNER, "learner", 0, cluster.learner_cpus, cluster.learner_gpus))
    roles.extend(
        RolePlan(f"actor-{i}", "actor", i, cluster.actor_cpus, cluster.actor_gpus) for i in range(cluster.actors)
    )
    return roles


def stop_order(names: Iterable[str]) -> list[list[str]]:
    """Actors first (nothing new is generated), then the learner (checkpoints), then replay, then the rest."""
    names = list(names)
    actors = sorted(n for n in names if n.startswith("actor-"))
    groups = [actors, [n for n in names if n == LEARNER], [n for n in names if n == REPLAY]]
    known = {n for group in groups for n in group}
    groups.append(sorted(n for n in names if n not in known))
    return [group for group in groups if group]


def wants_generated_keys(config: RunConfig, node_ips: Sequence[str]) -> bool:
    """Whether the driver makes CurveZMQ keys for this run (see `cluster.curve_keys`)."""
    mode = config.cluster.curve_keys
    if mode != "auto":
        return mode == "generate"
    if config.transport.server_secret_key is not None or config.transport.server_public_key is not None:
        return False
    return not all(is_loopback_endpoint(f"tcp://[{ip}]:1" if ":" in ip else f"tcp://{ip}:1") for ip in node_ips)


# ---------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyPair:
    public: str  # the text of `NAME.key`
    secret: str  # the text of `NAME.key_secret`


@dataclass(frozen=True)
class RunKeys:
    """The run's CurveZMQ keys: one server pair (replay and the learner's weights) and one pair per client role."""

    server: KeyPair
    clients: dict[str, KeyPair]


def generate_run_keys(client_names: Iterable[str]) -> RunKeys:
    """Fresh key pairs made with `at2po keys gen`'s code, read back as text (the files are removed)."""
    staging = Path(tempfile.mkdtemp(prefix="at2po-keys-"))
    try:

        def pair(name: str) -> KeyPair:
            public, secret = generate_keypair(staging, name)
            return KeyPair(public.read_text(encoding="utf-8"), secret.read_text(encoding="utf-8"))

        return RunKeys(server=pair("server"), clients={name: pair(name) for name in client_names})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def role_key_files(keys: RunKeys, name: str, kind: RoleKind) -> dict[str, str]:
    """The key files one role needs, as relative path -> text (secrets only for the role that owns them)."""
    files = {"server.key": keys.server.public}
    if BIND_KEYS[kind]:
        files["server.key_secret"] = keys.server.secret
        files.update({f"authorized/{client}.key": pair.public for client, pair in keys.clients.items()})
    if kind != "replay":
        files[f"{name}.key"] = keys.clients[name].public
        files[f"{name}.key_secret"] = keys.clients[name].secret
    return files


def key_settings(name: str, kind: RoleKind, keys_dir: Path) -> dict[str, str]:
    """The `transport.*` key paths of a role whose key files were written into keys_dir."""
    settings = {"server_public_key": str(keys_dir / "server.key")}
    if BIND_KEYS[kind]:
        settings["server_secret_key"] = str(keys_dir / "server.key_secret")
        settings["authorized_keys_dir"] = str(keys_dir / "authorized")
    if kind != "replay":
        settings["client_secret_key"] = str(keys_dir / f"{name}.key_secret")
    else:
        del settings["server_public_key"]  # replay is never a client
    return settings


def write_key_files(keys_dir: Path, files: dict[str, str]) -> None:
    """Write key files with the modes `at2po keys gen` uses (secrets 0600, directories 0700)."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for relative, text in files.items():
        path = keys_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if "secret" in relative else 0o644)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)


# -------------------------------------------------------------------------------- the role's config


@dataclass(frozen=True)
class RoleLaunch:
    """Everything a host needs to run its role; sent once as the Ray actor's argument."""

    name: str
    kind: RoleKind
    index: int
    namespace: str
    config_text: str
    cwd: str
    key_files: dict[str, str] = field(default_factory=dict)
    replay_actor: str | None = None
    learner_actor: str | None = None


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """`tcp://host:port` -> (host, port)."""
    scheme, sep, address = endpoint.partition("://")
    host, colon, port = address.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not host or not port.isdigit():
        raise ClusterError(f"endpoint {endpoint!r} is not tcp://HOST:PORT; cluster roles bind TCP endpoints")
    return host.strip("[]"), int(port)


def free_port(host: str, preferred: int | None = None, wait_s: float = 0.0) -> int:
    """A TCP port free on host right now (the role binds it moments later): `preferred` if it is or
    becomes free within wait_s, else any."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + wait_s
    while preferred is not None:
        with socket.socket(family) as probe:
            # As ZeroMQ binds: connections of the previous process in TIME_WAIT do not block the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, preferred))
                return preferred
            except OSError:
                pass
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def bind_endpoints(
    kind: RoleKind, transport: dict[str, Any], host: str, fixed_ports: bool, previous: dict[str, str] | None = None
) -> dict[str, str]:
    """The endpoints a binding role takes on its node: the node IP and the configured port, or a free port
    (the one a previous host of this role used on this node, waiting a little for the previous process,
    which got SIGTERM when its host died, to let go of it: clients that kept the old endpoint then
    reconnect to a host Ray re-created here)."""
    endpoints = {}
    for key in BIND_KEYS[kind]:
        if fixed_ports:
            port = split_endpoint(transport[key])[1]
        else:
            old = split_endpoint(previous[key]) if previous and key in previous else None
            port = free_port(host, old[1], PORT_REUSE_WAIT_S) if old is not None and old[0] == host else free_port(host)
        address = f"[{host}]" if ":" in host else host
        endpoints[key] = f"tcp://{address}:{port}"
    return endpoints


def role_config(launch: RoleLaunch, endpoints: dict[str, str], keys: dict[str, str] | None) -> RunConfig:
    """The run config with this role's endpoints, key files, actor identity and metrics file."""
    data = tomllib.loads(launch.config_text)
    data.setdefault("transport", {}).update(endpoints)
    if keys is not None:
        data["transport"].update(keys)
    if launch.kind == "actor":
        actor = data.setdefault("actor", {})
        actor["actor_id"] = launch.name
        actor["seed"] = int(actor.get("seed", 0)) + launch.index
    logging_section = data.setdefault("logging", {})
    if logging_section.get("metrics_path"):
        path = Path(logging_section["metrics_path"])
        logging_section["metrics_path"] = str(path.with_name(f"{path.stem}.{launch.name}{path.suffix}"))
    return build_config(data)


def at2po_argv() -> list[str]:
    """The `at2po` command of the Python this host runs under."""
    script = Path(sys.executable).parent / "at2po"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ops.cli"]


def role_argv(kind: RoleKind, config_path: Path, resume: bool) -> list[str]:
    group, command = ROLE_COMMANDS[kind]
    argv = [*at2po_argv(), group, command, "--config", str(config_path)]
    return [*argv, "--resume"] if resume and kind == "learner" else argv


# --------------------------------------------------------------------------- the role's process


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: SIGTERM the child when the thread that started it dies (Linux)."""

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@dataclass(frozen=True)
class LogChunk:
    lines: list[str]
    next_seq: int
    dropped: int


class RoleProcess:
    """One role's child process: (re)started by a watcher thread, output kept in a file and a ring.

    `command(restart)` gives the argv of each start (it may resolve endpoints and write the config;
    if it raises, that start counts as a failed one). The watcher thread is the one that forks, so the
    child's parent-death signal follows this object's life, not that of some short-lived thread.
    """

    def __init__(
        self,
        name: str,
        command: Callable[[bool], list[str]],
        log_path: Path,
        cwd: Path,
        max_restarts: int,
        env: dict[str, str] | None = None,
        lines_kept: int = LOG_LINES_KEPT,
    ) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        self.cwd = cwd
        self.max_restarts = max_restarts
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.state: RoleState = "starting"
        self.restarts = 0
        self.last_exit: int | None = None
        self.started_at = 0.0
        self.process: subprocess.Popen[bytes] | None = None
        self._lines: deque[tuple[int, str]] = deque(maxlen=lines_kept)
        self._seq = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._log: IO[str] | None = None
        self._watcher = threading.Thread(target=self._watch, name=f"role-{name}", daemon=True)

    # ------------------------------------------------------------------------------------ output

    def note(self, text: str) -> None:
        """Record a line of the host's own (prefixed `[cluster]`) in the same log as the role's output."""
        self._append(f"[cluster] {text}")

    def _append(self, line: str) -> None:
        with self._lock:
            self._seq += 1
            self._lines.append((self._seq, line))
            if self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self._append(raw.decode("utf-8", errors="replace").rstrip("\n"))
        stream.close()

    def read_log(self, after: int, limit: int = 1000) -> LogChunk:
        """Lines with a sequence number above `after` (at most `limit`), and how many were lost before them."""
        with self._lock:
            first = self._lines[0][0] if self._lines else self._seq + 1
            dropped = max(0, first - after - 1)
            lines = [(seq, text) for seq, text in self._lines if seq > after][:limit]
            next_seq = lines[-1][0] if lines else max(after, first - 1)
        return LogChunk([text for _, text in lines], next_seq, dropped)

    # ---------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a", encoding="utf-8")
        self._watcher.start()

    def _spawn(self, restart: bool) -> subprocess.Popen[bytes]:
        argv = self.command(restart)
        if not self.cwd.is_dir():
            raise ClusterError(f"working directory {self.cwd} does not exist on this node (cluster.cwd)")
        self.note(f"starting: {' '.join(argv)}")
        process = subprocess.Popen(
            argv,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        assert process.stdout is not None
        threading.Thread(target=self._pump, args=(process.stdout,), name=f"log-{self.name}", daemon=True).start()
        return process

    def _watch(self) -> None:
        restart = False
        while not self._stopping.is_set():
            try:
                process = self._spawn(restart)
            except Exception as error:
                self.note(f"cannot start: {error}")
                code = -1
            else:
                with self._lock:
                    self.process, self.started_at, self.state = process, time.monotonic(), "running"
                    late = self._stopping.is_set()  # stop() ran while this process was being started
                if late:
                    _signal_group(process, signal.SIGTERM)
                code = process.wait()
            with self._lock:
                self.last_exit = code
                if self._stopping.is_set():
                    return
                if code == 0:
                    self.state = "finished"
                elif self.restarts >= self.max_restarts:
                    self.state = "failed"
                else:
                    self.restarts += 1
                    self.state = "starting"
            if self.state in ("finished", "failed"):
                self.note(f"exited with {code}; {self.state}" + (" (no restarts left)" if code else ""))
                return
            self.note(f"exited with {code}; restart {self.restarts}/{self.max_restarts}")
            restart = True
            self._stopping.wait(RESTART_BACKOFF_S)

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM the role's process group, SIGKILL it after grace_s; no restart follows."""
        with self._lock:
            self._stopping.set()
            if self.state in ("starting", "running"):
                self.state = "stopping"
            process = self.process
        if process is not None and process.poll() is None:
            self.note(f"stopping (SIGTERM, {grace_s:g} s grace)")
            _signal_group(process, signal.SIGTERM)
        if self._watcher.is_alive():
            self._watcher.join(timeout=grace_s)
        if self._watcher.is_alive():
            with self._lock:
                process = self.process
            if process is not None and process.poll() is None:
                self.note("did not stop in time: SIGKILL")
                _signal_group(process, signal.SIGKILL)
            self._watcher.join(timeout=30)
        with self._lock:
            if self.process is not None:
                self.last_exit = self.process.poll()
            if self.state == "stopping":
                self.state = "stopped"
        self.note(f"stopped (exit {self.last_exit})")
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
        return self.last_exit

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def alive(self) -> bool:
        return self.state == "running" and self.process is not None and self.process.poll() is None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            alive = self.alive()
            return {
                "state": self.state,
                "pid": self.process.pid if self.process is not None and alive else None,
                "restarts": self.restarts,
                "last_exit": self.last_exit,
                "uptime_s": round(time.monotonic() - self.started_at, 1) if alive else 0.0,
            }


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def accepts_connections(endpoint: str, timeout_s: float = 1.0) -> bool:
    """True when something listens on the endpoint's TCP address."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# -------------------------------------------------------------------------------- the Ray actor


class RoleHost:
    """The Ray actor of one role: writes its files on this node, runs and supervises its process."""

    def __init__(self, launch: RoleLaunch) -> None:
        import ray

        self.launch = launch
        context = ray.get_runtime_context()
        self.reconstructed = bool(context.was_current_actor_reconstructed)
        self.node_ip = ray.util.get_node_ip_address()
        base = build_config(tomllib.loads(launch.config_text))
        self.cluster = base.cluster
        self.role_dir = Path(self.cluster.node_dir).expanduser() / launch.namespace / launch.name
        self.role_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keys: dict[str, str] | None = None
        if launch.key_files:
            write_key_files(self.role_dir / "keys", launch.key_files)
            self.keys = key_settings(launch.name, launch.kind, self.role_dir / "keys")
        endpoints_file = self.role_dir / "endpoints.json"
        reuse = self.reconstructed and endpoints_file.is_file()
        previous = json.loads(endpoints_file.read_text(encoding="utf-8")) if reuse else None
        self.binds = bind_endpoints(
            launch.kind, base.transport.model_dump(), self.node_ip, self.cluster.fixed_ports, previous
        )
        endpoints_file.write_text(json.dumps(self.binds), encoding="utf-8")
        self.process = RoleProcess(
            launch.name,
            self._command,
            self.role_dir / "role.log",
            Path(launch.cwd),
            self.cluster.max_restarts,
        )
        self.process.start()
        if self.reconstructed:
            self.process.note("this host was re-created by Ray (its previous process or node was lost)")

    def _upstream(self, actor_name: str) -> dict[str, str]:
        """The endpoints another role's host bound; waits while that host is being placed."""
        import ray

        waited = 0.0
        while True:
            try:
                handle = ray.get_actor(actor_name, namespace=self.launch.namespace)
                return dict(ray.get(handle.endpoints.remote(), timeout=10))
            except Exception as error:
                if self.process.stopping:
                    raise ClusterError(f"stopped while waiting for {actor_name}") from None
                if waited % 30 == 0:
                    self.process.note(f"waiting for {actor_name}'s endpoints ({type(error).__name__})")
                time.sleep(2.0)
                waited += 2.0

    def _command(self, restart: bool) -> list[str]:
        endpoints = dict(self.binds)
        if self.launch.replay_actor is not None:
            endpoints.update(self._upstream(self.launch.replay_actor))
        if self.launch.learner_actor is not None and self.launch.kind == "actor":
            endpoints.update(self._upstream(self.launch.learner_actor))
        config = role_config(self.launch, endpoints, self.keys)
        path = self.role_dir / "config.toml"
        path.write_text(dump_config(config), encoding="utf-8")
        return role_argv(self.launch.kind, path, resume=restart or self.reconstructed)

    # ------------------------------------------------------------------------ remote methods

    def endpoints(self) -> dict[str, str]:
        return dict(self.binds)

    def ready(self) -> bool:
        """Running, and (for the binding roles) accepting connections on its endpoints."""
        if not self.process.alive():
            return False
        return all(accepts_connections(endpoint) for endpoint in self.binds.values())

    def status(self) -> dict[str, Any]:
        return {
            "name": self.launch.name,
            "kind": self.launch.kind,
            "node_ip": self.node_ip,
            **self.process.snapshot(),
            "endpoints": dict(self.binds),
            "role_dir": str(self.role_dir),
            "reconstructed": self.reconstructed,
        }

    def read_log(self, after: int, limit: int = 1000) -> LogChunk:
        return self.process.read_log(after, limit)

    def stop(self, grace_s: float | None = None) -> int | None:
        """Stop the role's process for good and delete its key files (they only served this run)."""
        code = self.process.stop(self.cluster.stop_grace_s if grace_s is None else grace_s)
        shutil.rmtree(self.role_dir / "keys", ignore_errors=True)
        return code


# ---------------------------------------------------------------------------------- the driver


def connect(address: str | None, namespace: str) -> None:
    """Join the Ray cluster at address (HOST:PORT, or RAY_ADDRESS / a local one when None) as a driver."""
    import logging

    target = address or os.environ.get("RAY_ADDRESS")
    if target and target != "auto" and "://" not in target:
        _check_reachable(target)
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(
            address=target or "auto",
            namespace=namespace,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError) as error:
        raise ClusterError(
            f"cannot join the Ray cluster at {address or 'auto'}: {error}. A cluster started with token auth "
            "needs RAY_AUTH_MODE=token (and the token: ~/.ray/auth_token or RAY_AUTH_TOKEN) here too"
        ) from None


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a wrong HOST:PORT (ray.init would retry for minutes)."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        raise ClusterError(f"--address {address!r} is not HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise ClusterError(f"no Ray cluster answers at {address}: {error}") from None


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def alive_nodes() -> dict[str, str]:
    """node IP -> node id of the cluster's live nodes."""
    import ray

    return {node["NodeManagerAddress"]: node["NodeID"] for node in ray.nodes() if node.get("Alive")}


def role_names() -> list[str]:
    """The role actors of the current namespace."""
    import ray

    return sorted(ray.util.list_named_actors(all_namespaces=False))


def _actor_options(plan: RolePlan, cluster: ClusterConfig, nodes: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": plan.name,
        "namespace": cluster.name,
        "lifetime": "detached",
        "num_cpus": plan.cpus,
        "num_gpus": plan.gpus,
        "max_restarts": cluster.max_restarts,
        "max_task_retries": 0,
        "max_concurrency": 4,
    }
    if plan.node_ip is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if plan.node_ip not in nodes:
            raise ClusterError(
                f"cluster.replay_node_ip: no live Ray node has IP {plan.node_ip}; nodes: {', '.join(sorted(nodes))}"
            )
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=nodes[plan.node_ip], soft=False)
    return options


@dataclass
class Launched:
    """The handles of a run's role hosts, in start order, and where the operator's keys are (if generated)."""

    handles: dict[str, Any]
    operator_keys: Path | None = None


OPERATOR = "operator"


def launch(
    config: RunConfig,
    say: Callable[[str], None],
    cwd: str | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> Launched:
    """Place every role (replay first, and wait until it listens); raise ClusterError if that fails.

    With generated keys, an extra client pair (`operator`) is written on this machine under
    `<cluster.node_dir>/<name>/operator/`, so `at2po replay stats` can reach a CurveZMQ replay."""
    cluster = config.cluster
    existing = role_names()
    if existing:
        raise ClusterError(
            f"a run named {cluster.name!r} is already on this cluster ({', '.join(existing)}); "
            f"stop it with `at2po cluster stop --name {cluster.name}` or pick another cluster.name"
        )
    nodes = alive_nodes()
    plans = plan_roles(cluster)
    keys: RunKeys | None = None
    operator_dir: Path | None = None
    if wants_generated_keys(config, list(nodes)):
        keys = generate_run_keys([*(p.name for p in plans if p.kind != "replay"), OPERATOR])
        operator_dir = Path(cluster.node_dir).expanduser() / cluster.name / OPERATOR
        write_key_files(operator_dir, role_key_files(keys, OPERATOR, "actor"))
    handles: dict[str, Any] = {}
    try:
        _place(config, plans, nodes, keys, handles, say, cwd, cancelled)
    except BaseException:
        # Undo this launch only (never another run's roles): its own hosts and the operator keys.
        stop_roles(handles, min(cluster.stop_grace_s, 10.0), say)
        if operator_dir is not None:
            shutil.rmtree(operator_dir, ignore_errors=True)
        raise
    return Launched(handles, operator_dir)


def _place(
    config: RunConfig,
    plans: list[RolePlan],
    nodes: dict[str, str],
    keys: RunKeys | None,
    handles: dict[str, Any],
    say: Callable[[str], None],
    cwd: str | None,
    cancelled: Callable[[], bool],
) -> None:
    """Create the role hosts in order into `handles`, waiting for replay to listen before the others."""
    import ray

    cluster = config.cluster
    config_text = dump_config(config)
    host_class = ray.remote(RoleHost)
    learner = LEARNER if cluster.learner else None
    for plan in plans:
        launch_spec = RoleLaunch(
            name=plan.name,
            kind=plan.kind,
            index=plan.index,
            namespace=cluster.name,
            config_text=config_text,
            cwd=cluster.cwd or cwd or os.getcwd(),
            key_files=role_key_files(keys, plan.name, plan.kind) if keys is not None else {},
            replay_actor=None if plan.kind == "replay" else REPLAY,
            learner_actor=learner if plan.kind == "actor" else None,
        )
        handles[plan.name] = host_class.options(**_actor_options(plan, cluster, nodes)).remote(launch_spec)
        pinned = f", node {plan.node_ip}" if plan.node_ip else ""
        say(f"placed {plan.name} (cpus={plan.cpus:g}, gpus={plan.gpus:g}{pinned})")
        if plan.kind == "replay":
            _wait_ready(handles[REPLAY], REPLAY, cluster.start_timeout_s, cancelled)
            endpoint = ray.get(handles[REPLAY].endpoints.remote(), timeout=30)["replay_endpoint"]
            say(f"replay listens on {endpoint}")


def _wait_ready(handle: Any, name: str, timeout_s: float, cancelled: Callable[[], bool]) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cancelled():
            raise ClusterError(f"interrupted while waiting for {name} to start")
        ref = handle.ready.remote()
        done, _ = ray.wait([ref], timeout=min(2.0, max(0.1, deadline - time.monotonic())))
        if done:
            if ray.get(ref):
                return
            status = ray.get(handle.status.remote(), timeout=30)
            if status["state"] in ("failed", "finished"):
                chunk = ray.get(handle.read_log.remote(0), timeout=30)
                tail = "\n".join(chunk.lines[-20:])
                raise ClusterError(f"{name} exited ({status['state']}, exit {status['last_exit']}):\n{tail}")
        time.sleep(0.5)
    raise ClusterError(
        f"{name} was not placed and listening within {timeout_s:g} s (cluster.start_timeout_s): not enough free "
        "resources for it, or its process is slow to start (see `at2po cluster status`)"
    )


@dataclass(frozen=True)
class RoleStatus:
    """What `status` shows for one role; `state` is `unreachable` when its host did not answer."""

    name: str
    state: str
    kind: str = ""
    node_ip: str = ""
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None
    uptime_s: float = 0.0
    endpoints: dict[str, str] = field(default_factory=dict)
    role_dir: str = ""
    reconstructed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def statuses(handles: dict[str, Any] | None = None, timeout_s: float = 10.0) -> list[RoleStatus]:
    """Every role host's status (the current namespace's when handles is None), asked in parallel."""
    import ray

    if handles is None:
        handles = {}
        for name in role_names():
            with contextlib.suppress(ValueError):
                handles[name] = ray.get_actor(name)
    refs = {name: handle.status.remote() for name, handle in handles.items()}
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    result = []
    for name, ref in refs.items():
        try:
            result.append(RoleStatus(**ray.get(ref, timeout=0.1)))
        except ray.exceptions.ActorDiedError:
            result.append(RoleStatus(name=name, state="gone"))
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
            result.append(RoleStatus(name=name, state="unreachable"))
    return result


def stop_roles(
    handles: dict[str, Any] | None,
    grace_s: float,
    say: Callable[[str], None],
    before_removal: Callable[[], None] = lambda: None,
) -> dict[str, int | None]:
    """Stop the roles in order (SIGTERM, grace, SIGKILL) and remove their Ray actors; returns exit codes.

    `before_removal` runs after each group stopped and before its actors are removed (a last log read)."""
    import ray

    if handles is None:
        handles = {}
        for name in role_names():
            with contextlib.suppress(ValueError):
                handles[name] = ray.get_actor(name)
    exits: dict[str, int | None] = {}
    for group in stop_order(handles):
        say(f"stopping {', '.join(group)}")
        refs = {name: handles[name].stop.remote(grace_s) for name in group}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=grace_s + 30)
        for name, ref in refs.items():
            try:
                exits[name] = ray.get(ref, timeout=0.1)
            except ray.exceptions.RayError:
                exits[name] = None
        before_removal()
        for name in group:
            with contextlib.suppress(Exception):
                ray.kill(handles[name], no_restart=True)
    return exits


class LogFollower:
    """Polls the role hosts for new output lines (what `cluster run` prints)."""

    def __init__(self, handles: dict[str, Any]) -> None:
        self.handles = dict(handles)
        self.cursors = {name: 0 for name in handles}
        self.gone: set[str] = set()
        self.nodes: dict[str, str] = {}  # role -> node IP, filled in by whoever learns it (for prefixes)

    def poll(self, timeout_s: float = 10.0) -> list[tuple[str, str]]:
        """(role, line) pairs that arrived since the last poll; hosts that no longer exist go to `gone`."""
        import ray

        live = {n: h for n, h in self.handles.items() if n not in self.gone}
        refs = {name: handle.read_log.remote(self.cursors[name]) for name, handle in live.items()}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        out: list[tuple[str, str]] = []
        for name, ref in refs.items():
            try:
                chunk: LogChunk = ray.get(ref, timeout=0.1)
            except ray.exceptions.ActorDiedError:
                self.gone.add(name)
                continue
            except ray.exceptions.RayError:
                continue
            if chunk.dropped:
                out.append((name, f"[cluster] ... {chunk.dropped} line(s) not shown (see role.log on its node)"))
            out.extend((name, line) for line in chunk.lines)
            self.cursors[name] = chunk.next_seq
        return out
