"""The loop both training phases share: data order, processes, checkpoints and resume, logging.

The loop knows token ids, trainable parameters and an objective module; the objective of each phase
(`phases.py`) knows gates and losses. Everything random is a function of (seed, step, rank): the
batch of step ``s`` comes from seeded per-epoch permutations and the torch RNG is reseeded before
each step. A checkpoint therefore holds only trainable weights, optimizer state and the step, and
a resumed run replays exactly the batches and random draws of an uninterrupted one.

Several processes (``accelerate launch``, DDP): every process builds the same global batch and
takes rows ``rank::world`` of it. Losses are sums divided by the *global* token and row counts,
so averaged gradients equal one process's gradient on the whole batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from firstskip import artifacts
from firstskip.data import collate
from firstskip.errors import FirstSkipError

Encoded = list[tuple[list[int], int]]  # (prompt + response ids, prompt length), as data.encode_example gives
CHECKPOINT_DIR = "checkpoint"
LOG_NAME = "train_log.jsonl"


@dataclass
class LoopSettings:
    """What every phase shares: how long, how big, how fast, how reproducible."""

    steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 8  # global: summed over processes
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of steps with a linear warm-up; then cosine decay to 10%
    seed: int = 0
    checkpoint_every: int = 25  # steps; 0 saves only the final artifact
    # Settings added after checkpoints were already being written, with the value that reproduces
    # the training before them: a checkpoint that lacks one was written with that value.
    before_they_existed: ClassVar[dict[str, Any]] = {}
    # Settings since removed, with the value that today's settings reproduce: a checkpoint that holds
    # one at that value resumes; at another value it is refused like any other changed setting.
    no_longer_used: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("lr", self.lr)
        _positive("epochs", self.epochs)
        if self.steps is not None:
            _positive("steps", self.steps)
        if not 0 <= self.warmup < 1:
            raise FirstSkipError(f"warmup must lie in [0, 1), got {self.warmup}")
        if self.checkpoint_every < 0:
            raise FirstSkipError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    def total_steps(self, n_examples: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * n_examples / self.batch_size))

    def lr_at(self, step: int, total: int) -> float:
        warm = int(self.warmup * total)
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise FirstSkipError(f"{name} must be positive, got {value}")


@dataclass
class StepInfo:
    """What an objective needs to know about the step beyond its rows of the batch."""

    step: int
    total: int
    tokens: int  # response tokens in the global batch (loss normaliser)
    rows: int  # rows in the global batch
    reduce: Callable[[torch.Tensor], torch.Tensor]  # sum over processes (identity for one)
    gather: Callable[[torch.Tensor], torch.Tensor]  # every process's rows, concatenated
    rank: int = 0  # this process holds rows rank::world of the global batch
    world: int = 1


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of global batch ``step``: per-epoch seeded permutations laid end to end."""
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position + len(out), n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out += order[offset: offset + batch_size - len(out)].tolist()
    return out


def run_loop(objective: nn.Module, data: Encoded, settings: LoopSettings, run_dir: str | os.PathLike,
             phase: str, resume: bool, progress: bool = True, model_config: dict[str, Any] | None = None
             ) -> dict[str, Any] | None:
    """Train the parameters of ``objective`` that require grad; the last step's summary.

    Checkpoints go to ``run_dir/checkpoint`` every ``settings.checkpoint_every`` steps. A checkpoint
    resumes only with the settings, data and ``model_config`` (the run's config as a dict) that
    wrote it: the same trainable weights under another router pooling or base model would train on
    silently as something else.

    ``objective(batch, info)`` returns ``(loss, stats)``: the loss of its rows (sums divided by the
    global counts in ``info``) and a dict of summed statistics that its ``summarize(stats, info)``
    turns into the numbers logged to ``train_log.jsonl`` and shown on the progress bar.
    """
    from accelerate import Accelerator  # imported here: it is slow to import and only training needs it

    if not data:
        raise FirstSkipError("no training examples")
    device = next(objective.parameters()).device
    accelerator = Accelerator(cpu=device.type == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    if settings.batch_size < world:
        raise FirstSkipError(f"batch size {settings.batch_size} is smaller than the {world} processes")
    run_dir = Path(run_dir)
    named = [(name, p) for name, p in objective.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=settings.lr, weight_decay=settings.weight_decay)
    total = settings.total_steps(len(data))
    identity = {"data": _data_fingerprint(data), "model_config": _jsonish(model_config)}
    start = _load_checkpoint(run_dir, phase, settings, identity, named, optimizer) if resume else 0
    model, optimizer = accelerator.prepare(objective, optimizer)
    log = _Log(run_dir / LOG_NAME, phase, start, enabled=accelerator.is_main_process)
    bar = tqdm(total=total, initial=start, desc=phase, disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    reduce = (lambda t: accelerator.reduce(t, "sum")) if world > 1 else (lambda t: t)
    summary = None
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # reseeded every step; the caller's generator is left as it was
        for step in range(start, total):
            torch.manual_seed(settings.seed * 1_000_003 + step * 1_009 + rank)  # dropout etc.: f(seed, step, rank)
            rows = batch_indices(len(data), settings.batch_size, step, settings.seed)
            gather = functools.partial(_gather_rows, accelerator, len(rows)) if world > 1 else (lambda t: t)
            info = StepInfo(step, total, sum(len(data[i][0]) - data[i][1] for i in rows), len(rows), reduce, gather,
                            rank, world)
            batch = collate([data[i] for i in rows[rank::world]], pad_id=0).to(accelerator.device)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr_at(step, total)
            loss, stats = model(batch, info)
            accelerator.backward(loss * world)  # DDP averages gradients; the loss is already globally normalised
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            summary = objective.summarize({k: reduce(v.detach()) for k, v in stats.items()}, info)
            log.write({"step": step + 1, "lr": settings.lr_at(step, total), "processes": world, **summary})
            bar.set_postfix({k: summary[k] for k in ("loss", "keep", "skip", "tau") if k in summary}, refresh=False)
            bar.update(1)
            done = step + 1
            if settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < total:
                if accelerator.is_main_process:
                    _save_checkpoint(run_dir, phase, done, settings, identity, named, optimizer)
                accelerator.wait_for_everyone()
            _after_step(done)
    bar.close()
    return summary


def _gather_rows(accelerator: Any, rows: int, local: torch.Tensor) -> torch.Tensor:
    """All processes' rows of a global batch of ``rows`` (shards differ by one row at most)."""
    world, size = accelerator.num_processes, -(-rows // accelerator.num_processes)
    padded = torch.cat([local, local.new_zeros(size - local.shape[0], *local.shape[1:])])
    every = accelerator.gather(padded).view(world, size, *local.shape[1:])
    return torch.cat([every[rank, :len(range(rank, rows, world))] for rank in range(world)])


def process_state() -> Any:
    """accelerate's view of this process (rank, world, device).

    Without GPUs it must be asked for the CPU: a state first created without ``cpu=True`` takes
    a multi-process launch on a GPU-less machine for a single process, and it is created once.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def on_main(write: Callable[[], Any]) -> None:
    """Run a write on the main process only; every process waits until it is done."""
    state = process_state()
    if state.is_main_process:
        write()
    state.wait_for_everyone()


def _after_step(step: int) -> None:
    """Called after each step; the resume tests replace it to kill a run part-way."""


# -- checkpoints: one safetensors file per step, and state.json (written last) pointing to it --------

def _save_checkpoint(run_dir: Path, phase: str, step: int, settings: LoopSettings, identity: dict[str, Any],
                     named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer) -> None:
    folder = run_dir / CHECKPOINT_DIR
    opt_state = optimizer.state_dict()
    tensors = {f"param/{name}": p for name, p in named}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    file = f"step-{step:07d}.safetensors"
    artifacts.write_tensors(folder / file, tensors, {"format": "pt", "step": str(step)})
    artifacts.write_json(folder / "state.json", {
        "phase": phase, "step": step, "file": file, "settings": dataclasses.asdict(settings),
        **identity, "param_groups": opt_state["param_groups"], "optim_scalars": scalars,
    })
    for old in folder.glob("step-*.safetensors"):  # only now is the new file the one state.json names
        if old.name != file:
            old.unlink()


def _load_checkpoint(run_dir: Path, phase: str, settings: LoopSettings, identity: dict[str, Any],
                     named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer) -> int:
    """Restore weights and optimizer from the last checkpoint of ``phase``; the step to go on from."""
    folder = run_dir / CHECKPOINT_DIR
    state_path = folder / "state.json"
    if not state_path.is_file():
        return 0
    state = json.loads(state_path.read_text(encoding="utf-8"))
    if state["phase"] != phase:
        return 0
    saved = {k: v for k, v in {**settings.before_they_existed, **state["settings"]}.items()
             if k not in settings.no_longer_used or settings.no_longer_used[k] != v}
    _refuse_changes(run_dir, "settings", dataclasses.asdict(settings), saved)
    if state.get("model_config") is not None:  # checkpoints written before it was recorded have none
        _refuse_changes(run_dir, "model config fields", identity["model_config"] or {}, state["model_config"])
    if state["data"] != identity["data"]:
        raise FirstSkipError(f"cannot resume {run_dir}: the training data differ from the checkpoint's; use the "
                             "same --data, --limit, --max-length and --seed, or --overwrite to start again")
    tensors = load_file(folder / state["file"])
    with torch.no_grad():
        for name, p in named:
            p.copy_(tensors[f"param/{name}"])
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, field = key.split("/", 2)
            opt_state["state"].setdefault(int(index), {})[field] = value
    for index, values in state["optim_scalars"].items():
        opt_state["state"].setdefault(int(index), {}).update(values)
    optimizer.load_state_dict(opt_state)
    return int(state["step"])


def _refuse_changes(run_dir: Path, what: str, now: dict[str, Any], saved: dict[str, Any]) -> None:
    changed = sorted(k for k in now.keys() | saved.keys() if _jsonish(now.get(k)) != saved.get(k))
    if changed:
        raise FirstSkipError(f"cannot resume {run_dir}: {what} {changed} differ from the checkpoint's "
                             f"({', '.join(f'{k}={_shorten(repr(saved.get(k)))}' for k in changed)}); use the same ones "
                             "or --overwrite to start again")


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _jsonish(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _data_fingerprint(data: Encoded) -> str:
    digest = hashlib.sha256()
    for ids, prompt_len in data:
        digest.update(json.dumps([prompt_len, ids]).encode())
    return digest.hexdigest()[:16]


def clear_checkpoint(run_dir: str | os.PathLike) -> None:
    """Remove the checkpoint once the artifact it leads to is saved."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if folder.is_dir():
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()


class _Log:
    """train_log.jsonl: one JSON line per step and phase; a resumed phase first drops its lines past
    the checkpoint, so the log of a resumed run reads like an uninterrupted one."""

    def __init__(self, path: Path, phase: str, start: int, enabled: bool) -> None:
        self.path, self.phase, self.enabled = path, phase, enabled
        if enabled and path.is_file():
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            records = [json.loads(line) for line in lines]
            keep = [line for line, r in zip(lines, records) if not (r["phase"] == phase and r["step"] > start)]
            if len(keep) != len(lines):
                artifacts.write_text(path, "".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"phase": self.phase, **record}) + "\n")
