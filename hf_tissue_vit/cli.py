"""What every ``scripts/*.py`` shares: bad input becomes ``error: ...`` on stderr and exit status 2.

Under ``accelerate launch`` every process meets the same bad input (see
:func:`hf_tissue_vit.distributed.collectively`); only the main process prints it, so it shows once.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from .distributed import is_main_rank

if TYPE_CHECKING:
    from transformers import HfArgumentParser

# Bad arguments, missing files and failed downloads (data.DownloadError is a ConnectionError):
# the user can fix these, so they get one line, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ConnectionError)


def describe_os_error(err: OSError) -> str:
    """One line for an OSError that escaped the checks: the path(s), the system's reason and its code.

    ``str(OSError)`` shows ``[Errno 30] Read-only file system: '/x'``; errors without a path (raised
    by libraries with their own message) are shown as they are.
    """
    if err.filename is None:
        return str(err)
    paths = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 is not None else "")
    code = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    reason = err.strerror or type(err).__name__
    return f"{paths}: {reason}{f' ({code})' if code else ''}; check that this path can be written and is not in use"


def run_main(
    body: Callable[[list[str] | None], int],
    argv: list[str] | None = None,
    exit_codes: Mapping[type[BaseException], int] | None = None,
) -> int:
    """Return ``body(argv)``; on a :data:`USER_ERRORS` exception print ``error: <message>`` to stderr
    and return 2. ``exit_codes`` maps other exception types to their own status (checked first).

    Any other OSError (a read-only folder, a busy mount point, a folder where a file must go, ...)
    that a check did not catch first also becomes one line naming the path (:func:`describe_os_error`),
    with status 2.
    """
    handled = {**(exit_codes or {}), **{error: 2 for error in USER_ERRORS if error not in (exit_codes or {})}}
    try:
        return body(argv)
    except tuple(handled) as err:
        _report(f"error: {err}")
        return next(code for error, code in handled.items() if isinstance(err, error))
    except OSError as err:
        _report(f"error: {describe_os_error(err)}")
        return 2


def _report(line: str) -> None:
    if is_main_rank():  # the other processes of a launch stop with the same error, silently
        print(line, file=sys.stderr)


def argument_parser(dataclass_types: Any, **kwargs: Any) -> HfArgumentParser:
    """``HfArgumentParser(dataclass_types, **kwargs)`` whose usage errors (an unknown flag, a bad value)
    are printed by the main process only: under ``accelerate launch`` every process parses the same
    command line, and the user should read the error once, as from a plain run."""
    from transformers import HfArgumentParser

    class _OnceParser(HfArgumentParser):
        def error(self, message: str) -> NoReturn:  # argparse's documented hook; it must not return
            if is_main_rank():
                super().error(message)
            self.exit(2)

    return _OnceParser(dataclass_types, **kwargs)


def parse_folder_first(dataclass_type: type, argv: list[str] | None, rest: str) -> Any:
    """Parse ``argv`` into ``dataclass_type``, whose ``output_dir`` may come first without its flag
    (``push_to_hub.py OUTPUT_DIR --repo_id ...``, as README shows); ``--help`` shows both forms.
    ``rest`` is the usage after OUTPUT_DIR."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--output_dir", *argv]
    usage = f"%(prog)s OUTPUT_DIR {rest}\n       %(prog)s --output_dir OUTPUT_DIR {rest}"
    (args,) = argument_parser(dataclass_type, usage=usage).parse_args_into_dataclasses(args=argv)
    return args
