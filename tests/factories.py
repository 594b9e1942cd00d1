import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from rest_framework.authtoken.models import Token

from config.roles import Role

PASSWORD = "a-Strong-pass-123"


class UserFactory(factory.django.DjangoModelFactory):
    """A user with a role: ``UserFactory(role=Role.VIEWER)``; ``role=None`` for none."""

    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    first_name = factory.Faker("first_name")
    last_name = factory.Faker("last_name")
    password = factory.django.Password(PASSWORD)

    @classmethod
    def _create(cls, model_class, *args, role: Role | None = Role.ENGINEER, **kwargs):
        kwargs.setdefault("is_staff", role is Role.ADMIN)
        user = super()._create(model_class, *args, **kwargs)
        if role is not None:
            user.groups.add(Group.objects.get(name=role.value))
        return user


class TokenFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Token

    user = factory.SubFactory(UserFactory)
