"""Strict reading of settings that may arrive as text: ``monai.bundle run --overwrite false`` passes the string
``'false'``, which Python counts as true. A value that is not clearly one of the two is refused, not guessed."""

from __future__ import annotations

from typing import Any

__all__ = ["as_bool"]

TRUE = frozenset({"true", "1", "yes", "on"})
FALSE = frozenset({"false", "0", "no", "off", "none", "null", ""})


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: ``True``/``False``, 0/1, or one of the words in ``TRUE``/``FALSE`` (any case)."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
        return value.strip().lower() in TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")
