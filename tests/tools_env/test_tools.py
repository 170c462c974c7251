"""The search and python tools: schemas, observations, and failures that become observations."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from common.metrics import Counters
from tools_env.bm25_index import BM25Index
from tools_env.corpus import Passage, write_corpus
from tools_env.retriever_client import LocalRetriever, RetrieverClient
from tools_env.sandbox import PythonSandbox
from tools_env.sandbox_limits import SandboxLimits
from tools_env.tools import PythonTool, SearchTool

PASSAGES = [
    Passage("p1", "Tavrel Ommick", "Tavrel Ommick was born in Quenmoor and works for Dishodor Mills."),
    Passage("p2", "Quenmoor", "Quenmoor is a city in Stulthumara on the Jilboshis River."),
    Passage("p3", "Dishodor Mills", "Dishodor Mills was founded in 1777 by Lerlon Trogor."),
]


@pytest.fixture(scope="module")
def local_search(tmp_path_factory: pytest.TempPathFactory) -> SearchTool:
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_corpus(corpus, PASSAGES)
    return SearchTool(LocalRetriever(BM25Index.open(corpus)), topk=2, result_style="search_r1")


def test_schemas_are_openai_function_schemas(local_search: SearchTool) -> None:
    for tool in (local_search, PythonTool(PythonSandbox())):
        schema = tool.schema()
        assert schema["type"] == "function"
        assert schema["function"]["name"] == tool.name
        parameters = schema["function"]["parameters"]
        assert parameters["type"] == "object" and parameters["required"]


def test_search_formats_ranked_passages(local_search: SearchTool) -> None:
    outcome = asyncio.run(local_search.execute({"query": "Dishodor Mills founded"}))
    assert not outcome.failed
    assert outcome.text.startswith('Doc 1(Title: "Dishodor Mills")')
    assert "1777" in outcome.text


def test_search_accepts_a_query_list_and_reports_no_results(local_search: SearchTool) -> None:
    outcome = asyncio.run(local_search.execute({"query_list": ["Quenmoor river"]}))
    assert "Jilboshis" in outcome.text
    nothing = asyncio.run(local_search.execute({"query": "zzzz qqqq"}))
    assert nothing.text == "No results found." and not nothing.failed


def test_snippet_search_shows_the_matching_sentence_of_each_page(local_search: SearchTool) -> None:
    snippets = SearchTool(local_search.retriever, topk=1, result_style="snippet")
    outcome = asyncio.run(snippets.execute({"query": "Tavrel Ommick works"}))
    assert outcome.text == 'Page 1: "Tavrel Ommick"\nTavrel Ommick was born in Quenmoor and works for Dishodor Mills.'


@pytest.mark.parametrize("arguments", [{"query": 5}, {"query": ["a"]}, {}, {"query_list": [1, 2]}])
def test_search_with_bad_arguments_is_an_observation(local_search: SearchTool, arguments: dict) -> None:
    outcome = asyncio.run(local_search.execute(arguments))
    assert outcome.error_kind == "bad_arguments" and "must be a string" in outcome.text


def test_empty_query_is_an_observation(local_search: SearchTool) -> None:
    outcome = asyncio.run(local_search.execute({"query": "   "}))
    assert outcome.error_kind == "empty_query"


def test_a_dead_retriever_is_a_counted_failed_observation() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    counters = Counters()
    tool = SearchTool(
        RetrieverClient(f"http://127.0.0.1:{port}/retrieve", timeout_s=0.5, retries=1, backoff_s=0.01),
        counters=counters,
    )
    outcome = asyncio.run(tool.execute({"query": "anything"}))
    assert outcome.failed and outcome.error_kind == "RetrieverUnavailable"
    assert "not available" in outcome.text
    assert counters.get("search_failures") == 1


def test_python_tool_runs_code_and_reports_limits(tmp_path: Path) -> None:
    counters = Counters()
    tool = PythonTool(PythonSandbox(SandboxLimits(wall_s=2.0, cpu_s=1)), counters=counters)
    ok = asyncio.run(tool.execute({"code": "print(48213 * 7719)"}))
    assert ok.text.strip() == str(48213 * 7719) and not ok.failed and ok.error_kind is None
    looping = asyncio.run(tool.execute({"code": "while True:\n    pass"}))
    assert not looping.failed and looping.error_kind in {"cpu_limit", "timeout"}
    bad = asyncio.run(tool.execute({"code": 12}))
    assert bad.error_kind == "bad_arguments"
    assert counters.get("python_calls") == 2
