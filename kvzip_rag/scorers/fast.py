"""kvzip-fast: KVzip's scores predicted from the cached keys by a learned gate, so compression costs one prefill."""

from __future__ import annotations

import logging

import torch

from ..errors import ModelMismatchError
from ..prefill import PrefilledDocument
from .base import Scorer
from .kvzip import KVzipScorer

logger = logging.getLogger("kvzip_rag")


class KVzipFastScorer(Scorer):
    """Score each context KV pair with the model's calibrated gate (:mod:`.fast_gate`), no repeat pass.

    The gate is loaded automatically from the cache dir (``kvzip-rag calibrate`` writes it). A model without one
    is scored by KVzip itself, with a one-line notice; ``name`` then reads ``kvzip`` so the cache records which
    scorer really built it.
    """

    name = "kvzip-fast"

    def __init__(self, gate=None):
        self.gate = gate

    def score(self, document: PrefilledDocument) -> torch.Tensor:
        from .fast_gate import find_gate

        gate = self.gate or find_gate(document.model)
        if gate is None:
            logger.warning("kvzip-fast: model %r has no calibrated gate (run `kvzip-rag calibrate`); scoring with "
                           "KVzip instead", document.model.name)
            self.name = KVzipScorer.name
            return KVzipScorer().score(document)
        gate.check_model(document.model)
        if gate.layers != document.compressed_layers:
            raise ModelMismatchError(f"the gate covers layers {gate.layers}, the model compresses "
                                     f"{document.compressed_layers}; recalibrate it")
        self.name = type(self).name
        return gate.predict([document.context_keys(layer) for layer in document.compressed_layers])
