"""Register the offline provider and its two models (chat and embeddings, price 0)."""

from django.db import migrations

MODELS = [
    {
        "remote_id": "smollm2-135m-instruct",
        "display_name": "SmolLM2-135M-Instruct (offline)",
        "context_length": 8192,
        "capabilities": ["chat"],
    },
    {
        "remote_id": "all-minilm-l6-v2",
        "display_name": "all-MiniLM-L6-v2 embeddings, 384 dims (offline)",
        "context_length": 256,
        "capabilities": ["embeddings"],
    },
]


def register(apps, schema_editor):
    Provider = apps.get_model("jobs", "Provider")
    RegisteredModel = apps.get_model("jobs", "RegisteredModel")
    provider, _ = Provider.objects.get_or_create(
        slug="offline",
        defaults={"name": "Offline (this machine)", "kind": "offline", "enabled": True},
    )
    for spec in MODELS:
        RegisteredModel.objects.get_or_create(
            key=f"offline/{spec['remote_id']}",
            defaults={
                **spec,
                "provider": provider,
                "price_input_per_m": 0,
                "price_output_per_m": 0,
                "price_source": "local",
                "enabled": True,
            },
        )


def unregister(apps, schema_editor):
    apps.get_model("jobs", "Provider").objects.filter(slug="offline").delete()


class Migration(migrations.Migration):
    dependencies = [("jobs", "0001_initial")]

    operations = [migrations.RunPython(register, unregister)]
