from django.urls import path

from corpora import views

app_name = "corpora"
urlpatterns = [
    path("", views.index, name="index"),
    path("upload/", views.upload, name="upload"),
    path("corpora/<uuid:pk>/", views.corpus_detail, name="corpus"),
    path("corpora/<uuid:pk>/documents/<int:document_pk>/", views.document_detail, name="document"),
    path("training-files/<uuid:pk>/", views.training_file_detail, name="training_file"),
    path("exports/", views.exports_page, name="exports"),
    path("exports/new/", views.export_new, name="export_new"),
    path("exports/<uuid:pk>/", views.export_detail, name="export"),
]
