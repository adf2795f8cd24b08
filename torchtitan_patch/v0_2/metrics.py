"""torchtitan 0.2.2's metrics processor with PaRO's figures (:mod:`torchtitan_patch.metrics`)."""

from __future__ import annotations

from typing import Any

from torchtitan.components.metrics import MetricsProcessor

from torchtitan_patch.metrics import ParoMetrics


class ParoMetricsProcessor(ParoMetrics, MetricsProcessor):
    """``MetricsProcessor`` that adds PaRO's communication and memory figures to each log."""

    @property
    def log_freq(self) -> int:
        return self.job_config.metrics.log_freq


def build_paro_metrics_processor(
    job_config: Any, parallel_dims: Any, model_args: Any = None, tag: str | None = None
) -> ParoMetricsProcessor:
    """A train spec ``build_metrics_processor_fn`` (torchtitan's signature)."""
    return ParoMetricsProcessor(job_config, parallel_dims, tag)
