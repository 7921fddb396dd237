"""SpaFL and its baselines on Flower (``flwr``): the simulator's method functions behind a
Flower ``ServerApp`` and ``ClientApp``, so that a run moves from one process to Flower's
simulation engine or to real devices without changing what is computed.

    server.app, client.app      the apps ``flwr run .`` starts (settings from the run config)
    server_app(config), client_app(config)
                                the same apps for an explicit :class:`FedConfig`
    MethodStrategy              a Flower strategy over one of spafl's methods: SpaFL (uniform
                                mean of thresholds, global threshold change kept for the
                                weight update), FedAvg, local-only, SparsyFed, Top-K; the
                                round is the simulator's (spafl.federated.engine), only the
                                transport differs (nodes.py: messages and node discovery)
    simulate                    a run on Flower's simulation engine from Python
    config_from_run_config      a FedConfig from Flower's run config
    run.flower_run              ``spafl flower run``: ``flwr run`` on a local SuperLink that is
                                stopped afterwards

What crosses the wire is the simulator's message, in the same encoding
(:func:`spafl.federated.wire.encode`), as one byte array: for SpaFL the thresholds (and
the global threshold change on the downlink), nothing else. Each client keeps its model
(weights and batch-norm state) in a file per partition, so a restarted SuperNode resumes where
it stopped. The cohort of a round is the simulator's seeded sample of partition ids, mapped to
whichever Flower node holds each partition, so the same seed gives the same run.

Needs ``pip install -e ".[flower]"``. Importing this package switches off Flower's telemetry
and its update check for the processes it starts, unless already set (the switches are the
environment variables in :data:`QUIET_ENV`; export them in the shell too, so that the
``flwr`` command itself is quiet).
"""

from __future__ import annotations

import os

# Flower's documented switches: no usage telemetry, no update check, no package installation
# at run time (apps run in the environment they were started in).
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
for _key, _value in QUIET_ENV.items():
    os.environ.setdefault(_key, _value)

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('spafl.flower needs Flower: pip install -e ".[flower]" (flwr[simulation] 1.41)') from e

from .client import client_app  # noqa: E402
from .server import MethodStrategy, server_app  # noqa: E402
from .simulation import simulate  # noqa: E402
from .wire import config_from_run_config  # noqa: E402

__all__ = ["QUIET_ENV", "MethodStrategy", "client_app", "config_from_run_config", "server_app", "simulate"]
