"""The tools an agent calls: each one an OpenAI function schema plus an async `execute`.

Decided interface (actors and environments rely on it):
- A tool has a `name`, a `schema()` in OpenAI function-calling form
  (`{"type": "function", "function": {"name", "description", "parameters": JSON Schema}}`) and
  `async execute(arguments) -> ToolOutcome`.
- `execute` never raises for anything the model or the outside world can cause. The outcome's
  `text` is the observation body (the protocol wraps it in its tags); `failed` is true only when
  the tool's machinery failed (retriever down, sandbox could not start, an unexpected exception),
  not when the model's own code raised or its search found nothing: that is a normal observation.
  Failures are counted by kind in the `Counters` given to the tool.
- Tools are stateless between calls, so forked episodes can share them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from common.log import get_logger
from common.metrics import Counters
from tools_env.corpus import format_results
from tools_env.retriever_client import Retriever, RetrieverError
from tools_env.sandbox import PythonSandbox, SandboxStatus

log = get_logger("tools_env.tools")


@dataclass(frozen=True)
class ToolOutcome:
    """What one tool call produced: the observation text and whether the tool itself failed."""

    text: str
    failed: bool = False
    error_kind: str | None = None
    latency_s: float = 0.0


class Tool(Protocol):
    name: str

    def schema(self) -> dict[str, Any]: ...

    async def execute(self, arguments: Mapping[str, Any]) -> ToolOutcome: ...


def _function_schema(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def _queries_of(arguments: Mapping[str, Any]) -> list[str] | None:
    """`query` (a string) or verl's `query_list` (strings); None when neither is usable."""
    query = arguments.get("query")
    if isinstance(query, str):
        return [query]
    query_list = arguments.get("query_list")
    if isinstance(query_list, list) and query_list and all(isinstance(q, str) for q in query_list):
        return list(query_list)
    return None


class SearchTool:
    """Search a corpus through a `Retriever` (local BM25 index or a Search-R1 HTTP server)."""

    name = "search"

    def __init__(
        self,
        retriever: Retriever,
        topk: int = 3,
        result_style: str = "search_r1",
        counters: Counters | None = None,
        max_queries: int = 5,
    ) -> None:
        self.retriever = retriever
        self.topk = topk
        self.result_style = result_style
        self.counters = counters if counters is not None else Counters()
        self.max_queries = max_queries

    def schema(self) -> dict[str, Any]:
        return _function_schema(
            "search",
            "Search the knowledge corpus and return the most relevant passages.",
            {"query": {"type": "string", "description": "the search query"}},
            ["query"],
        )

    async def execute(self, arguments: Mapping[str, Any]) -> ToolOutcome:
        queries = _queries_of(arguments)
        if queries is None:
            self.counters.inc("search_bad_arguments")
            return ToolOutcome("Search failed: the query must be a string.", error_kind="bad_arguments")
        queries = [q.strip() for q in queries[: self.max_queries]]
        if not any(queries):
            self.counters.inc("search_empty_query")
            return ToolOutcome("Search failed: the query is empty.", error_kind="empty_query")
        started = time.perf_counter()
        try:
            results = await self.retriever.retrieve_async(queries, self.topk)
        except RetrieverError as error:
            self.counters.inc("search_failures")
            log.warning("search_failed", error=str(error), error_type=type(error).__name__)
            return ToolOutcome(
                f"Search failed: the retriever is not available ({type(error).__name__}).",
                failed=True,
                error_kind=type(error).__name__,
                latency_s=time.perf_counter() - started,
            )
        latency_s = time.perf_counter() - started
        self.counters.inc("search_calls")
        passages = [scored.passage for per_query in results for scored in per_query]
        if not passages:
            return ToolOutcome("No results found.", latency_s=latency_s)
        text = format_results(passages, self.result_style, query=" ".join(queries))
        return ToolOutcome(text, latency_s=latency_s)


class PythonTool:
    """Run model-written Python in the sandbox; its output (or the reason it stopped) is the observation."""

    name = "python"

    def __init__(self, sandbox: PythonSandbox, counters: Counters | None = None) -> None:
        self.sandbox = sandbox
        self.counters = counters if counters is not None else Counters()

    def schema(self) -> dict[str, Any]:
        return _function_schema(
            "python",
            "Run a Python program and return what it prints (the value of a final bare expression is printed).",
            {"code": {"type": "string", "description": "the Python source code"}},
            ["code"],
        )

    async def execute(self, arguments: Mapping[str, Any]) -> ToolOutcome:
        code = arguments.get("code")
        if not isinstance(code, str):
            self.counters.inc("python_bad_arguments")
            return ToolOutcome("Execution failed: the code must be a string.", error_kind="bad_arguments")
        result = await self.sandbox.run_async(code)
        self.counters.inc("python_calls")
        if result.status is not SandboxStatus.OK:
            self.counters.inc(f"python_{result.status.value}")
        failed = result.status is SandboxStatus.SANDBOX_FAILURE
        if failed:
            log.warning("sandbox_failed", stderr=result.stderr[-500:])
        return ToolOutcome(
            result.observation(),
            failed=failed,
            error_kind=None if result.status is SandboxStatus.OK else result.status.value,
            latency_s=result.wall_s,
        )
