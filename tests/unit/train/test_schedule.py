from __future__ import annotations

import pytest
import torch

from finetune.config.schema import OptimConfig
from finetune.train.schedule import build_scheduler, lr_factor


def test_warmup_then_cosine_to_min() -> None:
    f = [lr_factor(s, total_steps=10, warmup=2, kind="cosine", min_ratio=0.1) for s in range(11)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))
    assert f[10] == pytest.approx(0.1)


def test_linear_and_constant() -> None:
    assert lr_factor(5, total_steps=10, warmup=0, kind="linear", min_ratio=0.0) == 0.5
    assert lr_factor(7, total_steps=10, warmup=0, kind="constant", min_ratio=0.0) == 1.0


def test_scheduler_state_resumes_exactly() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(lr=1.0, warmup_steps=3)
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(opt, cfg, total_steps=20)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([param], lr=1.0)
    sched2 = build_scheduler(opt2, cfg, total_steps=20)
    sched2.load_state_dict(state)
    opt.step()
    sched.step()
    opt2.step()
    sched2.step()
    assert sched.get_last_lr() == sched2.get_last_lr()
