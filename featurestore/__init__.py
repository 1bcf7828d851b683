"""The HDF5 feature store: plain numpy + h5py (never imports JAX), crash-safe and resumable."""

from featurestore.store import (
    ATTRIBUTES,
    SCHEMA_VERSION,
    BackboneInfo,
    FeatureStore,
    Split,
    StoreError,
    StoreWriter,
    create_store,
    finalize,
    upgrade,
    write_layer_view,
)
from featurestore.summary import summarize

__all__ = [
    "ATTRIBUTES",
    "SCHEMA_VERSION",
    "BackboneInfo",
    "FeatureStore",
    "Split",
    "StoreError",
    "StoreWriter",
    "create_store",
    "finalize",
    "upgrade",
    "write_layer_view",
    "summarize",
]
