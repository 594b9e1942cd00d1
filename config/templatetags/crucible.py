"""Filters that keep the wording of every page the same.

    {% load crucible %}
    {{ job.status|label }}        training -> "Training", needs_approval -> "Needs approval"
    {{ line|arrows }}             "24.5 -> 16.8" -> "24.5 → 16.8"

Prefer a model's ``get_<field>_display`` where there is one; ``label`` is for raw codes
(values from JSON, annotations, other apps' strings).
"""

from __future__ import annotations

import re

from django import template

register = template.Library()

ARROW = "→"
_ASCII_ARROW = re.compile(r"\s*-+>\s*")


@register.filter
def label(value) -> str:
    """A code or lowercase label as shown in the UI: spaces for underscores, first letter
    capitalised, the rest kept (so "GPU" and "LoRA" survive)."""
    if value is None:
        return ""
    text = str(value).replace("_", " ").strip()
    return text[:1].upper() + text[1:]


@register.filter
def arrows(value) -> str:
    """The one arrow style of the UI: ``->`` (with any spacing) becomes `` → ``."""
    if value is None:
        return ""
    return _ASCII_ARROW.sub(f" {ARROW} ", str(value))
