"""Validate the evaluation suites and record their versions and hashes in the lock file."""

from django.core.management.base import BaseCommand, CommandError

from evaluation.suites import SUITE_NAMES, SuiteError, check_lock, write_lock


class Command(BaseCommand):
    help = (
        "Validate evaluation/suites/*.json and record each suite's version and content hash in "
        "VERSIONS.lock.json. A suite whose content changed needs --bump PART NAME."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--bump",
            nargs=2,
            action="append",
            metavar=("PART", "SUITE"),
            default=[],
            help="raise a suite's version before locking: PART is major, minor or patch",
        )
        parser.add_argument(
            "--check", action="store_true", help="only report problems; exit 1 if any"
        )

    def handle(self, *args, **options):
        try:
            if options["check"]:
                problems = check_lock()
                for problem in problems:
                    self.stderr.write(problem)
                if problems:
                    raise CommandError(f"{len(problems)} suite lock problem(s)")
                self.stdout.write("All suites valid and locked.")
                return
            bump = {}
            for part, name in options["bump"]:
                if part not in ("major", "minor", "patch"):
                    raise CommandError(f"--bump PART must be major, minor or patch, not {part!r}")
                if name not in SUITE_NAMES:
                    raise CommandError(f"unknown suite {name!r}; suites: {', '.join(SUITE_NAMES)}")
                bump[name] = part
            for line in write_lock(bump=bump):
                self.stdout.write(line)
        except SuiteError as exc:
            raise CommandError(str(exc)) from exc
