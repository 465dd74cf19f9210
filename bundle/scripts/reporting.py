"""Text shown to people: notices that must not be missed."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["banner"]


def banner(lines: Sequence[str], char: str = "!") -> str:
    """A block nobody scrolls past: used for backbone warnings in runs, the demo and the accuracy checks."""
    width = max(len(line) for line in lines) + 4
    rule = char * width
    return "\n".join([rule, *(f"{char} {line.ljust(width - 4)} {char}" for line in lines), rule])
