from django.urls import path

from evaluation import views

app_name = "evaluation"
urlpatterns = [
    path("", views.index, name="index"),
    path("jobs/<uuid:job_id>/validate", views.job_validate, name="job_validate"),
    path("runs/<uuid:run_id>/", views.run_detail, name="run"),
    path("runs/<uuid:run_id>/rate/", views.rate, name="rate"),
    path("runs/<uuid:run_id>/cancel", views.run_cancel, name="cancel"),
    path("runs/<uuid:run_id>/approve", views.run_approve, name="approve"),
    path("runs/<uuid:run_id>/report", views.run_report, name="report_generate"),
    path("reports/<int:report_id>/download", views.report_download, name="report_download"),
    path("reports/<int:report_id>/share", views.report_share, name="report_share"),
    path("share-links/<int:link_id>/revoke", views.share_revoke, name="share_revoke"),
    path("shared/<str:token>/", views.shared, name="shared"),
    path("shared/<str:token>/report.pdf", views.shared_download, name="shared_download"),
]
