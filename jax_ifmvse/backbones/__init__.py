"""Pretrained speech backbones (Whisper encoder, WavLM, HuBERT, Data2Vec-audio) behind one interface."""

from jax_ifmvse.backbones.base import Backbone, masked_mean
from jax_ifmvse.backbones.sources import (
    BadSource,
    cache_root,
    load_backbone,
)

__all__ = [
    "Backbone",
    "BadSource",
    "cache_root",
    "load_backbone",
    "masked_mean",
]
