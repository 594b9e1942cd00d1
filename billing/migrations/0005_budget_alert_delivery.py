from django.db import migrations, models


def existing_alerts_delivered(apps, schema_editor):
    BudgetAlert = apps.get_model("billing", "BudgetAlert")
    BudgetAlert.objects.filter(delivered_at__isnull=True).update(delivered_at=models.F("sent_at"))


class Migration(migrations.Migration):
    dependencies = [("billing", "0004_llm_write_ahead")]

    operations = [
        migrations.AddField(
            model_name="budgetalert",
            name="delivered_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="budgetalert",
            name="delivery_claimed_until",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(existing_alerts_delivered, migrations.RunPython.noop),
    ]
