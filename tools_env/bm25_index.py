"""A BM25 index over a Search-R1 corpus, built once and cached on disk.

Decided interface:
- `BM25Index.open(corpus_path, cache_dir=None, backend=DEFAULT_BACKEND)` loads the cached index for this
  corpus, building it first if there is none. `search(query, k)` and `search_batch(queries, k)` return
  `ScoredPassage`s, best first, only passages that share at least one term with the query (so fewer than k,
  or none, is normal). Queries never raise: empty, punctuation-only, gigantic or binary-junk text is
  tokenised like any other text and simply matches what it matches.
- Backends: "tantivy" (Rust, on-disk inverted index) and "bm25s" (numpy sparse matrix, exhaustive
  scoring). Tantivy is the default, chosen with `at2po bench retrieval` (synthetic 40-word passages, 2 CPUs):
  the same hit@3 and similar query latency, but at 1M passages it builds 2.4x faster (42 s vs 100 s), its
  index is a quarter of the size (78 MB vs 299 MB) and the build peaks at 0.26 GB of memory instead of 1.9 GB.
  Both index the same tokens and use BM25 with k1=1.2, b=0.75 (tantivy's fixed values). Scores are not
  comparable across backends: tantivy multiplies by (k1 + 1) and quantises document lengths.
  Equal scores rank by corpus row in both, so retrieval is reproducible from build to build (tantivy's
  indexing threads lay documents out differently each time; one demonstration of 3,000 differed between
  two warm starts of the same seeds before, and the warm start's held-out EM with it, 15.0 against 13.0).
- Tokenisation is ours, in Python, shared by both backends and by queries, so the two backends see the same
  terms: lowercase; split on anything that is not a letter or digit (Unicode-aware; `_` splits too); drop
  Lucene's 33 English stop words and tokens over 40 characters; no stemming (bm25s would need PyStemmer,
  which is not a dependency). Query terms are deduplicated and capped at MAX_QUERY_TERMS, and only the first
  MAX_QUERY_CHARS characters of a query are read. Tantivy's query parser is never used (its syntax errors
  on quotes, `AND`, `:` ...): queries are built from term clauses.
- Cache: `<cache_dir>/<corpus-stem>-<backend>-<key>/` (cache_dir defaults to `.at2po-bm25/` beside the corpus,
  or ~/.cache/at2po/bm25 when the corpus directory is read-only), where key hashes the corpus fingerprint
  (absolute path, size, mtime and the bytes of its first and last MiB, so small files are hashed whole), the
  backend, its library version and the tokeniser and format versions. A changed corpus therefore gets a new
  directory; old ones are left for the user to delete. A build writes into a `.tmp-*` sibling and renames it
  into place, so a concurrent second builder either wins the rename or discards its copy and loads the
  winner's; readers never see a half-built index. A cached directory that fails to load is moved aside to
  `.corrupt-*` and rebuilt. `meta.json` records the build (including a random `build_id`), so a caller can
  tell a reused index from a fresh one; `BM25Index.built` says whether this call built it.
- The passages themselves live in the cache too (`passages.jsonl` plus an offsets array, memory-mapped), so
  serving needs neither the corpus file nor the corpus in memory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import mmap
import os
import re
import shutil
import threading
import time
import uuid
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, get_args

import numpy as np

from common.log import get_logger
from common.metrics import Counters
from tools_env.corpus import CorpusError, Passage, ScoredPassage, read_corpus

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "MAX_QUERY_CHARS",
    "MAX_QUERY_TERMS",
    "BM25Index",
    "Backend",
    "IndexCacheError",
    "ScoredPassage",
    "corpus_fingerprint",
    "query_terms",
    "tokenize",
]

log = get_logger("tools_env.bm25_index")

Backend = Literal["tantivy", "bm25s"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
DEFAULT_BACKEND: Backend = "tantivy"

FORMAT_VERSION = 1
TOKENIZER_VERSION = 1
K1 = 1.2
B = 0.75
MAX_QUERY_CHARS = 4096
MAX_QUERY_TERMS = 64
MAX_TOKEN_CHARS = 40
MAX_K = 1000
_FINGERPRINT_EDGE_BYTES = 1 << 20

# Lucene's default English stop-word set (what pyserini's default analyzer drops).
STOPWORDS = frozenset(
    {
        "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not",
        "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was",
        "will", "with",
    }
)  # fmt: skip
_TOKEN_RE = re.compile(r"[^\W_]+")


class IndexCacheError(RuntimeError):
    """The index cache directory cannot be used (unwritable, or an index that cannot be built)."""


def tokenize(text: str) -> list[str]:
    """Index terms of `text`: lowercased letter/digit runs, stop words and over-long tokens dropped."""
    return [
        token for token in _TOKEN_RE.findall(text.lower()) if len(token) <= MAX_TOKEN_CHARS and token not in STOPWORDS
    ]


def query_terms(query: str) -> list[str]:
    """The distinct terms of a query, in order, from its first MAX_QUERY_CHARS characters, at most MAX_QUERY_TERMS."""
    return list(dict.fromkeys(tokenize(query[:MAX_QUERY_CHARS])))[:MAX_QUERY_TERMS]


def corpus_fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a corpus file's content cheaply: a full hash of wiki-18 (14 GB) would take minutes."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(_FINGERPRINT_EDGE_BYTES))
        if stat.st_size > _FINGERPRINT_EDGE_BYTES:
            handle.seek(max(_FINGERPRINT_EDGE_BYTES, stat.st_size - _FINGERPRINT_EDGE_BYTES))
            digest.update(handle.read(_FINGERPRINT_EDGE_BYTES))
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "edge_sha256": digest.hexdigest(),
    }


def _library_version(backend: Backend) -> str:
    return importlib.metadata.version(backend)


def default_cache_dir(corpus_path: Path) -> Path:
    """`.at2po-bm25/` beside the corpus; the user cache (~/.cache/at2po/bm25) when that directory is read-only."""
    beside = corpus_path.parent / ".at2po-bm25"
    if beside.is_dir() or os.access(corpus_path.parent, os.W_OK):
        return beside
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "at2po" / "bm25"


# ---------------------------------------------------------------------------------------------- passage store


class _PassageStoreWriter:
    """Appends passages as JSON lines and remembers where each starts, so rows can be read back by number."""

    def __init__(self, directory: Path) -> None:
        self._lines = (directory / "passages.jsonl").open("wb")
        self._offsets_path = directory / "offsets.npy"
        self._offsets = array("q", [0])

    def add(self, passage: Passage) -> None:
        line = json.dumps([passage.id, passage.title, passage.text], ensure_ascii=False).encode("utf-8") + b"\n"
        self._lines.write(line)
        self._offsets.append(self._offsets[-1] + len(line))

    def close(self) -> None:
        """Flush and write the offsets; a second call does nothing."""
        if self._lines.closed:
            return
        self._lines.flush()
        os.fsync(self._lines.fileno())
        self._lines.close()
        np.save(self._offsets_path, np.frombuffer(self._offsets, dtype=np.int64))


class _PassageStore:
    """Read-only, memory-mapped passage rows; safe to share between threads."""

    def __init__(self, directory: Path) -> None:
        self._offsets = np.load(directory / "offsets.npy", mmap_mode="r")
        self._file = (directory / "passages.jsonl").open("rb")
        size = os.fstat(self._file.fileno()).st_size
        if int(self._offsets[-1]) != size:
            self._file.close()
            raise IndexCacheError(f"{directory}: passage store is {size} bytes, offsets say {int(self._offsets[-1])}")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get(self, row: int) -> Passage:
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        assert self._map is not None
        passage_id, title, text = json.loads(self._map[start:end])
        return Passage(id=passage_id, title=title, text=text)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()


# --------------------------------------------------------------------------------------------------- backends


class _Builder(Protocol):
    def add(self, row: int, terms: list[str]) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None:
        """Stop any background work, so the build directory can be removed."""
        ...


class _Searcher(Protocol):
    def search(self, terms: list[str], k: int) -> list[tuple[int, float]]:
        """(row, score) pairs, best first, only rows with a positive score."""
        ...


class _TantivyBuilder:
    def __init__(self, directory: Path) -> None:
        import tantivy

        self._tantivy = tantivy
        directory.mkdir()
        self._index = tantivy.Index(_tantivy_schema(), path=str(directory), reuse=False)
        _register_whitespace(self._index)
        # Tantivy splits the heap between its threads and needs at least 15 MB each (the 3 MB minimum is too
        # small to keep segment counts low).
        threads = max(1, min(4, os.cpu_count() or 1))
        self._writer: Any = self._index.writer(heap_size=threads * 64_000_000, num_threads=threads)

    def add(self, row: int, terms: list[str]) -> None:
        document = self._tantivy.Document()
        document.add_unsigned("row", row)
        document.add_text("body", " ".join(terms))
        self._writer.add_document(document)

    def finish(self) -> None:
        self._writer.commit()
        self._writer.wait_merging_threads()
        self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.rollback()
            self._writer.wait_merging_threads()  # joins tantivy's indexing threads
            self._writer = None


def _tantivy_schema() -> Any:
    import tantivy

    builder = tantivy.SchemaBuilder()
    builder.add_unsigned_field("row", fast=True)
    # Terms are already tokenised (ours), joined by spaces; frequencies are kept, positions are not needed.
    builder.add_text_field("body", tokenizer_name="at2po_ws", index_option="freq")
    return builder.build()


def _register_whitespace(index: Any) -> None:
    import tantivy

    index.register_tokenizer("at2po_ws", tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.whitespace()).build())


_TIE_WINDOW = 16  # extra hits fetched so that ties at the k-th place are broken by row


class _TantivySearcher:
    def __init__(self, directory: Path) -> None:
        import tantivy

        self._tantivy = tantivy
        self._index = tantivy.Index.open(str(directory))
        _register_whitespace(self._index)
        self._schema = self._index.schema
        self._searcher = self._index.searcher()

    def search(self, terms: list[str], k: int) -> list[tuple[int, float]]:
        tantivy = self._tantivy
        clauses = [
            (tantivy.Occur.Should, tantivy.Query.term_query(self._schema, "body", term, index_option="freq"))
            for term in terms
        ]
        # Equal scores come back in document-address order, which depends on how tantivy's indexing threads
        # split the corpus into segments: a wider window sorted by (score, row) makes the top k reproducible.
        hits = self._searcher.search(tantivy.Query.boolean_query(clauses), limit=k + _TIE_WINDOW, count=False).hits
        if not hits:
            return []
        rows = self._searcher.fast_field_values("row", [address for _score, address in hits])
        ranked = sorted(
            ((int(row), float(score)) for row, (score, _address) in zip(rows, hits, strict=True) if score > 0),
            key=lambda hit: (-hit[1], hit[0]),
        )
        return ranked[:k]


def _import_bm25s() -> Any:
    import logging

    import bm25s

    # bm25s sets its own logger to DEBUG on import; put it back under the root logger's level.
    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s


class _Bm25sBuilder:
    """Streams documents into token-id lists (bm25s itself needs the whole corpus at once to build)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._vocab: dict[str, int] = {}
        self._ids: list[list[int]] = []

    def add(self, row: int, terms: list[str]) -> None:
        vocab = self._vocab
        self._ids.append([vocab.setdefault(term, len(vocab)) for term in terms])

    def finish(self) -> None:
        bm25s = _import_bm25s()
        from bm25s.tokenization import Tokenized

        if not self._vocab:  # bm25s cannot build a matrix with no columns
            self._vocab[""] = 0
        model = bm25s.BM25(k1=K1, b=B, method="lucene")
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 length norm when no passage has a term
            model.index(Tokenized(ids=self._ids, vocab=self._vocab), create_empty_token=False, show_progress=False)
        self._ids = []
        model.save(str(self._directory), show_progress=False)

    def abort(self) -> None:
        self._ids = []


class _Bm25sSearcher:
    def __init__(self, directory: Path) -> None:
        bm25s = _import_bm25s()
        self._model = bm25s.BM25.load(str(directory), mmap=True, load_corpus=False, show_progress=False)
        self._vocab: dict[str, int] = self._model.vocab_dict

    def search(self, terms: list[str], k: int) -> list[tuple[int, float]]:
        ids = [self._vocab[term] for term in terms if term in self._vocab]
        if not ids:
            return []
        scores = self._model.get_scores_from_ids(ids)
        k = min(k, len(scores))
        kth_best = np.partition(-scores, k - 1)[k - 1]
        top = np.flatnonzero(-scores <= kth_best)  # every row tied with the k-th too, so the cut is by row
        top = top[np.lexsort((top, -scores[top]))][:k]  # best first; ties by row, so results are deterministic
        return [(int(row), float(scores[row])) for row in top if scores[row] > 0]


def _builder(backend: Backend, directory: Path) -> _Builder:
    return _TantivyBuilder(directory) if backend == "tantivy" else _Bm25sBuilder(directory)


def _searcher(backend: Backend, directory: Path) -> _Searcher:
    return _TantivySearcher(directory) if backend == "tantivy" else _Bm25sSearcher(directory)


# ------------------------------------------------------------------------------------------------------ index


@dataclass(frozen=True)
class BuildInfo:
    """What meta.json records about one build."""

    build_id: str
    backend: str
    num_passages: int
    build_s: float
    built_at: float


class BM25Index:
    """A loaded, read-only BM25 index; thread-safe for searching. Use `BM25Index.open`."""

    def __init__(self, directory: Path, backend: Backend, info: BuildInfo, built: bool) -> None:
        self.directory = directory
        self.backend: Backend = backend
        self.info = info
        self.built = built
        self.counters = Counters(["queries", "empty_queries", "results"])
        self._store = _PassageStore(directory)
        try:
            self._searcher = _searcher(backend, directory / "index")
        except BaseException:
            self._store.close()
            raise
        if len(self._store) != info.num_passages:
            self._store.close()
            raise IndexCacheError(
                f"{directory}: passage store holds {len(self._store)} passages, meta.json says {info.num_passages}"
            )
        self._closed = False
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- open / build

    @classmethod
    def open(
        cls,
        corpus_path: str | Path,
        cache_dir: str | Path | None = None,
        backend: Backend = DEFAULT_BACKEND,
    ) -> BM25Index:
        """Load the cached index for this corpus and backend, building (and caching) it first if needed."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        corpus_path = Path(corpus_path)
        if not corpus_path.is_file():
            raise CorpusError(f"{corpus_path}: corpus file not found")
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir(corpus_path)
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise IndexCacheError(f"cannot create index cache directory {cache_root}: {error}") from error
        fingerprint = corpus_fingerprint(corpus_path)
        final = cache_root / cls._directory_name(corpus_path, backend, fingerprint)
        index = cls._try_load(final, backend)
        if index is not None:
            log.info("bm25_index_loaded", directory=str(final), backend=backend, passages=index.info.num_passages)
            return index
        info = cls._build(corpus_path, final, backend, fingerprint)
        index = cls._try_load(final, backend)
        if index is None:
            raise IndexCacheError(f"{final}: the index just built could not be loaded")
        index.built = info.build_id == index.info.build_id
        return index

    @staticmethod
    def _directory_name(corpus_path: Path, backend: Backend, fingerprint: dict[str, Any]) -> str:
        key = {
            "format": FORMAT_VERSION,
            "tokenizer": TOKENIZER_VERSION,
            "backend": backend,
            "library": _library_version(backend),
            "k1": K1,
            "b": B,
            "corpus": fingerprint,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", corpus_path.name.split(".")[0])[:40] or "corpus"
        return f"{stem}-{backend}-{digest}"

    @classmethod
    def _try_load(cls, directory: Path, backend: Backend) -> BM25Index | None:
        """The index in `directory`, or None if there is none; a broken one is moved aside (and None returned)."""
        meta_path = directory / "meta.json"
        if not directory.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            info = BuildInfo(**{name: meta[name] for name in BuildInfo.__dataclass_fields__})
            if info.backend != backend:
                raise IndexCacheError(f"meta.json says backend {info.backend!r}, expected {backend!r}")
            return cls(directory, backend, info, built=False)
        except Exception as error:
            aside = directory.with_name(f".corrupt-{directory.name}-{uuid.uuid4().hex[:8]}")
            log.warning("bm25_index_corrupt", directory=str(directory), error=repr(error), moved_to=str(aside))
            try:
                directory.rename(aside)
            except FileNotFoundError:
                pass  # another process moved it first
            except OSError as rename_error:
                raise IndexCacheError(
                    f"{directory}: unusable index ({error}); cannot move it aside: {rename_error}"
                ) from rename_error
            return None

    @staticmethod
    def _build(corpus_path: Path, final: Path, backend: Backend, fingerprint: dict[str, Any]) -> BuildInfo:
        """Build into a private temporary directory, then publish it with one atomic rename."""
        temporary = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
        started = time.perf_counter()
        log.info("bm25_index_build_started", corpus=str(corpus_path), backend=backend, directory=str(final))
        try:
            temporary.mkdir()
            store = _PassageStoreWriter(temporary)
            builder = _builder(backend, temporary / "index")
            count = 0
            try:
                for count, passage in enumerate(read_corpus(corpus_path), start=1):
                    store.add(passage)
                    builder.add(count - 1, tokenize(passage.contents))
                if count == 0:
                    raise CorpusError(f"{corpus_path}: corpus has no passages")
                store.close()
                builder.finish()
            except BaseException:
                store.close()
                builder.abort()
                raise
            if corpus_fingerprint(corpus_path) != fingerprint:
                raise CorpusError(f"{corpus_path}: corpus changed while it was being indexed; run again")
            info = BuildInfo(
                build_id=uuid.uuid4().hex,
                backend=backend,
                num_passages=count,
                build_s=round(time.perf_counter() - started, 3),
                built_at=time.time(),
            )
            meta = {**info.__dict__, "corpus": fingerprint, "library": _library_version(backend)}
            meta_path = temporary / "meta.json"
            meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
            _fsync_tree(temporary)
            try:
                temporary.rename(final)
            except OSError:
                if not final.exists():
                    raise
                log.info("bm25_index_build_lost_race", directory=str(final))
                return info  # another builder published first; the caller loads theirs
            _fsync_directory(final.parent)
            log.info("bm25_index_built", directory=str(final), backend=backend, passages=count, build_s=info.build_s)
            return info
        except OSError as error:
            raise IndexCacheError(f"building the index in {temporary} failed: {error}") from error
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ search

    @property
    def num_passages(self) -> int:
        return self.info.num_passages

    def passage(self, row: int) -> Passage:
        """The passage stored at `row` (0-based corpus order)."""
        if not 0 <= row < self.info.num_passages:
            raise IndexError(f"row {row} out of range (index has {self.info.num_passages} passages)")
        return self._store.get(row)

    def passages(self) -> Iterator[Passage]:
        for row in range(self.info.num_passages):
            yield self._store.get(row)

    def search(self, query: str, k: int = 3) -> list[ScoredPassage]:
        """The best k passages sharing a term with `query`; [] when it has no usable term."""
        _check_k(k)
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        self.counters.inc("queries")
        terms = query_terms(query)
        if not terms:
            self.counters.inc("empty_queries")
            return []
        hits = self._searcher.search(terms, k)
        self.counters.inc("results", len(hits))
        return [ScoredPassage(self._store.get(row), score) for row, score in hits]

    def search_batch(self, queries: Sequence[str], k: int = 3) -> list[list[ScoredPassage]]:
        """One result list per query, in order."""
        _check_k(k)
        return [self.search(query, k) for query in queries]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._store.close()

    def __enter__(self) -> BM25Index:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int from 1 to {MAX_K}, got {k!r}")


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root, so a published index survives a crash right after the rename."""
    for directory, _subdirectories, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(directory))
