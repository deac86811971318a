"""Shipped failure scenarios (see :mod:`scenarios.base`). Never imports Qt."""

from .base import Scenario, get, names, register

__all__ = ["Scenario", "get", "names", "register"]
