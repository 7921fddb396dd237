"""Flower deployments as separate processes on 127.0.0.1: the README's deployment commands as
written (TLS and SuperNode authentication; addresses replaced by loopback, placeholders by
values), with a node that cannot serve the run and one that claims a partition already served;
the refusals of an unregistered SuperNode, of a SuperNode and a ``flwr`` client without TLS or
without the CA; and a SuperLink restart that the SuperNodes survive. The certificates and keys
are made here. Each test starts several processes and takes minutes on a small machine."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from flower_processes import (
    Processes,
    flower_bin,
    free_port,
    history_rows,
    make_pki,
    node_keys,
    tiny_fashion_mnist,
    wait_until,
)

pytest.importorskip("flwr", reason='Flower is not installed (pip install -e ".[flower]")')

ROOT = Path(__file__).resolve().parent.parent
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
         "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1"}


def _env(tmp_path: Path) -> dict:
    home = tmp_path / "flwr-home"
    home.mkdir()
    path = f"{flower_bin(tmp_path / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **QUIET, "FLWR_HOME": str(home), "PATH": path}


def readme_deployment() -> tuple[list[str], str]:
    """The commands of docs/flower.md's "## Deployment" block (continuation lines joined) and the
    SuperLink connection its comments give for ``$FLWR_HOME/config.toml``."""
    text = (ROOT / "docs" / "flower.md").read_text()
    section = text[text.index("## Deployment"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands, toml, current = [], [], ""
    for line in block.splitlines():
        if line.startswith("#   "):
            toml.append(line[4:])
            continue
        if line.startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands, "\n".join(toml) + "\n"


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "history.csv").open()))


def test_readme_deployment_runs_as_written(tmp_path):
    """The README's lines: TLS, SuperNode keys registered, one SuperNode per partition (the
    node-config's state-dir used to make every SuperNode fail); plus two registered SuperNodes
    that must not serve, one for a partition the run does not have and one for a partition
    already served: both are excluded with a warning and the run goes on with the others."""
    commands, connection = readme_deployment()
    superlink, keygen, register, supernode, flwr_run = commands
    assert superlink.startswith("flower-superlink") and "--insecure" not in " ".join(commands)
    assert keygen.startswith("ssh-keygen") and register.startswith("flwr supernode register")
    assert supernode.startswith("flower-supernode") and "state-dir='/var/spafl'" in supernode
    assert flwr_run.startswith("flwr run . mine")
    site = tmp_path / "site"  # where the commands run: the certificates and keys live here
    make_pki(site)
    port, var, data, out = free_port(), tmp_path / "var", tiny_fashion_mnist(tmp_path / "data"), tmp_path / "runs"
    var.mkdir()

    def local(command: str, node: str = "p", partition: str = "p") -> str:
        """Addresses to loopback, placeholders to this machine's values."""
        for old, new in (("SERVER", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("9091", str(port)),
                         ("/abs/path/to/ca.crt", str(site / "ca.crt")), ("/var/spafl", str(var)),
                         ("'/data'", f"'{data}'"), ("/abs/runs/fl", str(out)), ("node-p.key", f"node-{node}.key"),
                         ("partition-id=p", f"partition-id={partition}"), ("num-partitions=N", "num-partitions=2"),
                         ("num-clients=N", "num-clients=2"), ("clients-per-round=K", "clients-per-round=2")):
            command = command.replace(old, new)
        return command

    env = _env(tmp_path)
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(local(connection))
    procs = Processes(env, tmp_path / "logs", site)
    try:
        procs.start("superlink", local(superlink))
        wait_until(lambda: procs.run("flwr ls mine", 60).returncode == 0, 120, 2, "the SuperLink")
        # partitions 0 and 1 as the README says; then partition 5 of 2 (cannot serve) and a
        # second node for partition 0. Several SuperNodes on one machine need their own
        # runtime ports (--port), which separate machines do not.
        for node, partition in (("0", "0"), ("1", "1"), ("broken", "5"), ("duplicate", "0")):
            if shutil.which("ssh-keygen"):
                made = procs.run(local(keygen, node), 60)
                assert made.returncode == 0, made.stdout
            else:  # the same key files, made without OpenSSH
                node_keys(site, f"node-{node}.key")
            registered = procs.run(local(register, node), 60)
            assert registered.returncode == 0 and "registered successfully" in registered.stdout, registered.stdout
            procs.start(f"node-{node}", local(supernode, node, partition) + f" --port {free_port()}")
        wait_until(lambda: procs.run("flwr supernode ls mine", 60).stdout.count("online") >= 4, 180, 2,
                   "four SuperNodes online")
        procs.start("run", local(flwr_run), cwd=ROOT)
        wait_until(lambda: history_rows(out) >= 2, 900, 2, "two rounds")
        run_id = re.search(r"Successfully started run (\d+)", procs.log("run")).group(1)
        stopped = procs.run(f"flwr stop {run_id} mine", 120)  # the preset runs 500 rounds
        assert stopped.returncode == 0, stopped.stdout
        log = procs.log("run")
        assert re.search(r"node \d+ excluded from sampling: cannot serve this run: .*this SuperNode serves "
                         r"partition 5 of 2", log), log[-3000:]
        assert re.search(r"node \d+ excluded from sampling: claims partition 0, which node \d+ serves", log)
        for row in _rows(out)[:2]:
            assert row["sampled"] == "0 1" and row["participants"] == "2" and row["dropped"] == "0"
        # each client's state file and the one before it (kept by the run folder's atomic write)
        assert sorted(p.name for p in var.glob("partition-*.pt")) == sorted(
            f"partition-0000{p}{suffix}.pt" for p in (0, 1) for suffix in ("", ".prev"))
        assert (var / "superlink.db").is_file()
    finally:
        procs.close()


def test_secure_deployment_tls_node_auth_and_superlink_restart(tmp_path):
    pki = make_pki(tmp_path / "pki")
    keys = {name: node_keys(tmp_path / "keys", name) for name in ("node-0", "node-1", "unregistered")}
    port, state, out = free_port(), tmp_path / "state", tmp_path / "out"
    env = _env(tmp_path)
    address = f"127.0.0.1:{port}"
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink.secure]\naddress = "{address}"\nroot-certificates = "{pki["ca"]}"\n\n'
        f'[superlink.no-ca]\naddress = "{address}"\n\n'
        f'[superlink.plain]\naddress = "{address}"\ninsecure = true\n')
    superlink = (f"flower-superlink --ssl-ca-certfile {pki['ca']} --ssl-certfile {pki['cert']} "
                 f"--ssl-keyfile {pki['key']} --enable-supernode-auth --database {tmp_path / 'superlink.db'} "
                 f"--disable-runtime-dependency-installation --host 127.0.0.1 --port {port}")

    def supernode(name: str, partition: int, extra: str = "") -> str:
        return (f"flower-supernode --root-certificates {pki['ca']} --superlink {address} "
                f"--auth-supernode-private-key {keys[name][0]} --port {free_port()} "
                f"--node-config \"partition-id={partition} num-partitions=2 state-dir='{state}'\" {extra}")

    procs = Processes(env, tmp_path / "logs", ROOT)
    try:
        procs.start("superlink", superlink)
        wait_until(lambda: procs.run("flwr ls secure", 60).returncode == 0, 120, 2, "the SuperLink")
        # a flwr client without TLS, or without the CA that signed the SuperLink's certificate
        for connection in ("plain", "no-ca"):
            refused = procs.run(f"flwr ls {connection}", 60)
            assert refused.returncode != 0 and "unavailable" in refused.stdout, refused.stdout
        for name in ("node-0", "node-1"):
            registered = procs.run(f"flwr supernode register {keys[name][1]} secure", 60)
            assert registered.returncode == 0 and "registered successfully" in registered.stdout, registered.stdout
        procs.start("node-0", supernode("node-0", 0))
        procs.start("node-1", supernode("node-1", 1))
        # a SuperNode whose key is not registered, and one without TLS: both refused
        rogue = procs.start("unregistered", supernode("unregistered", 0, "--max-retries 2"))
        plain = procs.start("plain", f"flower-supernode --insecure --superlink {address} --port {free_port()} "
                                     "--max-retries 2 --node-config \"partition-id=1 num-partitions=2\"")
        assert rogue.wait(timeout=180) != 0 and plain.wait(timeout=180) != 0
        assert "Failed to activate SuperNode" in procs.log("unregistered"), procs.log("unregistered")[-2000:]
        assert "could not establish a connection" in procs.log("plain")
        wait_until(lambda: procs.run("flwr supernode ls secure", 60).stdout.count("online") == 2, 180, 2,
                   "the two registered SuperNodes online")
        run_config = f"num-clients=2 clients-per-round=2 state-dir='{state}' out-dir='{out}'"
        done = procs.run(f'flwr run . secure --stream --run-config "{run_config} rounds=2"', 900)
        assert done.returncode == 0 and history_rows(out) == 2, done.stdout[-3000:]

        # The SuperLink dies and comes back on its database: the SuperNodes reconnect by
        # themselves, and the same run submitted again continues from its checkpoint.
        procs.stop("superlink", signal.SIGKILL)
        procs.start("superlink", superlink)
        wait_until(lambda: procs.run("flwr supernode ls secure", 60).stdout.count("online") == 2, 240, 2,
                   "the SuperNodes back online")
        for name in ("node-0", "node-1"):
            assert procs.procs[name].poll() is None, procs.log(name)[-2000:]
        done = procs.run(f'flwr run . secure --stream --run-config "{run_config} rounds=3"', 900)
        assert done.returncode == 0 and "continuing the run" in done.stdout, done.stdout[-3000:]
        rows = _rows(out)
        assert [int(r["round"]) for r in rows] == [1, 2, 3] and all(r["participants"] == "2" for r in rows)
        for p in range(2):
            assert torch.load(state / f"partition-{p:05d}.pt", weights_only=True)["round"] == 2
    finally:
        procs.close()
        shutil.rmtree(tmp_path / "keys", ignore_errors=True)
