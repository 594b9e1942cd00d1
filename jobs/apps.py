from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Batch LLM jobs"

    def ready(self) -> None:
        # The gateway's circuit breakers on /readyz and the dashboard (config imports no app).
        from config.health import register_status
        from jobs.services import gateway_status

        register_status("model_gateway", gateway_status)

        # Serving: the model runtime on /readyz; a completed job's adapter into the registry.
        from django.db.models.signals import post_save

        from jobs.serving import model_runtime_status, on_job_transition

        register_status("model_runtime", model_runtime_status)
        post_save.connect(
            on_job_transition, sender="training.JobTransition", dispatch_uid="serving-adapters"
        )
