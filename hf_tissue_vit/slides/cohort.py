"""Many slides over one or many processes (``accelerate launch``), resumable: :func:`map_slides`.

Every process expands the inputs the same way and reads which slides are already done (their folder
ends with :data:`DONE_FILE`, written after every other file of the slide, with the settings it was
made with and its summary row). The slides left are checked, split between the processes (a bad one
stops every process with the same one-line error before any slide is mapped), then dealt out whole,
longest first, to the process with the least work so far (:func:`~hf_tissue_vit.distributed.longest_first`);
each process maps its slides one at a time on its own device. A slide that fails while it is mapped
is reported in ``summary.csv`` and the others go on. The main process gathers the rows and writes
``summary.csv`` in input order. With one process (plain ``python``) it is the same code.

A slide done from another file or with other settings (model, window size, µm/px, ...) is mapped
again, as is every slide with ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import distributed
from ..fileio import atomic_write_json
from .outputs import SLIDE_FILES, save_slide_map, summary_row, write_summary
from .reader import open_slide
from .run import SlideMapOptions, check_slide, expand_inputs, map_slide, model_mpp

logger = logging.getLogger(__name__)

DONE_FILE = "slide_map_done.json"  # written last into a slide's folder: its outputs are complete


def run_settings(predictor: Any, options: SlideMapOptions, target_mpp: float | None) -> dict[str, Any]:
    """What a slide's outputs depend on, recorded in :data:`DONE_FILE` and compared on a re-run."""
    config = getattr(getattr(predictor, "model", None), "config", None)
    model = getattr(config, "_name_or_path", None) or None
    if model and os.path.isdir(model):
        model = str(Path(model).resolve())
    return {"model": model, "label_names": list(predictor.label_names), "target_mpp": target_mpp,
            "tile": options.tile, "stride": options.stride, "slide_mpp": options.slide_mpp,
            "background_threshold": options.background_threshold, "min_tissue_area": options.min_tissue_area,
            "max_side": options.max_side, "tta": bool(getattr(predictor, "tta", False)),
            "bf16": bool(getattr(predictor, "bf16", False))}


def done_row(out: Path, slide: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The summary row of ``slide`` when ``out`` holds its finished map made with ``settings``, else None
    (not done, or done from another slide or with other settings: then it is mapped again)."""
    try:
        record = json.loads((out / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no mark (or not ours): not done
        return None
    if record.get("slide") == os.path.abspath(slide) and record.get("settings") == settings:
        return record["row"]
    theirs = record.get("settings") or {}
    differ = sorted(k for k in settings if theirs.get(k) != settings[k]) or ["slide"]
    logger.info("%s was made with other settings (%s): mapped again", out, ", ".join(differ))
    return None


def _remove_temps(folder: Path, names: Sequence[str]) -> None:
    """Remove the temp files that atomic writes of ``names`` left in ``folder`` (a killed run's)."""
    if folder.is_dir():
        prefixes = tuple(f".{name}." for name in names)
        for path in folder.iterdir():
            if path.is_file() and ".tmp" in path.name and path.name.startswith(prefixes):
                path.unlink(missing_ok=True)


def _prepare_folder(out: Path) -> None:
    """Before a slide is (re)mapped: no done-mark, no temp file of a killed run in its folder."""
    (out / DONE_FILE).unlink(missing_ok=True)
    _remove_temps(out, (*SLIDE_FILES, DONE_FILE))


def _map_one(predictor: Any, path: str, out: Path, options: SlideMapOptions, target: float | None,
             settings: dict[str, Any], state: Any) -> dict[str, Any]:
    """Map and save one slide, mark it done; a failure while mapping becomes its summary row."""
    try:
        _prepare_folder(out)
        with open_slide(path, options.slide_mpp, options.max_image_pixels) as reader:
            result = map_slide(predictor, reader, options, target)
    except Exception as err:  # unreadable while mapping (overview level, I/O ...): the run goes on
        logger.error("%s: %s: %s", path, type(err).__name__, err)
        return summary_row(None, path, str(out), f"{type(err).__name__}: {err}")
    save_slide_map(result, out, options.max_side)
    row = summary_row(result.fractions(), path, str(out))
    atomic_write_json(out / DONE_FILE, {"slide": os.path.abspath(path), "settings": settings, "row": row,
                                        "process": [state.process_index, state.num_processes]})
    return row


def _output_dirs(paths: Sequence[str], output_dir: Path) -> list[Path]:
    """One sub-folder per slide, named after it (a number added where two slides share a name)."""
    dirs, used = [], set()
    for path in paths:
        name, n = Path(path).stem or "slide", 1
        while (output_dir / name) in used:
            n += 1
            name = f"{Path(path).stem}_{n}"
        used.add(output_dir / name)
        dirs.append(output_dir / name)
    return dirs


def map_slides(predictor: Any, inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
               options: SlideMapOptions | None = None, overwrite: bool = False,
               state: Any = None) -> list[dict[str, Any]]:
    """Map every slide of ``inputs`` (files, folders, globs) into ``output_dir`` (the folder itself for
    a single file, else one sub-folder per slide) and write ``summary.csv``; returns the summary rows
    in input order, on every process. ``state``: the ``PartialState`` (default: this process's)."""
    options = options or SlideMapOptions()
    state = state or distributed.process_state()
    paths = expand_inputs(inputs)
    target = model_mpp(predictor, options.mpp)
    output_dir = Path(output_dir)
    single = len(paths) == 1 and len(inputs) == 1 and os.path.isfile(os.fspath(inputs[0]))
    outs = [output_dir] if single else _output_dirs(paths, output_dir)
    settings = run_settings(predictor, options, target)
    rows: dict[int, dict[str, Any]] = {}
    if not overwrite:
        rows = {i: row for i, out in enumerate(outs) if (row := done_row(out, paths[i], settings)) is not None}
    todo = [i for i in range(len(paths)) if i not in rows]
    if rows:
        logger.info("%d of %d slides are done already (%s): skipped", len(rows), len(paths), DONE_FILE)
    # every bad input is found before the first slide is mapped; the checks are shared out
    geometries = distributed.collectively(state, todo, lambda i: check_slide(paths[i], options, target))
    sizes = [g.rows * g.cols for g in geometries]
    mine = distributed.longest_first(sizes, state.num_processes)[state.process_index]
    logger.info("process %d of %d: %d slides to map", state.process_index + 1, state.num_processes, len(mine))
    done = [(todo[k], _map_one(predictor, paths[todo[k]], outs[todo[k]], options, target, settings, state))
            for k in mine]
    rows.update(distributed.gather(done))
    ordered = [rows[i] for i in range(len(paths))]
    if state.is_main_process:
        _remove_temps(output_dir, ("summary.csv",))  # one a killed run was writing
        write_summary(ordered, list(predictor.label_names), output_dir / "summary.csv")
    state.wait_for_everyone()
    return ordered
