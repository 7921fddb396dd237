"""The entry points ``flwr run .`` loads (``[tool.flwr.app.components]`` in pyproject.toml).

The Flower app bundle holds only this file and the app config: the apps themselves come from
the spafl installed where the SuperLink and SuperNodes run (``pip install -e ".[flower]"``),
so that the package's data files and its ``spafl.kernels`` are there too.
"""

from spafl.flower.client import app as client
from spafl.flower.server import app as server

__all__ = ["client", "server"]
