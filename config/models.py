from django.db import models


class Capability(models.Model):
    """Holder of the platform-wide permissions that roles are made of (no table).

    Model-level permissions (``view_trainingjob`` ...) come with each app's models; these
    are the actions that cross apps. Roles map to them in ``config/roles.py``.
    """

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [
            ("view_dashboard", "Read datasets, jobs, evaluations and budgets"),
            ("run_jobs", "Upload datasets; create, start, cancel and retry jobs"),
            ("score_validations", "Score validation responses as a rater"),
            ("approve_validations", "Approve or reject validation reports"),
            ("manage_budgets", "Set monthly budgets and alert thresholds"),
            ("override_budgets", "Start a job over budget, with a recorded reason"),
            ("manage_users", "Create users, change roles and issue API tokens"),
        ]

    def __str__(self) -> str:
        return "Crucible capabilities"
