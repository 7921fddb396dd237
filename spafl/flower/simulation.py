"""A run on Flower's simulation engine from Python (what ``flwr run`` does with a local
simulation federation, without the CLI and its SuperLink process)."""

from __future__ import annotations

import os
from pathlib import Path

from ..federated.config import FedConfig
from ..federated.data import ImageDataset
from .client import client_app
from .server import MethodStrategy, server_app


def simulate(config: FedConfig, *, state_dir: str | Path, out_dir: str | Path | None = None,
             num_supernodes: int | None = None, server_eval: bool = True, num_cpus: float = 1.0,
             num_gpus: float = 0.0, dataset: ImageDataset | None = None, verbose: bool = False) -> MethodStrategy:
    """Run ``config`` on Flower's simulation engine (Ray) with ``num_supernodes`` virtual
    SuperNodes (default: one per client), each ClientApp using ``num_cpus`` CPUs and a
    ``num_gpus`` fraction of a GPU; clients persist into ``state_dir``; ``dataset`` replaces
    the dataset ``config`` names (it travels to the Ray workers). Returns the server's
    strategy (``history``, ``wire_log``) after the last round."""
    started: list[MethodStrategy] = []
    server = server_app(config, out_dir, server_eval=server_eval, dataset=dataset, on_start=started.append)
    # The ClientApps run in Ray worker processes, whose working directory is not ours.
    client = client_app(config, Path(state_dir).resolve(), dataset)
    backend = {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    # Ray's notice about a future default for GPU visibility (we pass num_gpus explicitly).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    run_simulation(server, client, num_supernodes=num_supernodes or config.num_clients, backend_config=backend,
                   verbose_logging=verbose)
    if not started:
        raise RuntimeError("the ServerApp did not start (see Flower's log above)")
    return started[0]
