"""Checkpoint I/O, converters from official checkpoints, and loading / fine-tuning helpers."""

from .io import load_state_dict_file, unwrap_state_dict
from .official import (
    WeightsUnavailableError,
    build_model_with_official_weights,
    check_loaded_keys,
    checkpoint_cache_path,
    fetch_checkpoint,
    read_official_checkpoint,
    sha256_of_file,
)
from .restricted_unpickler import OpaqueObject, restricted_torch_load

__all__ = [
    "OpaqueObject",
    "WeightsUnavailableError",
    "build_model_with_official_weights",
    "check_loaded_keys",
    "checkpoint_cache_path",
    "fetch_checkpoint",
    "load_state_dict_file",
    "read_official_checkpoint",
    "restricted_torch_load",
    "sha256_of_file",
    "unwrap_state_dict",
]
