from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from config.roles import role_of

User = get_user_model()


@admin.display(description="Role")
def _role(user) -> str:
    role = role_of(user)
    return role.label if role else "—"


admin.site.unregister(User)


@admin.register(User)
class CrucibleUserAdmin(UserAdmin):
    """Users with their role (the group they belong to) shown and filterable."""

    list_display = (
        "username",
        "email",
        "first_name",
        "last_name",
        _role,
        "is_active",
        "last_login",
    )
    list_filter = ("groups", "is_active", "is_staff", "is_superuser")

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("groups")
