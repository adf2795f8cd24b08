"""torchtitan's metrics with PaRO's: bytes per link and model-state memory at every logged step.

Beside torchtitan's loss, throughput and device memory, each logged step reports for this
rank (the logging rank):

- intra- and inter-group bytes sent per optimizer step, averaged over the steps since the
  last log, in total and per phase (param_gather, grad_reduce, sync_g, sync_p, other), and
  of the inter bytes those sent block-quantized (``parallelism.paro_quant_*``);
- model-state memory: parameters, gradients and optimizer states held now.

The console gets one extra line after torchtitan's; TensorBoard / W&B get ``paro/...`` scalars.
"""

from __future__ import annotations

from typing import Any

from torchtitan.tools.logging import logger

from paro_fsdp import comm_stats, memory_stats
from torchtitan_patch.models import paro_models

_MIB = 1024 * 1024


def _mib(nbytes: float) -> str:
    return f"{nbytes / _MIB:.2f}MiB"


def _quantized(nbytes: float) -> str:
    """What of the inter bytes went quantized (nothing when quantization is off)."""
    return f" ({_mib(nbytes)} quantized)" if nbytes else ""


class ParoMetrics:
    """Mixin for torchtitan's ``MetricsProcessor``: adds PaRO's figures to each log.

    Each adapter's processor puts it before the release's ``MetricsProcessor`` and says where
    that release keeps ``metrics.log_freq`` (:attr:`log_freq`).
    """

    _last_logged_step: int | None = None

    @property
    def log_freq(self) -> int:
        """``metrics.log_freq`` of the job."""
        raise NotImplementedError

    def paro_metrics(self, steps: int) -> dict[str, float]:
        """This rank's PaRO figures per step over the last ``steps`` steps; resets the byte counters."""
        models = paro_models(self.model_parts or [])
        if not models:
            return {}
        metrics: dict[str, float] = {}
        for model in models:
            stats = comm_stats(model)
            for phase, links in stats.as_dict().items():
                for link, nbytes in links.items():
                    key = f"paro/comm_{link}_bytes/{phase}"
                    metrics[key] = metrics.get(key, 0.0) + nbytes / steps
            key = "paro/comm_inter_quantized_bytes_per_step"
            metrics[key] = metrics.get(key, 0.0) + stats.quantized("inter") / steps
            stats.reset()
            for kind, nbytes in memory_stats(model).items():
                key = f"paro/memory_{kind}_bytes"
                metrics[key] = metrics.get(key, 0.0) + nbytes
        for link in ("intra", "inter"):
            prefix = f"paro/comm_{link}_bytes/"
            metrics[f"paro/comm_{link}_bytes_per_step"] = sum(v for k, v in metrics.items() if k.startswith(prefix))
        return metrics

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        if self._last_logged_step is None:  # first log of this run (maybe resumed): steps since the last multiple
            steps = (step - 1) % self.log_freq + 1
        else:
            steps = step - self._last_logged_step
        paro = self.paro_metrics(max(1, steps))  # type: ignore[attr-defined]
        self._last_logged_step = step
        super().log(step, global_avg_loss, global_max_loss, grad_norm, {**(extra_metrics or {}), **paro})
        if paro:
            color = self.color
            logger.info(
                f"{color.red}step: {step:2}  {color.yellow}paro comm/step "
                f"intra: {_mib(paro['paro/comm_intra_bytes_per_step'])}  "
                f"inter: {_mib(paro['paro/comm_inter_bytes_per_step'])}"
                f"{_quantized(paro['paro/comm_inter_quantized_bytes_per_step'])}  "
                f"{color.turquoise}model state params: {_mib(paro['paro/memory_params_bytes'])}  "
                f"grads: {_mib(paro['paro/memory_grads_bytes'])}  "
                f"optim: {_mib(paro['paro/memory_optim_bytes'])}{color.reset}"
            )

