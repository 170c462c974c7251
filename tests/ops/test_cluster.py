"""`at2po cluster`: the plan, keys, role configs and process supervision, then a real two-node Ray run.

The fast tests need no Ray. The slow one starts a Ray head on 127.0.0.2 and a worker node on
127.0.0.3 (docs/dependencies.md's recipe: token auth, a private temp dir), runs replay, two actors
and the learner on both nodes with CurveZMQ keys made for the run, kills a role's process and a
role's Ray actor, stops the run, and ends the test's own Ray processes (by the pids whose command
line names its private temp dir, and their children; never `ray stop`, which would end every Ray
cluster of this user on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from typer.testing import CliRunner

from common.config import ConfigError, RunConfig, TransportConfig, build_config, dump_config
from common.transport import bind_server_socket, connect_client_socket, is_loopback_endpoint
from ops import cluster
from ops.cluster_cmd import _run_ended, cluster_app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def wait_for(condition: Callable[[], object], timeout_s: float = 60.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met in {timeout_s} s"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------ the plan


def test_plan_places_replay_first_pinned_then_learner_then_actors_with_their_resources() -> None:
    config = build_config(
        {},
        [
            "cluster.actors=2",
            'cluster.replay_node_ip="10.0.0.7"',
            "cluster.actor_gpus=0.5",
            "cluster.learner_gpus=2",
            "cluster.replay_cpus=3",
        ],
    )
    plans = cluster.plan_roles(config.cluster)
    assert [(p.name, p.kind, p.index) for p in plans] == [
        ("replay", "replay", 0),
        ("learner", "learner", 0),
        ("actor-0", "actor", 0),
        ("actor-1", "actor", 1),
    ]
    assert (plans[0].cpus, plans[0].node_ip) == (3.0, "10.0.0.7")
    assert plans[1].gpus == 2.0 and plans[1].node_ip is None
    assert [p.gpus for p in plans[2:]] == [0.5, 0.5]

    without_learner = cluster.plan_roles(build_config({}, ["cluster.learner=false", "cluster.actors=1"]).cluster)
    assert [p.name for p in without_learner] == ["replay", "actor-0"]


def test_stop_order_is_actors_then_learner_then_replay() -> None:
    assert cluster.stop_order(["replay", "actor-1", "learner", "actor-0", "odd"]) == [
        ["actor-0", "actor-1"],
        ["learner"],
        ["replay"],
        ["odd"],
    ]
    assert cluster.stop_order(["replay"]) == [["replay"]]


def test_cluster_section_refuses_bad_values_by_key() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.name"):
        build_config({}, ['cluster.name="no spaces"'])
    with pytest.raises(ConfigError, match=r"cluster\.actor_cpus"):
        build_config({}, ["cluster.actor_cpus=-1"])
    with pytest.raises(ConfigError, match=r"cluster\.curve_keys"):
        build_config({}, ['cluster.curve_keys="sometimes"'])


@pytest.mark.parametrize(
    "overrides, nodes, expected",
    [
        ([], ["127.0.0.2", "127.0.0.3"], False),  # loopback only: no keys needed
        ([], ["127.0.0.2", "10.1.2.3"], True),  # a real network: keys are required
        (['transport.server_secret_key="/k/s"'], ["10.1.2.3"], False),  # the operator's own keys
        (['cluster.curve_keys="generate"'], ["127.0.0.2"], True),
        (['cluster.curve_keys="config"'], ["10.1.2.3"], False),
    ],
)
def test_keys_are_generated_when_a_node_is_beyond_loopback(
    overrides: list[str], nodes: list[str], expected: bool
) -> None:
    assert cluster.wants_generated_keys(build_config({}, overrides), nodes) is expected


# ---------------------------------------------------------------------------------------------- keys


def write_role_keys(tmp_path: Path, keys: cluster.RunKeys, name: str, kind: cluster.RoleKind) -> TransportConfig:
    keys_dir = tmp_path / name / "keys"
    cluster.write_key_files(keys_dir, cluster.role_key_files(keys, name, kind))
    return TransportConfig(**cluster.key_settings(name, kind, keys_dir))


def test_generated_keys_let_the_run_roles_talk_and_nobody_else(tmp_path: Path) -> None:
    keys = cluster.generate_run_keys(["learner", "actor-0", "operator"])
    replay = write_role_keys(tmp_path, keys, "replay", "replay")
    learner = write_role_keys(tmp_path, keys, "learner", "learner")
    actor = write_role_keys(tmp_path, keys, "actor-0", "actor")

    assert replay.client_secret_key is None and replay.server_public_key is None
    assert actor.server_secret_key is None and actor.authorized_keys_dir is None
    assert learner.server_secret_key is not None and learner.client_secret_key is not None
    assert not any("server.key_secret" in str(p) for p in (tmp_path / "actor-0").rglob("*"))
    for secret in tmp_path.rglob("*.key_secret"):
        assert secret.stat().st_mode & 0o077 == 0, secret
    assert sorted(p.name for p in (tmp_path / "replay" / "keys" / "authorized").iterdir()) == [
        "actor-0.key",
        "learner.key",
        "operator.key",
    ]

    ctx = zmq.Context()
    try:
        with bind_server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", replay) as server:
            server.socket.rcvtimeo = 5000
            for name, transport in (("learner", learner), ("actor-0", actor)):
                client = connect_client_socket(ctx, zmq.DEALER, server.endpoint, transport)
                client.send(name.encode())
                assert server.socket.recv_multipart()[1] == name.encode()
                client.close(linger=0)
            # A client with keys that are not the run's gets no answer at all.
            stranger = cluster.generate_run_keys(["actor-0"])
            outsider = write_role_keys(tmp_path / "other", stranger, "actor-0", "actor")
            client = connect_client_socket(
                ctx,
                zmq.DEALER,
                server.endpoint,
                outsider.model_copy(update={"server_public_key": actor.server_public_key}),
            )
            client.send(b"let me in")
            server.socket.rcvtimeo = 500
            with pytest.raises(zmq.Again):
                server.socket.recv_multipart()
            client.close(linger=0)
    finally:
        ctx.term()


# ------------------------------------------------------------------------------------ role configs


def launch_spec(kind: cluster.RoleKind, name: str, index: int, config: RunConfig) -> cluster.RoleLaunch:
    return cluster.RoleLaunch(
        name=name, kind=kind, index=index, namespace="t", config_text=dump_config(config), cwd="/"
    )


def test_role_config_carries_the_role_endpoints_identity_keys_and_metrics_file() -> None:
    base = build_config({}, ["actor.seed=10", 'logging.metrics_path="/m/run.jsonl"'])
    endpoints = {
        "replay_endpoint": "tcp://10.0.0.1:7000",
        "weights_pub_endpoint": "tcp://10.0.0.2:7001",
        "weights_endpoint": "tcp://10.0.0.2:7002",
    }
    keys = cluster.key_settings("actor-2", "actor", Path("/k"))
    config = cluster.role_config(launch_spec("actor", "actor-2", 2, base), endpoints, keys)
    assert config.transport.replay_endpoint == "tcp://10.0.0.1:7000"
    assert config.transport.weights_endpoint == "tcp://10.0.0.2:7002"
    assert config.transport.client_secret_key == "/k/actor-2.key_secret"
    assert config.transport.server_public_key == "/k/server.key"
    assert (config.actor.actor_id, config.actor.seed) == ("actor-2", 12)
    assert config.logging.metrics_path == "/m/run.actor-2.jsonl"

    replay = cluster.role_config(launch_spec("replay", "replay", 0, base), {"replay_endpoint": "tcp://h:1"}, None)
    assert replay.actor.actor_id is None and replay.actor.seed == 10
    assert replay.transport.server_secret_key is None


def test_bind_endpoints_use_the_node_ip_and_a_free_or_the_configured_port() -> None:
    transport = TransportConfig().model_dump()
    fixed = cluster.bind_endpoints("learner", transport, "127.0.0.3", fixed_ports=True)
    assert fixed == {"weights_pub_endpoint": "tcp://127.0.0.3:5556", "weights_endpoint": "tcp://127.0.0.3:5557"}

    free = cluster.bind_endpoints("replay", transport, "127.0.0.2", fixed_ports=False)
    host, port = cluster.split_endpoint(free["replay_endpoint"])
    assert host == "127.0.0.2" and port != 5555
    with socket.socket() as probe:
        probe.bind((host, port))  # really free

    again = cluster.bind_endpoints("replay", transport, "127.0.0.2", fixed_ports=False, previous=free)
    assert again == free  # a re-created host takes its old port back
    assert cluster.bind_endpoints("actor", transport, "127.0.0.2", fixed_ports=False) == {}
    with pytest.raises(cluster.ClusterError, match="tcp://HOST:PORT"):
        cluster.split_endpoint("ipc:///tmp/x")


def test_role_argv_resumes_only_the_learner() -> None:
    path = Path("/r/config.toml")
    assert cluster.role_argv("learner", path, resume=True)[-4:] == ["run", "--config", str(path), "--resume"]
    assert cluster.role_argv("actor", path, resume=True)[-3:] == ["run", "--config", str(path)]
    assert cluster.role_argv("replay", path, resume=True)[-4:] == ["replay", "serve", "--config", str(path)]


# ------------------------------------------------------------------------------ role processes


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_dying_role_is_restarted_until_its_restarts_run_out(tmp_path: Path) -> None:
    starts: list[bool] = []

    def command(restart: bool) -> list[str]:
        starts.append(restart)
        return python(f"print('run {len(starts)}'); raise SystemExit(3)")

    role = cluster.RoleProcess("flaky", command, tmp_path / "role.log", tmp_path, max_restarts=2)
    role.start()
    wait_for(lambda: role.snapshot()["state"] == "failed", what="role failed")
    assert starts == [False, True, True]
    snapshot = role.snapshot()
    assert (snapshot["restarts"], snapshot["last_exit"], snapshot["pid"]) == (2, 3, None)
    text = (tmp_path / "role.log").read_text()
    assert "run 1" in text and "run 3" in text and "no restarts left" in text


def test_a_clean_exit_is_finished_and_the_log_is_read_by_cursor(tmp_path: Path) -> None:
    role = cluster.RoleProcess(
        "done", lambda _: python("for i in range(5): print('line', i)"), tmp_path / "r.log", tmp_path, 3, lines_kept=4
    )
    role.start()
    wait_for(lambda: role.snapshot()["state"] == "finished", what="role finished")
    wait_for(lambda: "finished" in role.read_log(0).lines[-1], what="last note")
    chunk = role.read_log(0)
    # 1 start note + 5 lines + 1 exit note = 7 lines; 4 are kept, so 3 were dropped.
    assert chunk.dropped == 3 and len(chunk.lines) == 4 and chunk.lines[0] == "line 2"
    assert role.read_log(chunk.next_seq).lines == []
    tail = role.read_log(chunk.next_seq - 1)
    assert tail.lines == [chunk.lines[-1]] and tail.dropped == 0
    assert role.snapshot()["restarts"] == 0


def test_a_start_that_cannot_be_prepared_counts_as_a_failed_start(tmp_path: Path) -> None:
    def command(_restart: bool) -> list[str]:
        raise cluster.ClusterError("replay has no endpoint yet")

    role = cluster.RoleProcess("x", command, tmp_path / "r.log", tmp_path, max_restarts=1)
    role.start()
    wait_for(lambda: role.snapshot()["state"] == "failed", what="role failed")
    assert (tmp_path / "r.log").read_text().count("cannot start: replay has no endpoint yet") == 2


def test_stop_sends_sigterm_first_and_does_not_restart(tmp_path: Path) -> None:
    marker = tmp_path / "terminated"
    trap = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (open({str(marker)!r}, 'w').write('x'), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    role = cluster.RoleProcess("t", lambda _: python(trap), tmp_path / "r.log", tmp_path, max_restarts=3)
    role.start()
    wait_for(lambda: "ready" in role.read_log(0).lines, what="child ready")
    assert role.stop(grace_s=30) == 0
    assert marker.read_text() == "x"
    snapshot = role.snapshot()
    assert (snapshot["state"], snapshot["restarts"]) == ("stopped", 0)


def test_a_role_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
    stubborn += "time.sleep(120)"
    role = cluster.RoleProcess("s", lambda _: python(stubborn), tmp_path / "r.log", tmp_path, max_restarts=3)
    role.start()
    wait_for(lambda: "ready" in role.read_log(0).lines, what="child ready")
    assert role.stop(grace_s=0.5) == -signal.SIGKILL
    assert "SIGKILL" in (tmp_path / "r.log").read_text()


HOST_SCRIPT = """
import sys, time
from pathlib import Path
from ops.cluster import RoleProcess
out = Path(sys.argv[1])
role = RoleProcess("child", lambda _: [sys.executable, "-c", "import time; time.sleep(300)"], out / "r.log", out, 0)
role.start()
while role.snapshot()["pid"] is None:
    time.sleep(0.05)
print(role.snapshot()["pid"], flush=True)
time.sleep(300)
"""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "State:\tZ" in status.read_text())


def test_the_role_process_dies_with_its_host(tmp_path: Path) -> None:
    host = subprocess.Popen(
        [sys.executable, "-c", HOST_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert host.stdout is not None
        child = int(host.stdout.readline())
        assert pid_alive(child)
        host.kill()
        host.wait(timeout=30)
        wait_for(lambda: not pid_alive(child), what="orphaned role process ended")
    finally:
        if host.poll() is None:
            host.kill()


# ------------------------------------------------------------------------------------------- the CLI


def test_cli_has_run_status_stop_and_refuses_a_bad_config_before_touching_ray(tmp_path: Path) -> None:
    result = runner.invoke(cluster_app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "status", "stop"):
        assert command in result.output
    bad = runner.invoke(cluster_app, ["run", "--address", "127.0.0.1:1", "--set", "cluster.actorz=3"])
    assert bad.exit_code == 2
    assert "cluster.actorz: unknown key" in bad.output
    bad_name = runner.invoke(cluster_app, ["status", "--address", "127.0.0.1:1", "--name", "a b"])
    assert bad_name.exit_code == 2 and "--name" in bad_name.output


def test_the_run_ends_with_the_learner_or_with_every_actor() -> None:
    with_learner = build_config({}, [])
    assert _run_ended({"replay": ("running", 0), "learner": ("running", 0)}, with_learner) is None
    assert _run_ended({"replay": ("running", 0), "learner": ("finished", 0)}, with_learner) == ("learner finished", 0)
    assert _run_ended({"replay": ("running", 0), "learner": ("failed", 3)}, with_learner) == ("learner failed", 1)
    assert _run_ended({"replay": ("failed", 3), "learner": ("running", 0)}, with_learner) == ("replay failed", 1)
    actors_only = build_config({}, ["cluster.learner=false"])
    assert (
        _run_ended({"replay": ("running", 0), "actor-0": ("finished", 0), "actor-1": ("running", 1)}, actors_only)
        is None
    )
    assert _run_ended({"actor-0": ("finished", 0), "actor-1": ("failed", 3)}, actors_only) == ("actors finished", 0)
    assert _run_ended({"actor-0": ("failed", 3)}, actors_only) == ("every actor failed", 1)


# ----------------------------------------------------------------------- a two-node Ray cluster


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def descendants(roots: set[int]) -> set[int]:
    """roots and every process below them (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def processes_naming(text: str) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def end_processes(pids: set[int]) -> None:
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.1)


class RayCluster:
    """A head on 127.0.0.2 and a worker node on 127.0.0.3, with their own token and temp dir."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        self.port = free_port("127.0.0.2")
        self.address = f"127.0.0.2:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        self.env.pop("RAY_ADDRESS", None)
        self.ray = str(Path(sys.executable).parent / "ray")

    def start(self) -> None:
        common = ["--num-cpus", "2", "--disable-usage-stats", "--temp-dir", str(self.temp_dir)]
        head = [self.ray, "start", "--head", "--node-ip-address", "127.0.0.2", "--port", str(self.port)]
        worker = [self.ray, "start", "--address", self.address, "--node-ip-address", "127.0.0.3"]
        for argv in ([*head, "--include-dashboard", "false", *common], [*worker, *common]):
            subprocess.run(argv, env=self.env, check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        end_processes(descendants(processes_naming(str(self.temp_dir))))

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "ops.cluster_cmd", *args]
        return subprocess.run(argv, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)

    def statuses(self, config: Path) -> dict[str, dict[str, object]]:
        result = self.cli("status", "--address", self.address, "--config", str(config), "--json")
        if result.returncode != 0:
            return {}
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        return {str(row["name"]): row for row in rows}


@pytest.fixture
def ray_cluster() -> Iterator[RayCluster]:
    temp_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths have a length limit
    ray_cluster = RayCluster(temp_dir)
    try:
        ray_cluster.start()
        yield ray_cluster
    finally:
        ray_cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def write_run_config(tmp_path: Path, model_dir: Path, **cluster_settings: object) -> Path:
    settings = {
        "name": "e2e",
        "actors": 2,
        "replay_node_ip": "127.0.0.2",
        "node_dir": str(tmp_path / "nodes"),
        "curve_keys": "generate",
        "stop_grace_s": 30.0,
        "start_timeout_s": 120.0,
        **cluster_settings,
    }
    cluster_toml = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    path = tmp_path / f"{settings['name']}.toml"
    path.write_text(
        f"""
[replay]
dir = "{tmp_path / "replay"}"
map_size_gb = 0.2
capacity_bytes = 100000000
trees_per_step = 2
max_staleness = 1

[logging]
level = "info"
metrics_path = "{tmp_path / "metrics" / "run.jsonl"}"

[tasks]
data_dir = "{tmp_path / "world"}"
n_train = 30
n_test = 5
hops = [1]

[env]
max_turns = 2

[model]
dir = "{model_dir}"

[tree]
builder = "chain"
chains = 2
max_new_tokens = 16

[actor]
concurrent_tasks = 2
window = 8
torch_threads = 1

[learner]
torch_threads = 1
checkpoint_dir = "{tmp_path / "checkpoints"}"
checkpoint_every = 1000

[cluster]
{cluster_toml}
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from actors.tiny_model import TinyModelSpec, init_tiny_model, world_training_texts

    texts = world_training_texts(seed=0, n_tasks=200, n_arithmetic=100, max_passages=800)
    return init_tiny_model(tmp_path_factory.mktemp("cluster_model") / "model", TinyModelSpec(), texts)


def replay_stats(ray_cluster: RayCluster, endpoint: str, *overrides: str) -> dict[str, object] | None:
    argv = [str(Path(sys.executable).parent / "at2po"), "replay", "stats", "--endpoint", endpoint, "--timeout-s", "3"]
    for override in overrides:
        argv += ["--set", override]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout) if result.returncode == 0 else None


def tree_records(tmp_path: Path, actor: str) -> int:
    """Trees an actor finished (its `tree` metrics records, in the file `cluster` gave that role)."""
    path = tmp_path / "metrics" / f"run.{actor}.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"name":"tree"' in line.replace(" ", ""))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_roles_run_on_two_ray_nodes_restart_and_stop_in_order(
    ray_cluster: RayCluster, tiny_model: Path, tmp_path: Path
) -> None:
    config = write_run_config(tmp_path, tiny_model)
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        run = subprocess.Popen(
            [sys.executable, "-m", "ops.cluster_cmd", "run", "--address", ray_cluster.address, "--config", str(config)],
            env=ray_cluster.env,
            cwd=REPO,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        # Every role runs; replay on the node it was pinned to, and roles on both nodes.
        def all_running() -> dict[str, dict[str, object]]:
            rows = ray_cluster.statuses(config)
            ok = len(rows) == 4 and all(r["state"] == "running" for r in rows.values())
            return rows if ok else {}

        rows = wait_for(all_running, 150, "all four roles running")
        assert isinstance(rows, dict)
        assert set(rows) == {"replay", "learner", "actor-0", "actor-1"}
        assert rows["replay"]["node_ip"] == "127.0.0.2"
        assert {r["node_ip"] for r in rows.values()} == {"127.0.0.2", "127.0.0.3"}
        endpoint = str(rows["replay"]["endpoints"]["replay_endpoint"])  # type: ignore[index]
        assert endpoint.startswith("tcp://127.0.0.2:")
        assert str(rows["learner"]["endpoints"]["weights_endpoint"]).startswith(f"tcp://{rows['learner']['node_ip']}:")  # type: ignore[index]

        # A second run with the same name is refused and leaves this one alone; so is a pin to no node.
        again = ray_cluster.cli("run", "--address", ray_cluster.address, "--config", str(config), "--detach")
        assert again.returncode == 1 and "already on this cluster" in again.stderr
        nowhere = ray_cluster.cli(
            "run", "--address", ray_cluster.address, "--config", str(config), "--detach",
            "--set", "cluster.name=other", "--set", 'cluster.replay_node_ip="127.0.0.9"',
        )  # fmt: skip
        assert nowhere.returncode == 1 and "no live Ray node has IP 127.0.0.9" in nowhere.stderr
        assert ray_cluster.cli("status", "--address", ray_cluster.address, "--name", "other").returncode == 1

        # Trees reach replay and the learner trains, over CurveZMQ with the run's keys: a client without
        # them gets no answer, the operator keys the driver wrote do.
        operator = tmp_path / "nodes" / "e2e" / "operator"
        with_keys = (
            f"transport.server_public_key={operator / 'server.key'}",
            f"transport.client_secret_key={operator / 'operator.key_secret'}",
        )
        assert replay_stats(ray_cluster, endpoint) is None

        def trained() -> dict[str, object] | None:
            stats = replay_stats(ray_cluster, endpoint, *with_keys)
            store = stats["store"] if stats else None
            return (
                stats if isinstance(store, dict) and store["inserts"] >= 4 and store["learner_version"] >= 1 else None
            )

        wait_for(trained, 120, "trees in replay and a learner update")
        actor_config = (tmp_path / "nodes" / "e2e" / "actor-1" / "config.toml").read_text()
        assert f'replay_endpoint = "{endpoint}"' in actor_config
        assert "actor-1.key_secret" in actor_config

        # A role whose process dies is restarted by its host, with the same endpoint for the others.
        victim = "actor-1"
        old_pid = int(rows[victim]["pid"])  # type: ignore[arg-type]
        os.kill(old_pid, signal.SIGKILL)

        def restarted() -> dict[str, object] | None:
            row = ray_cluster.statuses(config).get(victim)
            ok = row and row["restarts"] == 1 and row["state"] == "running" and row["pid"] not in (None, old_pid)
            return row if ok else None

        row = wait_for(restarted, 90, "the killed actor restarted")
        assert row["last_exit"] == -signal.SIGKILL  # type: ignore[index]
        trees_before = {name: tree_records(tmp_path, name) for name in ("actor-0", "actor-1")}
        wait_for(lambda: tree_records(tmp_path, victim) > trees_before[victim], 120, "trees from the restarted actor")

        # A role's Ray actor that dies is re-created by Ray; its process went down with it, replay comes
        # back on the same endpoint and both actors deliver trees to it again.
        old_replay_pid = int(rows["replay"]["pid"])  # type: ignore[arg-type]
        kill = (
            "import logging, sys, ray\n"
            "ray.init(address=sys.argv[1], namespace='e2e', logging_level=logging.WARNING, log_to_driver=False)\n"
            "ray.kill(ray.get_actor('replay'), no_restart=False)\n"
        )
        subprocess.run([sys.executable, "-c", kill, ray_cluster.address], env=ray_cluster.env, check=True, timeout=120)
        wait_for(lambda: not pid_alive(old_replay_pid), 60, "the old replay process ended with its host")

        def recreated() -> dict[str, object] | None:
            row = ray_cluster.statuses(config).get("replay")
            return row if row and row["reconstructed"] and row["state"] == "running" else None

        replay_row = wait_for(recreated, 90, "replay re-created by Ray")
        assert replay_row["endpoints"]["replay_endpoint"] == endpoint  # type: ignore[index]
        assert replay_row["pid"] != old_replay_pid  # type: ignore[index]
        # An actor holds at most actor.concurrent_tasks (2) leases, so a third finished tree needs a lease
        # granted by the re-created replay.
        trees_before = {name: tree_records(tmp_path, name) for name in ("actor-0", "actor-1")}
        for name, count in trees_before.items():
            wait_for(lambda: tree_records(tmp_path, name) >= count + 3, 120, f"{name}'s trees after replay came back")  # noqa: B023

        # `stop`: actors, then the learner (which checkpoints on SIGTERM), then replay; the actors are removed.
        stopped = ray_cluster.cli("stop", "--address", ray_cluster.address, "--config", str(config))
        assert stopped.returncode == 0, stopped.stderr
        exits = json.loads(stopped.stdout)["stopped"]
        assert exits == {"actor-0": 0, "actor-1": 0, "learner": 0, "replay": 0}
        assert stopped.stderr.index("stopping actor-0, actor-1") < stopped.stderr.index("stopping learner")
        assert stopped.stderr.index("stopping learner") < stopped.stderr.index("stopping replay")
        assert any((tmp_path / "checkpoints").glob("v*/COMPLETE"))
        assert not operator.exists() and not (tmp_path / "nodes" / "e2e" / "learner" / "keys").exists()
        assert run.wait(timeout=60) == 0  # the following driver notices and leaves
        assert ray_cluster.cli("status", "--address", ray_cluster.address, "--name", "e2e").returncode == 1
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)

    streamed = out.read_text()
    for prefix in ("replay@127.0.0.2 | ", "actor-1@", "learner@"):
        assert prefix in streamed, prefix
    assert "[cluster] exited with -9; restart 1/3" in streamed
    assert "replay listens on tcp://127.0.0.2:" in err.read_text()

    # Ctrl-C on a following driver stops its run cleanly (replay alone here: no keys on loopback).
    config = write_run_config(tmp_path, tiny_model, name="ctrlc", actors=0, learner=False, curve_keys="auto")
    with err.open("w") as stderr:
        run = subprocess.Popen(
            [sys.executable, "-m", "ops.cluster_cmd", "run", "--address", ray_cluster.address, "--config", str(config)],
            env=ray_cluster.env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_for(lambda: "replay listens" in err.read_text(), 120, "replay listening")
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=90) == 0
    finally:
        if run.poll() is None:
            run.kill()
    text = err.read_text()
    assert "ending the run: interrupted" in text and "stopping replay" in text
    assert "CurveZMQ keys were generated" not in text
    assert ray_cluster.cli("status", "--address", ray_cluster.address, "--name", "ctrlc").returncode == 1


# ----------------------------------------------------------------------- deployments without Ray

DEPLOY = REPO / "ops" / "deploy"


def overrides_of(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]


def assert_cli_accepts(args: list[str]) -> None:
    """The real `at2po` parses these arguments (`--help` stops before anything runs)."""
    from ops.cli import app

    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, (args, result.output)


def test_systemd_units_run_real_commands_on_the_example_config() -> None:
    example = (DEPLOY / "run.example.toml").read_text()
    base = tomllib.loads(example)
    config = build_config(base)
    for key in ("replay_endpoint", "weights_pub_endpoint", "weights_endpoint"):
        assert not is_loopback_endpoint(getattr(config.transport, key))
    assert config.transport.server_secret_key and config.transport.client_secret_key  # required beyond loopback

    commands = {}
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        lines = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
        assert len(lines) == 1, unit
        argv = shlex.split(lines[0].removeprefix("ExecStart=").replace("%i", "3").replace("%H", "host"))
        assert argv[0] == "/opt/at2po/.venv/bin/at2po"
        assert argv[argv.index("--config") + 1] == "/etc/at2po/run.toml"
        commands[unit.name] = argv[1:3]
        assert_cli_accepts(argv[1:])
        instance = build_config(base, overrides_of(argv))
        if unit.name == "at2po-actor@.service":
            assert (instance.actor.actor_id, instance.actor.seed) == ("host-actor-3", 3)
    assert commands == {
        "at2po-actor@.service": ["actor", "run"],
        "at2po-learner.service": ["learner", "run"],
        "at2po-replay.service": ["replay", "serve"],
    }


def test_kubernetes_manifests_agree_with_their_config_and_the_cli() -> None:
    yaml = pytest.importorskip("yaml")
    docs = [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    docs = [doc for doc in docs if doc.get("kind") != "Kustomization"]
    listed = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    by_kind: dict[tuple[str, str], dict[str, object]] = {(d["kind"], d["metadata"]["name"]): d for d in docs}

    base = tomllib.loads(by_kind[("ConfigMap", "at2po-config")]["data"]["run.toml"])  # type: ignore[index]
    config = build_config(base)
    services = {
        name: {p["name"]: p["port"] for p in doc["spec"]["ports"]}  # type: ignore[index]
        for (kind, name), doc in by_kind.items()
        if kind == "Service"
    }
    assert cluster.split_endpoint(config.transport.replay_endpoint) == ("at2po-replay", services["at2po-replay"]["zmq"])
    assert cluster.split_endpoint(config.transport.weights_pub_endpoint) == (
        "at2po-learner",
        services["at2po-learner"]["weights-pub"],
    )
    assert cluster.split_endpoint(config.transport.weights_endpoint) == (
        "at2po-learner",
        services["at2po-learner"]["weights"],
    )

    key_names = {Path(p).name for p in (config.transport.server_secret_key, config.transport.client_secret_key)}
    workloads = {name: doc for (kind, name), doc in by_kind.items() if kind in ("StatefulSet", "Deployment")}
    assert set(workloads) == {"at2po-replay", "at2po-learner", "at2po-actor"}
    for name, doc in workloads.items():
        pod = doc["spec"]["template"]["spec"]  # type: ignore[index]
        (container,) = pod["containers"]
        args = [a.replace("$(POD_NAME)", "at2po-actor-abc") for a in container["args"]]
        assert_cli_accepts(args)
        role = build_config(base, overrides_of(args))
        if "--endpoint" in args:
            binds = [args[args.index("--endpoint") + 1]]
        else:
            binds = (
                [role.transport.weights_pub_endpoint, role.transport.weights_endpoint]
                if name.endswith("learner")
                else []
            )
        container_ports = {p["containerPort"] for p in container.get("ports", [])}
        assert {cluster.split_endpoint(b)[1] for b in binds} == container_ports, name
        mounted: set[str] = set()
        for volume in pod["volumes"]:
            sources = volume.get("projected", {}).get("sources", []) or [{"secret": volume.get("secret")}]
            for source in sources:
                if source.get("secret"):
                    mounted.update(item["path"] for item in source["secret"]["items"])
        if name == "at2po-actor":
            assert mounted == {"server.key", "client.key_secret"}
        elif name == "at2po-replay":
            assert {"server.key_secret", "authorized/actors.key", "authorized/learner.key"} <= mounted
        else:
            assert key_names <= mounted and "authorized/actors.key" in mounted


def test_a_wrong_cluster_address_fails_fast_with_its_reason() -> None:
    port = free_port("127.0.0.1")  # nothing listens there
    with pytest.raises(cluster.ClusterError, match=r"no Ray cluster answers at 127\.0\.0\.1"):
        cluster.connect(f"127.0.0.1:{port}", "x")
    with pytest.raises(cluster.ClusterError, match="not HOST:PORT"):
        cluster.connect("nonsense", "x")
    result = runner.invoke(cluster_app, ["status", "--address", f"127.0.0.1:{port}", "--name", "x"])
    assert result.exit_code == 1 and "no Ray cluster answers" in result.output
