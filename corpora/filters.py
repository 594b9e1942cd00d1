"""Filters of the document and chunk lists (API and dashboard share them).

``meta=key:value`` matches a metadata key (dotted keys reach into nested objects); a
value that reads as a JSON number, true, false or null also matches that typed value,
so ``meta=year:1963`` finds both ``1963`` and ``"1963"``. Keys are applied through
explicit key transforms, never as ORM lookups, so no key can turn into a lookup.
"""

from __future__ import annotations

import json
import re

from django.db.models import Q, QuerySet
from django.db.models.fields.json import KeyTransform
from django.db.models.functions import Substr

from config.errors import InvalidInput

KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,4}$")
MAX_FILTERS = 10


def _invalid(param: str, message: str) -> InvalidInput:
    return InvalidInput(
        f"{param}: {message}", details={"fields": [{"field": param, "message": message}]}
    )


def parse(expression: str, param: str) -> tuple[str, str | None]:
    """``key:value`` -> (key, value); ``key`` alone -> (key, None)."""
    key, sep, value = expression.partition(":")
    key = key.strip()
    if not KEY.match(key):
        raise _invalid(
            param,
            f"'{expression}' is not key:value (keys are letters, digits, _ and -, dotted "
            "for nested objects)",
        )
    return key, (value if sep else None)


def _candidates(value: str) -> list:
    found = [value]
    try:
        typed = json.loads(value)
    except ValueError:
        return found
    if typed is None or isinstance(typed, bool | int | float):
        found.append(typed)
    return found


def _transform(column: str, key: str) -> KeyTransform:
    expression = column
    for part in key.split("."):
        expression = KeyTransform(part, expression)
    return expression


def _apply(queryset: QuerySet, column: str, expressions: list[str], param: str) -> QuerySet:
    if len(expressions) > MAX_FILTERS:
        raise _invalid(param, f"at most {MAX_FILTERS} filters")
    for index, expression in enumerate(expressions):
        key, value = parse(expression, param)
        alias = f"_{param}_{index}"
        queryset = queryset.alias(**{alias: _transform(column, key)})
        if value is None:
            queryset = queryset.filter(**{f"{alias}__isnull": False})
        else:
            condition = Q()
            for candidate in _candidates(value):
                condition |= Q(**{alias: candidate})
            queryset = queryset.filter(condition)
    return queryset


def documents(
    queryset: QuerySet,
    *,
    q: str = "",
    document_type: str = "",
    language: str = "",
    author: str = "",
    meta: list[str] = (),
    ext: list[str] = (),
) -> QuerySet:
    """The filtered documents, in corpus order, without loading their text."""
    if q:
        queryset = queryset.filter(Q(external_id__icontains=q) | Q(title__icontains=q))
    if document_type:
        queryset = queryset.filter(document_type=document_type)
    if language:
        queryset = queryset.filter(language=language)
    if author:
        queryset = queryset.filter(author__icontains=author)
    queryset = _apply(queryset, "metadata", list(meta), "meta")
    queryset = _apply(queryset, "extensions", list(ext), "ext")
    return queryset.defer("text").annotate(preview=Substr("text", 1, 240)).order_by("position")


def chunks(
    queryset: QuerySet,
    *,
    document: str = "",
    q: str = "",
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    meta: list[str] = (),
) -> QuerySet:
    """The filtered chunks in document order, with their document's id (one query)."""
    if document:
        queryset = queryset.filter(document__external_id=document)
    if q:
        queryset = queryset.filter(text__icontains=q)
    if min_tokens is not None:
        queryset = queryset.filter(token_count__gte=min_tokens)
    if max_tokens is not None:
        queryset = queryset.filter(token_count__lte=max_tokens)
    queryset = _apply(queryset, "metadata", list(meta), "meta")
    return (
        queryset.select_related("document")
        .only(*CHUNK_FIELDS, "document__external_id", "document__position")
        .order_by("document__position", "position")
    )


CHUNK_FIELDS = (
    "id",
    "corpus_id",
    "document_id",
    "position",
    "text",
    "token_count",
    "char_count",
    "start_char",
    "end_char",
    "metadata",
)
