"""Tier 1: the step plan when a time budget cuts a run: warm-up as a share of the steps that fit, the steps of one
epoch, and the rescaled learning-rate schedule (a real torch LambdaLR)."""

from __future__ import annotations

import pytest

from finetune_pipeline.spec import TrainingSpec
from finetune_pipeline.training.configs import budget_warmup_steps, epoch_steps, warmup_steps

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("fields", "planned", "fit", "warm"),
    [
        ({"warmup_ratio": 0.05}, 400, 65, 3),  # the case: 5% of 65, not 20 of the 400 planned
        ({"warmup_ratio": 0.1}, 400, 400, 40),
        ({"warmup_steps": 20}, 400, 65, 3),  # an explicit count keeps its share of the run (20/400)
        ({"warmup_steps": 20}, 40, 4, 2),
        ({"warmup_ratio": 0.0}, 400, 65, 0),
    ],
)
def test_budget_warmup_is_a_share_of_the_steps_that_fit(fields: dict, planned: int, fit: int, warm: int) -> None:
    t = TrainingSpec(max_steps=planned, **fields)
    assert budget_warmup_steps(t, planned, fit) == warm
    assert budget_warmup_steps(t, planned, planned) == warmup_steps(t, planned)


def test_epoch_steps_count_the_effective_batch() -> None:
    t = TrainingSpec(max_steps=1, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    assert epoch_steps(t, 1911) == 120  # ceil(1911 / 16)
    assert epoch_steps(t, 0) == 1


def test_rescaled_schedule_warms_up_and_decays_within_the_budget() -> None:
    import torch
    from transformers import get_scheduler

    from finetune_pipeline.training.callbacks import rescale_schedule

    t = TrainingSpec(max_steps=400, warmup_ratio=0.05)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_scheduler("linear", opt, num_warmup_steps=warmup_steps(t, 400), num_training_steps=400)
    for _ in range(4):  # the calibration steps run on the planned schedule
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(4 / 20)  # still warming up toward step 20 of 400
    rescale_schedule(sched, "linear", budget_warmup_steps(t, 400, 65), 65)
    lrs = []
    for _ in range(4, 65):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[0] == pytest.approx((65 - 5) / (65 - 3))  # past the 3-step warm-up: decaying
    assert lrs[-1] == pytest.approx(0.0)  # the decay ends at the last step that fits


@pytest.mark.parametrize(
    ("attention", "max_length", "use_cuda", "kernel"),
    [
        ("auto", 512, False, "eager"),  # short rows on a CPU: eager (the CPU flash-attention backward is slow)
        ("auto", 1024, False, "eager"),  # the bound itself
        ("auto", 2048, False, "sdpa"),  # long rows: eager's attention matrices grow with the length squared
        ("auto", 512, True, "sdpa"),  # CUDA: sdpa's fused kernels
        ("eager", 4096, True, "eager"),  # a named kernel is taken as it is
        ("sdpa", 128, False, "sdpa"),
    ],
)
def test_attention_kernel_rule(attention: str, max_length: int, use_cuda: bool, kernel: str) -> None:
    from finetune_pipeline.training.configs import attention_kernel

    t = TrainingSpec(attention=attention, max_length=max_length)
    assert attention_kernel(t, use_cuda) == kernel


@pytest.mark.parametrize(
    ("parameters", "method", "batch", "lr"),
    [
        (135_000_000, "lora", 8, 1.02e-3),  # the packaged SmolLM2-135M at the default batch: today's 1e-3
        (7_000_000_000, "lora", 16, 2e-4),  # the anchor: QLoRA's published 7B setting
        (7_000_000_000, "qlora", 64, 4e-4),  # square-root batch scaling
        (70_000_000_000, "lora", 16, 6.32e-5),  # larger models take smaller steps
        (1_000_000, "lora", 8, 2e-3),  # a tiny model: capped at 2e-3
        (135_000_000, "full", 8, 5.09e-5),  # full fine-tuning: a 20x smaller anchor
        (500_000_000_000, "full", 1, 1e-6),  # floored
    ],
)
def test_default_learning_rate_rule(parameters: int, method: str, batch: int, lr: float) -> None:
    from finetune_pipeline.training.configs import default_learning_rate

    assert default_learning_rate(parameters, method, batch) == pytest.approx(lr, rel=1e-3)


def test_sft_config_refuses_an_unresolved_learning_rate() -> None:
    from finetune_pipeline.spec import RuntimeSpec
    from finetune_pipeline.training.configs import sft_config

    with pytest.raises(ValueError, match="learning_rate is left out"):
        sft_config(
            TrainingSpec(), RuntimeSpec(), output_dir="x", use_cuda=False, dtype="float32", do_eval=False, saving=False
        )


def _estimate(per_row: float, fixed: float = 1000.0):  # noqa: ANN202 - a linear memory model: fixed + per row
    return lambda micro: fixed + per_row * micro


@pytest.mark.parametrize(
    ("effective", "per_row", "budget", "micro", "accumulation", "fits"),
    [
        (8, 100.0, 18_000.0, 8, 1, True),  # fits at 8: today's 8 x 1
        (8, 5_000.0, 12_000.0, 2, 4, True),  # 8 (41,000 MB) and 4 (21,000) do not fit; 2 (11,000) does
        (8, 5_000.0, 5_000.0, 1, 8, False),  # not even 1 (6,000 MB) fits: 1, with the warning's reason
        (6, 5_000.0, 17_000.0, 3, 2, True),  # not a power of two: the divisors 6, 3, 2, 1 (6 needs 31,000 MB)
        (6, 5_000.0, 12_000.0, 2, 3, True),
    ],
    ids=["fits-at-8", "fits-at-2", "nothing-fits", "six-by-3", "six-by-2"],
)
def test_micro_batch_rule(
    effective: int, per_row: float, budget: float, micro: int, accumulation: int, fits: bool
) -> None:
    from finetune_pipeline.training.configs import choose_micro_batch

    est = _estimate(per_row)
    got = choose_micro_batch(effective, est, budget)
    assert (got.micro, got.accumulation, got.fits) == (micro, accumulation, fits)
    assert got.micro * got.accumulation == effective  # the effective batch, and the learning, unchanged
    assert got.estimate_mb == est(micro) and got.budget_mb == budget
    assert f"{est(micro):,.0f} MB of a {budget:,.0f} MB budget" in got.reason
    if fits and micro < effective:  # the next larger candidate, and what it would have needed
        larger = min(m for m in range(micro + 1, effective + 1) if effective % m == 0)
        assert f"; {larger} would need {est(larger):,.0f} MB" in got.reason
    if not fits:
        assert "exceeds the budget" in got.reason
        assert all(fix in got.reason for fix in ("gradient_checkpointing", "max_length", "qlora"))


def test_micro_batch_message_names_the_product_and_the_next_size() -> None:
    from finetune_pipeline.training.configs import choose_micro_batch

    got = choose_micro_batch(8, _estimate(29.25, 1000.0), 18_000.0)
    assert got.message() == (
        "micro-batch 8 x accumulation 1 (effective batch 8), chosen from the memory estimate: 1,234 MB of a "
        "18,000 MB budget; 16 would need 1,468 MB and change the effective batch (set "
        "training.per_device_train_batch_size to use it)"
    )


@pytest.mark.parametrize(
    ("fields", "micro", "accumulation", "left_out"),
    [
        ({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3}, 4, 3, False),  # both set: as given
        ({"per_device_train_batch_size": 4}, 4, 1, False),  # only the micro-batch: accumulation 1
        ({"gradient_accumulation_steps": 3}, 8, 3, False),  # only accumulation: micro-batch 8
        ({}, 8, 1, True),  # both left out: 8 x 1 until choose_micro_batch splits the 8
        ({"num_processes": 2}, 8, 1, True),
    ],
    ids=["both-set", "micro-set", "accumulation-set", "none-set", "none-set-two-processes"],
)
def test_batch_defaults(fields: dict, micro: int, accumulation: int, left_out: bool) -> None:
    from finetune_pipeline.training.configs import batch_fields, batch_left_out, effective_batch, given_micro_batch

    t = TrainingSpec(max_steps=1, **fields)
    assert batch_fields(t) == (micro, accumulation)
    assert batch_left_out(t) is left_out
    assert effective_batch(t) == micro * accumulation * t.num_processes
    given = given_micro_batch(t)
    assert (given is None) if left_out else ((given.micro, given.accumulation) == (micro, accumulation))


def test_batch_fields_stay_positive_when_set() -> None:
    from pydantic import ValidationError

    for field in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        with pytest.raises(ValidationError):
            TrainingSpec(**{field: 0})
        assert getattr(TrainingSpec(), field) is None
