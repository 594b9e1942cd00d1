"""The app boundaries of pyproject.toml's [tool.importlinter] contracts hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Contracts: 3 kept, 0 broken." in output


def test_training_announces_instead_of_importing_billing_and_evaluation():
    from training import hooks

    # billing and evaluation subscribed in their AppConfig.ready()
    assert hooks.estimate_requested.has_listeners()
    assert hooks.start_requested.has_listeners()
    assert hooks.reconcile_tick.has_listeners()
    assert hooks.job_finished.has_listeners()
    assert hooks.job_completed.has_listeners()
