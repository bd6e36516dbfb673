"""One inference job over the processes of ``accelerate launch`` (a plain ``python`` run is one process).

Built on Accelerate's own primitives: :class:`accelerate.PartialState` (which process this is, its
device), ``split_between_processes`` (contiguous shards), ``gather_object`` and ``wait_for_everyone``.
What this module adds:

* :func:`process_state` / :func:`process_device`: the state for ``--device`` (``cpu``: gloo between
  CPU processes) and the device a process runs on (its own GPU under a launch).
* :func:`collectively`: a check that each process runs on its share; when any process fails, every
  process raises the same error, so no process is left waiting in a collective for one that stopped.
* :func:`longest_first`: whole items (slides) dealt to processes, longest first, each to the process
  with the least work so far (every process computes the same plan from the same sizes).
* :class:`ShardedCSV`: each process streams its contiguous shard's rows to a part file; the main
  process joins the parts, in process order (= input order), into the one output file, atomically.
* :func:`process_rank`: the rank from the launcher's environment, for code that runs before or
  without a state (e.g. printing a bad-input error once).
"""

from __future__ import annotations

import atexit
import csv
import heapq
import io
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from .fileio import atomic_write, remove_stale_temps, temp_name

if TYPE_CHECKING:  # accelerate (and torch) are imported when a state is made
    import torch
    from accelerate import PartialState

T = TypeVar("T")
logger = logging.getLogger(__name__)
EXIT_BARRIER_SECONDS = 60  # how long a finished process waits at exit for the others (the main one joins the outputs)
PART_PREFIX = ".part-"  # ShardedCSV part files: .part-<pid>-<hex>.<output name>


def process_rank() -> int:
    """Global rank of this process from the launcher's environment (0 without a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main_rank() -> bool:
    """True on the process that prints and writes the joint outputs (rank 0, or the only process)."""
    return process_rank() == 0


def process_state(device: str | None = None) -> PartialState:
    """This process's :class:`~accelerate.PartialState`; ``device`` ``"cpu"`` makes CPU processes (gloo).
    Under a launch the process group is destroyed at exit (see :func:`_end_process_group`)."""
    from accelerate import PartialState

    state = PartialState(cpu=device is not None and device.strip().lower() == "cpu")
    if state.num_processes > 1:
        atexit.unregister(_end_process_group)  # once, however many states a process makes
        atexit.register(_end_process_group)
    return state


def _end_process_group() -> None:
    """Destroy the default process group while the interpreter is still whole: a gloo group left to the
    interpreter's own teardown aborts the process ("terminate called without an active exception",
    SIGABRT), which fails a launch that has written all its outputs."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:  # no process tears its group down while another still talks to it (bounded: never a hang)
            torch.distributed.monitored_barrier(timeout=timedelta(seconds=EXIT_BARRIER_SECONDS))
        except RuntimeError as err:  # a process that stopped early: say so, and leave anyway
            logger.warning("not every process reached the end of the job: %s", str(err).splitlines()[0])
        torch.distributed.destroy_process_group()


def process_device(state: PartialState, requested: str | None = None) -> torch.device:
    """The device this process runs its model on: the state's (``cuda:<local rank>`` under a launch),
    or ``requested`` when it names another kind of device, or a device index in a one-process run."""
    import torch

    if requested is None:
        return state.device
    device = torch.device(requested)
    if device.type == state.device.type and (state.num_processes > 1 or device.index is None):
        return state.device  # each process its own GPU
    return device


def progress_name(state: PartialState, name: str = "predict") -> str:
    """A progress bar's name: ``name``, with this process's number under a launch (``predict 2/4``)."""
    return f"{name} {state.process_index + 1}/{state.num_processes}" if state.num_processes > 1 else name


def split(state: PartialState, items: Sequence[T]) -> Sequence[T]:
    """This process's contiguous shard of ``items`` (``split_between_processes``; all of them for one);
    a list, or a ``range`` for a ``range``."""
    if isinstance(items, range):  # split_between_processes slices lists, tuples and tensors only
        with state.split_between_processes(list(range(len(items)))) as mine:
            return items[mine[0]:mine[-1] + 1] if mine else items[0:0]
    with state.split_between_processes(items if isinstance(items, (list, tuple)) else list(items)) as mine:
        return mine


def gather(items: list[T]) -> list[T]:
    """Every process's ``items`` joined in process order, on every process (``gather_object``)."""
    from accelerate.utils import gather_object

    return gather_object(items)


def collectively(state: PartialState, items: Sequence[T], check: Callable[[T], Any]) -> list[Any]:
    """``check`` each item of this process's shard; returns every item's result, in input order, on
    every process. When a check raises (ValueError, OSError, ...) in any process, every process raises
    the first error (in input order) as the same exception type with the same message."""
    results: list[tuple[str, Any]] = []
    for item in split(state, items):
        try:
            results.append(("ok", check(item)))
        except Exception as err:  # passed on to the other processes, then raised everywhere
            results.append(("error", (type(err), str(err))))
    everyone = gather(results)
    for status, value in everyone:
        if status == "error":
            kind, message = value
            raise _rebuild(kind, message)
    return [value for _, value in everyone]


def _rebuild(kind: type[BaseException], message: str) -> BaseException:
    try:
        return kind(message)
    except Exception:  # an exception type with another signature: its message as a RuntimeError
        return RuntimeError(message)


def longest_first(sizes: Sequence[float], num_processes: int) -> list[list[int]]:
    """Indices of ``sizes`` dealt to ``num_processes`` processes: longest first, each to the process
    with the least total so far (ties: the lower process). Each list is in the order to work on."""
    plan: list[list[int]] = [[] for _ in range(num_processes)]
    loads = [(0.0, p) for p in range(num_processes)]
    heapq.heapify(loads)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, process = heapq.heappop(loads)
        plan[process].append(index)
        heapq.heappush(loads, (load + float(sizes[index]), process))
    return plan


class ShardedCSV:
    """One CSV written by every process: each its shard's rows, the main process joins them.

    ``with ShardedCSV(state, path, header) as handle:`` gives a text handle for this process's rows
    (``header``: the column names, written once). With one process the handle writes ``path`` itself (atomically); with
    several, each writes a part file next to ``path`` (named after its process, so a later run
    removes those of a killed one) and, when every process is done, the main process writes ``path``
    (header, then the parts in process order) atomically and removes the parts.
    """

    def __init__(self, state: PartialState, path: str | os.PathLike, header: Sequence[str]) -> None:
        self.state, self.path = state, Path(path)
        line = io.StringIO()
        csv.writer(line).writerow(header)
        self.header = line.getvalue()
        self._part: Path | None = None

    def __enter__(self) -> IO[str]:
        self._stack = []
        if self.state.num_processes == 1:
            context = atomic_write(self.path, newline="")
            handle = context.__enter__()
            handle.write(self.header)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.state.is_local_main_process:  # parts of a killed run (their process is gone)
                remove_stale_temps(self.path.parent, PART_PREFIX, f".{self.path.name}")
            self._part = self.path.parent / temp_name(PART_PREFIX, f".{self.path.name}")
            context = open(self._part, "w", encoding="utf-8", newline="")
            handle = context
        self._context = context
        return handle

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if self._part is None:
            self._context.__exit__(kind, error, traceback)
            return
        self._context.close()
        if kind is not None:  # this process failed: its part is of no use; the launcher stops the others
            self._part.unlink(missing_ok=True)
            return
        parts = gather([str(self._part)])
        if self.state.is_main_process:
            with atomic_write(self.path, newline="") as out:
                out.write(self.header)
                for part in parts:
                    with open(part, encoding="utf-8", newline="") as handle:
                        shutil.copyfileobj(handle, out)
            for part in parts:
                Path(part).unlink(missing_ok=True)
        self.state.wait_for_everyone()
