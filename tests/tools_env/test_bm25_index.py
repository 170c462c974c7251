"""BM25 index: tokenisation, retrieval quality on both backends, junk queries, and the on-disk cache."""

from __future__ import annotations

import itertools
import json
import random
import threading
from pathlib import Path

import pytest

from ops.bench_retrieval import write_synthetic_corpus
from tools_env.bm25_index import (
    BACKENDS,
    DEFAULT_BACKEND,
    MAX_QUERY_TERMS,
    BM25Index,
    corpus_fingerprint,
    query_terms,
    tokenize,
)
from tools_env.corpus import CorpusError, Passage, read_corpus, write_corpus

PASSAGES = [
    Passage("p0", "Ada Lovelace", "Ada Lovelace wrote the first published algorithm for the Analytical Engine."),
    Passage("p1", "Charles Babbage", "Charles Babbage designed the Analytical Engine, a mechanical computer."),
    Passage("p2", "Grace Hopper", "Grace Hopper developed COBOL and popularised the term debugging."),
    Passage("p3", "Alan Turing", "Alan Turing proposed the Turing machine and the imitation game."),
    Passage("p4", "Zürich", "Zürich is the largest city in Switzerland, on Lake Zürich."),
    Passage("p5", "C++", "C++ is a programming language created by Bjarne Stroustrup."),
    Passage("p6", "Ada (language)", "Ada is a programming language named after Ada Lovelace."),
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.jsonl"
    write_corpus(path, PASSAGES)
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def ids(results: list) -> list[str]:  # type: ignore[type-arg]
    return [result.passage.id for result in results]


# ----------------------------------------------------------------------------------------------- tokenisation


def test_tokenize_lowercases_splits_and_drops_stop_words() -> None:
    assert tokenize("The Analytical-Engine, of Ada_Lovelace's (1843)!") == [
        "analytical",
        "engine",
        "ada",
        "lovelace",
        "s",
        "1843",
    ]
    assert tokenize("Zürich ÉCOLE naïve 東京") == ["zürich", "école", "naïve", "東京"]
    assert tokenize("x" * 41 + " keep " + "y" * 40) == ["keep", "y" * 40]
    assert tokenize("the and of to") == []


def test_query_terms_dedupe_and_cap() -> None:
    assert query_terms("Ada ada ADA lovelace Ada") == ["ada", "lovelace"]
    many = " ".join(f"w{i}" for i in range(MAX_QUERY_TERMS * 3))
    assert query_terms(many) == [f"w{i}" for i in range(MAX_QUERY_TERMS)]


# -------------------------------------------------------------------------------------------------- retrieval


def test_finds_the_right_passage(corpus: Path, tmp_path: Path, backend: str) -> None:
    with BM25Index.open(corpus, tmp_path / "cache", backend=backend) as index:  # type: ignore[arg-type]
        assert index.num_passages == len(PASSAGES)
        assert ids(index.search("Who designed the analytical engine?", 2)) == ["p1", "p0"]
        assert ids(index.search("grace hopper debugging", 1)) == ["p2"]
        assert ids(index.search("zurich", 3)) == []  # no accent folding: Zürich is its own term
        assert ids(index.search("ZÜRICH lake", 1)) == ["p4"]
        assert ids(index.search("stroustrup", 5)) == ["p5"]  # fewer than k: only matching passages
        top = index.search("Ada Lovelace", 3)
        assert set(ids(top)[:2]) == {"p0", "p6"}
        assert all(a.score >= b.score > 0 for a, b in itertools.pairwise(top))
        assert top[0].passage == next(p for p in PASSAGES if p.id == top[0].passage.id)
        assert index.search_batch(["turing", "cobol", ""], 2) == [
            index.search("turing", 2),
            index.search("cobol", 2),
            [],
        ]
        assert index.counters.get("empty_queries") == 1


def test_both_backends_rank_alike(corpus: Path, tmp_path: Path) -> None:
    queries = ["analytical engine", "programming language", "Ada", "machine game", "lake city"]
    rankings = {}
    for name in BACKENDS:
        with BM25Index.open(corpus, tmp_path / "cache", backend=name) as index:
            rankings[name] = [ids(index.search(query, 1)) for query in queries]
    assert rankings["tantivy"] == rankings["bm25s"]


def test_hit_at_3_on_a_synthetic_corpus(tmp_path: Path, backend: str) -> None:
    corpus_path = tmp_path / "synthetic.jsonl"
    write_synthetic_corpus(corpus_path, passages=3000, seed=7, vocabulary=20_000)
    passages = list(read_corpus(corpus_path))
    rng = random.Random(3)
    with BM25Index.open(corpus_path, tmp_path / "cache", backend=backend) as index:  # type: ignore[arg-type]
        hits = 0
        for _ in range(100):
            source = rng.choice(passages)
            query = " ".join(rng.sample(sorted(set(tokenize(source.contents))), 5))
            hits += source.id in ids(index.search(query, 3))
    assert hits >= 95


JUNK = [
    "",
    "   \n\t ",
    "!!! ??? ... ---",
    '"unbalanced quote',
    "AND",
    "OR NOT AND",
    "title:foo body:[a TO b]",
    "a AND (b OR",
    "engine^2 ~3 *wild* ?",
    "\\ / \\\\ {} [] () <>",
    "\x00\x01\x02\ufffd\ud800\udfff",
    bytes(range(256)).decode("latin-1"),
    "engine " * 200_000,
    " ".join(f"term{i}" for i in range(50_000)),
    "x" * 1_000_000,
]


@pytest.mark.parametrize("query", JUNK, ids=range(len(JUNK)))
def test_junk_queries_never_raise(corpus: Path, tmp_path: Path, backend: str, query: str) -> None:
    with BM25Index.open(corpus, tmp_path / "cache", backend=backend) as index:  # type: ignore[arg-type]
        results = index.search(query, 3)
        assert isinstance(results, list) and len(results) <= 3
        assert index.search_batch([query, "cobol"], 3)[1][0].passage.id == "p2"


def test_query_syntax_is_not_interpreted(corpus: Path, tmp_path: Path, backend: str) -> None:
    with BM25Index.open(corpus, tmp_path / "cache", backend=backend) as index:  # type: ignore[arg-type]
        assert ids(index.search('"COBOL AND', 1)) == ["p2"]
        assert ids(index.search("hopper:grace^5", 1)) == ["p2"]


def test_bad_k_and_query_type(corpus: Path, tmp_path: Path) -> None:
    with BM25Index.open(corpus, tmp_path / "cache") as index:
        for k in (0, -1, 10_001, True):
            with pytest.raises(ValueError, match="k must be"):
                index.search("ada", k)
        with pytest.raises(TypeError):
            index.search(b"ada", 3)  # type: ignore[arg-type]
        assert len(index.search("ada programming language", 1000)) == 3


def test_concurrent_searches_agree_with_sequential(corpus: Path, tmp_path: Path, backend: str) -> None:
    queries = ["ada", "engine", "language", "turing machine", "lake"] * 20
    with BM25Index.open(corpus, tmp_path / "cache", backend=backend) as index:  # type: ignore[arg-type]
        expected = [index.search(query, 2) for query in queries]
        outcomes: list[bool] = []

        def worker() -> None:
            outcomes.append([index.search(query, 2) for query in queries] == expected)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert outcomes == [True] * 4


# ------------------------------------------------------------------------------------------------------ cache


def cache_entries(cache: Path) -> list[str]:
    return sorted(entry.name for entry in cache.iterdir())


def test_second_open_reuses_the_cache(corpus: Path, tmp_path: Path, backend: str) -> None:
    cache = tmp_path / "cache"
    with BM25Index.open(corpus, cache, backend=backend) as first:  # type: ignore[arg-type]
        assert first.built
        build_id = first.info.build_id
    with BM25Index.open(corpus, cache, backend=backend) as second:  # type: ignore[arg-type]
        assert not second.built
        assert second.info.build_id == build_id
        assert ids(second.search("cobol", 1)) == ["p2"]
    assert len(cache_entries(cache)) == 1
    meta = json.loads((second.directory / "meta.json").read_text())
    assert meta["build_id"] == build_id and meta["num_passages"] == len(PASSAGES)


def test_changed_corpus_is_rebuilt(corpus: Path, tmp_path: Path, backend: str) -> None:
    cache = tmp_path / "cache"
    with BM25Index.open(corpus, cache, backend=backend) as first:  # type: ignore[arg-type]
        assert ids(first.search("cobol", 1)) == ["p2"]
    changed = [*PASSAGES[:2], Passage("new", "Fortran", "Fortran was developed at IBM by John Backus.")]
    write_corpus(corpus, changed)
    with BM25Index.open(corpus, cache, backend=backend) as second:  # type: ignore[arg-type]
        assert second.built and second.directory != first.directory
        assert ids(second.search("backus fortran", 1)) == ["new"]
        assert second.search("cobol", 1) == []
    assert len(cache_entries(cache)) == 2


def test_same_size_edit_changes_the_fingerprint(corpus: Path) -> None:
    before = corpus_fingerprint(corpus)
    data = corpus.read_bytes()
    corpus.write_bytes(data.replace(b"COBOL", b"LOBOC"))
    after = corpus_fingerprint(corpus)
    assert after["size"] == before["size"] and after["edge_sha256"] != before["edge_sha256"]


def test_backends_have_separate_cache_entries(corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for name in BACKENDS:
        BM25Index.open(corpus, cache, backend=name).close()
    assert len(cache_entries(cache)) == len(BACKENDS)
    assert all(any(f"-{name}-" in entry for entry in cache_entries(cache)) for name in BACKENDS)


def test_losing_builder_discards_its_copy(corpus: Path, tmp_path: Path, backend: str) -> None:
    cache = tmp_path / "cache"
    with BM25Index.open(corpus, cache, backend=backend) as winner:  # type: ignore[arg-type]
        pass
    # A second builder that finishes after the first published: its rename fails, its copy is removed.
    loser_info = BM25Index._build(corpus, winner.directory, backend, corpus_fingerprint(corpus))  # type: ignore[arg-type]
    assert loser_info.build_id != winner.info.build_id
    assert cache_entries(cache) == [winner.directory.name]
    with BM25Index.open(corpus, cache, backend=backend) as reopened:  # type: ignore[arg-type]
        assert reopened.info.build_id == winner.info.build_id and not reopened.built


def test_concurrent_builders_publish_one_index(corpus: Path, tmp_path: Path, backend: str) -> None:
    cache = tmp_path / "cache"
    barrier = threading.Barrier(3)
    opened: list[BM25Index] = []
    errors: list[BaseException] = []

    def build() -> None:
        barrier.wait()
        try:
            opened.append(BM25Index.open(corpus, cache, backend=backend))  # type: ignore[arg-type]
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({index.info.build_id for index in opened}) == 1
    assert sum(index.built for index in opened) == 1
    assert all(ids(index.search("cobol", 1)) == ["p2"] for index in opened)
    assert len(cache_entries(cache)) == 1  # no .tmp-* left behind
    for index in opened:
        index.close()


def test_corrupt_cache_entry_is_moved_aside_and_rebuilt(corpus: Path, tmp_path: Path, backend: str) -> None:
    cache = tmp_path / "cache"
    with BM25Index.open(corpus, cache, backend=backend) as first:  # type: ignore[arg-type]
        directory = first.directory
    (directory / "meta.json").write_text("{truncated", encoding="utf-8")
    with BM25Index.open(corpus, cache, backend=backend) as second:  # type: ignore[arg-type]
        assert second.built and second.directory == directory
        assert ids(second.search("cobol", 1)) == ["p2"]
    entries = cache_entries(cache)
    assert directory.name in entries
    assert any(entry.startswith(f".corrupt-{directory.name}") for entry in entries)


def test_bad_corpora_leave_no_cache_entry(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no passages"):
        BM25Index.open(empty, cache)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"id": "1", "contents": "fine"}) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"broken\.jsonl:2:"):
        BM25Index.open(broken, cache)
    with pytest.raises(CorpusError, match="not found"):
        BM25Index.open(tmp_path / "absent.jsonl", cache)
    assert cache_entries(cache) == []


def test_unknown_backend_and_default(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        BM25Index.open(corpus, tmp_path / "cache", backend="lucene")  # type: ignore[arg-type]
    with BM25Index.open(corpus, tmp_path / "cache") as index:
        assert index.backend == DEFAULT_BACKEND


def test_default_cache_dir_is_beside_the_corpus(corpus: Path) -> None:
    with BM25Index.open(corpus) as index:
        assert index.directory.parent == corpus.parent / ".at2po-bm25"


def test_passages_without_any_term_still_index(tmp_path: Path, backend: str) -> None:
    corpus_path = tmp_path / "stopwords.jsonl"
    write_corpus(corpus_path, [Passage("a", "The", "of the and"), Passage("b", "", "!!!")])
    with BM25Index.open(corpus_path, tmp_path / "cache", backend=backend) as index:  # type: ignore[arg-type]
        assert index.num_passages == 2
        assert index.search("the", 3) == [] and index.search("anything", 3) == []
        assert index.passage(1) == Passage("b", "", "!!!")


def test_ties_go_to_the_earliest_passages_whatever_the_index_layout(tmp_path: Path, backend: str) -> None:
    """Equal scores are ranked by corpus row, so a run's retrievals (and its demonstrations) are reproducible
    although tantivy's indexing threads lay the documents out differently from one build to the next."""
    twins = [Passage(f"t{i:03d}", "Twin", "The twin page tells the same story.") for i in range(300)]
    path = tmp_path / "twins.jsonl"
    write_corpus(path, [*PASSAGES, *twins])
    with BM25Index.open(path, tmp_path / "cache", backend=backend) as index:  # type: ignore[arg-type]
        assert ids(index.search("twin story", 3)) == ["t000", "t001", "t002"]
        assert ids(index.search("twin story", 1)) == ["t000"]
