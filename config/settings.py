"""Crucible settings, read from the environment through django-environ.

With no variables set, Crucible runs in its *embedded* mode: SQLite, Celery on
kombu's filesystem broker, results and cache in the database, files on local
disk. Setting ``DATABASE_URL``, ``REDIS_URL``, ``S3_BUCKET`` and the rest switches
each part to its production counterpart independently. README.md lists them all.
"""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from pathlib import Path

import botocore.config
import environ
from celery.schedules import crontab
from kombu import Exchange, Queue

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# A local .env file is a convenience for development; real deployments set variables.
if (BASE_DIR / ".env").exists():
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DATA_DIR = Path(env.str("CRUCIBLE_DATA_DIR", default=str(BASE_DIR / "var")))
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _embedded_secret_key() -> str:
    """A per-installation key kept in the data folder (never in the repository)."""
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(64))
        path.chmod(0o600)
    return path.read_text().strip()


# --- Core -------------------------------------------------------------------------------------
DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="") or _embedded_secret_key()
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.humanize",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "ninja",
    "rest_framework",
    "rest_framework.authtoken",
    "django_celery_results",
    "django_htmx",
    "template_partials",
    "axes",  # login throttling (config/auth.py)
    "config.apps.CoreConfig",
    "corpora",
    "jobs",
    "training",
    "evaluation",
    "billing",
]

MIDDLEWARE = [
    "config.middleware.RequestIDMiddleware",
    "config.middleware.UploadSizeMiddleware",  # before anything reads the body
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "config.middleware.AccessLogMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes asks
]

# --- Uploads: one limit for every file upload (API and dashboard forms), checked from the
# Content-Length before the body is read (config/middleware.py UploadSizeMiddleware).
UPLOAD_MAX_BYTES = env.int("UPLOAD_MAX_BYTES", default=2 * 1024**3)
FILE_UPLOAD_HANDLERS = [
    "config.middleware.LimitedUploadHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "config.context_processors.crucible",
            ],
        },
    }
]

# --- Database ---------------------------------------------------------------------------------
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'crucible.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL and IMMEDIATE transactions let the web process and Celery workers share the file.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # Tests use a file too (not shared-cache memory, whose table locks are not retried), so
    # the live server, the worker's webhooks and the test itself can use it at once.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-crucible.sqlite3")}
else:
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 5)
    # Django's backend, batching for bound parameters (config/db/postgresql/base.py).
    postgresql = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
    if postgresql:
        DATABASES["default"]["ENGINE"] = "config.db.postgresql"
    if postgresql and env.bool("DB_PREPARED_STATEMENTS", default=True):
        # psycopg prepares a statement on the server after ``prepare_threshold`` runs on a
        # connection, so hot statements (a batch task's claim and result, the gateway's
        # ledger and budget hold) stop paying PostgreSQL's planner on every call: about 1 ms
        # of a batch task's 2.8 ms of queries (bench/bench_batch.py). It needs server-side
        # binding, whose 65,535-parameter limit the backend above batches for. Off
        # (DB_PREPARED_STATEMENTS=0) behind a transaction-pooling PgBouncer, which cannot
        # keep a session's prepared statements.
        DATABASES["default"]["OPTIONS"].update(server_side_binding=True, prepare_threshold=5)
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

# --- Cache (also the shared counter behind rate limits) ---------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env.str("CACHE_KEY_PREFIX", default="crucible"),
            "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "crucible_cache",
        }
    }

# --- Storage ----------------------------------------------------------------------------------
S3_BUCKET = env.str("S3_BUCKET", default="")
MEDIA_ROOT = DATA_DIR / "media"
MEDIA_URL = "/media/"
STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
WHITENOISE_USE_FINDERS = not env.bool("STATIC_MANIFEST", default=False)
WHITENOISE_AUTOREFRESH = DEBUG

if S3_BUCKET:
    _default_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": S3_BUCKET,
            "endpoint_url": env.str("S3_ENDPOINT_URL", default="") or None,
            "region_name": env.str("S3_REGION", default="us-east-1"),
            "access_key": env.str("S3_ACCESS_KEY_ID", default="") or None,
            "secret_key": env.str("S3_SECRET_ACCESS_KEY", default="") or None,
            "location": env.str("S3_PREFIX", default=""),
            "default_acl": None,
            "file_overwrite": True,
            "querystring_auth": True,
            "querystring_expire": 3600,
            "addressing_style": env.str("S3_ADDRESSING_STYLE", default="path"),
            "client_config": botocore.config.Config(
                connect_timeout=5, read_timeout=60, retries={"max_attempts": 4, "mode": "standard"}
            ),
        },
    }
else:
    _default_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(MEDIA_ROOT), "base_url": MEDIA_URL},
    }
STORAGES = {
    "default": _default_storage,
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if env.bool("STATIC_MANIFEST", default=False)
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}

# --- Celery -----------------------------------------------------------------------------------
# The filesystem broker's folders (embedded default); a test or a second installation on the
# same machine can point its workers at another folder.
BROKER_DIR = Path(env.str("CELERY_BROKER_DIR", default=str(DATA_DIR / "broker")))
if REDIS_URL:
    CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3 * 3600}
else:
    # A hostname, though the transport ignores it: kombu warns "No hostname was supplied" without.
    CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://localhost//")
    for _folder in ("queue", "processed", "control"):
        (BROKER_DIR / _folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
    # The filesystem transport has no broadcast exchange for remote control.
    CELERY_WORKER_ENABLE_REMOTE_CONTROL = False
CELERY_RESULT_BACKEND = "django-db"
CELERY_CACHE_BACKEND = "django-cache"
CELERY_RESULT_EXTENDED = True
CELERY_RESULT_EXPIRES = timedelta(days=30)
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_TRACK_STARTED = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Two queues, so that short work never waits behind long work. "control" (reconcile, webhooks,
# launches, heartbeats, notifications, prices, costs, cleanup) is the default; "long" takes
# validation runs, exports and playground runs, each with its own time limit. Run them as
# separate workers: `celery -A config worker -Q control -c 2 -n control@%h` and
# `celery -A config worker -Q long -c 1 -n long@%h` (README, "Workers and queues").
CELERY_TASK_DEFAULT_QUEUE = "control"
CELERY_TASK_QUEUES = (
    Queue("control", Exchange("control"), routing_key="control"),
    Queue("long", Exchange("long"), routing_key="long"),
)
CELERY_TASK_ROUTES = {
    "evaluation.tasks.execute_validation_run": {"queue": "long"},
    "corpora.tasks.export_run": {"queue": "long"},
    "corpora.tasks.knowledge_base_build": {"queue": "long"},
    "training.tasks.run_playground": {"queue": "long"},
    "jobs.tasks.refresh_gateway_models": {"queue": "control"},
    "jobs.batch.tasks.batch_run_task": {"queue": "long"},
    "jobs.batch.tasks.batch_dispatch": {"queue": "control"},
    "jobs.batch.tasks.batch_stats": {"queue": "control"},
}
# A long task that holds a status row writes a heartbeat with its progress while it works
# (every few seconds, config/longtasks.py); a running row whose heartbeat is older than
# LONG_TASK_STALE_AFTER_S belongs to a worker that died (restart, deploy, SIGKILL) and the beat
# reconcile restarts it. Keep it above the longest single step (a model load, one batch).
LONG_TASK_STALE_AFTER_S = env.int("LONG_TASK_STALE_AFTER_S", default=300)
# A long task restarted this many times without finishing is failed instead (it may be what
# kills its worker, e.g. out of memory).
LONG_TASK_MAX_ATTEMPTS = env.int("LONG_TASK_MAX_ATTEMPTS", default=3)
# Control tasks orchestrate; long GPU work runs in executors, so a control task past 10 minutes
# is stuck. Long tasks set their own, larger limits.
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=540)
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=600)
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "worker-heartbeat": {"task": "config.tasks.worker_heartbeat", "schedule": 60.0},
    "reconcile-training-jobs": {"task": "training.tasks.reconcile_training_jobs", "schedule": 20.0},
    "sweep-runpod-pods": {"task": "training.tasks.sweep_runpod_pods", "schedule": 300.0},
    "reconcile-long-tasks": {"task": "config.tasks.reconcile_long_tasks", "schedule": 60.0},
    "refresh-gpu-prices": {
        "task": "billing.tasks.refresh_gpu_prices",
        "schedule": crontab(minute=0),
    },
    "refresh-gateway-models": {
        "task": "jobs.tasks.refresh_gateway_models",
        "schedule": crontab(minute=30),
    },
    "purge-expired-task-results": {
        "task": "celery.backend_cleanup",
        "schedule": crontab(hour=4, minute=0),
    },
}

# --- Auth -------------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# --- Login throttling (django-axes): after AXES_FAILURE_LIMIT failed sign-ins, the username and,
# separately, the address are locked for AXES_COOLOFF_TIME; admins unlock in the admin (Access
# attempts) or with `manage.py axes_reset`. Failed API token lookups: API_TOKEN_FAILURE_RATE
# per address (config/auth.py).
AUTHENTICATION_BACKENDS = [
    "config.auth.LoginThrottleBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("AXES_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]  # each on its own
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "config.auth.lockout_response"
AXES_VERBOSE = False
API_TOKEN_FAILURE_RATE = env.str("API_TOKEN_FAILURE_RATE", default="20/10m")
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "overview"
LOGOUT_REDIRECT_URL = "login"

# --- API --------------------------------------------------------------------------------------
# Per-token (or per-user for browser sessions) limit, as "<count>/<period>" (s, m, h, d).
API_RATE_LIMIT = env.str("API_RATE_LIMIT", default="600/m")
RATELIMIT_USE_CACHE = "default"
# Cache (Redis) down: API rate limits are not enforced rather than every request refused; the
# connection errors django-ratelimit lets through are caught in config/ratelimit.py.
RATELIMIT_FAIL_OPEN = True
NINJA_PAGINATION_PER_PAGE = 50

# --- Security ---------------------------------------------------------------------------------
HTTPS = env.bool("HTTPS", default=False)
if env.bool("BEHIND_PROXY", default=HTTPS):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = HTTPS
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = HTTPS
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# --- Mail and notifications -------------------------------------------------------------------
# EMAIL_URL, e.g. smtp+tls://user:password@smtp.example.com:587 (django-environ's email_url).
_email = env.email_url("EMAIL_URL", default="consolemail://")
EMAIL_BACKEND = _email["EMAIL_BACKEND"]
EMAIL_HOST = _email.get("EMAIL_HOST", "")
EMAIL_PORT = _email.get("EMAIL_PORT") or 25
EMAIL_HOST_USER = _email.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = _email.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = _email.get("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = _email.get("EMAIL_USE_SSL", False)
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="Crucible <crucible@localhost>")
SLACK_WEBHOOK_URL = env.str("SLACK_WEBHOOK_URL", default="")

# --- Training ---------------------------------------------------------------------------------
# This platform's address as workers and people see it: the base of the workers' webhooks and
# of every link in emails and hints. Empty (the default): derived from the address the web
# server answers on (config/addresses.py), which suits local workers. Required, and public,
# for RunPod workers.
CRUCIBLE_PUBLIC_URL = env.str("CRUCIBLE_PUBLIC_URL", default="")
TRAINING_HEARTBEAT_TIMEOUT_S = env.int("TRAINING_HEARTBEAT_TIMEOUT_S", default=300)
# A RunPod pod's storage grants (presigned URLs and upload policy) expire after this long.
TRAINING_MAX_DURATION_HOURS = env.float("TRAINING_MAX_DURATION_HOURS", default=48.0)
TRAINING_MAX_RECOVERIES = env.int("TRAINING_MAX_RECOVERIES", default=3)
TRAINING_CANCEL_GRACE_S = env.int("TRAINING_CANCEL_GRACE_S", default=120)
# A queued (or recovering) job whose launch has not started after this long lost its launch
# message (a broker restart without persistence): the reconcile enqueues it again.
TRAINING_LAUNCH_REQUEUE_S = env.int("TRAINING_LAUNCH_REQUEUE_S", default=300)
# Launch workers in the calling process instead of through Celery (the `train` command).
TRAINING_LAUNCH_INLINE = env.bool("TRAINING_LAUNCH_INLINE", default=False)
# Converted offline model weights (shared by every local worker).
TRAINING_MODEL_CACHE = env.str("CRUCIBLE_MODEL_CACHE", default=str(DATA_DIR / "models"))

# --- Billing (defaults and meaning in billing/conf.py) -----------------------------------------
BILLING_MONTHLY_BUDGET = env.float("BILLING_MONTHLY_BUDGET", default=500.0)
BILLING_APPROVAL_THRESHOLD = env.float("BILLING_APPROVAL_THRESHOLD", default=150.0)
BILLING_HARD_CAP_PERCENT = env.float("BILLING_HARD_CAP_PERCENT", default=100.0)
BILLING_VARIANCE_ALERT_PERCENT = env.float("BILLING_VARIANCE_ALERT_PERCENT", default=20.0)
BILLING_ALERT_EMAILS = env.list("BILLING_ALERT_EMAILS", default=[])

# --- External services (used by later parts; listed here so readiness can report them) --------
# RunPod executor (training/executors/runpod.py). Without an API key only the local executor runs.
RUNPOD_API_KEY = env.str("RUNPOD_API_KEY", default="")
# The GraphQL API's base URL (the SDK's RUNPOD_API_BASE_URL); empty = https://api.runpod.io.
RUNPOD_API_BASE_URL = env.str("RUNPOD_API_BASE_URL", default="")
# The training worker image (gpu/Dockerfile), pushed where RunPod can pull it.
RUNPOD_IMAGE = env.str("RUNPOD_IMAGE", default="ghcr.io/crucible/worker:latest")
RUNPOD_CLOUD_TYPE = env.str("RUNPOD_CLOUD_TYPE", default="SECURE")  # SECURE, COMMUNITY or ALL
RUNPOD_GPU_COUNT = env.int("RUNPOD_GPU_COUNT", default=1)
RUNPOD_CONTAINER_DISK_GB = env.int("RUNPOD_CONTAINER_DISK_GB", default=50)
# The model cache: a network volume (persists across pods and data centres' restarts) or a
# pod volume of RUNPOD_VOLUME_GB; mounted at RUNPOD_VOLUME_MOUNT_PATH.
RUNPOD_NETWORK_VOLUME_ID = env.str("RUNPOD_NETWORK_VOLUME_ID", default="")
RUNPOD_DATA_CENTER_ID = env.str("RUNPOD_DATA_CENTER_ID", default="")
RUNPOD_VOLUME_GB = env.int("RUNPOD_VOLUME_GB", default=100)
RUNPOD_VOLUME_MOUNT_PATH = env.str("RUNPOD_VOLUME_MOUNT_PATH", default="/runpod-volume")
# Spot bid per GPU = RunPod's minimum bid times this factor.
RUNPOD_SPOT_BID_MULTIPLIER = env.float("RUNPOD_SPOT_BID_MULTIPLIER", default=1.0)
# After this many preemptions a spot job is relaunched on-demand (0 = always spot again).
RUNPOD_ON_DEMAND_AFTER_PREEMPTIONS = env.int("RUNPOD_ON_DEMAND_AFTER_PREEMPTIONS", default=2)
# No capacity (or RunPod unreachable) at launch: retry with exponential backoff from
# RUNPOD_LAUNCH_BACKOFF_S up to RUNPOD_LAUNCH_BACKOFF_MAX_S, for RUNPOD_LAUNCH_RETRY_WINDOW_S.
RUNPOD_LAUNCH_BACKOFF_S = env.float("RUNPOD_LAUNCH_BACKOFF_S", default=30.0)
RUNPOD_LAUNCH_BACKOFF_MAX_S = env.float("RUNPOD_LAUNCH_BACKOFF_MAX_S", default=300.0)
RUNPOD_LAUNCH_RETRY_WINDOW_S = env.int("RUNPOD_LAUNCH_RETRY_WINDOW_S", default=1800)
# Pods this installation creates are named "<prefix>-<job id>-a<attempt>"; the orphan sweep
# only ever terminates pods with this prefix.
RUNPOD_POD_NAME_PREFIX = env.str("RUNPOD_POD_NAME_PREFIX", default="crucible")
HF_TOKEN = env.str("HF_TOKEN", default="")

# --- Playground (training/playground.py) -----------------------------------------------------
PLAYGROUND_MAX_NEW_TOKENS = env.int("PLAYGROUND_MAX_NEW_TOKENS", default=96)
PLAYGROUND_MAX_NEW_TOKENS_LIMIT = env.int("PLAYGROUND_MAX_NEW_TOKENS_LIMIT", default=512)

# --- Evaluation -------------------------------------------------------------------------------
# Start a validation run when a training job completes.
EVALUATION_AUTO_START = env.bool("EVALUATION_AUTO_START", default=True)
# Generation for the rubric suites: length limit, batch size, sampling (0 = greedy), seed.
EVALUATION_MAX_NEW_TOKENS = env.int("EVALUATION_MAX_NEW_TOKENS", default=192)
EVALUATION_BATCH_SIZE = env.int("EVALUATION_BATCH_SIZE", default=8)
EVALUATION_TEMPERATURE = env.float("EVALUATION_TEMPERATURE", default=0.0)
EVALUATION_SEED = env.int("EVALUATION_SEED", default=1234)
# Bootstrap resamples behind every interval.
EVALUATION_BOOTSTRAP = env.int("EVALUATION_BOOTSTRAP", default=2000)
# Which judge scores the rubrics: "offline" (the base model, by digit likelihoods), "endpoint"
# (EVALUATION_JUDGE_MODEL through the model gateway) or "none" (humans only).
EVALUATION_JUDGE = env.str("EVALUATION_JUDGE", default="offline")
# A validation run is one long task (model loads, generation, scoring).
EVALUATION_TASK_TIME_LIMIT = env.int("EVALUATION_TASK_TIME_LIMIT", default=4 * 3600)
# torch CPU threads for a run (0 = torch's default; 1 is fastest on a busy shared CPU).
EVALUATION_TORCH_THREADS = env.int("EVALUATION_TORCH_THREADS", default=0)
# The judge model of EVALUATION_JUDGE=endpoint: a model gateway registry key
# ("<provider>/<model id>"), called through jobs.gateway (settings page: /settings/models/).
EVALUATION_JUDGE_MODEL = env.str(
    "EVALUATION_JUDGE_MODEL", default="hf-router/meta-llama/Llama-3.1-8B-Instruct"
)

# --- Internationalisation ---------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

# --- Logging ----------------------------------------------------------------------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOG_FORMAT = env.str(
    "LOG_FORMAT", default="json" if env.str("DATABASE_URL", default="") else "text"
)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "context": {"()": "config.logging.RequestContextFilter"},
        "redact": {"()": "config.logging.RedactSecretsFilter"},
    },
    "formatters": {
        "json": {
            "()": "config.logging.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
        "text": {
            "format": "%(asctime)s %(levelname)-7s [%(request_id)s %(user)s] %(name)s: %(message)s",
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context", "redact"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.request": {"level": "ERROR"},
        # The access log line of AccessLogMiddleware replaces the server's own.
        "django.server": {"level": "WARNING"},
        "celery": {"level": LOG_LEVEL},
    },
}
CSRF_FAILURE_VIEW = "config.views.csrf_failure"

# --- Model gateway (jobs/gateway/) -----------------------------------------------------------
# The tunables live in GatewaySettings (the settings page); GATEWAY_RETRY_ATTEMPTS,
# GATEWAY_BACKOFF_BASE_S, GATEWAY_BACKOFF_CAP_S, GATEWAY_TIMEOUT_S, GATEWAY_DEADLINE_S,
# GATEWAY_CACHE_TTL_S, GATEWAY_BREAKER_FAILURE_THRESHOLD, GATEWAY_BREAKER_RESET_S and
# GATEWAY_DEFAULT_RUNS in the environment win over it. Provider keys: GATEWAY_<SLUG>_API_KEY
# (HF_TOKEN for "hf-router"); stored keys are encrypted with GATEWAY_SECRET_KEY (a Fernet key)
# or the key file CRUCIBLE_SECRET_KEY_FILE, else <DATA_DIR>/gateway.key (generated once).
GATEWAY_RATE_WINDOW_S = env.int("GATEWAY_RATE_WINDOW_S", default=60)  # "per minute" limits
GATEWAY_DEFAULT_MAX_TOKENS = env.int("GATEWAY_DEFAULT_MAX_TOKENS", default=1024)  # reservations
GATEWAY_OFFLINE_MAX_TOKENS = env.int("GATEWAY_OFFLINE_MAX_TOKENS", default=512)
GATEWAY_OFFLINE_DEVICE = env.str("GATEWAY_OFFLINE_DEVICE", default="auto")

# --- Metrics, tracing and backpressure (config/metrics.py, config/tracing.py) ------------------
# prometheus_client in multiprocess mode: every web and worker process writes its counters
# under this folder (set before prometheus_client is imported anywhere). Clear it when all
# processes are stopped (docs/runbook.md). /metrics wants `Authorization: Bearer METRICS_TOKEN`
# or any signed-in user/API token. OTel exports only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
PROMETHEUS_MULTIPROC_DIR = env.str("PROMETHEUS_MULTIPROC_DIR", default=str(DATA_DIR / "prometheus"))
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", PROMETHEUS_MULTIPROC_DIR)
Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
MIDDLEWARE.insert(1, "config.middleware.MetricsMiddleware")
# Batch jobs and batch evaluations are refused (503 + Retry-After) while the long queue holds
# this many messages (config/backpressure.py; EVAL_QUEUE_* are the earlier names).
BATCH_QUEUE_LIMIT = env.int("BATCH_QUEUE_LIMIT", default=env.int("EVAL_QUEUE_LIMIT", default=1000))
BATCH_QUEUE_RETRY_AFTER_S = env.int(
    "BATCH_QUEUE_RETRY_AFTER_S", default=env.int("EVAL_QUEUE_RETRY_AFTER_S", default=30)
)
