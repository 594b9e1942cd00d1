"""Seed the GPU price catalog.

H100 PCIe 80GB: $2.49/hr spot and $7.99/hr on demand, the RunPod prices quoted in the
product seed (the only GPU type of phase 1). cpu-local: the local executor, free (set a
notional rate in the admin to make local runs count against the budget).
"""

from decimal import Decimal

from django.db import migrations
from django.utils import timezone

PRICES = [
    {
        "gpu_type": "h100-pcie-80gb",
        "display_name": "NVIDIA H100 PCIe 80GB (RunPod)",
        "spot_per_hour": Decimal("2.49"),
        "on_demand_per_hour": Decimal("7.99"),
        "source": "Product seed (RunPod H100 PCIe pricing); refreshed from RunPod when configured",
    },
    {
        "gpu_type": "cpu-local",
        "display_name": "This machine (local executor)",
        "spot_per_hour": Decimal("0"),
        "on_demand_per_hour": Decimal("0"),
        "source": "Local executor: no provider charge; edit to set a notional hourly rate",
    },
]


def seed(apps, schema_editor):
    GpuPrice = apps.get_model("billing", "GpuPrice")
    for price in PRICES:
        GpuPrice.objects.get_or_create(
            gpu_type=price["gpu_type"], defaults={**price, "updated_at": timezone.now()}
        )


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
