from django.urls import path

from jobs import views_chat

app_name = "chat"
urlpatterns = [
    path("", views_chat.chat_page, name="chat"),
    path("feedback/", views_chat.feedback_page, name="feedback"),
]
