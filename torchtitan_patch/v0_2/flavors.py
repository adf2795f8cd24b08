"""Extra llama3 flavors: model sizes between torchtitan's debug model (6.2 M) and 8B.

torchtitan looks a flavor up in the train spec's ``model_args``, which for llama3 is the
module-level ``torchtitan.models.llama3.llama3_args`` dict (the spec registered by
:mod:`torchtitan_patch.v0_2` shares it), so adding a key makes ``--model.flavor <key>`` work for
PaRO and stock runs alike.

- ``57M``: dim 512, 16 layers, 8 heads (head dim 64, as in llama3 8B), the debug model's
  vocabulary of 2048 (the shipped tokenizer's 665 tokens fit). 56,640,000 parameters: 226.6 MB
  in fp32, about 0.9 GB per full replica with AdamW (parameters, gradients, two moments), so 8
  CPU ranks fit in host memory under every strategy. Used by ``benchmarks/e2e.py``.
"""

from __future__ import annotations

from torchtitan.models.llama3 import TransformerModelArgs, llama3_args

FLAVORS = {
    "57M": TransformerModelArgs(dim=512, n_layers=16, n_heads=8, vocab_size=2048, rope_theta=500000),
}


def register_flavors() -> None:
    """Add :data:`FLAVORS` to llama3's flavors; a flavor torchtitan already defines is kept."""
    for name, args in FLAVORS.items():
        llama3_args.setdefault(name, args)


register_flavors()
