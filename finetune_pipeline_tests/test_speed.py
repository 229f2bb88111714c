"""Tier 2: LoRA in the base weights' half precision (training.speed.half_precision_lora) on the tiny model: the
adapted layers run in bf16 under autocast while the adapter weights stay float32, every adapter tensor trains, the
loss curve matches peft's float32 path closely, and forwards outside training (evaluation, generation) still work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec
from finetune_pipeline_tests.conftest import chat_row

pytestmark = pytest.mark.integration

ROWS = [json.dumps(chat_row(i)["messages"]) for i in range(40)]
BF16 = ModelSpec(dtype="bfloat16", allow_slow_dtype=True, lora={"r": 4, "alpha": 8, "dropout": 0.0})


def test_adapted_layers_run_in_bf16_with_float32_adapter_weights(tiny_model: Path) -> None:
    import torch
    from peft import get_peft_model

    from finetune_pipeline.models.base import load_model
    from finetune_pipeline.training.configs import lora_config
    from finetune_pipeline.training.speed import half_precision_lora

    model = get_peft_model(load_model(str(tiny_model), BF16, for_training=True), lora_config(BF16.lora))
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    assert half_precision_lora(model, "bfloat16") == n_lora > 0
    seen: list[torch.dtype] = []
    a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    a.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert seen == [torch.bfloat16]  # the adapter's product ran in bf16
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)
    with torch.no_grad():  # evaluation and generation go through the same hooks
        model.eval()
        assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape[1] == 7
    assert half_precision_lora(model, "float32") == 0


def test_autocast_follows_the_device_of_the_input_not_the_one_named_at_setup(tiny_model: Path) -> None:
    """The trainer moves the model to CUDA after the hooks are set: a hook that kept the device named at setup ran
    its autocast on the CPU while the products ran on CUDA, and every bf16 LoRA run on a GPU failed ("expected mat1
    and mat2 to have the same dtype", seen on an H200). Mirrored here: hooks set for "cuda", the forward on the CPU."""
    import torch
    from peft import get_peft_model

    from finetune_pipeline.models.base import load_model
    from finetune_pipeline.training.configs import lora_config
    from finetune_pipeline.training.speed import half_precision_lora

    model = get_peft_model(load_model(str(tiny_model), BF16, for_training=True), lora_config(BF16.lora))
    assert half_precision_lora(model, "bfloat16", device="cuda") > 0
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_training_matches_the_float32_adapter_path(tiny_model: Path, tmp_path: Path) -> None:
    from finetune_pipeline.training.sft import TrainRequest, train

    t = TrainingSpec(max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3, max_length=128)
    results = {}
    for on in (True, False):
        req = TrainRequest(
            base_path=str(tiny_model),
            model=BF16,
            training=t.model_copy(update={"half_precision_lora": on}),
            runtime=RuntimeSpec(logging_steps=1, calibration_steps=0, eos_check_samples=0),
            train_messages=ROWS[:32],
            eval_messages=ROWS[32:],
            output_dir=tmp_path / str(on),
            save=False,
        )
        results[on] = train(req, log=lambda m: None)
    fast, slow = results[True], results[False]
    assert fast.dtype == "bfloat16" and fast.lora_tensors_changed == fast.lora_tensors_total > 0
    assert fast.loss_history[-1][1] < fast.loss_history[0][1]
    assert fast.loss_history[0][1] == pytest.approx(slow.loss_history[0][1], rel=0.02)
    assert fast.eval_loss == pytest.approx(slow.eval_loss, rel=0.05)
