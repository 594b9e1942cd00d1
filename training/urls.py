from django.urls import path

from training import views, views_tools

app_name = "training"
urlpatterns = [
    path("", views.index, name="index"),
    path("new/", views.new_job, name="new"),
    path("compare/", views_tools.compare, name="compare"),
    path("templates/", views_tools.templates, name="templates"),
    path("templates/<int:template_id>/start/", views_tools.template_start, name="template_start"),
    path("playground/", views_tools.playground, name="playground"),
    path("<uuid:job_id>/", views.detail, name="detail"),
    path("<uuid:job_id>/chart/", views.chart_data, name="chart"),
    path("<uuid:job_id>/annotate/", views.annotate, name="annotate"),
    path("<uuid:job_id>/save-template/", views_tools.template_save, name="template_save"),
]
