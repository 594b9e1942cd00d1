from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Batch LLM jobs"

    def ready(self) -> None:
        # The gateway's circuit breakers on /readyz and the dashboard (config imports no app).
        from config.health import register_status
        from jobs.services import gateway_status

        register_status("model_gateway", gateway_status)
