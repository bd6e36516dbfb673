"""Dataset and model cards: card data filled as a run happens + Jinja templates from ``model_card/``."""

from ..card_templates import render_card, render_text, template_path
from .build import build_model_card, existing_card, is_package_card, write_model_card
from .model_card import (
    DEFAULT_MODEL_LICENSE,
    EVALUATION_SECTION_TEMPLATE,
    EVALUATIONS_FILE,
    MODEL_CARD_TEMPLATE,
    MODEL_TAGS,
    PACKAGE_TAG,
    RUN_FILE,
    ModelCardInfo,
    evaluation_section,
    hyperparameter_rows,
    merged_card_data,
)

__all__ = [
    "DEFAULT_MODEL_LICENSE", "EVALUATION_SECTION_TEMPLATE", "EVALUATIONS_FILE", "MODEL_CARD_TEMPLATE", "MODEL_TAGS",
    "PACKAGE_TAG", "RUN_FILE", "ModelCardInfo", "build_model_card", "evaluation_section", "existing_card",
    "hyperparameter_rows", "is_package_card", "merged_card_data", "render_card", "render_text", "template_path",
    "write_model_card",
]
