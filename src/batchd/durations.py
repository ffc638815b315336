"""Durations as operators write them (``24h``, ``90s``, ``1h30m``), parsed once."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in ``text``; raises ValueError for anything but ``<int><s|m|h|d>`` runs."""
    text = text.strip().lower()
    pos, total = 0, 0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    if not text or pos != len(text) or total <= 0:
        raise ValueError(f"not a duration: {text!r} (use forms like 24h, 90s, 1h30m)")
    return total


def seconds(value: object) -> float:
    """Seconds as a number (``0.5``, ``"0.5"``, ``"0.5s"``) or a duration (``"2m"``, ``"1h30m"``)."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip().lower()
    try:
        return float(text.removesuffix("s"))
    except ValueError:
        return float(parse_duration(text))
