"""What every ``scripts/*.py`` shares: bad input becomes ``error: ...`` on stderr and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

# Bad arguments, missing files and failed downloads (data.DownloadError is a ConnectionError):
# the user can fix these, so they get one line, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ConnectionError)


def run_main(
    body: Callable[[list[str] | None], int],
    argv: list[str] | None = None,
    exit_codes: Mapping[type[BaseException], int] | None = None,
) -> int:
    """Return ``body(argv)``; on a :data:`USER_ERRORS` exception print ``error: <message>`` to stderr
    and return 2. ``exit_codes`` maps other exception types to their own status (checked first)."""
    handled = {**(exit_codes or {}), **{error: 2 for error in USER_ERRORS if error not in (exit_codes or {})}}
    try:
        return body(argv)
    except tuple(handled) as err:
        print(f"error: {err}", file=sys.stderr)
        return next(code for error, code in handled.items() if isinstance(err, error))
