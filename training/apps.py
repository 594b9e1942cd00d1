from django.apps import AppConfig
from django.db.models.signals import post_migrate


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Training"

    def ready(self) -> None:
        from training.catalogue import ensure_catalogue

        post_migrate.connect(ensure_catalogue, sender=self, dispatch_uid="training-catalogue")
