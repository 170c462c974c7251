"""Corpus records: Search-R1 contents parsing, JSONL reading/writing with line-numbered errors, result formatting."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tools_env.corpus import (
    CorpusError,
    Passage,
    ScoredPassage,
    format_results,
    parse_contents,
    read_corpus,
    write_corpus,
)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ contents


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        ('"Paris"\nParis is the capital of France.', ("Paris", "Paris is the capital of France.")),
        ("Paris\nno quotes around the title", ("Paris", "no quotes around the title")),
        ('"Title only"', ("Title only", "")),
        ('"Multi"\nline one\nline two', ("Multi", "line one\nline two")),
        ('"half quoted\ntext', ('"half quoted', "text")),
        ('""\nempty title', ("", "empty title")),
        ('"She said "hi""\nx', ('She said "hi"', "x")),
        ("", ("", "")),
    ],
)
def test_parse_contents(contents: str, expected: tuple[str, str]) -> None:
    assert parse_contents(contents) == expected


def test_passage_contents_is_search_r1_form() -> None:
    passage = Passage(id="7", title="Paris", text="Paris is the capital of France.")
    assert passage.contents == '"Paris"\nParis is the capital of France.'
    assert Passage.from_contents("7", passage.contents) == passage


@settings(max_examples=200, deadline=None)
@given(title=st.text().filter(lambda t: "\n" not in t), text=st.text())
def test_contents_round_trip(title: str, text: str) -> None:
    passage = Passage(id="x", title=title, text=text)
    assert parse_contents(passage.contents) == (title, text)
    assert Passage.from_contents("x", passage.contents).contents == passage.contents


# ----------------------------------------------------------------------------------------------- read / write


def test_read_corpus_accepts_contents_and_title_text_forms(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "c.jsonl",
        [
            json.dumps({"id": "a", "contents": '"A"\nalpha text'}),
            "",
            json.dumps({"id": 12, "title": "B", "text": "beta text", "extra": [1, 2]}),
            "   ",
            json.dumps({"id": "c", "contents": "no title line"}),
        ],
    )
    assert list(read_corpus(path)) == [
        Passage("a", "A", "alpha text"),
        Passage("12", "B", "beta text"),
        Passage("c", "no title line", ""),
    ]


def test_write_then_read_round_trips_including_unicode_and_gzip(tmp_path: Path) -> None:
    passages = [
        Passage("1", "Zürich", "Zürich liegt am See. 東京 ✓"),
        Passage("2", 'Quote "inside"', "line one\nline two"),
        Passage("3", "", ""),
    ]
    for name in ("c.jsonl", "c.jsonl.gz"):
        assert write_corpus(tmp_path / name, passages) == 3
        assert list(read_corpus(tmp_path / name)) == passages
    first = json.loads((tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first == {"id": "1", "contents": '"Zürich"\nZürich liegt am See. 東京 ✓'}
    with gzip.open(tmp_path / "c.jsonl.gz", "rt", encoding="utf-8") as handle:
        assert json.loads(handle.readline())["id"] == "1"


GOOD = json.dumps({"id": "ok", "contents": '"T"\nt'})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"contents": "x"}), "'id'"),
        (json.dumps({"id": True, "contents": "x"}), "'id'"),
        (json.dumps({"id": None, "contents": "x"}), "'id'"),
        (json.dumps({"id": "", "contents": "x"}), "'id' is empty"),
        (json.dumps({"id": "x", "contents": 5}), "'contents' must be a string"),
        (json.dumps({"id": "x", "title": "only a title"}), "needs a string 'contents'"),
        (json.dumps({"id": "x"}), "needs a string 'contents'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad_line, GOOD])
    reader = read_corpus(path)
    assert next(reader) == Passage("ok", "T", "t")
    with pytest.raises(CorpusError, match=message) as caught:
        next(reader)
    assert f"{path}:3:" in str(caught.value)


def test_non_utf8_line_is_reported_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + GOOD.encode() + b"\n" + b'{"id": "x", "contents": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"latin1\.jsonl:3: not UTF-8"):
        list(read_corpus(path))


def test_truncated_gzip_is_a_corpus_error(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl.gz"
    write_corpus(path, [Passage(str(i), f"T{i}", "some text " * 50) for i in range(200)])
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CorpusError, match="read failed"):
        list(read_corpus(path))


def test_missing_corpus_is_a_corpus_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="cannot open"):
        list(read_corpus(tmp_path / "absent.jsonl"))


# ------------------------------------------------------------------------------------------------ formatting

A = Passage("1", "Alpha", "alpha text")
B = Passage("2", "Beta", "beta text\nsecond line")
A_COPY = Passage("99", "Alpha", "alpha text")  # another id, same contents


def test_search_r1_format_is_byte_exact() -> None:
    # Search-R1's _passages2string: title = first line of contents (quotes kept), text = the rest, "\n" each.
    assert format_results([A, B]) == 'Doc 1(Title: "Alpha") alpha text\nDoc 2(Title: "Beta") beta text\nsecond line\n'


def test_page_format() -> None:
    assert format_results([A, B], style="page") == 'Page 1: "Alpha"\nalpha text\nPage 2: "Beta"\nbeta text\nsecond line'


LONG = Passage(
    "p9",
    "Orku Institute",
    "Orku Institute is a university. It was founded in 1617! Orku Institute is led by its rector, Thosher Jusins. "
    "The rector of Orku Institute is Thosher Jusins.",
)


def test_snippet_keeps_the_sentence_sharing_most_query_words() -> None:
    head = 'Page 1: "Orku Institute"\n'
    text = format_results([LONG, B], style="snippet", query="Orku Institute rector")
    assert text == head + 'Orku Institute is led by its rector, Thosher Jusins.\nPage 2: "Beta"\nbeta text\nsecond line'
    # matching ignores case and punctuation; a sentence ending in "!" is a sentence too
    assert format_results([LONG], style="snippet", query="FOUNDED?") == head + "It was founded in 1617!"
    # no word in common: the first sentence (ties go to the earliest)
    assert format_results([LONG], style="snippet", query="zzz") == head + "Orku Institute is a university."
    with pytest.raises(ValueError, match="needs the query"):
        format_results([LONG], style="snippet")


def test_duplicates_are_dropped_keeping_the_first_and_numbering_stays_dense() -> None:
    text = format_results([ScoredPassage(A, 3.0), ScoredPassage(A_COPY, 2.0), ScoredPassage(B, 1.0)])
    assert text.count("alpha text") == 1
    assert text.startswith('Doc 1(Title: "Alpha")') and 'Doc 2(Title: "Beta")' in text
    assert "Doc 3" not in text


def test_char_cap_and_limit() -> None:
    assert format_results([A, B], style="page", max_chars=5) == 'Page 1: "Alph\nPage 2: "Beta'
    assert format_results([A, B], max_chars=9) == 'Doc 1(Title: "Alpha") a\nDoc 2(Title: "Beta") be\n'
    assert format_results([A, A_COPY, B], style="page", limit=1) == 'Page 1: "Alpha"\nalpha text'


def test_empty_results_and_bad_arguments() -> None:
    assert format_results([]) == ""
    assert format_results([], style="page") == ""
    with pytest.raises(ValueError, match="style"):
        format_results([A], style="markdown")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_chars"):
        format_results([A], max_chars=0)
