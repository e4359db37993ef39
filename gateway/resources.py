"""Files shipped with the gateway: migrations and the broker configuration.

In a wheel they live in ``gateway/_data``; in a source checkout (editable install) at the top level.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The directory ``name`` (``migrations``, ``mosquitto``, ``schemas``)."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"cannot find the {name}/ directory next to the gateway package; reinstall the gateway"
    )
