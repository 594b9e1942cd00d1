"""Creates the database cache table when the database cache is configured.

The embedded mode keeps its cache (and so the rate-limit counters) in the database;
doing this in a migration means `migrate` alone prepares a new installation and every
test database. With Redis configured it does nothing.
"""

from django.core.management import call_command
from django.db import migrations


def create_cache_table(apps, schema_editor):
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    dependencies = [("core", "0001_initial")]

    operations = [migrations.RunPython(create_cache_table, migrations.RunPython.noop)]
