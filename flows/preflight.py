"""Checks that need the environment, run before any server, Ray or training starts (`check_before_run`).

The config's own validators catch what the config alone can tell (flows/config.py); this module adds
what needs the machine: whether the local Ray can place the workers at all (CPUs, GPUs), whether one
worker's training state fits the memory it will have, and whether the KV cache of the evaluation's
samples (eval.max_new_tokens) fits this machine. The memory estimate is closed-form, from
ModelConfig alone (no model is built, nothing is allocated): fp32 parameters, their gradients and
AdamW's two moments (16 bytes a parameter, sharded over the workers by FSDP), plus the activations kept
for the backward pass at train.batch_size x model.block_size (see `activation_bytes`). It is compared
with the memory of this machine (one GPU each when train.use_gpu; else RAM, or the container's limit,
shared by the local workers); with train.ray_address set, each node is taken to have this machine's
memory, which holds on a cluster's head, where `flows submit` runs the pipeline. The estimate leaves out
allocator slack, DDP's buckets and the CUDA context, so it errs low: only a run that cannot fit is refused.
Every failure is a UserError: one line naming the keys to change, exit code 2, never retried.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

from attention_core import ModelConfig
from flows.config import PipelineConfig
from flows.errors import UserError

_CHAR_VOCAB_GUESS = 256  # a char tokenizer's alphabet is only known after prep; text rarely has more


def count_params(model: ModelConfig, vocab_size: int) -> int:
    """Transformer(model.with_vocab(vocab_size)).num_params(non_embedding=False), without building it."""
    C, hd, bias = model.n_embd, model.head_dim, int(model.bias)
    norm = C * (1 + bias) if model.norm == "layernorm" else C  # RMSNorm has no bias
    qkv = (model.n_head + 2 * model.kv_heads) * hd
    attn = C * qkv + bias * qkv + C * C + bias * C + (2 * hd if model.qk_norm else 0)
    fc = (2 if model.mlp == "swiglu" else 1) * model.hidden_dim
    mlp = C * fc + bias * fc + model.hidden_dim * C + bias * C
    block = 2 * norm + attn + mlp
    embeddings = vocab_size * C + (model.block_size * C if model.pos == "learned" else 0)
    head = 0 if model.tie_embeddings else vocab_size * C
    return embeddings + model.n_layer * block + norm + head


def activation_bytes(model: ModelConfig, vocab_size: int, batch_size: int, act_bytes: int) -> int:
    """Activations one training micro-batch keeps for its backward pass, in bytes.

    Per token and layer, the tensors autograd saves: the two norms' inputs and outputs (4C; 6C with
    RMSNorm), in fp32 even under autocast; q, k and v ((n_head + 2 n_kv_head) head_dim, plus two fp32
    copies of q and k for RoPE and one for qk_norm), the attention output (C), the MLP's first
    projection and its activation (2 hidden, 3 for SwiGLU): about Korthikanti et al.'s 34·C bytes a
    token for a 16-bit GPT block. The explicit attention path adds its n_head x T probabilities; the
    fused one (SDPA) keeps none. On top, per token: the embedding output and final norm (3C, fp32)
    and the logits with cross-entropy's fp32 copy (vocab_size each). Elements not marked fp32 take
    act_bytes (4 in fp32, 2 under bf16 autocast). tests/flows/test_preflight.py holds it within a
    factor of 1.5 of the bytes autograd really saves.
    """
    C, T = model.n_embd, model.block_size
    q, kv = model.n_head * model.head_dim, model.kv_heads * model.head_dim
    fp32 = (6 if model.norm == "rmsnorm" else 4) * C
    fp32 += (2 * (q + kv) if model.pos == "rope" else 0) + ((q + kv) if model.qk_norm else 0)
    low = q + 2 * kv + C + (3 if model.mlp == "swiglu" else 2) * model.hidden_dim
    if model.attn_impl == "explicit":
        low += model.n_head * T
    per_token = model.n_layer * (4 * fp32 + act_bytes * low) + 4 * 3 * C + vocab_size * (act_bytes + 4)
    return batch_size * T * per_token


@dataclass(frozen=True)
class MemoryEstimate:
    params: int               # parameter count
    weights: int              # bytes, per worker: fp32 parameters and their gradients
    optimizer: int            # fp32: AdamW's two moments; Muon's one momentum for the blocks' weights
    activations: int
    precision: str            # "fp32" or "bf16"

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations


def vocab_size_guess(cfg: PipelineConfig) -> int:
    """The vocabulary prep will produce: byte 257, bpe at most data.vocab_size, char a guess."""
    return {"byte": 257, "bpe": cfg.data.vocab_size}.get(cfg.data.tokenizer, _CHAR_VOCAB_GUESS)


def estimate_memory(cfg: PipelineConfig, vocab_size: int | None = None) -> MemoryEstimate:
    """One worker's training memory at the configured batch, precision and strategy (a lower bound)."""
    tc, model = cfg.train, cfg.model
    vocab = vocab_size or vocab_size_guess(cfg)
    n = count_params(model, vocab)
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and tc.use_gpu)
    root = count_params(_without_blocks(model), vocab)  # embeddings, head, final norm: AdamW's always
    weights = 8 * n  # fp32 master weights + grads (autocast keeps both fp32)
    optimizer = 8 * n if tc.optimizer == "adamw" else 8 * root + 4 * (n - root)
    if tc.strategy == "fsdp":
        # sharded over the workers; one block (or the root's embeddings) is gathered, with its grads, at a time
        block = (n - root) // model.n_layer
        weights = math.ceil(weights / tc.num_workers) + 8 * max(block, root)
        optimizer = math.ceil(optimizer / tc.num_workers)
    acts = activation_bytes(model, vocab, tc.batch_size, 2 if bf16 else 4)
    return MemoryEstimate(params=n, weights=weights, optimizer=optimizer, activations=acts,
                          precision="bf16" if bf16 else "fp32")


def _without_blocks(model: ModelConfig) -> ModelConfig:
    """model with n_layer=0, for counting the root's parameters (no ModelConfig check: it is never built)."""
    clone = copy.copy(model)
    clone.n_layer = 0
    return clone


# --------------------------------------------------------------------------------------- the machine
def machine_memory() -> int:
    """RAM of this machine in bytes, or the container's cgroup limit when lower."""
    import psutil

    total = psutil.virtual_memory().total
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def local_gpus(environ: dict[str, str] | None = None) -> list[int]:
    """Total memory in bytes of each GPU a local Ray would use: nvidia-smi's list, narrowed by
    CUDA_VISIBLE_DEVICES (indices) as Ray narrows it. nvidia-smi, unlike torch, leaves CUDA
    uninitialised in this process, which later forks (data prep) and must not inherit it."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return visible_gpus(out, (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES"))


def visible_gpus(smi_output: str, visible: str | None) -> list[int]:
    """Bytes per GPU from nvidia-smi's MiB column, only those CUDA_VISIBLE_DEVICES names by index."""
    gpus = [int(line.strip()) * 1024**2 for line in smi_output.splitlines() if line.strip().isdigit()]
    if visible is None:
        return gpus
    picked = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(v.isdigit() for v in picked):
        return gpus if picked else []  # UUIDs: trust the count; "" hides every GPU
    return [gpus[int(v)] for v in picked if int(v) < len(gpus)]


@dataclass(frozen=True)
class WorkerBudget:
    bytes: int | None         # memory one worker has; None: not known here
    where: str                # how it was found, for the message


def worker_budget(cfg: PipelineConfig, *, ram: int | None = None, gpus: list[int] | None = None) -> WorkerBudget:
    """What each worker will have: a GPU each when use_gpu, else this machine's (or node's) RAM shared
    by the workers placed on it: all of them with a local Ray or STRICT_PACK, else one per node."""
    tc = cfg.train
    if tc.use_gpu:
        gpus = local_gpus() if gpus is None else gpus
        if not gpus:
            return WorkerBudget(None, "no GPU on this machine to measure")
        return WorkerBudget(min(gpus), f"{_size(min(gpus))} per GPU on this machine")
    ram = machine_memory() if ram is None else ram
    local = tc.ray_address is None
    per_node = tc.num_workers if local or tc.placement_strategy == "STRICT_PACK" else 1
    node = "this machine" if local else "each node (as this machine)"
    if per_node == 1:
        return WorkerBudget(ram, f"the RAM of {node}")
    return WorkerBudget(ram // per_node, f"{_size(ram)} RAM of {node} shared by {per_node} workers")


# --------------------------------------------------------------------------------------- the checks
def check_memory(cfg: PipelineConfig, budget: WorkerBudget | None = None) -> MemoryEstimate:
    """Raise UserError when one worker's estimated training memory exceeds what it will have."""
    est = estimate_memory(cfg)
    budget = budget or worker_budget(cfg)
    if budget.bytes is None or est.total <= budget.bytes:
        return est
    tc, m = cfg.train, cfg.model
    if est.activations > est.weights + est.optimizer:
        lower = "train.batch_size or model.block_size (or model.n_layer, model.n_embd)"
    else:
        lower = "model.n_embd or model.n_layer"
        if tc.strategy == "ddp" and (tc.use_gpu or tc.ray_address is not None):  # a worker per device
            lower += " (or shard them: train.strategy=fsdp over more train.num_workers)"
    raise UserError(
        f"model: training needs about {_size(est.total)} per worker ({est.params:.3g} parameters: weights and "
        f"gradients {_size(est.weights)}, {tc.optimizer} state {_size(est.optimizer)}; activations {_size(est.activations)} "
        f"at train.batch_size={tc.batch_size} x model.block_size={m.block_size}, n_layer={m.n_layer}, "
        f"n_embd={m.n_embd}, {est.precision}, {tc.strategy}) but each worker has about {_size(budget.bytes)} "
        f"({budget.where}): lower {lower}")


def check_generation(cfg: PipelineConfig, ram: int | None = None) -> int:
    """Refuse eval.max_new_tokens whose KV cache cannot fit this machine (evaluation samples here, on
    the CPU or one GPU). With learned positions the cache holds block_size positions at most; RoPE
    keeps every one. Returns the cache's bytes (fp32, one prompt at a time)."""
    from flows.evaluate import PROMPT_CHARS
    from flows.modelpack import default_max_new_tokens_limit

    m, ev = cfg.model, cfg.eval
    cap = default_max_new_tokens_limit(m.block_size)  # what evaluation's sampling allows
    if ev.max_new_tokens > cap:
        raise UserError(f"eval.max_new_tokens: {ev.max_new_tokens} is above the generation limit of {cap} new "
                        f"tokens (the larger of model.block_size={m.block_size} and 1024)")
    positions = max((len(p.encode()) for p in ev.prompts or []), default=PROMPT_CHARS) + ev.max_new_tokens
    if m.pos == "learned":
        positions = min(positions, m.block_size)
    kept = "model.pos=rope keeps every position" if m.pos == "rope" else f"model.block_size={m.block_size} positions"
    cache = 2 * m.n_layer * m.kv_heads * m.head_dim * positions * 4
    limit = machine_memory() if ram is None else ram
    if cache > limit:
        raise UserError(f"eval.max_new_tokens: {ev.max_new_tokens} tokens per sample need a KV cache of about "
                        f"{_size(cache)} ({kept}) but this machine has "
                        f"{_size(limit)}: lower eval.max_new_tokens")
    return cache


def check_resources(cfg: PipelineConfig, *, cpus: int | None = None, gpus: int | None = None) -> None:
    """With a local Ray, refuse workers it could never place (Ray would wait for them forever); the
    driver checks a joined cluster's nodes the same way (flows/train/cluster.py)."""
    from flows.placement import shortfall

    tc = cfg.train
    if tc.ray_address is not None:
        return  # the cluster's own nodes are checked once it is joined
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    gpus = (len(local_gpus()) if tc.use_gpu else 0) if gpus is None else gpus
    need = {"CPU": tc.cpus_per_worker or 1, **({"GPU": 1} if tc.use_gpu else {})}
    short = shortfall(tc.num_workers, need, [{"CPU": cpus, "GPU": gpus}], tc.placement_strategy,
                      cpus_configured=tc.cpus_per_worker is not None)
    if short:
        raise UserError(f"{short.key}: {short.asked} cannot be placed on the local Ray, this machine has {cpus} CPU "
                        f"and {gpus} GPU: {short.advice}, or join a cluster with train.ray_address")


def check_before_run(cfg: PipelineConfig) -> MemoryEstimate:
    """Everything the environment can tell before a run starts: the CLI's `run` and the flow's entry
    call it after loading the config (and filling in the environment). Raises UserError."""
    from flows.train.runs import check_run_settings

    check_run_settings(cfg)  # a reused train.run_name resumes only the training it started
    check_resources(cfg)
    estimate = check_memory(cfg)
    check_generation(cfg)
    return estimate


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            break
        n /= 1024
    return f"{n:.3g} {unit}" if n < 1e6 else f"{n:.2e} {unit}"
