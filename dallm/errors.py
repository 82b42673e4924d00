"""One user-facing error type and the one boundary that prints it: `dallm: error: ...`, one line, exit 2.

Every command (`fit`, `validate`, `kid`, `teacher`, `sample`, `export`) runs inside `error_boundary()`.
Bad input is reported as one line naming the flag or file; `DALLM_TRACEBACK=1` re-raises instead, so
the full traceback is one environment variable away. Anything not listed in `USER_ERRORS` is a bug in
dallm or a library and keeps its traceback.
"""

from __future__ import annotations

import ast
import os
import pickle
import re
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
    if isinstance(err, ArgumentError):
        text = argument_error_text(text)
    text = " ".join(text.split())
    if len(text) > _MAX_CHARS:
        text = text[: _MAX_CHARS - 3] + "..."
    if isinstance(err, ArgumentError):
        text += f" (see dallm {command} --help)" if command else " (see --help)"
    return text


_KEY = re.compile(r'Parser key "([^"]+)"')
_RESTRICTION = re.compile(r"does not conform to restriction ((?:v\s*[<>=]+\s*[^\s,]+(?: and )?)+)")
_BOUND = re.compile(r"v\s*([<>]=?)\s*([^\s,]+)")
_VALUE = re.compile(r"(?:Given value|Got value): (.*?)(?:\.? Got value:|$)", re.S)
_EXPECTED = re.compile(r"Expected an? <class '(\w+)'>")
_LITERAL = re.compile(r"Expected an? typing\.Literal\[([^\]]*)\]")


def _literal_values(text: str) -> list[str]:
    """The values of every `Literal[...]` alternative in an error, each once (`Literal[1, 1.0]` -> `1`)."""
    out: dict[object, str] = {}
    for group in _LITERAL.findall(text):
        for item in group.split(","):
            try:
                out.setdefault(ast.literal_eval(item.strip()), item.strip())
            except (ValueError, SyntaxError):
                out.setdefault(item.strip(), item.strip())
    return list(out.values())


def _range_phrase(restriction: str) -> str:
    """`v>=0 and v<=4294967295` -> `in [0, 4294967295]`, `v>0 and v<inf` -> `finite and > 0`, `v>0` -> `> 0`."""
    bounds = dict((op, value) for op, value in _BOUND.findall(restriction))
    low = next(((op, v) for op, v in bounds.items() if op.startswith(">")), None)
    high = next(((op, v) for op, v in bounds.items() if op.startswith("<")), None)
    if low and high and high[1] == "inf":
        return f"finite and {low[0]} {low[1]}" if low[1] != "-inf" else "finite"
    if low and high:
        return f"in {'[' if low[0] == '>=' else '('}{low[1]}, {high[1]}{']' if high[0] == '<=' else ')'}"
    op, value = low or high or ("", restriction)
    return f"{op} {value}".strip()


def argument_error_text(text: str) -> str:
    """A jsonargparse error as `--flag must be RANGE, got VALUE` (or `--flag: REASON`), naming the flag.

    jsonargparse says `Parser key "model.rank": Not of type PositiveInt: 0 does not conform to restriction
    v>0`, and for a nested key (`--model.optimizer.lr`) or a union it lists every alternative; the user
    needs the flag, the allowed range and the value given.
    """
    keys = list(dict.fromkeys(k for k in _KEY.findall(text) if k != "init_args"))
    if not keys:
        return text
    flag = "--" + ".".join(keys)
    values = [v.strip() for v in _VALUE.findall(text)]
    value = values[0] if values else None
    if value is None:
        head = re.search(r"Not of type \w+: (\S+) does not conform", text)
        value = head.group(1) if head else None
    ranges = [_range_phrase(r) for r in _RESTRICTION.findall(text)]
    literals = _literal_values(text)  # e.g. --trainer.num_sanity_val_steps: >= 0, or -1 for all
    if ranges or literals:
        alternatives = list(dict.fromkeys(ranges)) + literals + (["null"] if "NoneType" in text else [])
        return f"{flag} must be {' or '.join(alternatives)}, got {value}"
    expected = [t for t in dict.fromkeys(_EXPECTED.findall(text)) if t != "NoneType"]
    if expected and value is not None:
        odd = value.lower().lstrip("+-") in ("nan", "inf", "infinity")
        note = " (nan and inf are not accepted)" if odd else ""
        return f"{flag}: expected {' or '.join(expected)}, got {value}{note}"
    return f"{flag}: {_KEY.sub('', text).lstrip(': ')}"


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
