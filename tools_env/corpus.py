"""Passages and the Search-R1 corpus format: reading, writing and formatting retrieval results.

Decided interface:
- A corpus file is JSONL, one passage a line: `{"id": str, "contents": "\"Title\"\nText"}` (Search-R1 /
  wiki-18). Lines with `title` and `text` fields instead of `contents` are accepted too; an integer id is
  read as its decimal string. A `.gz` path is read through gzip.
- `Passage(id, title, text)`; `contents` rebuilds the Search-R1 form, so a corpus in that form round-trips
  unchanged (a first line without surrounding quotes gains them).
- `ScoredPassage(passage, score)` is what every retriever (local index or HTTP client) returns.
- `format_results(results, style)` renders results for the model: "search_r1" reproduces Search-R1's
  `Doc i(Title: <first line of contents>) <rest of contents>` lines byte for byte (the first line keeps its
  quotes, each line ends in a newline); "page" gives AT²PO/ARPO `Page i: <contents>` lines joined by newlines;
  "snippet" is "page" with each passage's text cut to its one sentence that shares the most words with the
  query (`query=` is then required; ties go to the earliest sentence), as a web search engine shows a snippet
  rather than the page: a much shorter observation, for small policies and short budgets.
  Results are deduplicated by contents (first kept) before numbering, then optionally limited and capped.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

ResultStyle = Literal["search_r1", "page", "snippet"]
RESULT_STYLES: tuple[ResultStyle, ...] = ("search_r1", "page", "snippet")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w+")


class CorpusError(ValueError):
    """A corpus file that cannot be read as passages; the message names the file and line."""


@dataclass(frozen=True)
class Passage:
    """One retrievable passage: the unit the index scores and the server returns."""

    id: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        """Search-R1's stored form: the quoted title on the first line, the text after it."""
        return f'"{self.title}"\n{self.text}'

    @classmethod
    def from_contents(cls, passage_id: str, contents: str) -> Passage:
        title, text = parse_contents(contents)
        return cls(id=passage_id, title=title, text=text)


@dataclass(frozen=True)
class ScoredPassage:
    """A passage with its retrieval score (BM25; only comparable within one backend and one query)."""

    passage: Passage
    score: float


def parse_contents(contents: str) -> tuple[str, str]:
    """Split Search-R1 `contents` into (title, text): the first line is the title, its surrounding quotes removed."""
    first, _, rest = contents.partition("\n")
    if len(first) >= 2 and first.startswith('"') and first.endswith('"'):
        first = first[1:-1]
    return first, rest


def _open_binary(path: Path) -> IO[bytes]:
    # Binary, decoded line by line: a text-mode reader decodes ahead in blocks and would blame the wrong line.
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return path.open("rb")


def _passage_from_record(record: object, where: str) -> Passage:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    raw_id = record.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise CorpusError(f"{where}: 'id' must be a string or an integer, got {raw_id!r}")
    passage_id = str(raw_id)
    if not passage_id:
        raise CorpusError(f"{where}: 'id' is empty")
    contents = record.get("contents")
    if contents is not None:
        if not isinstance(contents, str):
            raise CorpusError(f"{where}: 'contents' must be a string, got {type(contents).__name__}")
        return Passage.from_contents(passage_id, contents)
    title, text = record.get("title"), record.get("text")
    if isinstance(title, str) and isinstance(text, str):
        return Passage(id=passage_id, title=title, text=text)
    raise CorpusError(f"{where}: needs a string 'contents', or string 'title' and 'text' fields")


def read_corpus(path: str | Path) -> Iterator[Passage]:
    """Stream the passages of a JSONL corpus; blank lines are skipped, a malformed line raises CorpusError."""
    path = Path(path)
    try:
        handle = _open_binary(path)
    except OSError as error:
        raise CorpusError(f"{path}: cannot open corpus: {error}") from error
    with handle:
        line_number = 0
        try:
            for line_number, raw in enumerate(handle, start=1):
                where = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise CorpusError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise CorpusError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
                yield _passage_from_record(record, where)
        except (OSError, EOFError) as error:  # unreadable file, truncated or corrupt gzip
            raise CorpusError(f"{path}:{line_number + 1}: read failed: {error}") from None


def passage_json(passage: Passage) -> str:
    """The corpus line for one passage, without the newline (the form `read_corpus` reads back)."""
    return json.dumps({"id": passage.id, "contents": passage.contents}, ensure_ascii=False)


def write_corpus(path: str | Path, passages: Iterable[Passage]) -> int:
    """Write passages as Search-R1 JSONL (`{"id", "contents"}` lines); returns how many were written."""
    path = Path(path)
    count = 0
    with (
        gzip.open(path, "wt", encoding="utf-8") if path.suffix == ".gz" else path.open("w", encoding="utf-8")
    ) as handle:
        for passage in passages:
            handle.write(passage_json(passage) + "\n")
            count += 1
    return count


def _contents_of(item: Passage | ScoredPassage) -> str:
    return item.passage.contents if isinstance(item, ScoredPassage) else item.contents


def dedupe_contents(items: Iterable[Passage | ScoredPassage]) -> list[str]:
    """The distinct contents in first-seen order: two ids with the same text would waste the model's context."""
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        contents = _contents_of(item)
        if contents not in seen:
            seen.add(contents)
            out.append(contents)
    return out


def format_results(
    results: Sequence[Passage | ScoredPassage],
    style: ResultStyle = "search_r1",
    max_chars: int | None = None,
    limit: int | None = None,
    query: str | None = None,
) -> str:
    """Render retrieval results as the text the model reads; max_chars caps each passage's contents."""
    if style not in RESULT_STYLES:
        raise ValueError(f"unknown result style {style!r}; expected one of {', '.join(RESULT_STYLES)}")
    if style == "snippet" and query is None:
        raise ValueError("the snippet style needs the query the results answer")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    contents_list = dedupe_contents(results)
    if limit is not None:
        contents_list = contents_list[:limit]
    if style == "snippet":
        words = query_words(query or "")
        contents_list = [snippet_contents(contents, words) for contents in contents_list]
    if max_chars is not None:
        contents_list = [contents[:max_chars] for contents in contents_list]
    if style == "search_r1":
        lines = []
        for number, contents in enumerate(contents_list, start=1):
            title, _, text = contents.partition("\n")
            lines.append(f"Doc {number}(Title: {title}) {text}\n")
        return "".join(lines)
    return "\n".join(f"Page {number}: {contents}" for number, contents in enumerate(contents_list, start=1))


def query_words(text: str) -> frozenset[str]:
    """The lower-cased words of a query, as snippet selection matches them."""
    return frozenset(word.lower() for word in _WORD.findall(text))


def snippet_contents(contents: str, words: frozenset[str]) -> str:
    """`contents` with its text cut to the sentence sharing the most words with the query (earliest on ties)."""
    title, text = parse_contents(contents)
    sentences = [sentence for sentence in _SENTENCE_BREAK.split(text.strip()) if sentence]
    if not sentences:
        return contents
    best = max(sentences, key=lambda sentence: len(words & query_words(sentence)))
    return Passage("", title, best).contents
