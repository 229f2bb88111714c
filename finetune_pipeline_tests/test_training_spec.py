"""Tier 1: the training sections of the spec, the launcher command and the chat template resolution."""

from pathlib import Path

import pytest

from finetune_pipeline.spec import RuntimeSpec, SpecError, parse_spec

BASE = "name: p\nsource: {incoming_dir: in}\nregistry: {model_name: m}\n"


def test_training_problems_name_the_field_and_the_fix() -> None:
    text = BASE + (
        "model: {method: qlora, quantization: int4, lora: {target_modules: []}}\n"
        "training: {early_stopping_patience: 2, num_processes: 2}\nruntime: {save_total_limit: 0}\n"
    )
    with pytest.raises(SpecError) as exc:
        parse_spec(text, source="t.yaml")
    joined = "\n".join(exc.value.problems)
    assert "model.quantization: Input should be 'nf4' or 'int8'" in joined
    assert "model.lora.target_modules: needs at least one module name" in joined
    assert "t.yaml:6: runtime.save_total_limit: must be > 0" in joined
    with pytest.raises(SpecError, match=r"t.yaml:4: training: early_stopping_patience needs eval_steps > 0"):
        parse_spec(BASE + "training: {early_stopping_patience: 2}\n", source="t.yaml")


def test_defaults_are_the_fast_resumable_ones() -> None:
    s = parse_spec(BASE).spec
    assert s.model.dtype == "auto" and s.model.lora.target_modules == "all-linear"
    assert s.model.lora.use_dora is False and s.model.lora.use_rslora is False and s.model.quantization == "nf4"
    t, rt = s.training, s.runtime
    assert t.assistant_only_loss and t.chat_template == "auto" and rt.save_steps > 0 and rt.launcher == "python"
    with pytest.raises(SpecError, match="training.num_processes > 1 needs runtime.launcher: accelerate"):
        parse_spec(BASE + "training: {num_processes: 2}\n")


def test_moved_fields_say_where_they_went() -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(
            BASE + "training: {logging_steps: 2}\nevaluation: {min_improvement_over_base: 0.1}\n", source="t.yaml"
        )
    joined = "\n".join(exc.value.problems)
    assert "t.yaml:4: training.logging_steps: moved: this setting is now runtime.logging_steps" in joined
    assert (
        "evaluation.min_improvement_over_base: moved: this setting is now registry.min_improvement_over_base" in joined
    )


def test_chat_template_auto_and_errors(tiny_model: Path, tmp_path: Path) -> None:
    from finetune_pipeline.models.base import load_tokenizer
    from finetune_pipeline.training.chat import resolve_chat_template

    tok = load_tokenizer(str(tiny_model))
    own = tok.chat_template
    chosen = resolve_chat_template(tok, "auto")
    assert chosen.source == "chatml-smollm2" and chosen.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    # the marked template renders exactly what the model's own does: serving is unchanged
    assert tok.apply_chat_template(msgs, chat_template=chosen.template, tokenize=False) == tok.apply_chat_template(
        msgs, chat_template=own, tokenize=False
    )
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match=r"training.chat_template: .*no \{% generation %\} markers"):
        resolve_chat_template(tok, "auto")
    no_eos = tmp_path / "t.jinja"
    no_eos.write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
        "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="does not end the assistant answer with the EOS token"):
        resolve_chat_template(tok, "t.jinja", base_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="training.chat_template: .*missing.jinja does not exist"):
        resolve_chat_template(tok, "missing.jinja", base_dir=tmp_path)


# --- the translators from the spec to peft / trl / bitsandbytes configs (no model, no training) ---------------------

LORA_CASES = {
    "rank-alpha-dropout": ({"r": 8, "alpha": 16, "dropout": 0.1}, {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}),
    "all-linear": ({}, {"target_modules": "all-linear", "use_dora": False, "use_rslora": False}),
    "listed-targets": ({"target_modules": ["q_proj", "v_proj"]}, {"target_modules": {"q_proj", "v_proj"}}),
    "dora": ({"use_dora": True}, {"use_dora": True}),
    "rslora": ({"use_rslora": True}, {"use_rslora": True}),
}


@pytest.mark.parametrize(("lora", "expected"), LORA_CASES.values(), ids=LORA_CASES.keys())
def test_lora_config(lora: dict, expected: dict) -> None:
    from finetune_pipeline.spec import LoraSpec
    from finetune_pipeline.training.configs import lora_config

    cfg = lora_config(LoraSpec(**lora))
    assert cfg.task_type == "CAUSAL_LM"
    assert {k: getattr(cfg, k) for k in expected} == expected


SFT_CASES = {
    # name: (training, runtime, keyword overrides of the call, expected SFTConfig attributes)
    "batch": (
        {"per_device_train_batch_size": 4},
        {},
        {},
        {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4},
    ),
    "accumulation": ({"gradient_accumulation_steps": 3}, {}, {}, {"gradient_accumulation_steps": 3}),
    "learning-rate": ({"learning_rate": 3e-4, "lr_scheduler_type": "cosine"}, {}, {}, {"learning_rate": 3e-4}),
    "warmup-from-ratio": ({"warmup_ratio": 0.1, "max_steps": 30}, {}, {}, {"warmup_steps": 3, "max_steps": 30}),
    "max-length": ({"max_length": 77}, {}, {}, {"max_length": 77, "padding_free": False, "packing": False}),
    "padding-free-no-max-length": ({"padding_free": True}, {}, {}, {"max_length": None, "padding_free": True}),
    "packing-keeps-max-length": ({"packing": True, "max_length": 77}, {}, {}, {"max_length": 77, "padding_free": True}),
    "assistant-only-loss": ({}, {}, {}, {"assistant_only_loss": True, "completion_only_loss": None}),
    "completion-only-loss": ({"assistant_only_loss": False}, {}, {}, {"completion_only_loss": True}),
    "eval-every-n": ({"eval_steps": 4}, {}, {"do_eval": True}, {"eval_strategy": "steps", "eval_steps": 4}),
    "no-eval": ({}, {}, {"do_eval": False}, {"eval_strategy": "no", "eval_steps": None}),
    "early-stopping": (
        {"eval_steps": 2, "early_stopping_patience": 2},
        {},
        {"do_eval": True},
        {"metric_for_best_model": "eval_loss", "greater_is_better": False},
    ),
    "checkpoints": (
        {},
        {"save_steps": 7, "save_total_limit": 3},
        {"saving": True},
        {"save_strategy": "steps", "save_steps": 7, "save_total_limit": 3},
    ),
    "no-checkpoints": ({}, {"save_steps": 0}, {"saving": False}, {"save_strategy": "no", "save_steps": 500}),
    "logging": ({}, {"logging_steps": 3}, {}, {"logging_steps": 3}),
    "seed": ({"seed": 7}, {}, {}, {"seed": 7, "data_seed": 7}),
    "cpu-float32": ({}, {}, {}, {"use_cpu": True, "bf16": False, "fp16": False}),
    "cpu-bfloat16-no-autocast": ({}, {}, {"dtype": "bfloat16"}, {"use_cpu": True, "bf16": False, "fp16": False}),
    "cuda-float16-autocast": ({}, {}, {"dtype": "float16", "use_cuda": True}, {"use_cpu": False, "fp16": True}),
    "fixed-choices": (
        {},
        {},
        {},
        {"gradient_checkpointing": False, "report_to": [], "dataloader_num_workers": 0, "disable_tqdm": True},
    ),
}


@pytest.mark.parametrize(("training", "runtime", "call", "expected"), SFT_CASES.values(), ids=SFT_CASES.keys())
def test_sft_config(training: dict, runtime: dict, call: dict, expected: dict, tmp_path: Path) -> None:
    from finetune_pipeline.spec import TrainingSpec
    from finetune_pipeline.training.configs import sft_config

    kw = {"use_cuda": False, "dtype": "float32", "do_eval": False, "saving": False, **call}
    cfg = sft_config(TrainingSpec(**training), RuntimeSpec(**runtime), output_dir=str(tmp_path / "ckpt"), **kw)
    assert cfg.output_dir == str(tmp_path / "ckpt")
    got = {k: getattr(cfg, k) for k in expected}
    got = {k: (v.value if hasattr(v, "value") else v) for k, v in got.items()}  # enums (eval / save strategy)
    assert got == expected


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="trl refuses bf16 without a GPU")
def test_sft_config_bf16_autocast_on_cuda(tmp_path: Path) -> None:
    from finetune_pipeline.spec import TrainingSpec
    from finetune_pipeline.training.configs import sft_config

    kw = {"use_cuda": True, "dtype": "bfloat16", "do_eval": False, "saving": False}
    cfg = sft_config(TrainingSpec(), RuntimeSpec(), output_dir=str(tmp_path), **kw)
    assert cfg.bf16 and not cfg.fp16 and not cfg.use_cpu


QUANT_CASES = {
    "lora-none": ({"method": "lora"}, None),
    "full-none": ({"method": "full"}, None),
    "qlora-nf4": (
        {"method": "qlora", "dtype": "float32"},
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    ),
    "qlora-int8": ({"method": "qlora", "quantization": "int8"}, {"load_in_8bit": True, "load_in_4bit": False}),
}


@pytest.mark.parametrize(("model", "expected"), QUANT_CASES.values(), ids=QUANT_CASES.keys())
def test_quantization_config(model: dict, expected: dict | None) -> None:
    import torch

    from finetune_pipeline.models.base import quantization_config
    from finetune_pipeline.spec import ModelSpec

    cfg = quantization_config(ModelSpec(**model))
    if expected is None:
        assert cfg is None
        return
    assert {k: getattr(cfg, k) for k in expected} == expected
    if cfg.load_in_4bit:
        assert cfg.bnb_4bit_compute_dtype == torch.float32  # the spec's dtype


def test_trial_training_is_the_sweep_steps_only() -> None:
    """A trial's settings: the sweep's steps and two validations; the spec's own steps do not reach it (so a
    study named after trial_training's output survives changes to training.max_steps / eval_steps)."""
    from finetune_pipeline.spec import SweepSpec, TrainingSpec
    from finetune_pipeline.tuning.sweep import trial_training

    sweep = SweepSpec(max_steps=5)
    t = trial_training(TrainingSpec(learning_rate=3e-4), sweep)
    assert (t.max_steps, t.eval_steps, t.learning_rate) == (5, 2, 3e-4)
    longer = TrainingSpec(learning_rate=3e-4, max_steps=99, eval_steps=3)
    assert trial_training(longer, sweep) == t
    assert trial_training(TrainingSpec(), SweepSpec(max_steps=1)).eval_steps == 1


def test_train_records_round_trip_as_models(tmp_path: Path) -> None:
    """request.json and train_result.json are read back as the models, NaN validation loss included."""
    import math

    from finetune_pipeline.spec import ModelSpec, TrainingSpec
    from finetune_pipeline.training.records import TrainRequest, TrainResult

    req = TrainRequest(
        base_path="base",
        model=ModelSpec(method="qlora", lora={"r": 8}),
        training=TrainingSpec(max_steps=3),
        runtime=RuntimeSpec(logging_steps=1),
        train_messages=["[]"],
        eval_messages=[],
        output_dir=tmp_path / "out",
        save=False,
        checkpoint_dir=tmp_path / "ckpt",
    )
    req.save(tmp_path / "request.json")
    back = TrainRequest.load(tmp_path / "request.json")
    assert back == req and back.save_outputs is False and back.output_dir == tmp_path / "out"
    assert '"save": false' in (tmp_path / "request.json").read_text()
    counts = {"train_tokens": 10, "trainable_params": 1, "total_params": 2, "lora_tensors_changed": 1}
    res = TrainResult(
        output_dir="o",
        method="lora",
        steps=2,
        loss_history=[(1, 2.5), (2, 2.0)],
        eval_loss=math.nan,
        wall_seconds=1.0,
        tokens_per_second=10.0,
        cpu_seconds=1.0,
        lora_tensors_total=1,
        eos_rate=None,
        **counts,
    )
    res.save(tmp_path / "train_result.json")
    again = TrainResult.load(tmp_path / "train_result.json")
    assert math.isnan(again.eval_loss) and again.loss_history == [(1, 2.5), (2, 2.0)] and again.eos_rate is None
    assert again.model_dump(exclude={"eval_loss"}) == res.model_dump(exclude={"eval_loss"})
