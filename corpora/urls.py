from django.urls import path

from corpora import rag_views, views

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
    path("rag/", rag_views.rag_explorer, name="rag"),
    path("rag/retrieve/", rag_views.rag_retrieve, name="rag_retrieve"),
    path("rag/generate/", rag_views.rag_generate, name="rag_generate"),
    path("rag/indexes/new/", rag_views.rag_index_create, name="rag_index_create"),
    path("rag/indexes/<uuid:pk>/update/", rag_views.rag_index_update, name="rag_index_update"),
    path("rag/indexes/<uuid:pk>/delete/", rag_views.rag_index_delete, name="rag_index_delete"),
]
