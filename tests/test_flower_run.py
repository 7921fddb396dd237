"""``spafl flower run``: ``flwr run`` on a local simulation SuperLink that it starts and stops.

Before, ``flwr run .`` left Flower's managed local SuperLink running after the run, and a run
whose ServerApp failed still exited 0. The first test runs the real thing (Flower's SuperLink
and simulation, on free ports and a private FLWR_HOME); the others put stand-ins on PATH and on
the port to check the branches without starting Flower."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason='Flower is not installed (pip install -e ".[flower]")')

from flower_processes import flower_bin, free_port  # noqa: E402

from spafl.flower.run import superlink_answers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path, bin_folder: Path) -> dict:
    return {**os.environ, "PATH": f"{bin_folder}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}


def _spafl(args: list[str], env: dict, timeout: float = 540) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spafl", "flower", "run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for every purpose but the process table
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


def test_the_superlink_it_started_is_stopped_and_a_failed_run_exits_1(tmp_path):
    """A ServerApp that stops on an error (here: the out-dir holds a history.csv this project did
    not write) is recorded as failed by the SuperLink: ``flwr run`` exits 0, this command 1.
    Either way the SuperLink it started, and the simulation under it, are gone afterwards."""
    env = _env(tmp_path, flower_bin(tmp_path / "bin"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "history.csv").write_text("the user's own file\n")
    done = _spafl([".", "--federation-config", "num-supernodes=2", "--run-config",
                   f"num-clients=2 clients-per-round=2 rounds=1 out-dir='{out}' state-dir='{tmp_path / 'state'}'"],
                  env)
    text = done.stdout + done.stderr
    started = re.search(r"started a local SuperLink on 127\.0\.0\.1:(\d+) \(pid (\d+)\)", text)
    assert started, text[-3000:]
    port, pid = started.group(1), int(started.group(2))
    assert port == env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    assert "Successfully started run" in text, text[-3000:]
    assert re.search(r"run \d+ ended finished:failed", text), text[-3000:]
    assert done.returncode == 1
    assert f"stopped the local SuperLink (pid {pid})" in text
    assert not _alive(pid)
    assert not superlink_answers(port)
    assert (out / "history.csv").read_text() == "the user's own file\n"  # the refusal kept it


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _fake_flwr(folder: Path, status: str, exit_code: int = 0) -> Path:
    """A ``flwr`` that logs its arguments, "starts" run 7 and reports ``status`` for it."""
    folder.mkdir(parents=True, exist_ok=True)
    runs = json.dumps({"success": True, "runs": [{"run-id": "7", "status": status}]})
    script = folder / "flwr"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {folder / 'calls'}
if [ "$1" = ls ]; then echo '{runs}'; exit 0; fi
echo "Successfully started run 7"
exit {exit_code}
""")
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize("status, code", [("finished:completed", 0), ("finished:failed", 1)])
def test_a_superlink_already_running_is_used_and_left_running(tmp_path, status, code):
    env = _env(tmp_path, _fake_flwr(tmp_path / "bin", status))
    server = http.server.HTTPServer(("127.0.0.1", int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        done = _spafl([".", "--run-config", "rounds=1"], env, timeout=120)
        assert superlink_answers(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])  # not stopped: not ours
    finally:
        server.shutdown()
    assert done.returncode == code, done.stdout + done.stderr
    assert "already answers" in done.stdout and "left running" in done.stdout
    assert "started a local SuperLink" not in done.stdout
    calls = (tmp_path / "bin" / "calls").read_text().splitlines()
    assert calls[0] == "run . --run-config rounds=1 --stream"  # --stream added: the run is waited for
    assert calls[1] == "ls --run-id 7 --format json"


def test_flwr_run_s_own_failure_is_passed_on(tmp_path):
    env = _env(tmp_path, _fake_flwr(tmp_path / "bin", "finished:completed", exit_code=3))
    server = http.server.HTTPServer(("127.0.0.1", int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = _spafl(["."], env, timeout=120)
    finally:
        server.shutdown()
    assert done.returncode == 3
