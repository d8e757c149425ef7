"""Training primitives that need no Ray: one step, the device's peak FLOP/s, and training state on disk.

(The optimizers and learning-rate schedules are in optim.py.) `train_step` runs one optimizer step
over a list of micro-batches (gradient accumulation, autocast, clipping), setting each parameter
group's learning rate from the schedule's and the group's `lr_scale`, and synchronises with the
device once, at the end. `TrainState` saves and restores model weights (safetensors), optimizer state keyed by parameter
name and RNG states (`torch.load(weights_only=True)`: nothing else is ever unpickled) into a
directory that is swapped into place whole; a sharded trainer hands it full state dicts instead.
A distributed trainer wraps the model (DDP, FSDP2) from outside; `train_step` only needs to know
how to skip gradient synchronisation on all but the last micro-batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import safetensors.torch
import torch
import torch.nn as nn

from .config import ModelConfig
from .model import Transformer
from .wrappers import strip_wrappers, unwrap_model

# ----------------------------------------------------------------------------------------------
# The device's peak


# Dense bf16 peak FLOP/s by device name fragment: the denominator of MFU (nanoGPT's estimate_mfu).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak FLOP/s when known (H100/H200/A100), else None (CPUs and other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------------------------
# One training step


@dataclass
class StepResult:
    loss: float  # mean over micro-batches of each micro-batch's mean loss
    grad_norm: float  # total L2 norm of the gradients before clipping
    tokens: int  # input tokens consumed by this step (on this rank)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, lr: float | None = None,
               grad_clip: float = 1.0, autocast_dtype: torch.dtype | None = None,
               device_type: str = "cpu") -> StepResult:
    """Accumulate gradients over micro_batches [(x, y), ...], clip them, take one optimizer step.

    lr: the schedule's learning rate; each parameter group gets lr times its `lr_scale` (default 1).
    Each micro-batch's loss is divided by their number, so the gradient is that of the mean loss.
    Under DDP (`no_sync`) or FSDP2 (`set_requires_gradient_sync`) gradients are all-reduced only
    on the last micro-batch. The one host-device synchronisation is reading loss and norm at the end.
    """
    if len(micro_batches) == 0:
        raise ValueError("micro_batches: at least one (x, y) pair is needed")
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups run at a multiple of AdamW's
    optimizer.zero_grad(set_to_none=True)
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    n = len(micro_batches)
    loss_sum = None
    tokens = 0
    for i, (x, y) in enumerate(micro_batches):
        with _gradient_sync(model, enabled=i == n - 1):
            with autocast:
                _, loss = model(x, y)
            (loss / n).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        tokens += x.numel()

    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    loss_value, norm_value = torch.stack((loss_sum.float() / n, grad_norm.float())).tolist()  # one sync
    return StepResult(loss=loss_value, grad_norm=norm_value, tokens=tokens)


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, enabled: bool):
    """Turn off the data-parallel gradient all-reduce for this micro-step unless `enabled`."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
        model.set_requires_gradient_sync(enabled)
        yield
    elif not enabled and hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


# ----------------------------------------------------------------------------------------------
# Weights and training state on disk


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the (unwrapped) model's weights to one safetensors file; a tied matrix is stored once."""
    safetensors.torch.save_model(strip_wrappers(model), str(path))


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors file written by `save_weights` into the model (strict: every key must match)."""
    safetensors.torch.load_model(strip_wrappers(model), str(path), strict=True)


def save_model(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write config.json and model.safetensors: everything `load_model` needs, no optimizer."""
    config = unwrap_model(model).config.to_dict()

    def write(tmp: Path) -> None:
        _write_json(tmp / "config.json", config)
        save_weights(model, tmp / "model.safetensors")

    _write_directory(Path(directory), write)


def load_model(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Transformer:
    """Build a Transformer from state.json or config.json and load model.safetensors; eval mode."""
    directory = Path(directory)
    if (directory / "state.json").exists():
        config = json.loads((directory / "state.json").read_text())["model_config"]
    elif (directory / "config.json").exists():
        config = json.loads((directory / "config.json").read_text())
    else:
        raise FileNotFoundError(f"{directory}: neither state.json nor config.json")
    model = Transformer(ModelConfig.from_dict(config))
    load_weights(model, directory / "model.safetensors")
    return model.to(map_location).eval()


@dataclass
class TrainState:
    """Everything needed to resume training: model, optimizer, step, RNG states, small metadata.

    One format for every way of training: the weights of the plain Transformer (safetensors), the
    optimizer state keyed by parameter name (torch.distributed.checkpoint's "full" optimizer state
    dict has exactly this shape, so DDP, FSDP2 and a single process all write and read the same
    files), the RNG states, and state.json. `optimizer` is either an optimizer over `model`'s
    parameters or such a by-name state dict: a sharded trainer gathers full state dicts outside
    and hands them over as a plain Transformer and a dict. Call `save` on one process only.
    """

    WEIGHTS: ClassVar[str] = "model.safetensors"
    OPTIMIZER: ClassVar[str] = "optimizer.pt"
    RNG: ClassVar[str] = "rng.pt"
    STATE: ClassVar[str] = "state.json"

    model: nn.Module
    optimizer: torch.optim.Optimizer | dict | None
    step: int = 0
    extra: dict = field(default_factory=dict)  # small and JSON-serialisable (e.g. run metadata)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the weights, optimizer state, RNG states and state.json, then swap the directory in.

        Every file is written into a temporary sibling directory that replaces `directory` only once
        complete, so a crash mid-save leaves the previous checkpoint intact.
        """
        state = {"step": int(self.step), "model_config": unwrap_model(self.model).config.to_dict(),
                 "extra": self.extra}
        json.dumps(state)  # fail before touching the disk if extra is not JSON-serialisable
        optimizer_state = None
        if isinstance(self.optimizer, torch.optim.Optimizer):
            optimizer_state = _optimizer_state_by_name(self.model, self.optimizer)
        elif self.optimizer is not None:
            optimizer_state = self.optimizer
            _check_names(_parameter_names(self.model).values(), _state_names(optimizer_state), "optimizer state")

        def write(tmp: Path) -> None:
            save_weights(self.model, tmp / self.WEIGHTS)
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / self.OPTIMIZER)
            torch.save(_rng_state(), tmp / self.RNG)
            _write_json(tmp / self.STATE, state)

        _write_directory(Path(directory), write)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module,
             optimizer: torch.optim.Optimizer | None = None, *, restore_rng: bool = True,
             map_location: str | torch.device = "cpu") -> TrainState:
        """Restore a state written by `save` into an already-built model (and optimizer), strictly:
        a missing or unexpected weight or parameter name is an error."""
        directory = Path(directory)
        state = json.loads((directory / cls.STATE).read_text())
        load_weights(model, directory / cls.WEIGHTS)
        if optimizer is not None:
            saved = cls._read_optimizer(directory, map_location)
            optimizer.load_state_dict(_optimizer_state_by_index(model, optimizer, saved))
        if restore_rng:
            _set_rng_state(torch.load(directory / cls.RNG, map_location="cpu", weights_only=True))
        return cls(model=model, optimizer=optimizer, step=state["step"], extra=state["extra"])

    @classmethod
    def read(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> TrainState:
        """The state as plain objects: a Transformer built from state.json with the weights loaded
        strictly, and the optimizer state as its by-name dict (None if saved without one). RNG
        states are left alone. A sharded trainer scatters these into its own model and optimizer."""
        directory = Path(directory)
        state = json.loads((directory / cls.STATE).read_text())
        model = Transformer(ModelConfig.from_dict(state["model_config"]))
        load_weights(model, directory / cls.WEIGHTS)
        optimizer_state = None
        if (directory / cls.OPTIMIZER).exists():
            optimizer_state = cls._read_optimizer(directory, map_location)
            _check_names(_parameter_names(model).values(), _state_names(optimizer_state),
                         str(directory / cls.OPTIMIZER))
        return cls(model=model.to(map_location), optimizer=optimizer_state, step=state["step"],
                   extra=state["extra"])

    @classmethod
    def _read_optimizer(cls, directory: Path, map_location) -> dict:
        path = directory / cls.OPTIMIZER
        if not path.exists():
            raise FileNotFoundError(f"{path}: this state was saved without an optimizer")
        saved = torch.load(path, map_location=map_location, weights_only=True)
        if any(isinstance(key, int) for key in saved["state"]):
            raise ValueError(f"{path}: optimizer state keyed by index, written before states were keyed by "
                             "parameter name; its weights still load (load_model), its optimizer does not")
        return saved


def _parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in the unwrapped model; a tied parameter keeps its first name,
    as torch.distributed.checkpoint names it."""
    return {id(p): name for name, p in strip_wrappers(model).named_parameters() if p.requires_grad}


def _state_names(optimizer_state: dict) -> list[str]:
    return [name for group in optimizer_state["param_groups"] for name in group["params"]]


def _check_names(expected: Iterable[str], got: Iterable[str], what: str) -> None:
    """Strict loading: the same parameter names on both sides, else a KeyError naming the difference."""
    expected, got = set(expected), set(got)
    if expected != got:
        raise KeyError(f"{what}: missing parameters {sorted(expected - got)}, "
                       f"unexpected parameters {sorted(got - expected)}")


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with each parameter's index replaced by its name."""
    names = _parameter_names(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise KeyError(f"optimizer: parameters {missing} (by index) are not parameters of the model")
    name_of = [names[id(p)] for p in params]  # state_dict() numbers parameters in this order
    state = optimizer.state_dict()
    return {"state": {name_of[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]]}


def _optimizer_state_by_index(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A by-name optimizer state turned back into what `optimizer.load_state_dict` takes.

    Groups are matched by position and, inside a group, parameters by name: the indices are those
    of `optimizer`'s own parameter order, so a saved group listing its parameters in another order
    still gives each parameter its own state.
    """
    names = _parameter_names(model)
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"optimizer state: {len(saved['param_groups'])} parameter groups saved, "
                         f"{len(optimizer.param_groups)} in the optimizer")
    index: dict[str, int] = {}
    groups = []
    for k, (group, saved_group) in enumerate(zip(optimizer.param_groups, saved["param_groups"])):
        own = [names.get(id(p), f"<unnamed {k}:{i}>") for i, p in enumerate(group["params"])]
        _check_names(own, saved_group["params"], f"optimizer state, parameter group {k}")
        params = list(range(len(index), len(index) + len(own)))
        index.update(zip(own, params))
        groups.append({**saved_group, "params": params})
    unexpected = sorted(set(saved["state"]) - set(index))
    if unexpected:
        raise KeyError(f"optimizer state: unexpected parameters {unexpected}")
    return {"state": {index[name]: s for name, s in saved["state"].items()}, "param_groups": groups}


def _rng_state() -> dict[str, Any]:
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        # (version, tuple of 625 ints, gauss_next): plain values that weights_only loading accepts
        "python": random.getstate(),
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if rng["torch_cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(rng["torch_cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_directory(directory: Path, write) -> None:
    """Call write(tmp) on a fresh sibling directory, fsync it, then move it to `directory`."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.iterdir():  # contents on disk before the rename makes them visible
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if directory.exists():
            # POSIX cannot rename over a non-empty directory: move the old one aside first
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
