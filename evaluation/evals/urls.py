from django.urls import path

from evaluation.evals import views

app_name = "evals"
urlpatterns = [
    path("", views.history, name="history"),
    path("runs/<uuid:run_id>/", views.run_detail, name="run"),
    path("batches/", views.batches, name="batches"),
    path("batches/<uuid:batch_id>/", views.batch_detail, name="batch"),
    path("batches/<uuid:batch_id>/samples/", views.batch_samples, name="samples"),
    path("dashboard/", views.dashboard, name="dashboard"),
]
