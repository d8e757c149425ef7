"""flows.train.checkpoint: DDP, FSDP2 and a single process write and read one checkpoint format
(attention_core's TrainState), strictly. A one-process gloo group stands in for a cluster: no Ray."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from attention_core import ModelConfig, TrainState, Transformer, configure_optimizer, train_step
from flows.train import restore_checkpoint, save_checkpoint

CONFIG = ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


@pytest.fixture()
def process_group(free_port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def build(strategy: str, seed: int = 0, optimizer: str = "adamw"):
    torch.manual_seed(seed)
    model = Transformer(CONFIG)
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        fully_shard(model)
    inner = model.module if strategy == "ddp" else model
    return model, configure_optimizer(inner, 1e-2, 0.1, optimizer=optimizer)


def steps(model, optimizer, n: int, start: int = 0) -> list[float]:
    losses = []
    for i in range(start, start + n):
        x = torch.randint(32, (2, 8), generator=torch.Generator().manual_seed(i))
        losses.append(train_step(model, optimizer, [(x, torch.roll(x, -1, 1))]).loss)
    return losses


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def test_a_single_process_round_trip_without_a_process_group(tmp_path):
    model, optimizer = build("plain")
    steps(model, optimizer, 2)
    assert save_checkpoint(model, optimizer, tmp_path / "ckpt", step=2, extra={"k": 1})
    expected = steps(model, optimizer, 2, start=2)

    other, other_opt = build("plain", seed=1)
    assert restore_checkpoint(other, other_opt, tmp_path / "ckpt") == 2
    assert steps(other, other_opt, 2, start=2) == expected


@pytest.mark.parametrize("writer", ["plain", "ddp", "fsdp"])
@pytest.mark.parametrize("reader", ["plain", "ddp", "fsdp"])
def test_any_strategy_resumes_a_checkpoint_of_any_other_exactly(tmp_path, process_group, writer, reader):
    resume_exactly(tmp_path, writer, reader, "adamw")


@pytest.mark.parametrize("writer, reader", [("plain", "ddp"), ("ddp", "plain"), ("ddp", "ddp")])
def test_muon_with_adamw_resumes_exactly_under_ddp(tmp_path, process_group, writer, reader):
    """One optimizer whose groups are Muon's or AdamW's: torch.distributed.checkpoint's full state dict
    carries both kinds of state and the groups' settings (FSDP2 is refused by the config)."""
    resume_exactly(tmp_path, writer, reader, "muon")


def resume_exactly(tmp_path, writer: str, reader: str, optimizer_name: str) -> None:
    model, optimizer = build(writer, optimizer=optimizer_name)
    steps(model, optimizer, 2)
    if writer == "plain":  # attention_core alone, no torch.distributed.checkpoint
        TrainState(model, optimizer, step=2).save(tmp_path / "ckpt")
    else:
        save_checkpoint(model, optimizer, tmp_path / "ckpt", step=2, extra={})
    expected = steps(model, optimizer, 2, start=2)

    other, other_opt = build(reader, seed=1, optimizer=optimizer_name)
    if reader == "plain":
        TrainState.load(tmp_path / "ckpt", other, other_opt, restore_rng=False)
    else:
        assert restore_checkpoint(other, other_opt, tmp_path / "ckpt") == 2
    assert steps(other, other_opt, 2, start=2) == expected  # bitwise: one format, nothing lost
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(full(b), full(a), atol=0, rtol=0, msg=name)


def test_a_checkpoint_of_another_model_shape_is_refused(tmp_path, process_group):
    model, optimizer = build("fsdp")
    steps(model, optimizer, 1)
    save_checkpoint(model, optimizer, tmp_path / "ckpt", step=1, extra={})
    torch.manual_seed(0)
    bigger = Transformer(ModelConfig(**{**CONFIG.to_dict(), "n_layer": 3}))
    with pytest.raises(RuntimeError, match="h.2"):
        restore_checkpoint(bigger, configure_optimizer(bigger, 1e-2, 0.1), tmp_path / "ckpt")


def test_a_checkpoint_without_optimizer_state_cannot_resume(tmp_path):
    model, optimizer = build("plain")
    TrainState(model, None).save(tmp_path / "weights-only")
    with pytest.raises(FileNotFoundError, match="optimizer"):
        restore_checkpoint(model, optimizer, tmp_path / "weights-only")


def _drop(path, key: str) -> None:
    """Rewrite the safetensors file at path without `key`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    del tensors[key]
    save_file(tensors, str(path))


@pytest.mark.parametrize("reader", ["ddp", "fsdp"])
def test_a_checkpoint_missing_a_weight_is_refused_never_half_loaded(tmp_path, process_group, reader):
    model, optimizer = build("fsdp")
    steps(model, optimizer, 1)
    save_checkpoint(model, optimizer, tmp_path / "ckpt", step=1, extra={})
    _drop(tmp_path / "ckpt" / TrainState.WEIGHTS, "h.1.mlp.c_proj.weight")

    other, other_opt = build(reader, seed=1)
    before = {n: full(p).clone() for n, p in other.named_parameters()}
    with pytest.raises(RuntimeError, match=r"h\.1\.mlp\.c_proj\.weight"):
        restore_checkpoint(other, other_opt, tmp_path / "ckpt")
    for name, p in other.named_parameters():  # refused before anything was scattered
        assert torch.equal(full(p), before[name]), name


@pytest.mark.parametrize("reader", ["ddp", "fsdp"])
def test_a_checkpoint_missing_a_parameters_optimizer_state_is_refused(tmp_path, process_group, reader):
    model, optimizer = build("fsdp")
    steps(model, optimizer, 1)
    save_checkpoint(model, optimizer, tmp_path / "ckpt", step=1, extra={})
    path = tmp_path / "ckpt" / TrainState.OPTIMIZER
    saved = torch.load(path, weights_only=True)
    del saved["state"]["h.0.attn.c_attn.weight"]
    for group in saved["param_groups"]:
        group["params"] = [n for n in group["params"] if n != "h.0.attn.c_attn.weight"]
    torch.save(saved, path)

    other, other_opt = build(reader, seed=1)
    with pytest.raises(KeyError, match=r"missing parameters \['h\.0\.attn\.c_attn\.weight'\]"):
        restore_checkpoint(other, other_opt, tmp_path / "ckpt")
