"""Citation checking and grounding figures of a RAG answer.

- Citations are ``[n]`` (also ``[1, 2]`` and ``[1][2]``). A number that is not one of the
  returned sources is removed from the answer text and flagged (``invalid_citations``).
- Each answer sentence gets a **support** score against the chunks it cites: the share of
  the sentence's content words (lower-cased word tokens of three or more characters that are
  not stop words, citation markers removed) that occur in the cited chunks' text, taking the
  best single cited chunk. 1.0 = every content word is in a cited chunk; 0.0 = none, or the
  sentence cites nothing. It is a lexical measure (deterministic and free); it does not
  understand paraphrase, so it is a floor on grounding, not a proof.
- ``faithfulness`` = the mean support over the answer's sentences with content words;
  ``grounded`` = every such sentence cites a returned source and has support >= ``SUPPORTED``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

SUPPORTED = 0.5

_CITATION = re.compile(r"\[(\s*\d+\s*(?:[,;]\s*\d+\s*)*)\]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)|\n+")
_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset(
    """the and for are but not you all any can her was one our out has have had his how its
    may new now old see two who did get him let say she too use that this with from they
    will would there their what when where which while were been being into than then them
    these those such only also more most other some very just over your about after again
    against because before below between both down during each few further here itself
    myself once same should through under until upon whom why yours les des une est que qui
    dans pour par sur aux ces son ses sont pas plus ont""".split()  # noqa: SIM905
)


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in text if not unicodedata.combining(c))


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(_fold(_CITATION.sub(" ", text))) if len(w) >= 3} - _STOP


def citation_numbers(text: str) -> list[int]:
    numbers = []
    for match in _CITATION.finditer(text):
        numbers += [int(n) for n in re.split(r"[,;]", match.group(1))]
    return numbers


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s and s.strip()]


@dataclass
class Sentence:
    text: str
    citations: list[int]
    support: float
    supported: bool

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "citations": self.citations,
            "support": round(self.support, 3),
            "supported": self.supported,
        }


@dataclass
class Grounding:
    answer: str  # invented citations removed
    citations: list[int]  # valid source numbers cited, in order of first use
    invalid_citations: list[int]
    sentences: list[Sentence] = field(default_factory=list)
    faithfulness: float = 0.0
    grounded: bool = False

    @property
    def flags(self) -> list[str]:
        flags = []
        if self.invalid_citations:
            flags.append("invalid_citation")
        if not self.citations:
            flags.append("no_citation")
        if self.sentences and not self.grounded:
            flags.append("unsupported_sentence")
        return flags


def check_answer(answer: str, sources: dict[int, str]) -> Grounding:
    """Check the citations of ``answer`` against ``sources`` ({number: chunk text})."""
    invalid: list[int] = []

    def keep_valid(match: re.Match) -> str:
        numbers = [int(n) for n in re.split(r"[,;]", match.group(1))]
        good = [n for n in numbers if n in sources]
        invalid.extend(n for n in numbers if n not in sources)
        return "[" + ", ".join(str(n) for n in good) + "]" if good else ""

    cleaned = _CITATION.sub(keep_valid, answer)
    cleaned = re.sub(r"[ \t]+([.,;:!?])", r"\1", cleaned)
    cleaned = re.sub(r"[ \t]{2,}", " ", cleaned).strip()
    source_words = {n: content_words(text) for n, text in sources.items()}
    sentences = []
    for text in split_sentences(cleaned):
        cited = [n for n in dict.fromkeys(citation_numbers(text)) if n in sources]
        words = content_words(text)
        if not words:
            continue
        support = max((len(words & source_words[n]) / len(words) for n in cited), default=0.0)
        sentences.append(Sentence(text, cited, support, bool(cited) and support >= SUPPORTED))
    cited_all = [n for n in dict.fromkeys(citation_numbers(cleaned)) if n in sources]
    faithfulness = sum(s.support for s in sentences) / len(sentences) if sentences else 0.0
    return Grounding(
        answer=cleaned,
        citations=cited_all,
        invalid_citations=sorted(set(invalid)),
        sentences=sentences,
        faithfulness=faithfulness,
        grounded=bool(sentences) and all(s.supported for s in sentences),
    )
