"""Tissue maps of whole-slide images: OpenSlide reading by µm/px, tissue detection, streamed windows.

Modules: :mod:`.reader` (OpenSlide and plain-image readers), :mod:`.geometry` (resolution, level
choice, window grid), :mod:`.tissue` (overview and tissue mask), :mod:`.windows` (threaded block
reading), :mod:`.outputs` (the map and its files), :mod:`.run` (one slide), :mod:`.cohort` (many slides
over one or many processes, resumable).
"""

from .cohort import DONE_FILE, map_slides
from .geometry import MAX_UPSAMPLING, WindowGeometry, choose_level, plan_windows
from .outputs import (
    BACKGROUND,
    UNREADABLE,
    SlideMap,
    save_slide_map,
    write_geojson,
    write_summary,
)
from .reader import (
    SLIDE_EXTENSIONS,
    ImageReader,
    Level,
    OpenSlideReader,
    SlideReader,
    SlideReadError,
    open_slide,
    openslide_available,
)
from .run import (
    SlideMapOptions,
    check_slide,
    expand_inputs,
    map_slide,
    model_mpp,
)
from .tissue import read_overview, tissue_mask, window_tissue_fraction

__all__ = [
    "BACKGROUND",
    "DONE_FILE",
    "MAX_UPSAMPLING",
    "SLIDE_EXTENSIONS",
    "UNREADABLE",
    "ImageReader",
    "Level",
    "OpenSlideReader",
    "SlideMap",
    "SlideMapOptions",
    "SlideReadError",
    "SlideReader",
    "WindowGeometry",
    "check_slide",
    "choose_level",
    "expand_inputs",
    "map_slide",
    "map_slides",
    "model_mpp",
    "open_slide",
    "openslide_available",
    "plan_windows",
    "read_overview",
    "save_slide_map",
    "tissue_mask",
    "window_tissue_fraction",
    "write_geojson",
    "write_summary",
]
