"""Decimals as text (no app imports: any app and config.api use it)."""

from __future__ import annotations

from decimal import Decimal


def decimal_text(value: Decimal) -> str:
    """A Decimal in fixed-point notation (``str`` gives ``"0E-8"`` for a zero read from a
    column with 8 decimal places)."""
    return format(value, "f")
