from django.apps import AppConfig


class EvaluationConfig(AppConfig):
    name = "evaluation"
    verbose_name = "Validation and evaluation"

    def ready(self) -> None:
        # Issue 17: datasets, evaluations, batch evaluations and metrics on the public /v1/ API,
        # the gateway-call metrics hook, scrape-time
        # gauges and the tracing hooks (config imports no app, so the wiring is here).
        from evaluation.evals import wiring

        wiring.connect()
        from evaluation import hooks  # the automatic validation of completed training jobs

        hooks.connect()
