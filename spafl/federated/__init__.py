"""Federated SpaFL (clients keep their weights and batch-norm state, only thresholds travel)
and the methods it is compared with.

    FedConfig, PRESETS, build_config       a run's configuration and the paper's presets
    Simulator                              the in-process loop (checkpoint, resume, history, parallel clients)
    ThreadPolicy                           workers x intra-op threads for a run (what ``spafl train`` picks)
    server                                 what every engine shares: the round's tally, history files, initial model
    protocol                               the round as plain functions (client and server side)
    methods                                SpaFL, FedAvg, local-only, SparsyFed and Top-K behind one interface
    powerprop                              SparsyFed's Powerpropagation layers, activation pruning, Top-K
    runfolder                              a run folder's files: checkpoints (kept, checked, fallback), --overwrite
    compare                                several methods x seeds, and the Table-2-style summary
    data                                   dataset readers, the Dirichlet split, device tensors
    models                                 LeNet-5, Conv4, ViT, ResNet-18 and the digits CNN
    plots                                  accuracy / density curves and mask maps (matplotlib)
"""

from .._threads import ThreadPolicy
from . import compare, data, methods, models, powerprop, protocol, runfolder, server
from .config import DEFAULT_PRESET, PRESETS, FedConfig, build_config, load_config_file
from .simulator import FederatedWarning, Simulator

__all__ = [
    "DEFAULT_PRESET",
    "FedConfig",
    "FederatedWarning",
    "PRESETS",
    "Simulator",
    "ThreadPolicy",
    "build_config",
    "compare",
    "data",
    "load_config_file",
    "methods",
    "models",
    "powerprop",
    "protocol",
    "runfolder",
    "server",
]
