"""The supervisor restarts dead roles a bounded number of times and stops roles in order."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ops.roles import RoleSpec, Supervisor


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_for(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_dead_role_is_restarted_with_its_restart_command_then_given_up(tmp_path: Path) -> None:
    marker = tmp_path / "restarted"
    spec = RoleSpec(
        "flaky",
        python("import sys; sys.exit(3)"),
        tmp_path / "logs" / "flaky.log",
        restart_argv=python(f"open({str(marker)!r}, 'a').write('x'); import sys; sys.exit(4)"),
    )
    supervisor = Supervisor([spec], max_restarts=2, grace_s=5)
    supervisor.start()
    restarted: list[str] = []

    def settled() -> bool:
        restarted.extend(supervisor.check())
        return supervisor.roles["flaky"].state == "failed"

    wait_for(settled)
    assert restarted == ["flaky", "flaky"]
    assert marker.read_text() == "xx"  # both restarts used the restart command
    health = supervisor.health()[0]
    assert (health.state, health.restarts, health.last_exit) == ("failed", 2, 4)
    assert any("given up" in e for e in supervisor.events)


def test_clean_exit_is_not_restarted_and_stop_goes_in_order(tmp_path: Path) -> None:
    order = tmp_path / "order"
    trap = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        f"    open({str(order)!r}, 'a').write(sys.argv[1] + ' ')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    specs = [
        RoleSpec("done", python("print('bye')"), tmp_path / "done.log"),
        RoleSpec("actor-0", [*python(trap), "actor"], tmp_path / "a.log"),
        RoleSpec("learner", [*python(trap), "learner"], tmp_path / "l.log"),
        RoleSpec("replay", [*python(trap), "replay"], tmp_path / "r.log"),
    ]
    supervisor = Supervisor(specs, max_restarts=3, grace_s=10)
    supervisor.start()
    wait_for(lambda: all((tmp_path / f).read_text().strip() for f in ("a.log", "l.log", "r.log")))
    wait_for(lambda: not supervisor.check() and supervisor.roles["done"].state == "finished")
    supervisor.stop([["actor-0"], ["learner"], ["replay"]])
    assert order.read_text().split() == ["actor", "learner", "replay"]
    assert {h.name: h.state for h in supervisor.health()} == {
        "done": "finished",
        "actor-0": "stopped",
        "learner": "stopped",
        "replay": "stopped",
    }
    assert "bye" in (tmp_path / "done.log").read_text()


def test_a_role_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    supervisor = Supervisor([RoleSpec("stubborn", python(stubborn), tmp_path / "s.log")], max_restarts=0, grace_s=0.5)
    supervisor.start()
    wait_for(lambda: "ready" in (tmp_path / "s.log").read_text())
    supervisor.stop([["stubborn"]])
    assert supervisor.health()[0].last_exit == -9


def test_roles_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    """SIGKILL of the supervisor process: its role gets SIGTERM from the kernel (PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess

    marker = tmp_path / "child.pid"
    child = tmp_path / "child.py"
    child.write_text(f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ops.roles import RoleSpec, Supervisor\n"
        f"spec = RoleSpec('r', [sys.executable, {str(child)!r}], Path({str(tmp_path / 'r.log')!r}))\n"
        "Supervisor([spec], 0, 5).start()\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2])
    wait_for(lambda: marker.is_file() and marker.read_text().strip() != "")
    child_pid = int(marker.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)

    def gone() -> bool:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{child_pid}/stat") as stat:  # a zombie re-parented to init counts as gone
            return stat.read().split()[2] == "Z"

    wait_for(gone)
