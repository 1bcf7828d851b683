"""The HDF5 feature store: plain numpy + h5py (never imports JAX), crash-safe and resumable."""

from featurestore.store import (
    ATTRIBUTES,
    CODE_LABELS,
    SCHEMA_VERSION,
    BackboneInfo,
    FeatureStore,
    Split,
    StoreError,
    StoreWriter,
    create_store,
    finalize,
    set_codes,
    upgrade,
    write_layer_view,
)
from featurestore.summary import summarize

__all__ = [
    "ATTRIBUTES",
    "CODE_LABELS",
    "SCHEMA_VERSION",
    "BackboneInfo",
    "FeatureStore",
    "Split",
    "StoreError",
    "StoreWriter",
    "create_store",
    "finalize",
    "set_codes",
    "upgrade",
    "write_layer_view",
    "summarize",
]
