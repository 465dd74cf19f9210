"""What a user of ``python -m monai.bundle run`` sees when something is wrong: one line, before any work.

``start`` is the first item of each config's ``run`` list. It checks the ``--key value`` overrides against the
keys of the config files (``--matchng global`` would otherwise run a whole cohort with the default matching)
and against the types of their defaults, checks that the device exists, and installs an exception hook
under which a *user* error (a setting, a folder, a pattern, the cohort, the weights) ends the process with
one ``cs3f: error: ...`` line and exit status 2 instead of a 70-line traceback through MONAI's config
machinery. Internal errors keep their traceback; ``CS3F_DEBUG=1`` shows it for user errors too.
"""

from __future__ import annotations

import ast
import difflib
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SettingsError", "EXIT_USER_ERROR", "start", "check_overrides", "user_message"]

EXIT_USER_ERROR = 2
# the options of monai.bundle's `run` itself: not config keys
RUN_OPTIONS = frozenset(
    {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}
)
SCRIPTS = Path(__file__).resolve().parent


class SettingsError(ValueError):
    """A ``--key value`` the bundle cannot use: unknown key, wrong type, unavailable device."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .bank import BankError
    from .engines import CohortError
    from .outputs import OutputExistsError
    from .run_folder import OutputFolderError
    from .transforms import CohortInputError
    from .weights import WeightsNotFoundError

    return (
        SettingsError,
        CohortError,
        CohortInputError,
        OutputExistsError,
        OutputFolderError,
        WeightsNotFoundError,
        BankError,
    )


def innermost(err: BaseException) -> BaseException:
    """The error at the bottom of a chain: MONAI wraps errors raised while it builds components."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        nxt = err.__cause__ or (err.__context__ if not err.__suppress_context__ else None)
        if nxt is None:
            break
        err = nxt
    return err


def user_message(err: BaseException) -> str | None:
    """The one line to show for a user error, or ``None`` for an internal error (whose traceback matters)."""
    cause = innermost(err)
    ours = isinstance(cause, _user_error_types())
    # a ValueError or missing file raised by the bundle's own checks is a message to the user, too
    raised_here = (
        bool(cause.__traceback__)
        and Path(traceback.extract_tb(cause.__traceback__)[-1].filename).resolve().parent == SCRIPTS
    )
    if ours or (isinstance(cause, (ValueError, FileNotFoundError, NotADirectoryError)) and raised_here):
        return " ".join(str(cause).split()) or type(cause).__name__
    return None


def _hook(kind, err, tb) -> None:
    message = None if os.environ.get("CS3F_DEBUG") else user_message(err)
    if message is None:
        sys.__excepthook__(kind, err, tb)
        return
    sys.stdout.flush()
    sys.stderr.write(f"cs3f: error: {message}\n(set CS3F_DEBUG=1 to see the traceback)\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_USER_ERROR)


def _parse(text: str) -> Any:
    """A command-line value as ``monai.bundle run`` receives it (through python-fire)."""
    from fire import parser

    return parser.DefaultParseValue(text)


def command_line_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs of a ``monai.bundle run`` command line (``--flag`` alone is True)."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and len(token) > 2:
            key, sep, value = token[2:].partition("=")
            if not sep:
                has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
                value = argv[i + 1] if has_value else "True"
                i += has_value
            overrides[key.replace("-", "_") if key.replace("-", "_") in RUN_OPTIONS else key] = _parse(value)
        i += 1
    return overrides


def check_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Refuse unknown top-level keys (with the closest known ones) and values of the wrong type."""
    known = set(config) | RUN_OPTIONS
    for key, value in overrides.items():
        top = key.replace("::", "#").split("#")[0]
        if top not in known:
            close = difflib.get_close_matches(top, sorted(k for k in known if not k.startswith("_")), n=3, cutoff=0.6)
            hint = (
                f"; did you mean {' or '.join(f'--{c}' for c in close)}?"
                if close
                else "; see the keys of bundle/configs/inference.json"
            )
            raise SettingsError(f"unknown setting --{key}{hint}")
        if top != key or top in RUN_OPTIONS or (isinstance(value, str) and value.startswith(("$", "@", "%"))):
            continue
        default = config[top]
        if isinstance(default, bool):
            from .values import as_bool

            try:
                as_bool(value, f"--{key}")
            except ValueError as err:
                raise SettingsError(str(err)) from None
        elif isinstance(default, (int, float)) and isinstance(value, str):
            raise SettingsError(f"--{key} must be a number (default {default!r}), got {value!r}")


def _config_files(value: Any) -> list[str]:
    if isinstance(value, str):
        value = ast.literal_eval(value) if value.strip().startswith("[") else value.split(",")
    return [str(v) for v in value]


def check_device(device: Any) -> None:
    import torch

    name = str(device)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
    if name.startswith("cuda:"):
        index = int(name.split(":", 1)[1] or 0)
        if index >= torch.cuda.device_count():
            raise SettingsError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_grid(grid_size: Any, slice_depth: Any) -> None:
    """A grid that tokens do not tile would fail every subject, one by one, after encoding: refuse it up front."""
    size, depth = int(grid_size), int(slice_depth)
    if size < depth or size % depth:
        near = sorted({max(depth, depth * (size // depth)), depth * (size // depth + 1)})
        raise SettingsError(
            f"--grid_size {size}: must be a multiple of slice_depth {depth} (the depth of a token), e.g. "
            + " or ".join(map(str, near))
        )


def start(
    device: Any = None, grid_size: Any = None, slice_depth: Any = None, argv: Sequence[str] | None = None
) -> None:
    """First item of a config's ``run`` list: the checks and the error hook described in the module docstring."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 1 and argv[1] == "run" and argv[0].replace(os.sep, "/").endswith("monai/bundle/__main__.py"):
        sys.excepthook = _hook  # only for the command line: a host process that parses the config keeps its own
        overrides = command_line_overrides(argv[2:])
        if "config_file" in overrides:
            from monai.bundle import ConfigParser

            check_overrides(ConfigParser.load_config_files(_config_files(overrides["config_file"])), overrides)
    if device is not None:
        check_device(device)
    if grid_size is not None and slice_depth is not None:
        check_grid(grid_size, slice_depth)
