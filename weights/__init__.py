"""Checkpoint I/O, converters from official checkpoints, and loading / fine-tuning helpers."""

from .io import load_state_dict_file, unwrap_state_dict

__all__ = ["load_state_dict_file", "unwrap_state_dict"]
