"""Django's PostgreSQL backend, batching for bound parameters.

With server-side binding (``OPTIONS["server_side_binding"]``, which psycopg needs to prepare
statements: settings.DB_PREPARED_STATEMENTS) a query carries its parameters separately, and
PostgreSQL's protocol takes at most 65,535 of them. Django's PostgreSQL backend assumes no limit
(it inlines parameters by default), so the deletion collector and ``bulk_create`` would send one
query for any number of rows: deleting a batch job of 100,000 tasks failed. Here the backend
declares the limit and batches for it, as Django's Oracle backend does for the same limit.
A filter such as ``pk__in=<a list longer than 65,535>`` is still one query; the embedded mode
(SQLite) has a lower limit of the same kind, and the code keeps such lists short.
"""

from __future__ import annotations

from itertools import chain

from django.db.backends.postgresql import base, features, operations
from django.db.models import CompositePrimaryKey

MAX_BOUND_PARAMS = 2**16 - 1


class DatabaseFeatures(features.DatabaseFeatures):
    @property
    def max_query_params(self) -> int | None:
        return MAX_BOUND_PARAMS if self.uses_server_side_binding else None


class DatabaseOperations(operations.DatabaseOperations):
    def bulk_batch_size(self, fields, objs):
        limit = self.connection.features.max_query_params
        fields = list(
            chain.from_iterable(
                f.fields if isinstance(f, CompositePrimaryKey) else [f] for f in fields
            )
        )
        if limit and fields:
            return max(1, limit // len(fields))
        return len(objs)


class DatabaseWrapper(base.DatabaseWrapper):
    features_class = DatabaseFeatures
    ops_class = DatabaseOperations
