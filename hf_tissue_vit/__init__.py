"""hf_tissue_vit: Vision Transformers for H&E colorectal tissue tiles on the Hugging Face stack."""

from .constants import CLASS_NAMES

__version__ = "0.1.0"
__all__ = ["CLASS_NAMES", "__version__"]
