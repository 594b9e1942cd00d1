"""The two modes: embedded default with no variables, production parts from the environment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, django
django.setup()
from django.conf import settings as s
print(json.dumps({
    "db": s.DATABASES["default"]["ENGINE"],
    "db_name": str(s.DATABASES["default"]["NAME"]),
    "cache": s.CACHES["default"]["BACKEND"],
    "broker": s.CELERY_BROKER_URL.split("://")[0],
    "results": s.CELERY_RESULT_BACKEND,
    "storage": s.STORAGES["default"]["BACKEND"],
    "debug": s.DEBUG,
    "log_format": s.LOG_FORMAT,
    "email": s.EMAIL_BACKEND,
    "secure_cookies": s.SESSION_COOKIE_SECURE,
}))
"""


def _clean_env(tmp_path, **extra) -> dict:
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return {
        **keep,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "CRUCIBLE_DATA_DIR": str(tmp_path / "data"),
        **extra,
    }


def _settings_in(env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


PRODUCTION = {
    "DATABASE_URL": "postgres://crucible:pw@db.internal:5432/crucible",
    "REDIS_URL": "redis://cache.internal:6379/0",
    "S3_BUCKET": "crucible-artifacts",
    "S3_ENDPOINT_URL": "https://s3.example.com",
    "SECRET_KEY": "x" * 20 + "production-secret-key-with-enough-entropy-9f8e7d6c5b4a",
    "ALLOWED_HOSTS": "crucible.example.com",
    "HTTPS": "true",
    "EMAIL_URL": "smtp+tls://mailer:pw@smtp.example.com:587",
}


def test_no_variables_means_the_embedded_default(tmp_path):
    found = _settings_in(_clean_env(tmp_path))
    assert found == {
        "db": "django.db.backends.sqlite3",
        "db_name": str(tmp_path / "data" / "crucible.sqlite3"),
        "cache": "django.core.cache.backends.db.DatabaseCache",
        "broker": "filesystem",
        "results": "django-db",
        "storage": "django.core.files.storage.FileSystemStorage",
        "debug": False,
        "log_format": "text",
        "email": "django.core.mail.backends.console.EmailBackend",
        "secure_cookies": False,
    }
    # The embedded secret key is made once, kept private, and reused.
    key_file = tmp_path / "data" / "secret_key"
    assert key_file.exists() and oct(key_file.stat().st_mode)[-3:] == "600"


def test_production_variables_switch_each_part(tmp_path):
    found = _settings_in(_clean_env(tmp_path, **PRODUCTION))
    # Django's PostgreSQL backend, batching for bound parameters (config/db/postgresql).
    assert found["db"] == "config.db.postgresql"
    assert found["cache"] == "django.core.cache.backends.redis.RedisCache"
    assert found["broker"] == "redis"
    assert found["storage"] == "storages.backends.s3.S3Storage"
    assert found["log_format"] == "json"
    assert found["email"] == "django.core.mail.backends.smtp.EmailBackend"
    assert found["secure_cookies"] is True
    assert found["debug"] is False


def test_check_deploy_is_clean_under_production_settings(tmp_path):
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=_clean_env(tmp_path, **PRODUCTION),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.django_db
def test_migrations_are_in_step_with_models():
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.django_db
def test_the_database_cache_works_whatever_cache_the_database_was_migrated_with(settings):
    """An installation migrated with REDIS_URL set and later run without Redis falls back to
    the database cache; its table must exist (migration core.0003), or every authenticated
    request is a 500. In production-mode CI this test database was migrated with Redis."""
    from django.core.cache import caches
    from django.db import connection

    assert "crucible_cache" in connection.introspection.table_names()
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "crucible_cache",
        }
    }
    cache = caches["default"]
    assert cache.add("probe", 1, 30) and cache.get("probe") == 1
