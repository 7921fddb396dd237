"""Federated SpaFL (clients keep their weights and batch-norm state, only thresholds travel)
and the methods it is compared with.

    FedConfig, PRESETS, build_config       a run's configuration and the paper's presets
    Simulator                              the in-process loop (checkpoint, resume, history, parallel clients)
    ThreadPolicy                           workers x intra-op threads for a run (what ``spafl train`` picks)
    engine                                 the round, once for every transport (cohort, tally, aggregate, history row)
    methods                                SpaFL, FedAvg, local-only, SparsyFed and Top-K, a module each
    rules                                  what the server accepts and how it aggregates (every method, transport)
    cohort                                 the limits against the cohort, per round and across rounds (via rules)
    training                               a client's local SGD, state, report and evaluation
    keys                                   keyed randomness (collision-free stream keys)
    wire                                   the payload encoding (what a transport carries)
    accounting                             FLOPs and communication as the papers count them
    build                                  device, dataset checks, initial model (the same in every process)
    history                                a round's history row, every client's numbers, a run's summary
    powerprop                              SparsyFed's Powerpropagation layers, activation pruning, Top-K
    runfolder                              the only reader and writer of run files: history, checkpoints
                                           (kept, checked, fallback), Flower's server and client files
    compare                                several methods x seeds, and the Table-2-style summary
    data                                   a dataset in memory, the Dirichlet split, device tensors
    datafiles                              dataset readers (Fashion-MNIST, CIFAR, digits), --download
    models                                 LeNet-5, Conv4, ViT, ResNet-18 and the digits CNN
    plots                                  accuracy / density curves and mask maps (matplotlib)
    progress                               a run's progress line, a comparison's time left
    cli, flags, train_command              ``spafl train / compare / presets / plot``
"""

from .._threads import ThreadPolicy
from . import (
    accounting,
    build,
    compare,
    data,
    datafiles,
    engine,
    history,
    keys,
    methods,
    models,
    powerprop,
    rules,
    runfolder,
    training,
    wire,
)
from .config import DEFAULT_PRESET, PRESETS, FedConfig, build_config, load_config_file
from .rules import FederatedWarning
from .simulator import Simulator

__all__ = [
    "DEFAULT_PRESET",
    "FedConfig",
    "FederatedWarning",
    "PRESETS",
    "Simulator",
    "ThreadPolicy",
    "build_config",
    "accounting",
    "build",
    "compare",
    "data",
    "datafiles",
    "engine",
    "history",
    "keys",
    "load_config_file",
    "methods",
    "models",
    "powerprop",
    "rules",
    "runfolder",
    "training",
    "wire",
]
