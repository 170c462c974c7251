"""Typed run configuration: one TOML file, dotted command-line overrides, errors that name the key.

A run is described by one `RunConfig`. Every section forbids unknown keys, so a typo fails at start
with the dotted key and a suggestion instead of being silently ignored. Overrides use the same
dotted names as the TOML file (`--set replay.capacity_trees=10000`); their values are parsed as TOML
values (numbers, booleans, strings, arrays), falling back to a plain string.

Later roles add their own sections to `RunConfig`; each section is a pydantic model with
`extra="forbid"`.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the dotted key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class TransportConfig(_Section):
    """Where the replay service listens, message limits, and CurveZMQ key files."""

    replay_endpoint: str = Field(
        "tcp://127.0.0.1:5555", description="ZeroMQ endpoint the replay ROUTER binds and clients connect to"
    )
    weights_pub_endpoint: str = Field(
        "tcp://127.0.0.1:5556", description="ZeroMQ endpoint the learner's weight announcements (PUB) bind"
    )
    weights_endpoint: str = Field(
        "tcp://127.0.0.1:5557", description="ZeroMQ endpoint the learner serves weight chunks on (ROUTER)"
    )
    weights_chunk_bytes: int = Field(
        8 * 1024**2, ge=4096, description="size of one weight chunk (each checksummed on its own)"
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, gt=1024, description="largest message (all frames) a socket accepts"
    )
    server_secret_key: str | None = Field(
        None, description="CurveZMQ secret key file of a service (from `at2po keys gen`)"
    )
    server_public_key: str | None = Field(
        None, description="CurveZMQ public key file of the service a client connects to"
    )
    client_secret_key: str | None = Field(None, description="CurveZMQ secret key file of a client")
    authorized_keys_dir: str | None = Field(None, description="directory of client public key files a service accepts")
    sample_by_reference: Literal["auto", "on", "off"] = Field(
        "auto",
        description="learner samples name LMDB keys it reads from replay's store itself instead of carrying the "
        "bytes; auto = when replay_endpoint is loopback or ipc (falls back to bytes if the store cannot be opened)",
    )


class ReplayConfig(_Section):
    """The tree-replay store and its sampling, admission and capacity rules."""

    dir: str = Field("runs/replay", description="LMDB directory of the store")
    map_size_gb: float = Field(64.0, gt=0, description="LMDB map size (sparse file, upper bound of the store)")
    capacity_trees: int = Field(100_000, gt=0, description="most trees kept; consumed trees are evicted first")
    capacity_bytes: int = Field(32 * 1024**3, gt=0, description="most subtree bytes kept")
    sampler: Literal["fifo", "uniform"] = Field("fifo", description="fifo: each tree once, in order")
    max_times_sampled: int = Field(
        1, ge=0, description="uniform: a tree is retired after this many samples (0 = no bound)"
    )
    samples_per_insert: float | None = Field(
        None, gt=0, description="rate limiter (uniform only): target samples per inserted tree; unset = off"
    )
    min_size_to_sample: int = Field(1, ge=1, description="rate limiter: trees needed before any sample")
    error_buffer: float = Field(
        64.0, gt=0, description="rate limiter: allowed deviation of inserts*spi - samples from its target"
    )
    max_staleness: int = Field(4, ge=0, description="trees more versions behind the learner are not handed out")
    trees_per_step: int = Field(16, gt=0, description="trees the learner consumes per version (admission)")
    lease_ttl_s: float = Field(300.0, gt=0, description="a growing tree with no activity this long is dropped")
    commit_max_messages: int = Field(64, gt=0, description="group commit: most subtrees per transaction")
    commit_max_bytes: int = Field(
        1024**2, gt=0, description="group commit: a transaction closes once its subtrees reach this many bytes"
    )
    commit_max_delay_ms: float = Field(2.0, ge=0, description="group commit: longest wait to fill a transaction")
    sample_batches_kept: int = Field(
        256, ge=1, description="recent sample batches remembered so a retried request gets the same trees"
    )
    lease_requests_kept: int = Field(
        1024, ge=1, description="recent lease grants remembered so a re-sent lease request gets the same trees"
    )
    reference_hold_s: float = Field(
        30.0, gt=0, description="a tree sampled by reference is not evicted for this long (its keys stay readable)"
    )
    seed: int = Field(0, description="seed of the uniform sampler")


class LoggingConfig(_Section):
    """structlog output and the JSON-lines metrics file."""

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="least severe level logged")
    json_logs: bool | None = Field(None, description="JSON lines; unset = JSON unless stderr is a TTY")
    metrics_path: str | None = Field(None, description="JSON-lines metrics file; unset = no metrics file")


# The names registered in tools_env.rewards.REWARDS (a test keeps the two in step).
RewardName = Literal[
    "at2po_em", "at2po_code", "search_r1_em", "search_r1_subem", "tree_grpo_format", "arpo_f1", "numeric_match"
]


class EnvConfig(_Section):
    """The tool environment an episode runs in: protocol, reward and per-episode limits."""

    protocol: Literal["search_r1", "arpo", "tool_call"] = Field(
        "arpo", description="tool-call protocol: Search-R1 tags, ARPO/AT2PO tags, or JSON <tool_call>"
    )
    reward: RewardName = Field(
        "at2po_code", description="reward function (tools_env.rewards; at2po_code is AT2PO's reference code)"
    )
    tools: list[Literal["search", "python"]] = Field(["search"], description="tools offered to the policy")
    max_turns: int = Field(4, ge=1, description="most policy turns per episode (the answer turn included)")
    max_tool_calls: int = Field(3, ge=0, description="most tool calls per episode; later calls end the episode")
    max_observation_chars: int = Field(
        2000, ge=64, description="longest tool observation; longer ones are cut and marked as truncated"
    )
    seed: int = Field(0, description="seed of episodes (tool randomness, task order)")


class SearchConfig(_Section):
    """Where the search tool gets passages: a local BM25 index or a Search-R1 HTTP retriever."""

    backend: Literal["local", "http"] = Field("local", description="local: BM25 over `corpus`; http: `url`")
    corpus: str | None = Field(None, description="Search-R1 JSONL corpus for the local index; unset = task data's")
    index_dir: str | None = Field(None, description="where the local index is cached; unset = beside the corpus")
    bm25_backend: Literal["tantivy", "bm25s"] = Field("tantivy", description="BM25 library of the local index")
    url: str = Field("http://127.0.0.1:8000/retrieve", description="Search-R1 compatible /retrieve endpoint")
    topk: int = Field(3, ge=1, le=100, description="passages per query")
    timeout_s: float = Field(5.0, gt=0, description="HTTP retriever: time limit of one request")
    retries: int = Field(2, ge=0, description="HTTP retriever: retries after a failed request")
    result_style: Literal["search_r1", "page", "snippet"] = Field(
        "page",
        description="search_r1: `Doc i(Title: t) text`; page: `Page i: contents` (ARPO/AT2PO); snippet: page with "
        "each text cut to its sentence sharing most words with the query",
    )


class SandboxConfig(_Section):
    """Limits of the Python tool's sandboxed subprocess."""

    wall_s: float = Field(10.0, gt=0, description="wall-clock limit of one run")
    cpu_s: int = Field(5, ge=1, description="CPU-time limit of one run")
    memory_mb: int = Field(512, ge=32, description="address-space limit")
    max_processes: int = Field(16, ge=1, description="process limit")
    max_open_files: int = Field(64, ge=8, description="open-file limit")
    max_output_chars: int = Field(4000, ge=64, description="output kept; the run is stopped beyond it")


class TasksConfig(_Section):
    """Which tasks episodes solve: the synthetic world, arithmetic, or a Search-R1 format dataset."""

    source: Literal["synthetic_world", "arithmetic", "dataset"] = Field(
        "synthetic_world", description="task generator or a dataset file"
    )
    path: str | None = Field(None, description="dataset: Parquet/JSONL file in Search-R1 or at2po Task form")
    test_path: str | None = Field(None, description="dataset: held-out file in the same forms; unset = none")
    data_dir: str = Field("runs/world", description="synthetic world: where corpus and splits are written")
    train_seed: int = Field(0, description="seed of the training world / generator")
    test_seed: int = Field(1, description="seed of the held-out world / generator")
    n_train: int = Field(2000, ge=1, description="generated training tasks")
    n_test: int = Field(200, ge=1, description="generated test tasks")
    hops: list[int] = Field([1, 2], description="synthetic world: hop counts of the questions (equal shares)")
    train_hops: list[int] | None = Field(
        None,
        description="actors train only on tasks of these hop counts (a curriculum; held-out evaluation keeps "
        "every hop count); unset = all",
    )
    world_size: Literal["small", "medium", "100k"] = Field(
        "small", description="synthetic world: size of each world (small: about 3,000 passages)"
    )


class ModelConfig(_Section):
    """The policy: a local Hugging Face model directory (nothing is ever fetched from a hub)."""

    dir: str = Field("runs/tiny-model", description="local model directory (`at2po model init-tiny` makes one)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and compute dtype")
    init_copy_steps: int = Field(
        1100, ge=0, description="`at2po run` making the tiny policy: copy pretraining steps (0 = random weights)"
    )


class TreeConfig(_Section):
    """How an actor grows a task's turn tree (budgets count generated tokens)."""

    builder: Literal["chain", "tree-grpo", "arpo", "at2po"] = Field("at2po", description="tree builder")
    chains: int = Field(16, ge=1, description="chain: independent trajectories per task (GRPO's G)")
    tree_grpo_trees: int = Field(2, ge=1, description="tree-grpo: trees per task (M)")
    tree_grpo_expansions: int = Field(2, ge=0, description="tree-grpo: nodes expanded per round (N)")
    tree_grpo_rounds: int = Field(1, ge=0, description="tree-grpo: expansion rounds (L)")
    arpo_paths: int = Field(16, ge=1, description="arpo: global rollout size per task (M)")
    arpo_initial_chains: int = Field(8, ge=1, description="arpo: initial chains (N)")
    arpo_alpha: float = Field(0.5, description="arpo: base branch probability")
    arpo_beta: float = Field(0.2, description="arpo: entropy weight")
    arpo_variant: Literal["code", "paper"] = Field("code", description="arpo: reference code or paper rule")
    at2po_initial_chains: int = Field(10, ge=1, description="at2po: initial chains (M)")
    at2po_rounds: int = Field(2, ge=0, description="at2po: expansion rounds (L)")
    at2po_expansions: int = Field(6, ge=0, description="at2po: nodes expanded per round (K), one sibling each")
    at2po_alpha: float = Field(0.05, description="at2po: sibling penalty of the expansion score")
    at2po_variant: Literal["code", "paper"] = Field("code", description="at2po: reference code or paper score")
    max_new_tokens: int = Field(512, ge=1, description="most tokens generated in one turn")
    max_tree_tokens: int | None = Field(None, ge=1, description="most tokens generated for one tree; unset = none")
    max_context_tokens: int | None = Field(None, ge=1, description="longest context of a turn; unset = the model's")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")


class ActorConfig(_Section):
    """An actor process: backend, concurrency, streaming and weight updates."""

    actor_id: str | None = Field(None, description="unique actor name; unset = hostname-pid")
    backend: Literal["torch", "vllm"] = Field("torch", description="generation backend")
    concurrent_tasks: int = Field(4, ge=1, description="tasks whose trees grow at the same time")
    max_batch: int = Field(64, ge=1, description="most generation requests in one backend call")
    window: int = Field(64, ge=1, description="most unacked subtree messages in flight (back-pressure)")
    seed: int = Field(0, description="seed of task order and sampling")
    max_trees: int | None = Field(None, ge=1, description="stop after this many trees; unset = until SIGTERM")
    weights_timeout_s: float = Field(60.0, gt=0, description="time limit of one weight fetch")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads; unset = torch's default (`at2po run` splits the cores between roles)",
    )
    vllm_max_model_len: int = Field(4096, ge=64, description="vllm: longest context plus generation")
    vllm_kv_cache_gb: float = Field(1.0, gt=0, description="vllm on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)")


class LearnerConfig(_Section):
    """The learner: credit, loss, DeepSpeed engine, batches, checkpoints and weight publishing."""

    processes: int = Field(1, ge=1, description="data-parallel learner processes on this machine (gloo on CPU)")
    master_port: int | None = Field(None, ge=1, le=65535, description="torch.distributed port; unset = a free one")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads per process; unset = torch's default (`at2po run` splits the cores)",
    )
    credit: str = Field("at2po", description="credit method: grpo, tree-grpo, at2po or a registered name")
    credit_std: Literal["population", "unbiased"] | None = Field(
        None, description="std of reward normalisation; unset = the method's default"
    )
    at2po_weights: Literal["softmax", "linear", "child_mean", "leaf_mean"] = Field(
        "softmax", description="at2po: child weights (softmax of entropy = code, linear = paper)"
    )
    at2po_advantage: Literal["node_value", "diff_parent", "diff_root"] = Field(
        "node_value", description="at2po: advantage = node value, minus parent value, or minus root value"
    )
    tree_grpo_mode: Literal["intra+inter", "intra", "inter"] = Field(
        "intra+inter", description="tree-grpo: which normalised advantages are summed"
    )
    loss: str = Field("atpo", description="policy loss: atpo, ppo, gspo or a registered name")
    eps_low: float | None = Field(None, ge=0, lt=1, description="clip 1 - eps_low; unset = the loss's default")
    eps_high: float | None = Field(None, ge=0, description="clip 1 + eps_high; unset = the loss's default")
    dual_clip: float | None = Field(None, ge=0, description="dual-clip c; 0 = off; unset = the loss's default")
    is_cap: float = Field(5.0, ge=0, description="importance weight pi_prox/pi_behav cap; 0 = no cap")
    is_mode: Literal["mask", "truncate"] = Field("mask", description="units over the cap: masked or truncated")
    kl_coef: float = Field(0.0, ge=0, description="K3 KL to the initial policy (a frozen reference copy if > 0)")
    aggregation: Literal["seq-mean-token-mean", "token-mean"] = Field(
        "seq-mean-token-mean", description="how token losses are averaged"
    )
    prox_logp: Literal["recompute", "loglinear"] = Field(
        "recompute", description="proximal log-probs: a forward pass before the update, or version interpolation"
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="gradient-norm clip; 0 = off")
    zero_stage: int = Field(0, ge=0, le=2, description="DeepSpeed ZeRO stage (0-2; weights are published from rank 0)")
    bf16: bool = Field(False, description="train in bf16 (fp32 master weights in the optimizer)")
    micro_batch_tokens: int = Field(4096, ge=1, description="most packed tokens per forward (a tree is never split)")
    minibatches: int = Field(1, ge=1, description="optimizer steps per sampled batch (PPO mini-batches)")
    ppo_epochs: int = Field(1, ge=1, description="passes over each sampled batch")
    packing: bool = Field(True, description="lay each tree out once (tree attention); false = one row per path")
    packed_layout: Literal["tree", "segments"] = Field(
        "tree",
        description="packed: tree = each tree one flat row, attention reuses every ancestor's keys/values "
        "(llama, qwen2, qwen3, mistral without sliding window; other models fall back to segments); "
        "segments = subtrees of segment_tokens, each with a dense mask",
    )
    segment_tokens: int = Field(
        1536,
        ge=0,
        description="packed_layout = segments: cut a tree into subtrees of at most this many tokens; 0 = whole tree",
    )
    skip_zero_advantage: bool = Field(
        True, description="do not forward trees whose advantages are all 0 (same step; needs kl_coef = 0)"
    )
    trees_per_step: int | None = Field(None, ge=1, description="trees per update; unset = replay.trees_per_step")
    group_size: int | None = Field(
        None, ge=1, description="trees per task in a group; unset = tree.tree_grpo_trees for tree-grpo, else 1"
    )
    group_wait_steps: int = Field(2, ge=0, description="updates an incomplete task group waits before it trains")
    max_steps: int | None = Field(None, ge=1, description="stop after this many updates; unset = until SIGTERM")
    sample_timeout_s: float = Field(600.0, gt=0, description="longest wait for replay's trees before giving up")
    publish_every: int = Field(1, ge=1, description="publish weights every k versions")
    checkpoint_dir: str = Field("runs/learner", description="where checkpoints are written")
    checkpoint_every: int = Field(50, ge=1, description="checkpoint every k updates (and at a clean stop)")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept; older ones are deleted")
    seed: int = Field(0, description="torch seed of the learner")


class SftConfig(_Section):
    """Warm start: supervised fine-tuning on demonstrations (observation tokens masked)."""

    demos: str | None = Field(None, description="JSONL of chat demonstrations; unset = made from the synthetic world")
    n_demos: int = Field(1500, ge=1, description="demonstrations made from the training split")
    imperfect_fraction: float = Field(0.3, ge=0, le=1, description="share of made demonstrations with a mistake")
    mistakes: list[Literal["wrong_answer", "early_answer", "vague_query"]] = Field(
        ["wrong_answer", "early_answer", "vague_query"],
        min_length=1,
        description="mistakes an imperfect demonstration makes, one drawn uniformly per demonstration",
    )
    demos_from_train_world: bool = Field(
        False,
        description="synthetic world: also draw demonstrations from RL's training world; off, RL trains on a world "
        "the warm start never saw, so its reward cannot come from answers memorised during the warm start",
    )
    demo_worlds: int = Field(
        10,
        ge=1,
        le=1000,
        description="synthetic world: worlds the demonstrations are drawn from (the training world plus fresh-named "
        "ones), so the policy learns to copy names rather than memorise them",
    )
    epochs: int = Field(3, ge=1, description="passes over the demonstrations")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the warm start (the peak, with a schedule)")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="warm-start learning rate over its steps: linear warmup then cosine decay, or constant"
    )
    warmup_fraction: float = Field(0.03, ge=0, lt=1, description="cosine: share of the steps spent warming up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: the last step's lr as a fraction of lr")
    micro_batch_tokens: int = Field(8192, ge=1, description="most tokens per forward")
    batch_tokens: int = Field(16384, ge=1, description="tokens per optimizer step")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="demonstrations kept out to measure loss")
    out_dir: str = Field("runs/warmstart", description="where the warm-started model directory is written")
    seed: int = Field(0, description="seed of demonstration making and shuffling")


class SupervisorConfig(_Section):
    """`at2po run`: the local supervisor that starts every role, watches it and writes the report."""

    out_dir: str = Field("runs/at2po-run", description="run directory: config, logs, metrics, checkpoints, report")
    max_minutes: float = Field(15.0, gt=0, description="wall-clock budget of the whole run, warm start included")
    actors: int = Field(2, ge=1, description="actor processes")
    max_restarts: int = Field(3, ge=0, description="restarts allowed per role before the run gives up on it")
    warm_start: bool = Field(True, description="fine-tune on demonstrations before RL (reused if already made)")
    eval_limit: int = Field(200, ge=1, description="held-out tasks evaluated before and after training")
    eval_every_steps: int = Field(0, ge=0, description="also evaluate every k learner checkpoints; 0 = start/end only")
    live: bool | None = Field(None, description="rich live view; unset = when stdout is a terminal")
    stop_grace_s: float = Field(60.0, gt=0, description="time a role gets to exit after SIGTERM before SIGKILL")


class ClusterConfig(_Section):
    """`at2po cluster`: the roles as Ray actors on an existing Ray cluster (resources, placement, restarts)."""

    name: str = Field(
        "at2po",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="run name: the Ray namespace of the role actors (`status` and `stop` find them by it)",
    )
    actors: int = Field(2, ge=0, description="actor roles")
    learner: bool = Field(True, description="start the learner (false: replay and actors only)")
    replay_cpus: float = Field(1.0, ge=0, description="CPUs reserved for replay")
    replay_node_ip: str | None = Field(None, description="node whose disk holds the replay store; unset = any node")
    actor_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor")
    learner_cpus: float = Field(1.0, ge=0, description="CPUs reserved for the learner")
    learner_gpus: float = Field(0.0, ge=0, description="GPUs reserved for the learner (all its ranks)")
    max_restarts: int = Field(
        3, ge=0, description="restarts per role of its process, and of its Ray actor (e.g. after a node loss)"
    )
    curve_keys: Literal["auto", "generate", "config"] = Field(
        "auto",
        description="generate: CurveZMQ keys made per run; config: transport.* key files; auto: generate "
        "unless those are set or every node is on loopback",
    )
    fixed_ports: bool = Field(False, description="bind the configured endpoint ports; false = free ports on each node")
    cwd: str | None = Field(
        None, description="directory roles run in on each node (relative paths resolve there); unset = the driver's"
    )
    node_dir: str = Field("/tmp/at2po-cluster", description="node-local directory for each role's config, keys and log")
    start_timeout_s: float = Field(180.0, gt=0, description="longest wait for replay to be placed and listening")
    stop_grace_s: float = Field(60.0, gt=0, description="time a role gets to exit after SIGTERM before SIGKILL")


class RunConfig(_Section):
    """Everything one run needs; the same file serves `at2po run` and each role started by hand."""

    transport: TransportConfig = Field(default_factory=TransportConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tree: TreeConfig = Field(default_factory=TreeConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value` and parse the value as a TOML value (plain string if it is not one)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _known_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _set_dotted(tree: dict[str, Any], key: str, value: Any, model: type[BaseModel]) -> None:
    parts = key.split(".")
    node: dict[str, Any] = tree
    current: type[BaseModel] | None = model
    for depth, part in enumerate(parts):
        if current is not None and part not in current.model_fields:
            prefix = ".".join(parts[:depth])
            raise ConfigError(_unknown_key_message(prefix, part, _known_keys(current)))
        is_last = depth == len(parts) - 1
        if is_last:
            node[part] = value
            return
        annotation = current.model_fields[part].annotation if current is not None else None
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if current is None:
            raise ConfigError(f"{'.'.join(parts[: depth + 1])} is a value, not a section (override {key!r})")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])} is a value in the file, not a section")
        node = child


def _unknown_key_message(prefix: str, part: str, known: list[str]) -> str:
    dotted = f"{prefix}.{part}" if prefix else part
    close = difflib.get_close_matches(part, known, n=1)
    hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
    return f"{dotted}: unknown key{hint}; known keys here: {', '.join(sorted(known))}"


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        dotted = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{dotted}: unknown key")
        else:
            lines.append(f"{dotted}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def build_config(data: Mapping[str, Any], overrides: Iterable[str] = ()) -> RunConfig:
    """Validate a parsed TOML mapping plus dotted overrides into a RunConfig."""
    tree: dict[str, Any] = _deep_copy(data)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, RunConfig)
    _check_unknown(tree, RunConfig, "")
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error)) from None


def _check_unknown(tree: Mapping[str, Any], model: type[BaseModel], prefix: str) -> None:
    for key, value in tree.items():
        if key not in model.model_fields:
            raise ConfigError(_unknown_key_message(prefix.rstrip("."), key, _known_keys(model)))
        annotation = model.model_fields[key].annotation
        if isinstance(value, Mapping) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_unknown(value, annotation, f"{prefix}{key}.")


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a TOML file (or nothing, for the defaults) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{file}: not valid TOML: {error}") from None
        except OSError as error:
            raise ConfigError(f"config file {file} cannot be read: {error}") from None
    return build_config(data, overrides)


def dump_config(config: RunConfig) -> str:
    """Render a config as TOML text (for `--dry-run` style output and run directories)."""
    lines: list[str] = []
    for section_name in RunConfig.model_fields:
        section = getattr(config, section_name)
        lines.append(f"[{section_name}]")
        for key, value in section.model_dump().items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(value: str) -> str:
    """A TOML basic string: escape backslash, quote and the control characters TOML forbids literally."""
    parts = []
    for char in value:
        if char in _TOML_ESCAPES:
            parts.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            parts.append(f"\\u{ord(char):04x}")
        else:
            parts.append(char)
    return '"' + "".join(parts) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot render {value!r} as TOML")
