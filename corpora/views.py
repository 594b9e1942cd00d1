from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from config.views import dashboard_view


@dashboard_view
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "corpora/index.html", {"section": "datasets"})
