from django.apps import AppConfig


def ensure_offline_provider(sender=None, **kwargs) -> None:
    """The offline provider and its two models, created when missing.

    The data migration registered them first; this runs after every ``migrate`` and every
    database flush (post_migrate), so a flushed database (a test's, or an operator's
    ``flush``) still serves the offline model. Existing rows are never changed.
    """
    import importlib

    from django.apps import apps

    seed = importlib.import_module("jobs.migrations.0002_offline_provider")
    seed.register(apps, None)


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Batch LLM jobs"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        post_migrate.connect(ensure_offline_provider, sender=self, dispatch_uid="jobs-offline")

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

        # The LLM port (config/llm.py): training and corpora call models through it, never
        # importing jobs. Each call looks the gateway's function up when it runs (a patched
        # jobs.gateway.embed is the one the port calls).
        from config import llm
        from jobs import gateway
        from jobs import services as jobs_services

        llm.register(
            llm.Gateway(
                chat=lambda **kwargs: gateway.chat(**kwargs),
                embed=lambda **kwargs: gateway.embed(**kwargs),
                model_keys=lambda capability: list(
                    gateway.models(capability=capability).values_list("key", flat=True)
                ),
                caller=lambda **kwargs: gateway.Caller(**kwargs),
                adapter_model=lambda *, job: jobs_services.adapter_model_register(job=job),
                error=gateway.GatewayError,
            )
        )

        # The RAG routes also go on the public /v1/ API (jobs -> corpora, the allowed way).
        from corpora.rag_api import public_router
        from jobs.public_api import public_api

        public_api.add_router("", public_router)
