"""attnzoo: a timm-compatible zoo of vision transformers built on efficient attention.

``import attnzoo`` registers every model of the zoo into timm's registry::

    import attnzoo, timm
    model = timm.create_model("gated_vit_small_patch16_224")
"""

# importing a family module registers its models (one line per family)
from . import (
    agent_deit,  # noqa: F401
    agent_pvt,  # noqa: F401
    agent_swin,  # noqa: F401
    biformer,  # noqa: F401
    gated_vit,  # noqa: F401
    layers,  # noqa: F401
    metapool,  # noqa: F401
    moh_vit,  # noqa: F401
    nat,  # noqa: F401
    ppma,  # noqa: F401
    ppt,  # noqa: F401
    rmt,  # noqa: F401
    token_pooling,  # noqa: F401
    tome,  # noqa: F401
)
from ._registry import list_models
from .layers import apply_token_merging, apply_token_reduction, remove_token_merging, remove_token_reduction

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "apply_token_merging",
    "apply_token_reduction",
    "layers",
    "list_models",
    "remove_token_merging",
    "remove_token_reduction",
]
