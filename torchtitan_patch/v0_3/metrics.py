"""torchtitan 0.3's metrics processor with PaRO's figures (:mod:`torchtitan_patch.metrics`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from torchtitan.components.metrics import MetricsProcessor

from torchtitan_patch.metrics import ParoMetrics


class ParoMetricsProcessor(ParoMetrics, MetricsProcessor):
    """``MetricsProcessor`` that adds PaRO's communication and memory figures to each log."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        @classmethod
        def of(cls, config: MetricsProcessor.Config) -> ParoMetricsProcessor.Config:
            """This processor's config with the fields of torchtitan's ``config``."""
            return cls(**{f.name: getattr(config, f.name) for f in fields(config) if f.init})

    @property
    def log_freq(self) -> int:
        return self.config.log_freq
