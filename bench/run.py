"""Run every benchmark in bench/ (files named bench_*.py, each with a main()).

Each benchmark measures its subject and a baseline in the same run and prints the ratio,
so figures compare across machines. They run on a throw-away embedded installation.
"""

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    os.environ.setdefault("CRUCIBLE_DATA_DIR", tempfile.mkdtemp(prefix="crucible-bench-"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    only = set(sys.argv[1:])
    for path in sorted(HERE.glob("bench_*.py")):
        if only and path.stem not in only:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"== {path.stem}")
        module.main()


if __name__ == "__main__":
    main()
