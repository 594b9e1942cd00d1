from django.http import HttpRequest

from config.roles import role_of

NAVIGATION = [
    ("overview", "Overview", "overview"),
    ("datasets", "Datasets", "corpora:index"),
    ("training", "Training", "training:index"),
    ("evaluations", "Evaluations", "evaluation:index"),
    ("chat", "Chat", "chat:chat"),
    ("budgets", "Budgets", "billing:index"),
]


def crucible(request: HttpRequest) -> dict:
    user = getattr(request, "user", None)
    role = role_of(user) if user is not None else None
    return {"navigation": NAVIGATION, "user_role": role}
