"""``spafl flower run``: ``flwr run`` on Flower's local simulation SuperLink, stopped afterwards.

``flwr run .`` with no SuperLink of the user's starts Flower's managed local one (a detached
``flower-superlink --simulation`` on 127.0.0.1) and leaves it running when the run ends. This
wrapper starts that SuperLink itself, with Flower's own command, ports, database and log file,
so that ``flwr run`` finds it and uses it; runs ``flwr run`` with the arguments given; and stops
the SuperLink (and the simulation it started) when ``flwr run`` returns, fails or is interrupted.
A SuperLink that already answers on those ports is not this command's: it is used and left
running, and the user is told so.

The exit status is ``flwr run``'s, except that a run the SuperLink records as failed (a ServerApp
that stopped on an error, which ``flwr run`` 1.41 reports with status 0) gives 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import QUIET_ENV

STARTUP_TIMEOUT_S = 60.0  # Flower waits 15 s; a loaded machine needs longer to import flwr
STOP_TIMEOUT_S = 15.0


def local_ports() -> tuple[str, str]:
    """The managed local SuperLink's HTTP port and Control API port, as ``flwr`` 1.41 takes them
    (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT``, else 39091 /
    39093)."""
    return (os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"),
            os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", "39093"))


def flwr_home() -> Path:
    return Path(os.environ["FLWR_HOME"]) if os.environ.get("FLWR_HOME") else Path.home() / ".flwr"


def flower_env() -> dict:
    """The environment for Flower's commands: Flower's quiet switches (unless set), and, when
    ``flwr`` is not on PATH (an environment used without activating it), this interpreter's
    scripts folder first on PATH (the SuperLink starts the simulation's commands by name too)."""
    env = {**QUIET_ENV, **os.environ}
    if shutil.which("flwr", path=env.get("PATH")) is None:
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def superlink_answers(port: str, timeout: float = 0.5) -> bool:
    """Whether a SuperLink answers its health check on 127.0.0.1:``port``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as reply:
            return 200 <= reply.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def superlink_command(port: str, control_port: str, folder: Path) -> list[str]:
    """Flower 1.41's command for its managed local SuperLink (``flwr.cli.local_superlink``), so
    that ``flwr run`` takes this one for its own."""
    return ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
            "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", port,
            "--log-file", str(folder / "superlink.log"), "--log-rotation-interval-hours", "24",
            "--log-rotation-backup-count", "7", "--database", str(folder / "state.db")]


class LocalSuperLink:
    """The local simulation SuperLink, started in a session of its own (so that stopping it stops
    the simulation processes it started) and stopped by :meth:`stop`."""

    def __init__(self, port: str, control_port: str, folder: Path, log=print):
        self.port, self.folder, self.log = port, folder, log
        self.command = superlink_command(port, control_port, folder)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.process = subprocess.Popen(self.command, env=flower_env(),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True)
        except OSError as e:
            raise RuntimeError(f"cannot start flower-superlink ({e}); is Flower installed in this environment "
                               '(pip install -e ".[flower]")?') from e
        deadline = time.monotonic() + timeout
        while not superlink_answers(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with status {self.process.returncode} at start; see "
                                   f"{self.folder / 'superlink.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"flower-superlink did not answer on 127.0.0.1:{self.port} within {timeout:.0f} "
                                   f"s; see {self.folder / 'superlink.log'}")
            time.sleep(0.2)
        self.log(f"spafl flower run: started a local SuperLink on 127.0.0.1:{self.port} (pid {self.process.pid}); "
                 "it is stopped when the run ends")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to the SuperLink's process group, SIGKILL to what is left after ``timeout``."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        group = os.getpgid(process.pid)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log(f"spafl flower run: stopped the local SuperLink (pid {process.pid})")


_RUN_ID = re.compile(r"started run (\d+)", re.IGNORECASE)


def run_status(run_id: str, env: dict) -> str | None:
    """The SuperLink's status of run ``run_id`` (``"finished:completed"``, ``"finished:failed"``
    ...), or None when ``flwr ls`` cannot say."""
    try:
        done = subprocess.run(["flwr", "ls", "--run-id", run_id, "--format", "json"], env=env,
                              capture_output=True, text=True, timeout=60)
        runs = json.loads(done.stdout).get("runs", [])
    except (OSError, subprocess.SubprocessError, ValueError, AttributeError):
        return None
    for run in runs:
        if str(run.get("run-id")) == run_id:
            return run.get("status")
    return None


def flower_run(flwr_args: list[str], log=print) -> int:
    """``flwr run <flwr_args>`` on a local simulation SuperLink started here and stopped
    afterwards (see the module docstring); the exit status."""
    if "--stream" not in flwr_args:  # without it flwr run returns at once, and the run would be stopped
        flwr_args = [*flwr_args, "--stream"]
    port, control_port = local_ports()
    env = flower_env()
    link = None
    if superlink_answers(port):
        log(f"spafl flower run: a SuperLink already answers on 127.0.0.1:{port}; not started here, so it is used and "
            "left running")
    else:
        link = LocalSuperLink(port, control_port, flwr_home() / "local-superlink", log)
        try:
            link.start()
        except RuntimeError as e:
            log(f"spafl flower run: {e}")
            return 1
    try:
        try:
            process = subprocess.Popen(["flwr", "run", *flwr_args], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, bufsize=1)
        except OSError as e:
            log(f'spafl flower run: cannot start flwr ({e}); is Flower installed (pip install -e ".[flower]")?')
            return 1
        run_id = None
        for line in process.stdout:  # passed on as it comes, the run id noted
            sys.stdout.write(line)
            sys.stdout.flush()
            found = _RUN_ID.search(line)
            if found and run_id is None:
                run_id = found.group(1)
        status = process.wait()
        if status == 0 and run_id is not None:
            outcome = run_status(run_id, env)
            if outcome is not None and "failed" in outcome:
                log(f"spafl flower run: run {run_id} ended {outcome} (its log above says why)")
                status = 1
        return status
    except KeyboardInterrupt:
        log("spafl flower run: interrupted")
        return 130
    finally:
        if link is not None:
            link.stop()
