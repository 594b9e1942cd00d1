"""Warnings a user saw on install and start: setuptools' deprecated license table, kombu's
"No hostname was supplied" on the filesystem broker, bitsandbytes' CPU kernel warning."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_license_is_an_spdx_string_setuptools_accepts_without_warning():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"
    assert not [w for w in caught if "license" in str(w.message).lower()]


@pytest.mark.skipif(bool(os.environ.get("REDIS_URL")), reason="the embedded broker only")
def test_filesystem_broker_url_names_a_host(caplog):
    from kombu import Connection

    assert settings.CELERY_BROKER_URL.startswith("filesystem://")
    connection = Connection(
        settings.CELERY_BROKER_URL, transport_options=settings.CELERY_BROKER_TRANSPORT_OPTIONS
    )
    with caplog.at_level("WARNING", logger="kombu.connection"):
        connection.info()
    assert "No hostname was supplied" not in caplog.text


_IMPORTS = """
import logging, sys
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
if sys.argv[1] == "cpu":
    from gpu.model import resolve_device
    assert resolve_device("cpu") == "cpu"
import gpu.trainer  # trl and peft: older releases import bitsandbytes here, newer ones later
import bitsandbytes  # whoever imports it first (peft at model load, say), this is when it logs
"""


@pytest.mark.parametrize("path", ["cpu", "no-device-resolved"])
def test_bitsandbytes_cpu_warning_is_silenced_only_on_the_cpu_path(path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS, path],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    noisy = "bitsandbytes.backends.cpu.ops" in result.stderr
    if path == "cpu":
        assert not noisy, result.stderr[-2000:]
    else:  # the warning exists (so the test above means something) and is left elsewhere
        import torch

        if torch.cuda.is_available():
            pytest.skip("bitsandbytes' CPU-kernel warning is a CPU-only machine's")
        assert noisy
