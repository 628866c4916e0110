"""Training on tiny random models: phase 1 learns what the data rewards and meets a skip target after
calibration, a killed run resumes exactly, two processes agree with one; phase 2 leaves the routers
alone and decides skips as inference does; saved runs reload and generate identically.

The data reward skipping: responses are greedy continuations of the same model with layers 2 and 3
deleted, so gating those layers off lowers the loss and routers have something real to learn.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import firstskip.baselines
import firstskip.train
from firstskip import artifacts, models
from firstskip.cli import app
from firstskip.data import collate
from firstskip.engine import Sampling
from firstskip.errors import FirstSkipError
from firstskip.families import FAMILIES
from firstskip.modeling import FirstSkipModel
from firstskip.routers import decide
from firstskip.skipping import pruned_copy
from firstskip.train import LoraTraining, RouterTraining, calibrate, train, train_lora, train_routers
from firstskip.train import loop, phases, recipe
from firstskip.train.calibrate import keep_probs, response_loss, skip_ratio, threshold_for_ratio
from firstskip.train.passes import (decision_prompt, gated_forward, hard_gate, prompt_keep_probs,
                                   prompt_then_response, response_ce, response_kl)

TINY = "random:tiny-llama"
REWARDED = [2, 3]  # the layers the data rewards skipping
LEARN = RouterTraining(steps=40, batch_size=8, lr=1e-2, lam=0.0, polarize=0.0, checkpoint_every=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread and lose much to spinning when cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fresh() -> FirstSkipModel:
    torch.manual_seed(0)  # routers' first layers start random
    return FirstSkipModel.from_base(TINY)


def continuations(model, n: int, seed: int) -> list[tuple[list[int], int]]:
    """Random prompts of 8-15 tokens, each continued greedily for 6 tokens by ``model``."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        length = int(torch.randint(8, 16, (1,), generator=gen))
        ids = torch.randint(3, 256, (1, length), generator=gen)
        with torch.no_grad():
            for _ in range(6):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        data.append((ids[0].tolist(), length))
    return data


@pytest.fixture(scope="module")
def data() -> dict[str, list[tuple[list[int], int]]]:
    pruned = pruned_copy(models.load_model(TINY)[0], REWARDED)
    train = continuations(pruned, 64, 0)
    return {"train": train, "held": continuations(pruned, 48, 1), "test": continuations(pruned, 48, 2),
            "pattern": [(ids[:n] + [7, 8, 7, 8], n) for ids, n in train]}  # for LoRA: a response to learn


@pytest.fixture(scope="module")
def phase1_run(data, tmp_path_factory) -> Path:
    """A run whose routers were trained on the rewarding data (phase 1 only)."""
    run = tmp_path_factory.mktemp("phase1")
    train_routers(fresh(), data["train"], run, LEARN, progress=False)
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def killed_at(monkeypatch, at: int, run: Callable[[], object]) -> None:
    """``run`` as a kill at the end of step ``at`` leaves it."""
    def kill(step: int) -> None:
        if step == at:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(loop, "_after_step", kill)
        run()


def log(run: Path, phase: str) -> list[dict]:
    lines = (run / loop.LOG_NAME).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == phase]


# -- the passes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_two_piece_pass_equals_one_piece(model_type: str):
    """Phase 1's prefill-then-response pass gives the one-piece gated pass's loss, probs and gradients."""
    fsm = FirstSkipModel.from_base(f"random:tiny-{model_type}")
    torch.manual_seed(0)
    for router in fsm.routers.routers:
        torch.nn.init.normal_(router.down.weight, std=0.5)  # input-dependent keep-probabilities
    gen = torch.Generator().manual_seed(0)
    rows = [(torch.randint(3, 250, (p + r,), generator=gen).tolist(), p) for p, r in [(5, 3), (11, 6), (8, 1), (14, 4)]]
    batch = collate(rows, pad_id=0)
    soft = lambda layer, p: p  # noqa: E731
    for pooling, template in [("mean", (0, 0)), ("mean", (2, 1)), ("last", (0, 0))]:  # right-padded prompts
        fsm.routers.pooling, (fsm.routers.head, fsm.routers.tail) = pooling, template  # in one piece, left in two
        logits, labels, probs = gated_forward(fsm.model, fsm.engine.controller, batch, soft)
        one = response_ce(logits, labels)
        two, probs2, _ = prompt_then_response(fsm.model, fsm.engine.controller, fsm.routers, batch, lambda probs: soft)
        two = two.sum()
        params = [p for p in fsm.routers.parameters()]
        grads = torch.autograd.grad(one, params, allow_unused=True), torch.autograd.grad(two, params, allow_unused=True)
        torch.testing.assert_close(two, one, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(probs2, probs, atol=1e-6, rtol=0)
        for a, b in zip(*grads):
            if a is not None:
                torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_distillation_is_the_kl_from_the_model_with_every_layer(model_type: str):
    """The two-piece pass's KL term is KL(every layer || gated) of the one-piece passes, and asking for
    it leaves the CE and the keep-probabilities as they were (the teacher extends a fork of the
    prompt's cache; rows are longer than the sliding windows of the families that have one)."""
    fsm = FirstSkipModel.from_base(f"random:tiny-{model_type}")
    torch.manual_seed(0)
    for router in fsm.routers.routers:
        torch.nn.init.normal_(router.down.weight, std=0.5)
    gen = torch.Generator().manual_seed(1)
    batch = collate([(torch.randint(3, 250, (p + r,), generator=gen).tolist(), p) for p, r in [(6, 4), (9, 2)]], 0)
    half = lambda layer, p: p * (layer % 2)  # noqa: E731  (odd layers gated by p, even ones skipped)
    controller = fsm.engine.controller
    student, labels, _ = gated_forward(fsm.model, controller, batch, half)
    teacher, _, _ = gated_forward(fsm.model, controller, batch, lambda layer, p: torch.ones_like(p))
    ce, probs, kl = prompt_then_response(fsm.model, controller, fsm.routers, batch, lambda probs: half, distill=True)
    plain_ce, plain_probs, none = prompt_then_response(fsm.model, controller, fsm.routers, batch, lambda probs: half)
    expected = torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                          reduction="none").sum(-1)
    torch.testing.assert_close(kl, (expected * (labels != -100)).sum(-1), atol=1e-4, rtol=1e-4)
    assert none is None and bool((kl > 0).all())
    torch.testing.assert_close(ce, plain_ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, plain_probs)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_two_piece_pass_trains_lora_as_the_one_piece_pass_does(model_type: str):
    """Phase 2's pass (the prompt keeps its graph, LoRA is everywhere) gives the one-piece passes'
    CE, KL to the adapted model with every layer, and LoRA gradients."""
    fsm = FirstSkipModel.from_base(f"random:tiny-{model_type}")
    peft_model = phases.add_lora(fsm.model, LORA)
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter
    gen = torch.Generator().manual_seed(0)
    rows = [(torch.randint(3, 250, (p + r,), generator=gen).tolist(), p) for p, r in [(5, 3), (11, 6), (8, 1), (14, 4)]]
    batch, controller = collate(rows, pad_id=0), fsm.engine.controller
    skip = torch.zeros(len(rows), fsm.config.num_layers, dtype=torch.bool)
    skip[0, 2] = skip[1, 2] = skip[1, 3] = skip[3, 4] = True
    student, labels, _ = gated_forward(peft_model, controller, batch, hard_gate(skip))
    with torch.no_grad():
        teacher, _, _ = gated_forward(peft_model, controller, batch, lambda layer, p: torch.ones_like(p))
    one = response_ce(student, labels), response_kl(student, teacher, labels).sum()
    ce, _, kl = prompt_then_response(peft_model, controller, fsm.routers, batch, lambda probs: hard_gate(skip),
                                     distill=True, prompt_grad=True)
    two = ce.sum(), kl.sum()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(sum(one), params), torch.autograd.grad(sum(two), params)
    for a, b in zip(one, two):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert float(two[1].detach()) > 1e-3  # the skips move the distributions
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-3)


# -- phase 1 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_a_prefix_share_scores_the_prompt_cut_there(pooling: str):
    """`share` (phase 1's prefixes) gives exactly the keep-probabilities of the shortened prompts."""
    fsm = FirstSkipModel.from_base(TINY)
    torch.manual_seed(0)
    for router in fsm.routers.routers:
        torch.nn.init.normal_(router.down.weight, std=0.5)
    head, tail = (2, 1) if pooling == "mean" else (0, 0)
    fsm.routers.pooling, fsm.routers.head, fsm.routers.tail = pooling, head, tail
    gen = torch.Generator().manual_seed(0)
    rows = [(torch.randint(3, 250, (p + r,), generator=gen).tolist(), p) for p, r in [(9, 3), (14, 6), (7, 2)]]
    share = torch.tensor([0.5, 0.3, 1.0])
    _, probs, _ = prompt_then_response(fsm.model, fsm.engine.controller, fsm.routers, collate(rows, pad_id=0),
                                    lambda probs: (lambda layer, p: p), share)
    cut = []
    for (ids, p), s in zip(rows, share.tolist()):
        kept = head + math.ceil(s * (p - head - tail))
        prompt = ids[:kept] + ids[p - tail:p]  # the template's tail stays: it ends every prompt
        cut.append((prompt + [5], len(prompt)))
    shortened = prompt_keep_probs(fsm.model, fsm.engine.controller, collate(cut, pad_id=0))
    torch.testing.assert_close(probs.detach(), shortened, atol=1e-6, rtol=0)


def test_phase1_fit_is_the_mean_over_response_tokens():
    """Phase 1's fit: the rows' summed token losses (CE + distill KL) over the batch's response tokens,
    so a long answer weighs more than a short one."""
    fsm = fresh()
    gen = torch.Generator().manual_seed(1)
    rows = [(torch.randint(3, 250, (p + r,), generator=gen).tolist(), p) for p, r in [(8, 6), (10, 2), (7, 4)]]
    batch = collate(rows, 0)
    info = loop.StepInfo(step=0, total=10, tokens=12, rows=3, reduce=lambda t: t, gather=lambda t: t)
    skip = torch.zeros(3, fsm.config.num_layers, dtype=torch.bool)
    skip[:, 2] = skip[0, 1] = True
    ce, _, kl = prompt_then_response(fsm.model, fsm.engine.controller, fsm.routers, batch,
                                     lambda probs: hard_gate(skip), distill=True)
    objective = phases.RouterObjective(fsm, RouterTraining(lam=0.0, polarize=0.0, prefixes=0.0, distill=2.0))
    objective._gate = lambda probs, info, tokens: hard_gate(skip)
    assert bool((kl > 0).all())
    torch.testing.assert_close(objective(batch, info)[0].detach(), (ce + 2.0 * kl).sum() / 12)


def test_secant_gates_train_p_on_the_cost_of_the_decision():
    """A picked gate runs at its drawn value and alone passes p's gradient, `scale` times. Averaged over
    uniform values, its slope is L(keep) - L(skip), the cost of the decision (the mean value theorem),
    which the straight-through slope at the kept gate is not."""
    fsm = fresh()
    gen = torch.Generator().manual_seed(3)
    batch = collate([(torch.randint(3, 250, (p + r,), generator=gen).tolist(), p) for p, r in [(9, 6), (7, 5)]], 0)
    picked = torch.zeros(2, fsm.config.num_layers, dtype=torch.bool)
    picked[0, 2] = True

    def slope(gate_fn: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        held = []

        def make_gate(probs: torch.Tensor):
            probs.retain_grad()
            held.append(probs)
            return gate_fn

        ce, _, _ = prompt_then_response(fsm.model, fsm.engine.controller, fsm.routers, batch, make_gate)
        ce.sum().backward()
        return ce.sum().detach(), held[0].grad

    n, scale = 64, 7.0
    grads = [slope(phases.secant_gate(0.5, picked, torch.full(picked.shape, (k + 0.5) / n), scale))[1] for k in range(n)]
    mean = torch.stack(grads).mean(0)
    assert bool((mean[~picked] == 0).all())  # only the picked gate trains p
    skip = torch.zeros_like(picked)
    skip[0, 2] = True
    keep_all, _ = slope(hard_gate(torch.zeros_like(picked)))
    skipped, _ = slope(hard_gate(skip))
    secant = float(keep_all - skipped)
    assert abs(secant) > 1e-3
    assert float(mean[0, 2]) == pytest.approx(scale * secant, rel=2e-3)
    tangent = float(slope(phases.straight_through(0.5))[1][0, 2])
    assert abs(tangent - secant) > 0.1 * abs(secant)


def test_secant_draws_pick_that_many_skippable_layers_a_row_from_seed_and_step_alone():
    fsm = fresh()
    objective = phases.RouterObjective(fsm, RouterTraining(secant=3, skip_target=0.25))
    info = loop.StepInfo(step=5, total=10, tokens=9, rows=4, reduce=lambda t: t, gather=lambda t: t)
    picked, at = objective._secant_draws(info)
    assert picked.sum(-1).tolist() == [3, 3, 3, 3]
    assert not picked[:, fsm.config.protected].any()
    assert bool(((at > 0) & (at < 1))[picked].all())
    assert torch.equal(picked, objective._secant_draws(info)[0])
    assert not torch.equal(picked, objective._secant_draws(dataclasses.replace(info, step=6))[0])
    second = objective._secant_draws(dataclasses.replace(info, rank=1, world=2))  # the second of two processes
    assert torch.equal(second[0], picked[1::2]) and torch.equal(second[1], at[1::2])


@pytest.mark.parametrize("weighted", [False, True])
def test_token_weighted_targets_pull_rows_by_their_response_tokens(weighted):
    """A decode-saving target: a one-token answer's row is barely pulled towards skipping, a long one's is."""
    objective = phases.RouterObjective(fresh(), RouterTraining(skip_target=0.25, token_weighted=weighted))
    p = torch.full((2, 4), 0.9, requires_grad=True)
    tokens = torch.tensor([30, 1])
    info = loop.StepInfo(step=0, total=10, tokens=31, rows=2, reduce=lambda t: t, gather=lambda t: t)
    objective.target_term(p, tokens, info).backward()
    long_row, short_row = p.grad[:, 0].tolist()
    assert long_row > 0 and short_row > 0  # keep-probabilities above the target are pulled down
    assert long_row / short_row == pytest.approx(30 if weighted else 1)


def test_routers_learn_to_skip_the_layers_the_data_rewards(phase1_run, data):
    losses = [r["loss"] for r in log(phase1_run, "routers")]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8
    fsm = FirstSkipModel.from_pretrained(phase1_run)
    probs = keep_probs(fsm, data["test"])
    assert (probs[:, REWARDED] < 0.5).float().mean() > 0.8  # held-out prompts skip the rewarded layers
    assert (probs[:, [1, 4]] >= 0.5).float().mean() > 0.8  # ... and keep the others
    skip = decide(probs, fsm.config)
    keep_all = response_loss(fsm, data["test"], torch.zeros_like(skip))
    assert response_loss(fsm, data["test"], skip) < keep_all - 0.05  # on held-out prompts, hard decisions


def test_skip_target_is_met_after_calibration(data, tmp_path):
    settings = RouterTraining(steps=40, batch_size=8, lr=1e-2, skip_target=0.5, checkpoint_every=0)
    fsm = train_routers(fresh(), data["train"], tmp_path, settings, progress=False)
    wanted = settings.target_keep(fsm.config)
    assert wanted == pytest.approx(0.25)  # 3 of 6 layers skipped = 3 of the 4 skippable ones
    assert log(tmp_path, "routers")[-1]["keep"] == pytest.approx(wanted, abs=0.1)
    result = calibrate(tmp_path, data["held"], skip_target=0.5)
    assert result.skip_ratio == pytest.approx(0.5, abs=0.01)
    reloaded = FirstSkipModel.from_pretrained(tmp_path)
    assert reloaded.config.threshold == result.threshold
    assert skip_ratio(keep_probs(reloaded, data["test"]), reloaded.config, result.threshold) == pytest.approx(0.5, abs=0.05)


def test_threshold_for_ratio_cuts_between_sorted_probabilities():
    config = fresh().config  # 6 layers, 0 and 5 protected
    probs = torch.tensor([[0.9, 0.1, 0.2, 0.8, 0.7, 0.9], [0.9, 0.3, 0.6, 0.4, 0.5, 0.9]])
    for ratio, skips in [(0.0, 0), (1 / 6, 2), (0.25, 3), (0.5, 6), (4 / 6, 8)]:
        threshold = threshold_for_ratio(probs, config, ratio)
        assert int(decide(probs, config.replace(threshold=threshold)).sum()) == skips


def test_max_drop_calibration_respects_the_budget(phase1_run, data, tmp_path):
    run = copy_run(phase1_run, tmp_path)
    tight, loose = (calibrate(run, data["held"], max_drop=x) for x in (0.0, 10.0))
    assert tight.loss_increase <= 0.0 and loose.loss_increase <= 10.0
    assert loose.skip_ratio >= tight.skip_ratio and loose.skip_ratio == pytest.approx(4 / 6)  # all skippable layers
    assert artifacts.load_config(run).training["calibration"]["max_drop"] == 10.0
    with pytest.raises(FirstSkipError, match="exactly one"):
        calibrate(run, data["held"], skip_target=0.2, max_drop=0.1)


@pytest.mark.parametrize("hard_stage", [{"secant": 0}, {"secant": 2}], ids=["straight-through", "secant"])
def test_killed_then_resumed_equals_uninterrupted(data, tmp_path, monkeypatch, hard_stage):
    settings = RouterTraining(steps=12, batch_size=4, lr=1e-2, skip_target=0.3, hard_from=0.5, checkpoint_every=4,
                              **hard_stage)  # the steps replayed after the kill are hard ones (secant draws)
    train_routers(fresh(), data["train"], tmp_path / "whole", settings, progress=False)

    killed_at(monkeypatch, 7, lambda: train_routers(fresh(), data["train"], tmp_path / "killed", settings,
                                                    progress=False))
    assert not (tmp_path / "killed" / artifacts.CONFIG_NAME).exists()  # no half-finished run
    assert json.loads((tmp_path / "killed/checkpoint/state.json").read_text())["step"] == 4
    train_routers(fresh(), data["train"], tmp_path / "killed", settings, resume=True, progress=False)
    whole, resumed = (load_file(tmp_path / name / artifacts.ROUTERS_NAME) for name in ("whole", "killed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert log(tmp_path / "whole", "routers") == log(tmp_path / "killed", "routers")
    assert not (tmp_path / "killed" / loop.CHECKPOINT_DIR).exists()
    # A checkpoint resumes only with the settings that wrote it.
    killed_at(monkeypatch, 7, lambda: train_routers(fresh(), data["train"], tmp_path / "other", settings,
                                                    progress=False))
    changed = RouterTraining(**{**dataclasses.asdict(settings), "lr": 2e-2})
    with pytest.raises(FirstSkipError, match="'lr'"):
        train_routers(fresh(), data["train"], tmp_path / "other", changed, resume=True, progress=False)
    # ... and with the model config that wrote it: these router weights were trained to pool otherwise.
    other_pooling = FirstSkipModel.from_base(TINY, router_pooling="last")
    with pytest.raises(FirstSkipError, match="'router_pooling'"):
        train_routers(other_pooling, data["train"], tmp_path / "other", settings, resume=True, progress=False)


def test_a_checkpoint_written_before_a_setting_existed_resumes_with_its_old_value(data, tmp_path, monkeypatch):
    """Checkpoints from before distillation lack the key; they trained without it (distill=0). Settings
    since removed resume at the value today's training reproduces, and are refused at any other."""
    settings = RouterTraining(steps=8, batch_size=4, lr=1e-2, skip_target=0.3, checkpoint_every=4, distill=0.0,
                              secant=0)  # as before those settings existed
    train_routers(fresh(), data["train"], tmp_path / "whole", settings, progress=False)
    killed_at(monkeypatch, 5, lambda: train_routers(fresh(), data["train"], tmp_path / "old", settings,
                                                    progress=False))
    state_path = tmp_path / "old" / loop.CHECKPOINT_DIR / "state.json"
    state = json.loads(state_path.read_text())
    for key in ("distill", "secant"):
        del state["settings"][key]
    removed = {"per_example": False, "row_tokens": None, "on_policy": 0.0, "leave_one_out": False}
    for changed, refused in (({"per_example": True}, r"\['distill', 'per_example'\]"),
                             ({"row_tokens": 16}, r"\['distill', 'row_tokens'\]"),
                             ({}, r"\['distill'\] .*distill=0.0")):
        state_path.write_text(json.dumps({**state, "settings": {**state["settings"], **removed, **changed}}))
        with pytest.raises(FirstSkipError, match=refused):
            train_routers(fresh(), data["train"], tmp_path / "old", RouterTraining(**{**dataclasses.asdict(settings),
                                                                                   "distill": 1.0}),
                          resume=True, progress=False)
    train_routers(fresh(), data["train"], tmp_path / "old", settings, resume=True, progress=False)
    whole, resumed = (load_file(tmp_path / name / artifacts.ROUTERS_NAME) for name in ("whole", "old"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_two_processes_agree_with_one(text_tiny, tmp_path):
    """The whole recipe (routers, calibration, LoRA) under `accelerate launch` with two processes."""
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate's launcher is not installed")
    options = dict(skip_target=0.3, lora=True, max_steps=4, batch_size=6, limit=12, holdout=4, max_length=48,
                   progress=False)  # its last router step is a hard one, with secant draws
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\n"
        "from firstskip import models\n"
        "from firstskip.train import train\n"
        f"{inspect.getsource(ByteTokenizer)}\n"
        "models._preset_tokenizer = lambda preset: ByteTokenizer()\n"
        f"train({TINY!r}, {text_tiny!r}, sys.argv[1], **{options!r})\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --multi_gpu starts one process per rank through torch.distributed.run; without GPUs they use
    # gloo on the CPU (`--cpu --num_processes 2` would start a single process).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                          str(script), str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {r["processes"] for r in log(tmp_path / "two", "routers") + log(tmp_path / "two", "lora")} == {2}
    train(TINY, text_tiny, tmp_path / "one", **options)
    for name in (artifacts.ROUTERS_NAME, "adapter/adapter_model.safetensors"):
        one, two = (load_file(tmp_path / run / name) for run in ("one", "two"))
        for key in one:
            # gloo sums the two halves of each gradient in another order than one process does
            torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=1e-4)
    configs = [artifacts.load_config(tmp_path / run) for run in ("one", "two")]
    assert configs[0].threshold == pytest.approx(configs[1].threshold, abs=1e-5)


# -- phase 2 ---------------------------------------------------------------------------------------

LORA = LoraTraining(steps=10, batch_size=8, lr=1e-2, rank=4, checkpoint_every=0)


@pytest.mark.parametrize("prefill", ["full", "early"])
def test_phase2_leaves_routers_untouched_and_decides_like_inference(phase1_run, data, tmp_path, monkeypatch, prefill):
    """In `early` prefill (here after 2 tokens: the prompts are short) the routers read the start of
    each prompt and the rest of it passes the gates with the response."""
    monkeypatch.setattr("firstskip.config.EARLY_TOKENS", 2)
    run = copy_run(phase1_run, tmp_path)
    fsm = FirstSkipModel.from_pretrained(run)
    fsm.update_config(prefill=prefill)
    before = {k: v.clone() for k, v in fsm.routers.state_dict().items()}
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    split: list[bool] = []  # a batch whose prompts the routers read only in part
    real = phases.prompt_then_response

    def spy(model, controller, routers, batch, make_gate, **kwargs):  # the skips applied, and inference's
        lengths = ((batch.labels != -100).long().argmax(-1) + 1).tolist()  # a prompt ends where labels start
        heads = batch.prompt_mask.sum(-1).tolist()
        assert heads == [fsm.config.decision_tokens(n) for n in lengths]
        split.append(heads != lengths)
        prompts = [row[:n].tolist() for row, n in zip(batch.input_ids, lengths)]
        inference = fsm.engine.prefill(prompts).skip

        def recording(probs):
            gate = make_gate(probs)
            ones = torch.ones(len(prompts))
            steps.append((torch.stack([gate(layer, ones) == 0 for layer in range(probs.shape[1])], -1), inference))
            return gate

        return real(model, controller, routers, batch, recording, **kwargs)

    def loss() -> float:  # on the training data, with the skip sets inference would choose
        return response_loss(fsm, data["pattern"], decide(keep_probs(fsm, data["pattern"]), fsm.config))

    untrained = loss()
    monkeypatch.setattr(phases, "prompt_then_response", spy)
    train_lora(fsm, data["pattern"], run, LORA, progress=False)
    monkeypatch.setattr(phases, "prompt_then_response", real)
    assert all(split) == (prefill == "early") and split
    assert all(torch.equal(before[k], v) for k, v in fsm.routers.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in load_file(run / artifacts.ROUTERS_NAME).items())
    assert loss() < untrained - 0.5
    assert all(torch.equal(applied, decided) for applied, decided in steps)
    assert any(applied.any() for applied, _ in steps)
    # ... and the training pass decides as the engine's prefill does (same model, same prompts).
    batch = collate(data["test"][:8], pad_id=0)
    prompts = [ids[:n] for ids, n in data["test"][:8]]
    _, _, probs = gated_forward(fsm.model, fsm.engine.controller, decision_prompt(batch, fsm.config),
                                lambda layer, p: p)
    assert torch.equal(fsm.engine.prefill(prompts).skip, decide(probs, fsm.config))


def test_lora_resume_with_dropout_equals_uninterrupted(phase1_run, data, tmp_path, monkeypatch):
    settings = LoraTraining(steps=6, batch_size=4, lr=1e-2, rank=4, dropout=0.1, checkpoint_every=2)
    whole = copy_run(phase1_run, tmp_path / "a")
    train_lora(FirstSkipModel.from_pretrained(whole), data["train"], whole, settings, progress=False)
    killed = copy_run(phase1_run, tmp_path / "b")
    killed_at(monkeypatch, 3, lambda: train_lora(FirstSkipModel.from_pretrained(killed), data["train"], killed,
                                                 settings, progress=False))
    assert artifacts.load_config(killed).lora is None  # the routers-only run is still intact
    train_lora(FirstSkipModel.from_pretrained(killed), data["train"], killed, settings, resume=True, progress=False)
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("merge", [False, True])
def test_saved_and_reloaded_runs_generate_identically(phase1_run, data, tmp_path, merge):
    run = copy_run(phase1_run, tmp_path)
    trained = train_lora(FirstSkipModel.from_pretrained(run), data["train"], run, LORA, merge=merge, progress=False)
    config = artifacts.load_config(run)
    assert config.merged == merge and config.lora["r"] == 4
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "model").is_dir() == merge
    reloaded = FirstSkipModel.from_pretrained(run)
    prompts = [ids[:n] for ids, n in data["test"][:6]]
    sampling = Sampling(max_new_tokens=8)
    first, second = (m.engine.generate(prompts, sampling) for m in (trained, reloaded))
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert [g.skipped_layers for g in first] == [g.skipped_layers for g in second]
    assert any(g.skipped_layers for g in first)


# -- the recipe and the CLI ------------------------------------------------------------------------

class ByteTokenizer:
    """Bytes as token ids (the tiny models' vocabulary is 256), enough for the recipe's text path."""

    eos_token_id, pad_token_id, chat_template = 2, 0, None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i > 2).decode("utf-8", "replace")

    def save_pretrained(self, folder) -> None:
        pass


@pytest.fixture
def text_tiny(monkeypatch, shared_data):
    monkeypatch.setattr(models, "_preset_tokenizer", lambda preset: ByteTokenizer())
    monkeypatch.setattr(models, "_pretrained_tokenizer", lambda source: ByteTokenizer())  # merged runs' folders
    return [str(shared_data / name) for name in ("samsum", "boolq")]


def test_recipe_runs_both_phases_and_refuses_to_overwrite(text_tiny, tmp_path):
    options = dict(skip_target=0.25, lora=True, merge=True, max_steps=2, batch_size=4, limit=8, holdout=6,
                   max_length=48, progress=False)
    fsm = train(TINY, text_tiny, tmp_path, **options)
    config = artifacts.load_config(tmp_path)
    assert config.merged and config.training["calibration"]["examples"] == 12
    assert config.threshold == fsm.config.threshold and {"routers", "lora"} <= set(config.training)
    with pytest.raises(FirstSkipError, match="--resume .* --overwrite"):
        train(TINY, text_tiny, tmp_path, **options)
    with pytest.raises(FirstSkipError, match="rank"):  # a bad setting fails before --overwrite removes anything
        train(TINY, text_tiny, tmp_path, **options, lora_rank=0, overwrite=True)
    assert artifacts.load_config(tmp_path).threshold == config.threshold
    again = train(TINY, text_tiny, tmp_path, **options, resume=True)  # finished: nothing runs again
    assert again.config.threshold == config.threshold and len(log(tmp_path, "routers")) == 2
    train(TINY, text_tiny, tmp_path, **{**options, "lora": False, "merge": False}, overwrite=True)
    assert not (tmp_path / "model").exists() and artifacts.load_config(tmp_path).lora is None


def test_recipe_killed_in_lora_resumes_from_its_checkpoint(text_tiny, tmp_path, monkeypatch):
    """The resumed process loads the run from disk; its config must match the one the checkpoint
    was written under (in memory, after the first calibration), or --resume would refuse."""
    options = dict(skip_target=0.25, lora=True, max_steps=4, batch_size=4, limit=8, holdout=6, max_length=48,
                   progress=False)
    monkeypatch.setattr(recipe, "LoraTraining", lambda **kw: LoraTraining(**kw, checkpoint_every=2))
    train(TINY, text_tiny, tmp_path / "whole", **options)

    def kill(step: int) -> None:
        if step == 3 and (tmp_path / "killed" / "checkpoint/state.json").is_file():
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_after_step", kill)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, text_tiny, tmp_path / "killed", **options)
    assert json.loads((tmp_path / "killed/checkpoint/state.json").read_text())["phase"] == "lora"
    monkeypatch.setattr(loop, "_after_step", lambda step: None)
    train(TINY, text_tiny, tmp_path / "killed", **options, resume=True)
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("whole", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("crash_at", [1, 2])
def test_recipe_resumes_after_a_crash_around_calibration(text_tiny, tmp_path, monkeypatch, crash_at):
    """Killed before the first (after phase 1) or the second (after LoRA) calibration, --resume does it."""
    options = dict(skip_target=0.25, lora=True, max_steps=2, batch_size=4, limit=8, holdout=6, max_length=48,
                   progress=False)
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(recipe, "calibrate", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, text_tiny, tmp_path, **options)
    monkeypatch.setattr(recipe, "calibrate", calibrate)
    train(TINY, text_tiny, tmp_path, **options, resume=True)
    training = artifacts.load_config(tmp_path).training
    assert training["calibration"]["skip_ratio"] == pytest.approx(0.25, abs=0.02)
    assert training["calibration_before_lora"]["examples"] == 12 and len(log(tmp_path, "lora")) == 2


@pytest.mark.parametrize("args, message", [
    (["--skip-target", "0.2", "--lambda", "0.01"], "not both"),
    (["--merge"], "add --lora"),
    (["--resume", "--overwrite"], "one of them"),
    (["--skip-target", "0.9"], "skippable"),
    (["--skip-target", "0.2", "--saving-target", "0.2"], "not both"),
])
def test_train_command_errors_are_one_line(text_tiny, tmp_path, args, message):
    result = CliRunner().invoke(app, ["train", "-m", TINY, "--data", text_tiny[1], "--out", str(tmp_path / "r"),
                                      "--max-steps", "1", "--limit", "4", *args])
    assert isinstance(result.exception, FirstSkipError) and message in str(result.exception)
    assert "\n" not in str(result.exception)


def test_a_saving_target_trains_token_weighted_routers_and_calibrates_to_that_saving(text_tiny, tmp_path):
    result = CliRunner().invoke(app, ["train", "-m", TINY, "--data", text_tiny[0], "--data", text_tiny[1], "--out",
                                      str(tmp_path), "--saving-target", "0.3", "--max-steps", "2", "--limit", "8",
                                      "--batch-size", "4", "--holdout", "6", "--max-length", "48"])
    assert result.exit_code == 0, result.output
    training = artifacts.load_config(tmp_path).training
    assert training["routers"]["token_weighted"] and training["routers"]["skip_target"] == 0.3
    calibration = training["calibration"]
    assert calibration["saving_target"] == 0.3 and calibration["skip_target"] is None
    assert calibration["saving"] == pytest.approx(0.3, abs=0.1)  # as near as 12 prompts' decisions allow


def test_calibrate_command_stores_the_threshold(text_tiny, tmp_path, monkeypatch):
    train(TINY, text_tiny, tmp_path, max_steps=2, batch_size=4, limit=8, max_length=48, seed=3, progress=False)
    seeds = []
    monkeypatch.setattr(firstskip.train, "held_out_examples",
                        lambda *args: seeds.append(args[2]) or recipe.held_out_examples(*args))
    result = CliRunner().invoke(app, ["calibrate", "--run", str(tmp_path), "--data", text_tiny[0],
                                      "--data", text_tiny[1], "--skip-target", "0.5", "--limit", "8"])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.output.strip().splitlines()[-1])
    assert reply["examples"] == 16 and reply["skip_ratio"] == pytest.approx(0.5, abs=0.02)
    assert artifacts.load_config(tmp_path).threshold == reply["threshold"]
    assert seeds == [3]  # the run's own seed: the examples `train` held out, not training examples


# -- static-set runs: the fair rival ----------------------------------------------------------
def test_a_static_set_run_trains_lora_under_its_set_and_never_skips_outside_it(text_tiny, tmp_path):
    base = FirstSkipModel.from_base(TINY)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    fsm = train(TINY, text_tiny, tmp_path, lora=True, static="layers:2,3", max_steps=2, batch_size=4, limit=8,
                max_length=48, progress=False)
    config = artifacts.load_config(tmp_path)
    assert config.static_skip == [2, 3] and "routers" not in config.training and config.lora is not None
    assert fsm.config.training["lora"]["final"]["skip"] == pytest.approx(2 / 6, abs=1e-4)  # LoRA trained under the set
    run = FirstSkipModel.from_pretrained(tmp_path, merge_adapter=False)  # the adapter beside the base
    base_weights = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                    for k, v in run.model.state_dict().items() if "lora_" not in k}
    assert base_weights.keys() == before.keys() and all(torch.equal(before[k], v) for k, v in base_weights.items())
    delta = fsm.model.state_dict()["model.layers.1.self_attn.q_proj.weight"] - before["model.layers.1.self_attn.q_proj.weight"]
    assert 0 < torch.linalg.matrix_rank(delta) <= 8  # training moved LoRA's low-rank delta only
    ids = [[5, 6, 7, 8, 9], [40, 41, 42], [100] * 12]
    for threshold in (0.0, 1.0):  # no router decides, whatever the threshold
        run.set_decision(threshold=threshold)
        assert [g.skipped_layers for g in run.engine.generate(ids, Sampling(max_new_tokens=3))] == [[2, 3]] * 3


def test_a_plain_lora_run_skips_nothing(text_tiny, tmp_path):
    train(TINY, text_tiny, tmp_path, lora=True, static="none", max_steps=1, batch_size=4, limit=4, max_length=48,
          progress=False)
    run = FirstSkipModel.from_pretrained(tmp_path)
    assert run.config.static_skip == [] and run.engine.generate([[5, 6, 7]])[0].skipped_layers == []


def test_static_sets_are_the_baselines_measured_on_this_model(text_tiny):
    fsm = FirstSkipModel.from_base(TINY)
    encoded = [(list(range(3, 40)), 20), (list(range(50, 90)), 10)]
    bi = firstskip.baselines.block_influence(fsm.model, [{"input_ids": collate(encoded, 0).input_ids,
                                                           "attention_mask": collate(encoded, 0).attention_mask}])
    ctx = firstskip.baselines.BaselineContext(6, (0, 5), block_influence=bi)
    assert recipe.static_layers(fsm, "shortgpt", 0.34, encoded) == firstskip.baselines.shortgpt(ctx, 2)
    assert recipe.static_layers(fsm, "last", 0.5, encoded) == [2, 3, 4]
    assert recipe.static_layers(fsm, "layers:4,1", None, encoded) == [1, 4]
    for spec, target, message in (("bogus", 0.25, "--static takes"), ("uls", None, "needs --skip-target"),
                                  ("layers:1,x", None, "layer numbers"), ("layers:9", None, "outside")):
        with pytest.raises(FirstSkipError, match=message):
            recipe.static_layers(fsm, spec, target, encoded)
    with pytest.raises(FirstSkipError, match="add --lora"):
        train(TINY, text_tiny, "unused", static="none")
