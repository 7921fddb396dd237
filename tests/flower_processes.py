"""Helpers for the tests that deploy Flower as separate processes on 127.0.0.1: free ports,
Flower's commands bound to this interpreter, process groups that are always cleaned up, a
test PKI (a CA, a server certificate for loopback, SuperNode keys) and a tiny Fashion-MNIST."""

from __future__ import annotations

import datetime
import gzip
import ipaddress
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FLOWER_COMMANDS = ("flwr", "flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp",
                   "flwr-clientapp", "flwr-simulation")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_bin(folder: Path) -> Path:
    """Flower's commands as scripts that run them with this interpreter (an installed script's
    first line can name another environment's Python, and the SuperLink and SuperNodes start
    the others by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in FLOWER_COMMANDS:
        code = ("import sys; from importlib.metadata import entry_points; "
                f"sys.argv[0] = {name!r}; "
                f"sys.exit([e for e in entry_points(group='console_scripts') if e.name == {name!r}][0].load()())")
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$@"\n')
        script.chmod(0o755)
    return folder


class Processes:
    """Processes started in their own sessions (so a whole group, children included, can be
    signalled), each logging to a file; :meth:`close` ends them all (SIGTERM, then SIGKILL)."""

    def __init__(self, env: dict, logs: Path, cwd: Path):
        self.env, self.logs, self.cwd = env, logs, cwd
        self.procs: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: str | list[str], cwd: Path | None = None) -> subprocess.Popen:
        args = shlex.split(command) if isinstance(command, str) else command
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd or self.cwd,
                                start_new_session=True)
        proc._log = log  # type: ignore[attr-defined]
        self.procs[name] = proc
        return proc

    def run(self, command: str | list[str], timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a command to its end (its own session too; killed with its children on timeout)."""
        args = shlex.split(command) if isinstance(command, str) else command
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                cwd=cwd or self.cwd, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n[killed after {timeout} s]"
        return subprocess.CompletedProcess(args, proc.returncode, out, None)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        _kill_group(proc, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.wait(timeout=20)
        proc._log.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_until(check, timeout: float, interval: float = 1.0, what: str = "condition"):
    """Poll ``check()`` until it returns something true; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def history_rows(out: Path) -> int:
    path = out / "history.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


# --- a test PKI ---------------------------------------------------------------------------------


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for ``localhost`` / ``127.0.0.1`` signed by it (P-384, one
    day): ``{"ca", "cert", "key"}`` PEM files, what ``flower-superlink --ssl-*`` takes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("spafl test CA")).issuer_name(name("spafl test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (P-384, OpenSSH format, as ``ssh-keygen -t ecdsa
    -b 384`` writes it): ``(private key, public key)``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


# --- data -----------------------------------------------------------------------------------------


def tiny_fashion_mnist(root: Path, n_train: int = 120, n_test: int = 40, seed: int = 0) -> Path:
    """Random images and labels in Fashion-MNIST's layout under ``root`` (a data-root)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 64, (n, 28, 28)) + (labels * 19)[:, None, None]  # a little signal
        for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            data = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + \
                array.astype(np.uint8).tobytes()
            (raw / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(data))
    return root
