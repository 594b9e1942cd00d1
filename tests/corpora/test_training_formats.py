"""Training files in the formats users already have: OpenAI chat JSONL, ShareGPT, Alpaca and
Crucible's own. Detected per file, validated line by line, ids derived when absent, the format
stored and shown, mixed files refused, and OpenAI chat JSONL written back by exports."""

import io
import json
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from config.errors import InvalidInput
from config.roles import Role
from config.storage import storage_read
from corpora.models import TrainingFile
from corpora.services import corpus_create, export_create, training_file_create
from corpora.validation import validate_training_file
from gpu import formats
from tests.conftest import assert_envelope
from tests.corpora.conftest import document
from tests.corpora.test_exports import run_export
from tests.factories import UserFactory

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "training"
FORMATS_DIR = SAMPLES / "formats"


def lines(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def upload(client, content: bytes, filename="chat.jsonl"):
    return client._client.post(
        "/api/v1/training-files",
        data={"file": SimpleUploadedFile(filename, content), "name": "chat"},
        headers=client._headers,
    )


def signed_in(role=Role.ENGINEER) -> Client:
    client = Client()
    client.force_login(UserFactory(role=role))
    return client


def chats(content: bytes) -> list[formats.Chat]:
    """The conversations of a file as both platform and worker see them."""
    out, tracker = [], formats.FormatTracker()
    for number, raw in enumerate(content.splitlines(), start=1):
        if raw.strip():
            record = json.loads(raw)
            out.append(formats.normalize(record, tracker.check(record, number), number))
    return out


OPENAI = {
    "messages": [
        {"role": "system", "content": "You are Elena, a warm financial advisor."},
        {"role": "user", "content": "Should I pay off my card or save first?"},
        {"role": "assistant", "content": "Both matter; start with a small emergency fund."},
    ]
}
SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "Is a Roth IRA worth it at 35?"},
        {"from": "gpt", "value": "It is not too late: time is on your side."},
    ]
}
ALPACA = {"instruction": "Explain an index fund.", "input": "", "output": "A basket of stocks."}


@pytest.fixture
def engineer(api_as):
    return api_as(Role.ENGINEER)


@pytest.mark.parametrize(
    ("path", "fmt", "label", "conversations", "pairs"),
    [
        (FORMATS_DIR / "openai_chat.jsonl", "openai_chat", "OpenAI chat", 5, 13),
        (FORMATS_DIR / "sharegpt.jsonl", "sharegpt", "ShareGPT", 5, 14),
        (FORMATS_DIR / "alpaca.jsonl", "alpaca", "Alpaca", 5, 6),
        (SAMPLES / "financial_advisor_v1.jsonl", "crucible", "Crucible", 45, 120),
    ],
)
def test_each_format_is_accepted_with_the_detected_format(
    engineer, path, fmt, label, conversations, pairs
):
    content = path.read_bytes()
    response = upload(engineer, content, path.name)
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["format"], body["format_label"]) == (fmt, label)
    assert body["status"] == "ready", body["validation_errors"]
    # Pairs are trained assistant turns: the OpenAI sample's weight-0 reply is not one.
    assert (body["conversation_count"], body["pair_count"]) == (conversations, pairs)
    stored = TrainingFile.objects.get(pk=body["id"])
    assert stored.format == fmt and storage_read(stored.storage_path) == content
    preview = body["stats"]["preview"][0]
    assert [m["role"] for m in preview["messages"][:3]] == ["system", "user", "assistant"]
    assert engineer.get(f"training-files/{body['id']}").json()["format"] == fmt


def test_sharegpt_and_alpaca_become_the_expected_transcripts():
    sharegpt = chats((FORMATS_DIR / "sharegpt.jsonl").read_bytes())
    first = json.loads((FORMATS_DIR / "sharegpt.jsonl").read_text().splitlines()[0])
    assert sharegpt[0].id == first["id"] and not sharegpt[0].id_derived
    assert sharegpt[0].messages[0] == {"role": "system", "content": first["system"]}
    assert sharegpt[0].messages[1] == {
        "role": "user",
        "content": first["conversations"][0]["value"],
    }
    assert sharegpt[0].messages[2]["role"] == "assistant"
    assert sharegpt[4].id_derived and sharegpt[4].id.startswith("line-5-")

    alpaca = chats(lines({**ALPACA, "input": "For a beginner.", "system": "Be brief."}))[0]
    assert alpaca.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Explain an index fund.\n\nFor a beginner."},
        {"role": "assistant", "content": "A basket of stocks."},
    ]
    history = chats((FORMATS_DIR / "alpaca.jsonl").read_bytes())[4]
    assert [m["role"] for m in history.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


def test_derived_ids_are_stable_and_follow_line_and_content():
    content = (FORMATS_DIR / "openai_chat.jsonl").read_bytes()
    first = validate_training_file(io.BytesIO(content))
    again = validate_training_file(io.BytesIO(content))
    ids = [p["id"] for p in first.stats()["preview"]]
    assert ids == [p["id"] for p in again.stats()["preview"]]
    assert first.derived_ids == 5
    record = json.loads(content.splitlines()[0])
    assert ids[0] == formats.derive_id(record, 1) and ids[0].startswith("line-1-")
    # Same record on another line, or changed content: another id; the others keep theirs.
    moved = validate_training_file(io.BytesIO(b"\n" + content))
    assert moved.stats()["preview"][0]["id"].startswith("line-2-")
    edited = dict(record, messages=[*record["messages"][:-1], OPENAI["messages"][-1]])
    changed = validate_training_file(io.BytesIO(lines(edited) + content.split(b"\n", 1)[1]))
    changed_ids = [p["id"] for p in changed.stats()["preview"]]
    assert changed_ids[0] != ids[0] and changed_ids[1:] == ids[1:]
    # An own id is kept; two equal ids are refused as in Crucible files.
    duplicate = validate_training_file(io.BytesIO(lines({**SHAREGPT, "id": "a"}) * 2))
    assert duplicate.errors[0] == {
        "line": 2,
        "pointer": "/id",
        "message": "duplicate id 'a' (first on line 1)",
    }


@pytest.mark.parametrize(
    ("records", "line", "looks_like", "expected"),
    [
        ([OPENAI, OPENAI, SHAREGPT, ALPACA], 3, "ShareGPT", "OpenAI chat"),
        ([ALPACA, OPENAI], 2, "OpenAI chat", "Alpaca"),
        # A Crucible file whose line lacks the id is an OpenAI record, not Crucible.
        ([{**OPENAI, "id": "c-1"}, {**OPENAI, "id": "c-2"}, OPENAI], 3, "OpenAI chat", "Crucible"),
    ],
)
def test_a_file_mixing_formats_is_refused_at_the_first_differing_line(
    engineer, records, line, looks_like, expected
):
    response = upload(engineer, lines(*records))
    error = assert_envelope(response, 422, "validation_error")
    first = error["details"]["errors"][0]
    assert first["line"] == line and first["pointer"] == ""
    message = first["message"]
    assert message.startswith("mixed formats: this line looks like ")
    assert formats.SHAPES[formats.detect_format(records[line - 1])] in message
    assert f"but the file is {expected} (detected from line 1)" in message
    assert f"line {line}" in error["message"]
    assert looks_like.split()[0] in message
    assert TrainingFile.objects.count() == 0


def test_an_openai_file_may_carry_ids_on_some_lines(engineer):
    response = upload(engineer, lines(OPENAI, {**OPENAI, "id": "kept", "tools": []}, OPENAI))
    assert response.status_code == 201, response.content
    ids = [p["id"] for p in response.json()["stats"]["preview"]]
    assert ids[1] == "kept" and ids[0].startswith("line-1-") and ids[2].startswith("line-3-")


def test_an_id_with_openai_features_is_openai_and_a_plain_id_stays_crucible(engineer):
    weighted = _with({**OPENAI, "id": "own"}, "messages/2/weight", 1)
    response = upload(engineer, lines(weighted, OPENAI))
    assert response.status_code == 201, response.content
    assert response.json()["format"] == "openai_chat"
    assert response.json()["stats"]["preview"][0]["id"] == "own"
    # A Crucible record with a stray field keeps the Crucible schema's error, as before.
    error = assert_envelope(upload(engineer, lines({**OPENAI, "id": "c", "extra": 1})), 422)
    assert error["details"]["errors"][0]["message"].startswith(
        "Additional properties are not allowed ('extra' was unexpected)"
    )


def _with(record: dict, path: str, value) -> dict:
    """A deep copy of ``record`` with the value at a /-separated path replaced."""
    record = json.loads(json.dumps(record))
    parts = path.split("/")
    target = record
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    last = parts[-1]
    if value is ...:
        del target[int(last) if last.isdigit() else last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return record


@pytest.mark.parametrize(
    ("bad", "pointer", "fragment"),
    [
        (_with(OPENAI, "messages/1/role", "robot"), "/messages/1/role", "role must be one of"),
        (_with(OPENAI, "messages/2/weight", 2), "/messages/2/weight", "weight must be 0 or 1"),
        (_with(OPENAI, "messages/1/weight", 0), "/messages/1/weight", "assistant messages only"),
        (_with(OPENAI, "messages/2/content", "  "), "/messages/2/content", "content is empty"),
        (
            _with(OPENAI, "messages/2/content", [{"type": "image_url", "image_url": {}}]),
            "/messages/2/content/0/type",
            "not supported (text only)",
        ),
        (_with(OPENAI, "tools", {"type": "function"}), "/tools", "tools must be a list"),
        (_with(OPENAI, "messages", [OPENAI["messages"][0]]), "/messages", "at least two"),
        (_with(SHAREGPT, "conversations/1/from", "bot"), "/conversations/1/from", "from must be"),
        (_with(SHAREGPT, "conversations/0/value", ""), "/conversations/0/value", "value is empty"),
        (
            _with(SHAREGPT, "conversations/1", {"from": "function_call", "value": "not json"}),
            "/conversations/1/value",
            "a function_call turn must hold JSON",
        ),
        (_with(ALPACA, "output", ...), "/output", "output must be a string"),
        (_with(ALPACA, "instruction", 7), "/instruction", "instruction must be a string"),
        (_with(ALPACA, "history", [["only one"]]), "/history/0", "[instruction, response]"),
    ],
)
def test_a_bad_record_names_its_line_and_pointer(engineer, bad, pointer, fragment):
    first = {"openai_chat": OPENAI, "sharegpt": SHAREGPT, "alpaca": ALPACA}[
        formats.detect_format(bad)
    ]
    response = upload(engineer, lines(first, first, bad))
    error = assert_envelope(response, 422, "validation_error")
    reported = error["details"]["errors"][0]
    assert (reported["line"], reported["pointer"]) == (3, pointer), reported
    assert fragment in reported["message"], reported
    assert f"line 3 at {pointer}" in error["message"]
    assert TrainingFile.objects.count() == 0


def test_unknown_shape_says_which_formats_are_accepted(engineer):
    error = assert_envelope(upload(engineer, lines({"prompt": "a", "text": "b"})), 422)
    message = error["details"]["errors"][0]["message"]
    assert message.startswith("not a known training-file format (the record has 'prompt', 'text')")
    for shape in formats.SHAPES.values():
        assert shape in message


def test_trainability_problems_of_other_formats_are_stored_not_refused(engineer):
    all_context = _with(OPENAI, "messages/2/weight", 0)
    ends_on_user = {"conversations": [{"from": "human", "value": "Hi"}]}
    response = upload(engineer, lines(OPENAI, all_context))
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "problems" and body["pair_count"] == 1
    assert body["validation_errors"][0]["line"] == 2
    assert "every assistant message has weight 0" in body["validation_errors"][0]["message"]
    response = upload(engineer, lines(ends_on_user))
    assert response.json()["validation_errors"][0]["message"] == (
        "the conversation does not end with an assistant turn"
    )


def test_viewers_cannot_upload_any_format(api_as):
    viewer = api_as(Role.VIEWER)
    assert_envelope(upload(viewer, lines(OPENAI)), 403)
    assert TrainingFile.objects.count() == 0


# --- Pages ------------------------------------------------------------------------------------


def test_upload_page_says_which_format_it_detected(db):
    client = signed_in()
    response = client.post(
        reverse("corpora:upload"),
        {
            "kind": "training_file",
            "file": SimpleUploadedFile(
                "sharegpt.jsonl", (FORMATS_DIR / "sharegpt.jsonl").read_bytes()
            ),
        },
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 201
    html = response.content.decode()
    assert "Detected format: <strong>ShareGPT</strong>" in html
    assert "1 record without an id got one from its line number and content hash" in html


def test_file_page_shows_the_format_and_a_train_button_for_those_who_run_jobs(db):
    training_file = training_file_create(
        name="openai", upload=io.BytesIO(lines(OPENAI, OPENAI)), user=None
    )
    url = reverse("corpora:training_file", args=[training_file.pk])
    html = signed_in().get(url).content.decode()
    assert '<dd id="file-format">OpenAI chat' in html
    assert "2 derived from the line number and a content hash" in html
    train = f'href="{reverse("training:new")}?training_file={training_file.pk}"'
    assert train in html and "Train on this file" in html
    viewer = signed_in(Role.VIEWER).get(url)
    assert viewer.status_code == 200 and "Train on this file" not in viewer.content.decode()
    anonymous = Client().get(url)
    assert anonymous.status_code == 302 and "login" in anonymous["Location"]


def test_the_datasets_index_lists_each_file_with_its_format(db):
    training_file_create(name="from openai", upload=io.BytesIO(lines(OPENAI)), user=None)
    training_file_create(name="from alpaca", upload=io.BytesIO(lines(ALPACA)), user=None)
    html = signed_in(Role.VIEWER).get(reverse("corpora:index")).content.decode()
    table = html[html.index('id="training-files-table"') :]
    assert '<th scope="col">Format</th>' in table
    assert '<td class="nowrap">OpenAI chat</td>' in table
    assert '<td class="nowrap">Alpaca</td>' in table


def test_train_on_this_file_preselects_it_in_the_new_job_form(db):
    chosen = training_file_create(name="older", upload=io.BytesIO(lines(ALPACA)), user=None)
    newest = training_file_create(name="newer", upload=io.BytesIO(lines(OPENAI)), user=None)
    client = signed_in()
    html = client.get(f"{reverse('training:new')}?training_file={chosen.pk}").content.decode()
    assert f'<option value="{chosen.pk}" selected>' in html
    assert f'<option value="{newest.pk}" selected>' not in html
    # No or a bad parameter: the newest ready file, as before.
    for query in ("", "?training_file=not-a-uuid"):
        html = client.get(f"{reverse('training:new')}{query}").content.decode()
        assert f'<option value="{newest.pk}" selected>' in html
    assert (
        signed_in(Role.VIEWER)
        .get(f"{reverse('training:new')}?training_file={chosen.pk}")
        .status_code
        == 403
    )


# --- Exports ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", ["openai_chat.jsonl", "sharegpt.jsonl", "alpaca.jsonl"])
def test_openai_chat_export_re_uploads_to_the_same_conversations(engineer, sample):
    content = (FORMATS_DIR / sample).read_bytes()
    source = training_file_create(name="source", upload=io.BytesIO(content), user=None)
    export = run_export(
        training_file=source,
        formats=["openai_chat", "jsonl", "hf"],
        splits={"train": 1.0, "validation": 0.0, "test": 0.0},
    )
    # The other formats carry the same ids as the upload (derived ones included).
    jsonl_rows = storage_read(f"{export.storage_prefix}/jsonl/train.jsonl").splitlines()
    assert [json.loads(r)["id"] for r in jsonl_rows] == [c.id for c in chats(content)]
    entry = next(f for f in export.manifest["files"] if f["format"] == "openai_chat")
    assert entry["path"] == "openai_chat/train.jsonl" and entry["rows"] == 5
    exported = storage_read(f"{export.storage_prefix}/{entry['path']}")
    for raw in exported.splitlines():
        assert set(json.loads(raw)) <= {"messages", "tools"}

    response = upload(engineer, exported, "exported.jsonl")
    assert response.status_code == 201, response.content
    assert response.json()["format"] == "openai_chat"
    before, after = chats(content), chats(exported)
    assert [c.messages for c in after] == [c.messages for c in before]
    assert [c.context_only for c in after] == [c.context_only for c in before]
    assert [c.tools for c in after] == [c.tools for c in before]
    if sample == "openai_chat.jsonl":
        assert any(c.context_only for c in after) and any(c.tools for c in after)
        assert after[4].messages[2]["tool_calls"][0]["function"]["name"] == "monthly_payment"


def test_the_exports_page_offers_openai_chat(db):
    training_file_create(name="chat", upload=io.BytesIO(lines(OPENAI)), user=None)
    html = signed_in().get(reverse("corpora:exports")).content.decode()
    assert 'value="openai_chat"' in html and "OpenAI chat JSONL (training files)" in html


def test_openai_chat_export_is_for_training_files_only(db):
    corpus = corpus_create(name="c", upload=io.BytesIO(lines(document(1))), user=None)
    with pytest.raises(InvalidInput, match="openai_chat writes conversations"):
        export_create(user=None, formats=["openai_chat"], corpus=corpus)


# --- manage.py train --file -------------------------------------------------------------------


def test_manage_py_train_file_accepts_an_openai_chat_file(db, monkeypatch):
    from training import services as training_services
    from training.models import TrainingJob

    started = []
    monkeypatch.setattr(
        training_services, "training_job_start", lambda *, job, user, **kw: started.append(job)
    )
    out = io.StringIO()
    call_command(
        "train",
        "--file",
        str(FORMATS_DIR / "openai_chat.jsonl"),
        "--preset",
        "smoke",
        "--no-follow",
        stdout=out,
    )
    training_file = TrainingFile.objects.get()
    assert training_file.format == "openai_chat" and training_file.is_ready
    assert "5 conversations" in out.getvalue()
    job = TrainingJob.objects.get()
    assert job.training_file == training_file and started == [job]


# --- In the browser ---------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_upload_an_openai_file_then_train_on_it_in_the_browser(browser, live_server, ada):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select

    from tests.browser.test_dashboard_browser import (
        PASSWORD,
        _console_errors,
        _shoot,
        _sign_in,
        _wait,
    )

    _sign_in(browser, live_server, "ada", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    browser.get(f"{live_server.url}{reverse('corpora:index')}")
    hint = browser.find_element(By.ID, "formats-field")
    assert not hint.is_displayed()  # corpus is the default kind
    Select(browser.find_element(By.ID, "id_kind")).select_by_value("training_file")
    assert hint.is_displayed() and "OpenAI chat JSONL" in hint.text
    browser.find_element(By.ID, "id_file").send_keys(str(FORMATS_DIR / "openai_chat.jsonl"))
    browser.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    ok = _wait(browser).until(ec.visibility_of_element_located((By.ID, "upload-ok")))
    assert "5 conversations" in ok.text and "Detected format: OpenAI chat" in ok.text
    _shoot(browser, "datasets-training-format-upload.png")

    ok.find_element(By.LINK_TEXT, "Open it").click()
    _wait(browser).until(ec.visibility_of_element_located((By.ID, "file-format")))
    assert browser.find_element(By.ID, "file-format").text.startswith("OpenAI chat")
    _shoot(browser, "datasets-training-format-file.png")
    browser.find_element(By.ID, "train-on-file").click()
    _wait(browser).until(ec.url_contains(reverse("training:new")))
    selected = Select(browser.find_element(By.ID, "id_training_file")).first_selected_option
    assert selected.get_attribute("value") == str(TrainingFile.objects.get().pk)
    assert _console_errors(browser) == []
