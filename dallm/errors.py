"""One user-facing error type and the one boundary that prints it: `dallm: error: ...`, one line, exit 2.

Every command (`fit`, `validate`, `kid`, `teacher`, `sample`, `export`) runs inside `error_boundary()`.
Bad input is reported as one line naming the flag or file; `DALLM_TRACEBACK=1` re-raises instead, so
the full traceback is one environment variable away. Anything not listed in `USER_ERRORS` is a bug in
dallm or a library and keeps its traceback.
"""

from __future__ import annotations

import os
import pickle
import sys
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.fabric.utilities.exceptions import MisconfigurationException

# jsonargparse parsers built with these raise ArgumentError instead of printing 100+ lines of usage and
# exiting; the boundary turns the error into one line plus "see --help". Pass to every dallm parser.
PARSER_KWARGS = {"exit_on_error": False}


class DallmError(ValueError):
    """Bad input: its message names the flag or file and says what is wrong. Printed as one line, exit 2.

    A ValueError, so code and tests that expect ValueError for bad input keep working.
    """


# Exceptions that mean "the input or the environment is wrong", not "dallm is wrong":
# ValueError (incl. DallmError), OSError (missing / unreadable / read-only paths, with the path in it),
# argument errors of jsonargparse, Lightning's MisconfigurationException (its message names the Trainer
# argument) and UnpicklingError (a file that is not a checkpoint).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    ArgumentError,
    MisconfigurationException,
    pickle.UnpicklingError,
)

_MAX_CHARS = 600  # jsonargparse's union-type errors list every alternative; the start is what matters


def one_line(err: BaseException, command: str = "") -> str:
    """The error as one line: whitespace collapsed, OSError with its path, argument errors + `see --help`."""
    text = str(err) or type(err).__name__  # an OSError's str holds its path: "[Errno 30] ...: '/x'"
    if isinstance(err, MisconfigurationException):
        text = f"--trainer: {text}"
    key = os.environ.get("OPENAI_API_KEY", "")
    if len(key) >= 4:  # a server or SDK may echo the key in its error: it never reaches the terminal or logs
        text = text.replace(key, "<OPENAI_API_KEY>")
    text = " ".join(text.split())
    if len(text) > _MAX_CHARS:
        text = text[: _MAX_CHARS - 3] + "..."
    if isinstance(err, ArgumentError):
        text += f" (see dallm {command} --help)" if command else " (see --help)"
    return text


@contextmanager
def error_boundary(command: str = "") -> Iterator[None]:
    """Run a command; a user error becomes `dallm: error: <one line>` on stderr and `SystemExit(2)`.

    Args:
        command: the subcommand name, used in the `see dallm COMMAND --help` hint of argument errors.
    """
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("DALLM_TRACEBACK"):
            raise
        print(f"dallm: error: {one_line(err, command)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from err
