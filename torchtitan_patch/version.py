"""Which torchtitan is installed, and which adapter of this package serves it.

The version-independent core (PaRO fields and their checks, ``auto``, the parallelize step
around :func:`paro_fsdp.paro_parallelize`, the optimizer container, clipping, metrics,
checkpoint checks, initial weights, elastic restarts) lives in ``torchtitan_patch`` itself;
each supported torchtitan release has a small adapter that plugs it into that release's
extension points: ``torchtitan_patch.v0_2`` (TOML job files, train specs) and
``torchtitan_patch.v0_3`` (config functions, ``Trainer.Config`` subclasses, ``ModelSpec``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED = {"0.2.2": "v0_2", "0.3.0": "v0_3"}


class UnsupportedTorchtitanError(RuntimeError):
    """The installed torchtitan is not a release this package has an adapter for."""


def torchtitan_version() -> str:
    """The installed torchtitan's version (``""`` when it is not installed)."""
    try:
        return version("torchtitan")
    except PackageNotFoundError:
        return ""


def adapter() -> str:
    """The adapter for the installed torchtitan: ``"v0_2"`` or ``"v0_3"``.

    Raises:
        UnsupportedTorchtitanError: torchtitan is missing or of another release.
    """
    installed = torchtitan_version()
    name = SUPPORTED.get(installed)
    if name is None:
        found = f"torchtitan {installed} is installed" if installed else "torchtitan is not installed"
        raise UnsupportedTorchtitanError(
            f"{found}; paro-fsdp's torchtitan integration supports torchtitan {' and '.join(SUPPORTED)}: "
            f"install one (pip install -e '.[torchtitan]' for 0.2.2, '.[torchtitan03]' for 0.3.0)"
        )
    return name
