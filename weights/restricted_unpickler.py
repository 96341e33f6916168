"""Read the tensors of official research checkpoints that pickle non-tensor objects, without executing any code.

Official NAT/DiNAT, BiFormer and Agent-Attention checkpoints are training dicts such as
``{"model": state_dict, "optimizer": ..., "config": <pickled yacs CfgNode>, "args": <argparse.Namespace>}``.
``torch.load(weights_only=True)`` refuses them (the config classes are not allow-listed and often not even
installed), and ``weights_only=False`` would execute whatever the pickle names.

This module unpickles them with an allow-list: tensor/storage rebuild functions, ``OrderedDict``, ``torch.Size`` and
dtypes resolve normally; every other global resolves to :class:`OpaqueObject`, an inert record that stores its
constructor arguments and state and never calls anything. Reading a malicious pickle therefore yields opaque records
instead of running its payload, and the tensors are returned intact.
"""

from __future__ import annotations

import collections
import os
import pickle
import types
from typing import Any

import torch

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
}
_ALLOWED_GLOBALS.update(
    {("torch", name): getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}
)


class OpaqueObject:
    """Inert stand-in for a pickled object of a class that is not allow-listed.

    Records the global's name, the constructor arguments, dict/list items and the pickled state; it has no behaviour.
    """

    global_name = "<unknown>"

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:  # pickle NEWOBJ calls only __new__
        record = super().__new__(cls)
        record.args, record.kwargs, record.items, record.state = args, kwargs, {}, None
        return record

    def __call__(self, *args: Any, **kwargs: Any) -> OpaqueObject:  # REDUCE on a record (e.g. getattr(...)(...))
        return type(self)(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:  # pickle BUILD
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) of dict subclasses such as yacs CfgNode
        self.items[key] = value

    def append(self, value: Any) -> None:  # APPEND(S) of list subclasses
        self.items[len(self.items)] = value

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"OpaqueObject({self.global_name})"


def _opaque_class(module: str, name: str) -> type[OpaqueObject]:
    return types.new_class(name, (OpaqueObject,), exec_body=lambda ns: ns.update(global_name=f"{module}.{name}"))


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only allow-listed globals; every other global becomes an :class:`OpaqueObject`."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        return allowed if allowed is not None else _opaque_class(module, name)


class _RestrictedPickleModule:
    """The ``pickle_module`` protocol ``torch.load`` expects, backed by :class:`RestrictedUnpickler`."""

    Unpickler = RestrictedUnpickler
    __name__ = "attnzoo_restricted_pickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()


def restricted_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` through :class:`RestrictedUnpickler`: tensors are rebuilt, no pickled code is executed."""
    return torch.load(
        os.fspath(path), map_location=map_location, pickle_module=_RestrictedPickleModule, weights_only=False
    )
