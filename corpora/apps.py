from django.apps import AppConfig


class CorporaConfig(AppConfig):
    name = "corpora"
    verbose_name = "Corpora and datasets"

    def ready(self) -> None:
        # The RAG routes also go on the public /v1/ API (issue 15's jobs/public_api.py). They
        # are attached from here so that jobs never imports corpora (corpora -> jobs only).
        try:
            from jobs.public_api import public_api
        except ImportError:  # a checkout without the public API: /api/v1/rag/ only
            return
        from corpora.rag_api import public_router

        public_api.add_router("", public_router)
