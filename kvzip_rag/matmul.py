"""Which precision the model's weight matrices multiply in on CPU: float32 (default) or bfloat16.

Why bfloat16: on a CPU with bfloat16 matrix units (Intel AMX, AVX512-BF16), oneDNN multiplies a bfloat16 weight
that was packed once into its own layout at the cost of reading it, whatever the number of rows. Measured on a
2-core Xeon with AMX, the linear layers of SmolLM2-135M for one decoding step: float32 17 ms at 1 row and 27-31 ms
at 8; bfloat16 packed 12 ms at 1 row and 12 ms at 8 (unpacked bfloat16 17-18 ms: oneDNN repacks the weight on
every call). So a batch of eight questions decodes for the price of one, and a single answer is faster too.

Only the ``nn.Linear`` layers (and the output head) change: their input is rounded to bfloat16, the product is
accumulated by oneDNN and returned as float32. Caches, attention, norms and the float32 weights themselves stay as
they are (the packed copy costs half the float32 weights' memory again), so the model's fingerprint and stores are
shared with float32 loads. Each output row depends on its own input row only (tested), so a batched answer is
its answer alone but where the float32 attention around the products differs in its last bit between the two
paths and rounding to bfloat16 turns that into another token at a near tie (12 of 480 answers in the serve
benchmark). What it costs in quality is measured (``kvzip-rag bench --task precision``, BENCHMARKS.md).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .errors import InvalidArgumentError

MATMUL_ENV = "KVZIP_RAG_MATMUL"
MATMULS = ("float32", "bfloat16")
_PACK_ROWS = 8  # oneDNN's hint for the rows a packed weight will meet; any count works (a batch of 8 is typical)


def bfloat16_matmul_supported() -> bool:
    """Whether this torch and CPU multiply bfloat16 with oneDNN (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_matmul(matmul: str | None, default: str = "float32") -> str:
    """The precision asked for: explicit, else ``KVZIP_RAG_MATMUL``, else ``default``; anything else is a clear
    error."""
    if matmul is None:
        matmul = os.environ.get(MATMUL_ENV, "").strip() or default
    if matmul not in MATMULS:
        raise InvalidArgumentError(f"matmul must be one of {', '.join(MATMULS)}, got {matmul!r}")
    return matmul


class BFloat16Linear(torch.nn.Linear):
    """An ``nn.Linear`` that multiplies its packed bfloat16 weight (made once by :func:`use_matmul`); its float32
    parameters stay, so state dicts, fingerprints and the tied embedding are untouched."""

    packed_weight: torch.Tensor
    packed_bias: torch.Tensor | None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.to(torch.bfloat16).reshape(-1, input.shape[-1])  # oneDNN's linear takes (rows, features)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.packed_bias, "none", [], "")
        return out.reshape(*input.shape[:-1], out.shape[-1]).to(input.dtype)

    def reference(self, input: torch.Tensor) -> torch.Tensor:
        """The same product without oneDNN's packing (what tests compare ``forward`` with)."""
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return F.linear(input.to(torch.bfloat16), self.weight.to(torch.bfloat16), bias).to(input.dtype)


def use_matmul(model: torch.nn.Module, matmul: str) -> None:
    """Make every ``nn.Linear`` of ``model`` multiply in ``matmul`` precision (reversible: float32 undoes it)."""
    matmul = resolve_matmul(matmul)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if matmul == "float32":
        for module in linears:
            if isinstance(module, BFloat16Linear):
                module.__class__ = torch.nn.Linear
                del module.packed_weight, module.packed_bias
        return
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        raise InvalidArgumentError(
            f"matmul='bfloat16' is for float32 models on CPU; this one is {parameter.dtype} on {parameter.device} "
            "(on a GPU, load it with dtype='bfloat16' instead)")
    if not bfloat16_matmul_supported():
        raise InvalidArgumentError("matmul='bfloat16' needs a CPU with bfloat16 matrix instructions (AVX512-BF16 "
                                   "or AMX) and a torch built with oneDNN; this one has neither: use float32")
    with torch.no_grad():
        for module in linears:
            if isinstance(module, BFloat16Linear):
                continue
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach().to(torch.bfloat16), _PACK_ROWS)
            module.__class__ = BFloat16Linear
            module.packed_weight = packed
            module.packed_bias = None if module.bias is None else module.bias.detach().to(torch.bfloat16)


def model_matmul(model: torch.nn.Module) -> str:
    """The precision ``model``'s linear layers multiply in now."""
    return "bfloat16" if any(isinstance(m, BFloat16Linear) for m in model.modules()) else "float32"
