"""Hydrobit production gateway: MQTT devices in, PostgreSQL ledger, replies and state out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hydrobit-gateway")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0.0.0"
