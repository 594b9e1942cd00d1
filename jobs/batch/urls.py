from django.urls import path

from jobs.batch import views

app_name = "batch"

urlpatterns = [
    path("", views.jobs_page, name="jobs"),
    path("new/", views.launcher_page, name="launch"),
    path("<uuid:job_id>/", views.job_page, name="job"),
    path("<uuid:job_id>/results/", views.results_page, name="results"),
    path("<uuid:job_id>/tasks/<str:task_id>/", views.task_page, name="task"),
    path("<uuid:job_id>/export.zip", views.export_zip, name="export"),
]
