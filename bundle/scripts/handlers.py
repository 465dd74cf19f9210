"""Event handlers of the bundle's engines that MONAI and ignite do not ship.

Handlers follow MONAI's convention: constructed in the config, listed in an engine's ``val_handlers``, attached by
the engine (``attach(engine)``).
"""

from __future__ import annotations

from typing import Any

from monai.utils import IgniteInfo, min_version, optional_import
from tqdm.auto import tqdm

from .distributed import rank_and_world
from .values import as_bool

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["ProgressBar"]


class ProgressBar:
    """A progress bar over an engine's epoch, one step per subject; off with ``enabled`` false (``--progress false``)
    and in every process but the first of a ``torchrun`` run.

    Unlike ignite's own bar it takes the epoch's length when the epoch starts: the writing pass only knows then how
    many subjects it writes.
    """

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.desc = desc
        self.enabled = as_bool(enabled, "progress")
        self._bar: Any = None

    def attach(self, engine: Any) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._close_on_error)

    def _open(self, engine: Any) -> None:
        self._bar = tqdm(total=engine.state.epoch_length, desc=self.desc, disable=rank_and_world()[0] != 0, leave=False)

    def _step(self, engine: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def _close(self, engine: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _close_on_error(self, engine: Any, error: BaseException) -> None:
        self._close(engine)
        raise error
