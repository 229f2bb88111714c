"""Integration tier: real trl training on a tiny model (training/sft.py): every LoRA weight changes, the left-out
learning rate and micro-batch chosen, logged and recorded, same seed same weights, full fine-tuning, QLoRA on CPU and
its merge, the lean loss equal to trl's, adapter variants, early stopping, padding-free and packing, a Llama-3
tokenizer's end of turn; evaluation of base and tuned."""

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from finetune_pipeline.spec import EvaluationSpec, ModelSpec, RuntimeSpec, TrainingSpec
from finetune_pipeline_tests.conftest import chat_row

pytestmark = pytest.mark.integration

ROWS = [json.dumps(chat_row(i)["messages"]) for i in range(48)]
RT = RuntimeSpec(logging_steps=1)
TRAIN = TrainingSpec(max_steps=8, per_device_train_batch_size=4, learning_rate=5e-3, max_length=128)
LORA = ModelSpec(lora={"r": 4, "alpha": 8, "dropout": 0.0})


def request(base: str, model: ModelSpec, training: TrainingSpec, train: list, val: list, out: Path, **kw: Any) -> Any:
    """A TrainRequest with the data given in order (as the tests below read best)."""
    from finetune_pipeline.training.sft import TrainRequest

    return TrainRequest(
        base_path=base, model=model, training=training, train_messages=train, eval_messages=val, output_dir=out, **kw
    )


def test_lora_training_changes_every_adapter_weight_and_lowers_loss(tiny_model: Path, tmp_path: Path) -> None:
    from finetune_pipeline.training.sft import train

    res = train(
        request(str(tiny_model), LORA, TRAIN, ROWS[:40], ROWS[40:], tmp_path / "a", runtime=RT), log=lambda m: None
    )
    assert res.steps == 8 and len(res.loss_history) == 8
    assert res.loss_history[-1][1] < res.loss_history[0][1]
    assert res.lora_tensors_total > 0 and res.lora_tensors_changed == res.lora_tensors_total
    assert res.train_tokens > 0 and res.tokens_per_second > 0
    assert 0 < res.trainable_params < res.total_params / 10
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert (tmp_path / "a" / "chat_template.jinja").exists() or "chat_template" in (
        tmp_path / "a" / "tokenizer_config.json"
    ).read_text()
    assert not list((tmp_path / "a").glob("*.bin")), "only safetensors are written"


def test_a_left_out_learning_rate_is_chosen_by_the_rule_logged_and_recorded(tiny_model: Path, tmp_path: Path) -> None:
    from finetune_pipeline.training.configs import default_learning_rate
    from finetune_pipeline.training.sft import train

    lines: list[str] = []
    t = TRAIN.model_copy(update={"learning_rate": None, "max_steps": 2})
    res = train(request(str(tiny_model), LORA, t, ROWS[:8], [], tmp_path / "a", runtime=RT), log=lines.append)
    from transformers import AutoModelForCausalLM

    params = AutoModelForCausalLM.from_pretrained(tiny_model).num_parameters()
    expected = default_learning_rate(params, "lora", 4)
    assert res.learning_rate == expected
    assert any(ln.startswith(f"learning rate {expected:.3g}: training.learning_rate left out") for ln in lines), lines
    import torch

    kernel = "sdpa" if torch.cuda.is_available() else "eager"  # attention auto: eager on a CPU for rows <= 1024
    assert any(f"{kernel} attention" in ln for ln in lines), lines


@pytest.mark.parametrize(("budget", "micro"), [(None, 8), (1.0, 1)], ids=["this-machine", "nothing-fits"])
def test_a_left_out_batch_is_split_by_the_memory_estimate_logged_and_recorded(
    budget: float | None, micro: int, tiny_model: Path, tmp_path: Path
) -> None:
    from finetune_pipeline.training.child import cost_metadata
    from finetune_pipeline.training.sft import train

    lines: list[str] = []
    t = TRAIN.model_copy(update={"per_device_train_batch_size": None, "max_steps": 2})
    req = request(str(tiny_model), LORA, t, ROWS[:16], [], tmp_path / "a", runtime=RT, memory_budget_mb=budget)
    res = train(req, log=lines.append)
    assert (res.micro_batch, res.gradient_accumulation_steps) == (micro, 8 // micro)  # the effective batch stays 8
    line = next(ln for ln in lines if "micro-batch" in ln)
    print(line)
    warning = "" if budget is None else "warning: "  # a 1 MB budget: nothing fits, 1 x 8 and what to change
    head = f"{warning}micro-batch {micro} x accumulation {8 // micro} (effective batch 8), chosen from the memory"
    assert line.startswith(head), line
    assert res.memory_budget_mb is not None and f"of a {res.memory_budget_mb:,.0f} MB budget" in line
    if budget is None:  # the tiny model fits at 8 on any machine that runs the tests
        assert res.memory_budget_mb > res.memory_estimate_mb["total_mb"] and "; 16 would need" in line
    else:
        assert "exceeds the budget even at micro-batch 1" in line and "gradient_checkpointing" in line
    meta = cost_metadata(res)
    assert (meta["micro_batch"], meta["gradient_accumulation_steps"]) == (micro, 8 // micro)
    order = (tmp_path / "a" / "data_order.jsonl").read_text().splitlines()
    assert len(order) == 2 * (8 // micro)  # one record per micro-batch trained: the trainer used the choice


def test_a_resumed_run_keeps_the_micro_batch_of_its_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    """The budget at resume time may differ: the run keeps its checkpoint's micro-batch (the same batches)."""
    from finetune_pipeline.training.sft import train

    t = TRAIN.model_copy(update={"per_device_train_batch_size": None, "max_steps": 2})
    rt = RuntimeSpec(logging_steps=1, save_steps=1, calibration_steps=0, eos_check_samples=0)
    kw = {"runtime": rt, "checkpoint_dir": tmp_path / "ckpt"}
    first = train(request(str(tiny_model), LORA, t, ROWS[:16], [], tmp_path / "a", memory_budget_mb=1.0, **kw))
    lines: list[str] = []
    again = train(request(str(tiny_model), LORA, t, ROWS[:16], [], tmp_path / "b", **kw), log=lines.append)
    assert (first.micro_batch, again.micro_batch, again.gradient_accumulation_steps) == (1, 1, 8)
    assert "micro-batch 1 x accumulation 8 (effective batch 8), kept from checkpoint-2 (resumed)" in lines, lines


def test_lora_same_seed_same_adapter(tiny_model: Path, tmp_path: Path) -> None:
    from finetune_pipeline.training.sft import train

    short = TRAIN.model_copy(update={"max_steps": 3})
    for d in ("l1", "l2"):
        train(request(str(tiny_model), LORA, short, ROWS[:16], [], tmp_path / d, runtime=RT), log=lambda m: None)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("l1", "l2"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_full_finetune_and_same_seed_same_weights(tiny_model: Path, tmp_path: Path) -> None:
    from finetune_pipeline.training.sft import train

    full = ModelSpec(method="full")
    short = TRAIN.model_copy(update={"max_steps": 3})
    a = train(request(str(tiny_model), full, short, ROWS[:16], [], tmp_path / "f1", runtime=RT), log=lambda m: None)
    train(request(str(tiny_model), full, short, ROWS[:16], [], tmp_path / "f2", runtime=RT), log=lambda m: None)
    assert a.trainable_params == a.total_params
    wa, wb = load_file(tmp_path / "f1" / "model.safetensors"), load_file(tmp_path / "f2" / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_evaluation_scores_base_and_tuned_and_caches_the_base_outputs(tiny_model: Path, tmp_path: Path) -> None:
    from finetune_pipeline.evaluation.evaluate import evaluate
    from finetune_pipeline.training.sft import train

    train(request(str(tiny_model), LORA, TRAIN, ROWS[:40], ROWS[40:], tmp_path / "a", runtime=RT), log=lambda m: None)
    spec = EvaluationSpec(primary_metric="perplexity", max_samples=4, max_new_tokens=8, batch_size=4)
    args = (str(tiny_model), LORA, str(tmp_path / "a"), ROWS[40:44], spec, 0.95)
    report, _ = evaluate(*args, base_cache=tmp_path / "base.json", log=lambda m: None)
    assert report.tuned["perplexity"] < report.base["perplexity"] and report.primary_improvement > 0
    assert (tmp_path / "base.json").exists() and report.n_samples == 4
    logs: list[str] = []
    again, _ = evaluate(*args, base_cache=tmp_path / "base.json", log=logs.append)
    assert any("reused" in m for m in logs) and again.base == report.base


def test_qlora_trains_and_merges_on_cpu(tiny_model: Path, tmp_path: Path) -> None:
    """QLoRA (4-bit nf4 base, double quantisation) as a functional check: on CPU bitsandbytes has no 4-bit
    autograd kernel, so speed is meaningless here, but the adapter must train and merge into a float32 base."""
    from finetune_pipeline.models.merge import max_logit_diff, standalone_model, tuned_model
    from finetune_pipeline.training.sft import train

    q = ModelSpec(method="qlora", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    res = train(
        request(str(tiny_model), q, TRAIN.model_copy(update={"max_steps": 3}), ROWS[:16], ROWS[40:44], tmp_path / "q"),
        log=lambda m: None,
    )
    assert res.method == "qlora" and res.lora_tensors_changed == res.lora_tensors_total > 0
    merged, tok = standalone_model(str(tiny_model), q, str(tmp_path / "q"))
    assert max_logit_diff(merged, tuned_model(str(tiny_model), q, str(tmp_path / "q")), tok) < 1e-4


def lean_trainer(tiny_model: Path, tmp_path: Path, rows: list[str], model_spec: ModelSpec, attention: str = "") -> Any:
    """The asset's trainer over ``rows`` (one micro-batch of them all, assistant-only loss) on the tiny model with a
    fresh adapter, for the tests that call its loss directly."""
    from datasets import Dataset
    from peft import get_peft_model
    from trl import SFTConfig

    from finetune_pipeline.models.base import load_model, load_tokenizer
    from finetune_pipeline.training.chat import resolve_chat_template
    from finetune_pipeline.training.configs import lora_config
    from finetune_pipeline.training.trainer import RecordingSFTTrainer

    tok = load_tokenizer(str(tiny_model))
    tok.chat_template = resolve_chat_template(tok, "auto").template
    model = get_peft_model(load_model(str(tiny_model), model_spec, for_training=True), lora_config(model_spec.lora))
    if attention:
        model.set_attn_implementation(attention)
    ds = Dataset.from_list([{"messages": json.loads(r)} for r in rows])
    cfg = SFTConfig(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=len(rows),
        assistant_only_loss=True,
        use_cpu=True,
        report_to=[],
        max_length=128,
        gradient_checkpointing=False,
    )
    return RecordingSFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)


def test_lean_loss_equals_trl_loss(tiny_model: Path, tmp_path: Path) -> None:
    """The asset's training loss (LM head on labelled positions only, no per-step entropy) is trl's loss."""
    import torch

    from finetune_pipeline.training.trainer import lean_loss, lean_ok

    trainer = lean_trainer(tiny_model, tmp_path, ROWS[:4], LORA)
    tok = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    assert lean_ok(trainer)
    trainer.model.train()
    with torch.no_grad():
        lean = lean_loss(trainer, trainer.model, dict(batch), None)
        ref = super(type(trainer), trainer).compute_loss(trainer.model, dict(batch))
    assert torch.allclose(lean, ref, rtol=1e-5, atol=1e-5), (lean, ref)
    # only assistant tokens (answer + the <|im_end|> that ends it) carry a label
    labels = batch["labels"][0]
    kept = tok.decode(batch["input_ids"][0][labels != -100])
    assert kept.endswith("<|im_end|>") and "Ticket" not in kept and kept.startswith("{")


@pytest.mark.parametrize(
    "model",
    [
        ModelSpec(method="qlora", quantization="int8", lora={"r": 4, "alpha": 8, "dropout": 0.0}),
        ModelSpec(lora={"r": 4, "alpha": 8, "dropout": 0.0, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}),
        ModelSpec(lora={"r": 4, "alpha": 8, "dropout": 0.0, "use_rslora": True}),
    ],
    ids=["qlora-int8", "dora-q-v", "rslora"],
)
def test_adapter_variants_train(model: ModelSpec, tiny_model: Path, tmp_path: Path) -> None:
    from peft import PeftConfig

    from finetune_pipeline.training.sft import train

    res = train(
        request(
            str(tiny_model), model, TRAIN.model_copy(update={"max_steps": 2}), ROWS[:8], [], tmp_path / "v", runtime=RT
        ),
        log=lambda m: None,
    )
    assert res.lora_tensors_changed == res.lora_tensors_total > 0
    cfg = PeftConfig.from_pretrained(str(tmp_path / "v"))
    assert cfg.use_dora is model.lora.use_dora and cfg.use_rslora is model.lora.use_rslora
    targets = {m.split(".")[-1] for m in cfg.target_modules}
    if isinstance(model.lora.target_modules, list):
        assert targets == {"q_proj", "v_proj"}
    else:  # all-linear: every projection of the llama block, never the output head
        assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_early_stopping_on_validation_loss(tiny_model: Path, tmp_path: Path) -> None:
    from finetune_pipeline.training.sft import train

    # an improvement must exceed 100 nats: none does, so training stops after `patience` evaluations
    t = TRAIN.model_copy(
        update={"max_steps": 20, "eval_steps": 2, "early_stopping_patience": 2, "early_stopping_threshold": 100.0}
    )
    res = train(
        request(str(tiny_model), LORA, t, ROWS[:40], ROWS[40:44], tmp_path / "e", runtime=RT), log=lambda m: None
    )
    assert res.stopped_early and res.steps == 6 and [s for s, _ in res.eval_history] == [2, 4, 6]


@pytest.mark.parametrize("mode", [{"padding_free": True}, {"packing": True}], ids=["padding-free", "packing"])
def test_padding_free_and_packing_train(mode: dict, tiny_model: Path, tmp_path: Path) -> None:
    from finetune_pipeline.training.sft import train

    t = TRAIN.model_copy(update={"max_steps": 3, **mode})
    res = train(request(str(tiny_model), LORA, t, ROWS[:12], [], tmp_path / "p", runtime=RT), log=lambda m: None)
    assert res.steps == 3 and res.lora_tensors_changed == res.lora_tensors_total > 0
    assert all(loss == loss and loss > 0 for _, loss in res.loss_history)  # finite, not NaN


def test_two_training_steps_with_llama3_tokenizer(tmp_path: Path) -> None:
    """Assistant-only loss on a tiny llama with a Llama-3 tokenizer shipping <|end_of_text|> as EOS (as the
    first Meta-Llama-3-Instruct release did): training ends turns with <|eot_id|>, the adapter keeps that as EOS."""
    from finetune_pipeline.models.tiny import make_tiny_model
    from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec
    from finetune_pipeline.training.sft import TrainRequest, train
    from finetune_pipeline.training.templates import LLAMA3
    from finetune_pipeline_tests.test_templates import chat, family_tokenizer

    base = make_tiny_model(tmp_path / "base", tokenizer=family_tokenizer("llama3", eos="<|end_of_text|>"))
    rows = [json.dumps(chat(i % 2 == 0)) for i in range(8)]
    res = train(
        TrainRequest(
            base_path=str(base),
            model=ModelSpec(lora={"r": 4, "alpha": 8, "dropout": 0.0}),
            training=TrainingSpec(max_steps=2, per_device_train_batch_size=4, max_length=256),
            runtime=RuntimeSpec(logging_steps=1, eos_check_samples=0),
            train_messages=rows,
            eval_messages=[],
            output_dir=tmp_path / "adapter",
        ),
        log=lambda m: None,
    )
    assert res.steps == 2 and res.chat_template_source == "llama3" and res.eos_token == "<|eot_id|>"
    saved = json.loads((tmp_path / "adapter" / "generation_config.json").read_text())
    tok = family_tokenizer("llama3")
    assert saved["eos_token_id"] == tok.convert_tokens_to_ids("<|eot_id|>")
    assert (tmp_path / "adapter" / "chat_template.jinja").read_text() == LLAMA3
