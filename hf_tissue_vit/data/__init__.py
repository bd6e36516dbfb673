"""Labelled tissue tiles as a Hugging Face ``DatasetDict`` (train / validation / test).

Modules, in the order a build runs through them:

- :mod:`.sources` finds the tiles in a folder or zip (class folders or train/val/test layout),
  :mod:`.manifest` in a CSV/Parquet manifest, :mod:`.hub_source` in a Hub dataset, :mod:`.download`
  fetches the Kather 2016 Zenodo zip (cache, MD5); :mod:`.classes` decides the classes and their order
  (presets for known releases, ``--classes``, ``--label_map``);
- :mod:`.decode` decodes each file once, streaming to Arrow shards (checks: modes, sizes, duplicates);
- :mod:`.splits` assigns tiles to splits (stratified, slide-disjoint, or as given);
- :mod:`.build` runs those steps (:func:`build_dataset_with_report`) and fills the :class:`BuildReport`;
- :mod:`.storage` saves / loads / pushes, with the metadata file; :mod:`.card` renders the dataset card;
- :mod:`.schema` holds the split and class names and the features every split has.
"""

from __future__ import annotations

from .build import (
    SOURCE_TYPES,
    build_dataset,
    build_dataset_with_report,
    check_mpp,
    is_kather_tiles,
    resolve_source,
    tile_resolution,
)
from .card import DatasetCardInfo, dataset_card
from .classes import PRESET_NAMES, PRESETS, ClassChoice, parse_class_list, parse_label_map
from .download import (
    DEFAULT_DOWNLOAD_TIMEOUT,
    DownloadError,
    cached_zip_path,
    check_md5,
    default_cache_dir,
    download_kather_zip,
    md5_of_file,
    release_location,
)
from .hub_source import check_hub_id
from .report import BuildReport
from .schema import (
    SLIDE_PATTERN,
    SPLITS,
    class_name_for,
    dataset_features,
    parse_slide,
    split_class_counts,
)
from .splits import SPLIT_FRACTIONS, SPLIT_MODES, target_split_sizes
from .storage import (
    METADATA_FILE,
    build_workspace,
    check_output_dir,
    complete_splits,
    dataset_metadata,
    load_tissue_dataset,
    read_dataset_metadata,
    record_hub_dataset_id,
    save_dataset,
)

__all__ = [
    "PRESETS",
    "PRESET_NAMES",
    "ClassChoice",
    "build_workspace",
    "parse_class_list",
    "parse_label_map",
    "DEFAULT_DOWNLOAD_TIMEOUT",
    "METADATA_FILE",
    "SLIDE_PATTERN",
    "SOURCE_TYPES",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "SPLIT_MODES",
    "BuildReport",
    "DatasetCardInfo",
    "DownloadError",
    "build_dataset",
    "build_dataset_with_report",
    "cached_zip_path",
    "check_hub_id",
    "check_md5",
    "check_mpp",
    "check_output_dir",
    "class_name_for",
    "dataset_card",
    "dataset_features",
    "dataset_metadata",
    "default_cache_dir",
    "download_kather_zip",
    "is_kather_tiles",
    "load_tissue_dataset",
    "complete_splits",
    "md5_of_file",
    "parse_slide",
    "read_dataset_metadata",
    "record_hub_dataset_id",
    "release_location",
    "resolve_source",
    "save_dataset",
    "split_class_counts",
    "target_split_sizes",
    "tile_resolution",
]
