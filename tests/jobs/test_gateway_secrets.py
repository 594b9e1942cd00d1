"""Provider keys at rest: Fernet-encrypted with a key from the environment or a generated
key file (0600); only the last four characters are kept in clear."""

import stat

import pytest
from cryptography.fernet import Fernet

from jobs.gateway import secrets
from jobs.models import Provider


@pytest.fixture(autouse=True)
def _fresh_key(monkeypatch, tmp_path, settings):
    settings.DATA_DIR = tmp_path
    monkeypatch.delenv("GATEWAY_SECRET_KEY", raising=False)
    monkeypatch.delenv("CRUCIBLE_SECRET_KEY_FILE", raising=False)
    secrets.reset_cache()
    yield
    secrets.reset_cache()


def test_generated_key_file_is_private_and_reused(tmp_path):
    token = secrets.encrypt("sk-abc")
    path = tmp_path / "gateway.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secrets.reset_cache()
    assert secrets.decrypt(token) == "sk-abc"


def test_environment_key_wins(monkeypatch, tmp_path):
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("GATEWAY_SECRET_KEY", key)
    token = secrets.encrypt("sk-env")
    assert Fernet(key.encode()).decrypt(token.encode()) == b"sk-env"
    assert not (tmp_path / "gateway.key").exists()


def test_named_key_file(monkeypatch, tmp_path):
    path = tmp_path / "elsewhere.key"
    path.write_bytes(Fernet.generate_key())
    monkeypatch.setenv("CRUCIBLE_SECRET_KEY_FILE", str(path))
    assert secrets.decrypt(secrets.encrypt("x")) == "x"
    assert not (tmp_path / "gateway.key").exists()


def test_wrong_key_gives_a_clear_error_without_the_secret(monkeypatch):
    token = secrets.encrypt("sk-secret-value")
    monkeypatch.setenv("GATEWAY_SECRET_KEY", Fernet.generate_key().decode())
    secrets.reset_cache()
    with pytest.raises(secrets.SecretKeyError) as caught:
        secrets.decrypt(token)
    assert "enter the key again" in str(caught.value)
    assert caught.value.__cause__ is None and "sk-secret" not in str(caught.value)


@pytest.mark.django_db
def test_provider_stores_only_ciphertext_and_last4():
    provider = Provider(slug="openai", name="OpenAI", base_url="https://api.openai.com/v1")
    provider.set_api_key("  sk-live-1234567890abcd  ")
    provider.save()
    provider.refresh_from_db()
    assert "sk-live" not in provider.api_key_encrypted
    assert provider.api_key_last4 == "abcd"
    assert provider.api_key() == "sk-live-1234567890abcd"
    assert provider.env_key_name == "GATEWAY_OPENAI_API_KEY"
    provider.set_api_key("")
    assert provider.api_key_encrypted == "" and provider.api_key() == ""
