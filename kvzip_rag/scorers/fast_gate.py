"""The learned KVzip gate: a per-(layer, kv head) linear map from a cached key to its predicted log KVzip score.

Fast KVzip (arXiv 2601.17668) and kvpress's KVzap train a small gate on KVzip's own scores so that compression
costs one prefill. We measured which input predicts best on SmolLM2-135M (BENCHMARKS.md, "kvzip-fast"): a linear
map of the cached *post-RoPE* key (64 weights + bias per head) ranks pairs as well as one of the layer's input
hidden state (576 weights) and needs no hook into the forward pass, because the keys are already in the cache.

The gate is stored as safetensors in ``cache_dir()/gates/<model fingerprint>.safetensors`` and refused for any
other model: its weights mean nothing for other keys.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import CorruptBlobError, ModelMismatchError
from ..models import KVzipModel, cache_dir

GATE_FORMAT = "kvzip-rag-gate/1"
FEATURES = "post-rope-key"


@dataclass
class Gate:
    """``log score ~ keys @ weight[row, head] + bias[row, head]`` for every compressed layer ``layers[row]``."""

    model_fingerprint: str
    layers: list[int]
    weight: torch.Tensor  # (rows, kv_heads, head_dim) float32
    bias: torch.Tensor  # (rows, kv_heads) float32
    meta: dict[str, str] = field(default_factory=dict)  # calibration facts (corpus size, held-out correlation)

    def predict(self, keys: list[torch.Tensor]) -> torch.Tensor:
        """Predicted KVzip scores (exp of the predicted log score), shape (rows, kv_heads, tokens), from each
        compressed layer's cached context keys ``(kv_heads, tokens, head_dim)``."""
        rows = [
            torch.einsum("htd,hd->ht", k.float(), self.weight[row].to(k.device)) + self.bias[row, :, None].to(k.device)
            for row, k in enumerate(keys)
        ]
        return torch.stack(rows).cpu().exp()

    def check_model(self, model: KVzipModel) -> None:
        if self.model_fingerprint != model.fingerprint:
            raise ModelMismatchError(
                f"this kvzip-fast gate was calibrated for the model with fingerprint {self.model_fingerprint}, not "
                f"for {model.name!r} (fingerprint {model.fingerprint}); run `kvzip-rag calibrate --model ...` for it"
            )
        heads = model.config.num_key_value_heads
        if self.weight.shape[1] != heads:
            raise ModelMismatchError(f"the gate has {self.weight.shape[1]} kv heads per layer, the model {heads}")

    def save(self, path: Path) -> Path:
        """Write atomically (a concurrent reader sees the old file or the new one, never half of one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.float().contiguous(), "bias": self.bias.float().contiguous(),
                   "layers": torch.tensor(self.layers, dtype=torch.int64)}
        metadata = {**self.meta, "format": GATE_FORMAT, "features": FEATURES,
                    "model_fingerprint": self.model_fingerprint}
        handle, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        os.close(handle)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: Path, model: KVzipModel | None = None) -> "Gate":
        """Read a gate file; with ``model``, refuse it unless it was calibrated for that model."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for a damaged header
            raise CorruptBlobError(f"{path} is not a readable safetensors gate file: {error}") from error
        if metadata.get("format") != GATE_FORMAT or metadata.get("features") != FEATURES:
            raise CorruptBlobError(f"{path} is not a kvzip-rag gate (format {metadata.get('format')!r})")
        fingerprint = metadata.pop("model_fingerprint")
        for key in ("format", "features"):
            metadata.pop(key)
        gate = cls(fingerprint, tensors["layers"].tolist(), tensors["weight"], tensors["bias"], metadata)
        if model is not None:
            gate.check_model(model)
        return gate


def gate_path(model: KVzipModel) -> Path:
    """Where the gate of ``model`` lives: beside the converted models, keyed by the model fingerprint."""
    return cache_dir() / "gates" / f"{model.fingerprint}.safetensors"


def find_gate(model: KVzipModel) -> Gate | None:
    """The stored gate of ``model``, or None when it was never calibrated."""
    path = gate_path(model)
    return Gate.load(path, model) if path.exists() else None
