"""Look inside a ViT: closed-form parameter counts and attention maps.

* :mod:`.parameters`: parameter table per component, closed form next to the model's count.
* :mod:`.attention`: attention rollout, last-layer CLS attention, :func:`explain_tiles`.
* :mod:`.figures`: overlays, per-tile figures and the per-class grid.
* :mod:`.tiles`: the tiles a run explains (:func:`tiles_from_images`, :func:`tiles_from_dataset`).
* :mod:`.vit_config`: :func:`load_vit_config`, the scripts' one-line refusal of non-ViT models.
"""

from .attention import (
    HEAD_FUSIONS,
    SUPPORTED_MODEL_TYPES,
    AttentionMaps,
    TileAttention,
    attention_rollout,
    cls_attention,
    compute_attention_maps,
    eager_attention,
    explain_tiles,
    require_vit,
    rollout_matrix,
    upsample_map,
)
from .figures import overlay_heatmap, save_attention_grid, save_tile_figure
from .parameters import (
    ParameterRow,
    count_parameters,
    format_parameter_table,
    parameter_report,
    parameter_report_from_config,
    parameter_table,
)
from .tiles import TileSet, label_from_path, tiles_from_dataset, tiles_from_images
from .vit_config import load_vit_config

__all__ = [
    "HEAD_FUSIONS",
    "SUPPORTED_MODEL_TYPES",
    "AttentionMaps",
    "ParameterRow",
    "TileAttention",
    "TileSet",
    "attention_rollout",
    "cls_attention",
    "compute_attention_maps",
    "count_parameters",
    "eager_attention",
    "explain_tiles",
    "format_parameter_table",
    "label_from_path",
    "load_vit_config",
    "overlay_heatmap",
    "parameter_report",
    "parameter_report_from_config",
    "parameter_table",
    "require_vit",
    "rollout_matrix",
    "save_attention_grid",
    "save_tile_figure",
    "tiles_from_dataset",
    "tiles_from_images",
    "upsample_map",
]
