"""Validate the batch frameworks and record their versions and hashes in the lock file."""

from django.core.management.base import BaseCommand, CommandError

from jobs.batch.frameworks import FrameworkError, all_frameworks, check_lock, write_lock


class Command(BaseCommand):
    help = (
        "Validate jobs/frameworks/*.json against schemas/framework/v1.json and record each "
        "framework's version and content hash in VERSIONS.lock.json. A framework whose content "
        "changed needs --bump PART NAME."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--bump", nargs=2, action="append", default=[], metavar=("PART", "NAME")
        )
        parser.add_argument("--check", action="store_true", help="only report; exit 1 if any")

    def handle(self, *args, **options):
        try:
            if options["check"]:
                problems = check_lock()
                for problem in problems:
                    self.stderr.write(problem)
                if problems:
                    raise CommandError(f"{len(problems)} framework lock problem(s)")
                self.stdout.write("All frameworks valid and locked.")
                return
            names = set(all_frameworks())
            bump = {}
            for part, name in options["bump"]:
                if part not in ("major", "minor", "patch"):
                    raise CommandError(f"--bump PART must be major, minor or patch, not {part!r}")
                if name not in names:
                    raise CommandError(f"unknown framework {name!r}; frameworks: {sorted(names)}")
                bump[name] = part
            for line in write_lock(bump=bump):
                self.stdout.write(line)
        except FrameworkError as exc:
            raise CommandError(str(exc)) from exc
