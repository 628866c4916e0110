"""Shared fixtures: tiny seeded models of every family, the packaged SmolLM2, one tolerance table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from firstskip.families import FAMILIES
from firstskip.models import load_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# One place for numeric tolerances, by dtype (torchtune's habit): batching and padding change
# reduction order, so logits agree to rounding error, not bit for bit.
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny(model_type: str, seed: int = 0):
    """A tiny random model of one family (6 layers, width 64), in eval mode."""
    return load_model(f"random:tiny-{model_type}", seed=seed)[0]


@pytest.fixture(params=sorted(FAMILIES))
def tiny_model(request):
    return tiny(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The packaged real model (converted into the user cache on first use)."""
    try:
        return load_model("smollm2-135m")
    except Exception as err:  # the wheel is part of the documented set-up; say so if missing
        pytest.fail(f"packaged smollm2-135m unavailable: {err}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA
