from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from config import views
from config.api import api
from config.metrics import metrics_view
from jobs.public_api import public_api

admin.site.site_header = "Crucible administration"
admin.site.site_title = "Crucible admin"
admin.site.index_title = "Data, jobs, users and budgets"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path(
        "login/",
        auth_views.LoginView.as_view(redirect_authenticated_user=True),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("datasets/", include("corpora.urls")),
    path("training/", include("training.urls")),
    path("evaluations/", include("evaluation.urls")),
    path("budgets/", include("billing.urls")),
    path("settings/", include("jobs.urls")),
    path("batch/", include("jobs.batch.urls")),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    # The OpenAI-compatible public API (jobs/public_api.py) and the chat pages.
    path("v1/", public_api.urls),
    path("chat/", include("jobs.urls_chat")),
    path("evals/", include("evaluation.evals.urls")),  # issue 17: evaluations and dashboard
    path("metrics", metrics_view, name="metrics"),  # Prometheus exposition (protected)
]

handler400 = "config.views.bad_request"
handler403 = "config.views.permission_denied"
handler404 = "config.views.page_not_found"
handler500 = "config.views.server_error"
