"""Reading windows: blocks of neighbouring windows read in threads, a bounded number at a time.

Windows are read a block at a time (one ``read_region`` of up to ``block`` x ``block`` windows of
the chosen level, so OpenSlide decodes each slide tile once and the per-call cost is shared) and
each window is resampled from the block to ``tile`` x ``tile`` px with PIL's bilinear filter over
its exact, possibly fractional, box (antialiased when it shrinks). A block that fails (a corrupt
tile) is read again window by window, so only the windows touching the bad tile are lost; each is
reported with its error. Blocks are read by a thread pool (OpenSlide and PIL release the GIL),
either ahead of the consumer into a bounded window of futures or chunk by chunk (see
:func:`iter_blocks`): memory stays at a few batches of windows whatever the slide's size.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .geometry import WindowGeometry
from .reader import SlideReader, SlideReadError

BLOCK_LEVEL_PX = 1024  # side of one block read, in pixels of the read level


@dataclass
class WindowBlock:
    """Windows read together: their grid cells, pixels (``tile`` x ``tile`` x 3 uint8) and errors."""

    cells: np.ndarray  # int [N, 2] (row, col)
    windows: list[np.ndarray | None] = field(default_factory=list)  # None where unreadable
    errors: list[str] = field(default_factory=list)  # "" where read


def block_size(geometry: WindowGeometry) -> int:
    """Windows per block side: about :data:`BLOCK_LEVEL_PX` pixels of the read level."""
    window_level = geometry.window0 / geometry.downsample
    return max(1, int(BLOCK_LEVEL_PX // max(window_level, 1.0)))


def group_cells(cells: np.ndarray, block: int) -> list[np.ndarray]:
    """Split (row, col) cells into blocks of ``block`` x ``block`` grid cells, in row-major block order."""
    if len(cells) == 0:
        return []
    keys = (cells[:, 0] // block) * (cells[:, 1].max() // block + 1) + cells[:, 1] // block
    order = np.argsort(keys, kind="stable")
    cells, keys = cells[order], keys[order]
    splits = np.flatnonzero(np.diff(keys)) + 1
    return np.split(cells, splits)


def _read_windows(reader: SlideReader, geometry: WindowGeometry, cells: np.ndarray) -> list[np.ndarray]:
    """Read the region covering ``cells`` once and resample each window out of it."""
    ds, level = geometry.downsample, geometry.level
    level_w, level_h = reader.levels[level].width, reader.levels[level].height
    x0s = cells[:, 1] * geometry.stride0 / ds  # window corners in read-level px
    y0s = cells[:, 0] * geometry.stride0 / ds
    side = geometry.window0 / ds
    margin = math.ceil(max(1.0, side / geometry.tile)) + 1  # the bilinear filter's reach
    bx0 = max(0, math.floor(x0s.min()) - margin)
    by0 = max(0, math.floor(y0s.min()) - margin)
    bx1 = min(level_w, math.ceil(x0s.max() + side) + margin)
    by1 = min(level_h, math.ceil(y0s.max() + side) + margin)
    loc_x, loc_y = round(bx0 * ds), round(by0 * ds)  # read_region takes level-0 coordinates
    region = reader.read_region(loc_x, loc_y, level, bx1 - bx0, by1 - by0)
    ox, oy = loc_x / ds, loc_y / ds
    size = (geometry.tile, geometry.tile)
    exact = abs(side - geometry.tile) < 1e-9
    out = []
    for x, y in zip(x0s - ox, y0s - oy, strict=True):
        if exact and float(x).is_integer() and float(y).is_integer():
            window = region.crop((int(x), int(y), int(x) + geometry.tile, int(y) + geometry.tile))
        else:
            box = (max(0.0, x), max(0.0, y), min(region.width, x + side), min(region.height, y + side))
            window = region.resize(size, Image.BILINEAR, box=box)
        out.append(np.asarray(window))
    return out


def read_block(reader: SlideReader, geometry: WindowGeometry, cells: np.ndarray) -> WindowBlock:
    """Read one block; on a read error, each window alone, so only the bad ones are lost."""
    block = WindowBlock(cells)
    try:
        block.windows = _read_windows(reader, geometry, cells)
        block.errors = [""] * len(cells)
        return block
    except SlideReadError:
        pass
    for cell in cells:
        try:
            block.windows.append(_read_windows(reader, geometry, cell[None])[0])
            block.errors.append("")
        except SlideReadError as err:
            block.windows.append(None)
            block.errors.append(str(err))
    return block


def iter_blocks(reader: SlideReader, geometry: WindowGeometry, blocks: Iterable[np.ndarray],
                workers: int = 2, prefetch: int = 8, overlap: bool = True,
                chunk_windows: int = 64) -> Iterator[WindowBlock]:
    """Yield :class:`WindowBlock` objects in order, read by ``workers`` threads (0: in the calling thread).

    ``overlap``: keep up to ``prefetch`` blocks reading while the consumer works (a GPU's forward
    pass leaves the CPU free). Otherwise blocks are read in chunks of about ``chunk_windows``
    windows, all threads on one chunk, and nothing is read while the consumer holds a chunk: on a
    CPU, reading threads that run beside torch's threads slow both down.
    """
    if workers <= 0:
        for cells in blocks:
            yield read_block(reader, geometry, cells)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="slide-read") as pool:
        yield from (_overlapped if overlap else _chunked)(pool, reader, geometry, blocks,
                                                          prefetch if overlap else chunk_windows)


def _overlapped(pool: ThreadPoolExecutor, reader: SlideReader, geometry: WindowGeometry,
                blocks: Iterable[np.ndarray], prefetch: int) -> Iterator[WindowBlock]:
    pending: deque[Future] = deque()
    try:
        for cells in blocks:
            pending.append(pool.submit(read_block, reader, geometry, cells))
            if len(pending) >= max(1, prefetch):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # consumer stopped early (error, Ctrl-C): drop what was not started
        for future in pending:
            future.cancel()


def _chunked(pool: ThreadPoolExecutor, reader: SlideReader, geometry: WindowGeometry,
             blocks: Iterable[np.ndarray], chunk_windows: int) -> Iterator[WindowBlock]:
    chunk: list[np.ndarray] = []
    iterator = iter(blocks)
    while True:
        cells = next(iterator, None)
        if cells is not None:
            chunk.append(cells)
            if sum(len(c) for c in chunk) < max(1, chunk_windows):
                continue
        if not chunk:
            return
        futures = [pool.submit(read_block, reader, geometry, c) for c in chunk]
        wait(futures)  # the whole chunk is read before the consumer gets any of it
        chunk = []
        yield from (future.result() for future in futures)
