from django.apps import AppConfig


class CorporaConfig(AppConfig):
    name = "corpora"
    verbose_name = "Corpora and datasets"
    # The RAG routes on the public /v1/ API are mounted by JobsConfig.ready() (jobs imports
    # corpora, never the other way round).
