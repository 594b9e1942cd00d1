"""Creates the database cache table whatever cache is configured now.

0002 ran ``createcachetable``, which creates tables only for the caches configured at that
moment: an installation first migrated with ``REDIS_URL`` set had no table, and when it later
ran without Redis every request that touched the cache (authentication's rate-limit counters
first) failed with 500 "relation crucible_cache does not exist". The table is tiny and unused
while Redis is the cache, so it is always there.
"""

from django.core.management.commands.createcachetable import Command as CreateCacheTable
from django.db import migrations

TABLE = "crucible_cache"  # config.settings' DatabaseCache LOCATION


def create_cache_table(apps, schema_editor):
    # The command's create_table skips a table that already exists (it reads ``verbosity``,
    # which only handle() sets).
    command = CreateCacheTable()
    command.verbosity = 0
    command.create_table(schema_editor.connection.alias, TABLE, False)


class Migration(migrations.Migration):
    dependencies = [("core", "0002_cache_table")]

    operations = [migrations.RunPython(create_cache_table, migrations.RunPython.noop)]
