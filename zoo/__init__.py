"""attnzoo: a timm-compatible zoo of vision transformers built on efficient attention.

``import attnzoo`` registers every model of the zoo into timm's registry::

    import attnzoo, timm
    model = timm.create_model("gated_vit_small_patch16_224")
"""

from . import gated_vit, layers  # noqa: F401  (importing a family registers its models)
from ._registry import list_models

__version__ = "0.1.0"
__all__ = ["__version__", "layers", "list_models"]
