from django.urls import path

from jobs import views

app_name = "jobs"
urlpatterns = [path("models/", views.settings_page, name="settings")]
