"""The record of one build: what the source held, what was checked, what was decided."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BuildReport:
    """What a build saw and decided; saved as ``hf_tissue_vit_dataset.json`` next to the data.

    Each step of the build fills its part: the source reader the file counts and ``source_kind``,
    the decoder the mode/size/duplicate checks, the split the slides and class counts.
    """

    source: str
    source_kind: str
    split_by: str
    seed: int
    class_names: list[str]
    preset: str | None = None  # a known release (data.classes.PRESETS) the source was recognised as
    citation: str | None = None  # the dataset's citation: --citation, else the preset's
    n_image_files: int = 0
    n_ignored_files: int = 0
    ignored_examples: list[str] = field(default_factory=list)
    skipped_bad_files: list[str] = field(default_factory=list)
    converted_modes: dict[str, int] = field(default_factory=dict)
    tile_size: list[int] | None = None
    # Micrometres per pixel; None when the source does not tell (see build.tile_resolution).
    mpp: float | None = None
    other_size_counts: dict[str, int] = field(default_factory=dict)
    other_size_examples: list[str] = field(default_factory=list)
    dropped_classes: dict[str, int] = field(default_factory=dict)
    duplicate_groups: list[list[str]] = field(default_factory=list)
    removed_cross_split_duplicates: list[str] = field(default_factory=list)
    split_slides: dict[str, list[str]] = field(default_factory=dict)
    split_class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    build_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-ready values."""
        return asdict(self)

    def drop_class_tile(self, name: str) -> None:
        """Count one tile of a class that was not asked for (left out of the dataset)."""
        self.dropped_classes[name] = self.dropped_classes.get(name, 0) + 1
