"""CPU mode for torchtitan 0.2.2 (:mod:`torchtitan_patch.cpu`): shim 3 through its train specs."""

from __future__ import annotations

import dataclasses
import functools

from torchtitan_patch.cpu import gloo_safe, point_torchtitan_at_cpu


def apply() -> None:
    """Apply the shims (once, through :func:`torchtitan_patch.cpu.enable_cpu_mode`)."""
    import torchtitan.components.metrics  # noqa: F401  (modules that copy device_* at import)
    import torchtitan.distributed.parallel_dims  # noqa: F401
    import torchtitan.distributed.utils  # noqa: F401
    import torchtitan.protocols.train_spec as train_spec_module
    import torchtitan.tools.profiling  # noqa: F401

    point_torchtitan_at_cpu()
    get_train_spec = train_spec_module.get_train_spec

    @functools.wraps(get_train_spec)
    def get_gloo_safe_train_spec(name: str):
        spec = get_train_spec(name)
        return dataclasses.replace(spec, parallelize_fn=gloo_safe(spec.parallelize_fn))

    train_spec_module.get_train_spec = get_gloo_safe_train_spec
