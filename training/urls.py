from django.urls import path

from training import views

app_name = "training"
urlpatterns = [
    path("", views.index, name="index"),
    path("<uuid:job_id>/", views.detail, name="detail"),
]
