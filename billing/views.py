from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from billing import services
from billing.models import AuditEntry, GpuPrice, LedgerEntry
from config.errors import InvalidInput
from config.views import dashboard_view


@dashboard_view
@require_safe  # read-only: budgets change through the API or the admin; a POST here is a 405
def index(request: HttpRequest) -> HttpResponse:
    try:
        month = services.parse_month(request.GET.get("month"))
    except InvalidInput:  # a bad month in the address shows this month
        month = services.month_start()
    summary = services.budget_summary(month=month)
    chart = {
        "days": [d["day"] for d in summary["daily"]],
        "daily": [float(d["amount"]) for d in summary["daily"]],
        "cumulative": [float(d["cumulative"]) for d in summary["daily"]],
        "budget": float(summary["budget"]),
    }
    percent = summary["percent_used"] or 0
    context = {
        "section": "budgets",
        "summary": summary,
        "chart": chart,
        "percent_bar": min(100, percent),
        "level": "danger" if percent >= 95 else "warning" if percent >= 80 else "success",
        "prices": GpuPrice.objects.filter(is_active=True),
        "audit": AuditEntry.objects.select_related("job", "user")[:10],
        "can_manage": request.user.has_perm("core.manage_budgets"),
        "gpu_spent": summary["by_kind"].get(LedgerEntry.Kind.GPU_TIME, 0),
        "llm": services.llm_spend_summary(month=month),
    }
    return render(request, "billing/index.html", context)
