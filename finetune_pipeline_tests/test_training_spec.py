"""Unit tier: the training sections of the spec and what they become (training/configs.py: lora_config,
sft_config, the step plan), the launcher command, the chat template resolution, and the rules around the run
(time budget, divergence, the end-of-turn contract)."""

import math
from pathlib import Path

import pytest

from finetune_pipeline.spec import ModelSpec, RuntimeSpec, SpecError, TrainingSpec, parse_spec
from finetune_pipeline.training.callbacks import budget_steps, diverged
from finetune_pipeline.training.configs import planned_steps, warmup_steps
from finetune_pipeline.training.contract import check_rows, loss_spans
from finetune_pipeline_tests.conftest import make_spec

pytestmark = pytest.mark.unit

RT = RuntimeSpec(logging_steps=1, calibration_steps=0)
LORA = ModelSpec(lora={"r": 4, "alpha": 8, "dropout": 0.0})

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
    resolved = TrainingSpec(**{"learning_rate": 1e-3, **training})  # sft.setup resolves a left-out rate first
    cfg = sft_config(resolved, RuntimeSpec(**runtime), output_dir=str(tmp_path / "ckpt"), **kw)
    assert cfg.output_dir == str(tmp_path / "ckpt")
    got = {k: getattr(cfg, k) for k in expected}
    got = {k: (v.value if hasattr(v, "value") else v) for k, v in got.items()}  # enums (eval / save strategy)
    assert got == expected


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="trl refuses bf16 without a GPU")
def test_sft_config_bf16_autocast_on_cuda(tmp_path: Path) -> None:
    from finetune_pipeline.spec import TrainingSpec
    from finetune_pipeline.training.configs import sft_config

    kw = {"use_cuda": True, "dtype": "bfloat16", "do_eval": False, "saving": False}
    cfg = sft_config(TrainingSpec(learning_rate=1e-3), RuntimeSpec(), output_dir=str(tmp_path), **kw)
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


# ---- tier 1: steps, epochs, budget, divergence, the end-of-turn rule, the spec ---------------------------------


@pytest.mark.parametrize(
    ("fields", "rows", "steps"),
    [
        ({"max_steps": 7}, 100, 7),
        ({"num_train_epochs": 1}, 40, 10),  # 40 rows / batch 4
        ({"num_train_epochs": 2, "gradient_accumulation_steps": 2}, 41, 12),  # ceil(41 / 8) = 6 per epoch
        ({"num_train_epochs": 0.5}, 40, 5),
    ],
    ids=["max_steps", "one-epoch", "epochs-accumulation", "half-epoch"],
)
def test_planned_steps(fields: dict, rows: int, steps: int) -> None:
    t = TrainingSpec(per_device_train_batch_size=4, **fields)
    assert planned_steps(t, rows) == steps


def test_warmup_steps_replace_the_ratio() -> None:
    assert warmup_steps(TrainingSpec(warmup_ratio=0.1), 50) == 5
    assert warmup_steps(TrainingSpec(warmup_steps=3), 50) == 3
    assert warmup_steps(TrainingSpec(warmup_steps=80), 50) == 50


@pytest.mark.parametrize(
    ("budget", "elapsed", "per_step", "done", "planned", "expected"),
    [(600, 60, 10, 4, 100, 58), (600, 60, 1, 4, 100, 100), (10, 60, 10, 4, 100, 5)],
    ids=["budget-binds", "everything-fits", "over-budget-already"],
)
def test_budget_steps(budget: float, elapsed: float, per_step: float, done: int, planned: int, expected: int) -> None:
    assert budget_steps(budget, elapsed, per_step, done, planned) == expected


@pytest.mark.parametrize(
    ("losses", "broken"),
    [([2.0, 1.5, math.nan], True), ([2.0, 1.0, math.inf], True), ([2.0, 0.4, 2.5], True), ([2.0, 1.0, 1.2], False)],
    ids=["nan", "inf", "diverged", "noisy-but-fine"],
)
def test_divergence_rule(losses: list[float], broken: bool) -> None:
    assert (diverged(losses) is not None) == broken


EOS = 2


@pytest.mark.parametrize(
    ("ids", "labels", "ok"),
    [
        ([5, 6, 7, EOS], [-100, -100, 7, EOS], True),
        ([5, 6, 7, EOS, 9], [-100, -100, 7, EOS, 9], True),  # a whitespace token after EOS (ChatML's newline)
        ([5, 6, 7, EOS], [-100, -100, 7, -100], False),  # EOS outside the loss mask
        ([5, 6, 7, 8], [-100, -100, 7, 8], False),  # truncated: no EOS at all
        ([5, 6, 7, EOS], [-100] * 4, False),  # all-masked
        ([5, 7, EOS, 6, 7, 8], [-100, 7, EOS, -100, 7, 8], False),  # the second trained turn misses its EOS
    ],
    ids=["eos-in-mask", "newline-after-eos", "eos-masked", "no-eos", "all-masked", "second-turn"],
)
def test_end_of_turn_rule(ids: list[int], labels: list[int], ok: bool) -> None:
    rep = check_rows([(ids, labels)], EOS, "</s>", whitespace_ids={9})
    assert rep.passed == ok and rep.share_failing == (0.0 if ok else 1.0)
    if not ok:
        assert rep.example is not None and "1 of 1 training rows (100.0%)" in rep.message()


def test_loss_spans() -> None:
    assert loss_spans([-100, 1, 2, -100, 3]) == [(1, 3), (4, 5)]


@pytest.mark.parametrize(
    ("training", "problem"),
    [
        ({"max_steps": 10, "num_train_epochs": 2}, "not both"),
        ({"max_steps": None}, "needs max_steps or num_train_epochs"),
    ],
    ids=["both", "neither"],
)
def test_spec_steps_or_epochs(training: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        TrainingSpec(**training)


def test_spec_epochs_alone_and_budget_needs_calibration() -> None:
    t = TrainingSpec(num_train_epochs=2)
    assert t.max_steps is None and t.num_train_epochs == 2
    spec = make_spec(training={"num_train_epochs": 2})
    assert spec.with_overrides({"learning_rate": 1e-4}).training.num_train_epochs == 2  # round trip stays valid
    with pytest.raises(ValueError, match="calibration_steps"):
        make_spec(training={"max_minutes": 5}, runtime={"calibration_steps": 0})


def test_sweep_trials_get_a_share_of_the_sweep_budget() -> None:
    from finetune_pipeline.tuning.sweep import trial_training

    spec = make_spec(
        training={"num_train_epochs": 3, "max_minutes": 30},
        sweep={"max_minutes": 6, "n_trials": 3, "max_steps": 4},
    )
    t = trial_training(spec.training, spec.sweep)
    assert (t.max_steps, t.num_train_epochs, t.max_minutes, t.eval_steps) == (4, None, 2.0, 2)


def test_knobs_reach_trl_and_peft() -> None:
    from finetune_pipeline.training.configs import check_optim, lora_config, sft_config

    t = TrainingSpec(
        max_steps=10,
        learning_rate=1e-3,
        gradient_checkpointing=True,
        optim="adafactor",
        max_grad_norm=0.5,
        warmup_steps=2,
    )
    cfg = sft_config(t, RT, output_dir="x", use_cuda=False, dtype="float32", do_eval=False, saving=False, steps=10)
    assert (cfg.gradient_checkpointing, cfg.optim, cfg.max_grad_norm, cfg.warmup_steps) == (True, "adafactor", 0.5, 2)
    assert cfg.logging_nan_inf_filter is False  # the NaN guard must see NaN losses
    lc = lora_config(LORA.lora.model_copy(update={"bias": "lora_only", "modules_to_save": ["lm_head"]}))
    assert lc.bias == "lora_only" and set(lc.modules_to_save) == {"lm_head"}
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_optim("paged_adamw_8bit", use_cuda=False)
    check_optim("paged_adamw_8bit", use_cuda=True)


@pytest.mark.parametrize(
    ("method", "expected"), [("lora", ("base", "out")), ("qlora", ("base", "out")), ("full", ("out", None))]
)
def test_where_the_trained_weights_are(method: str, expected: tuple) -> None:
    """One rule for every loader (evaluation, the champion, the sweep's metric objective): a full fine-tune saved a
    whole model, LoRA and QLoRA an adapter on the base."""
    from finetune_pipeline.models.base import trained_weights

    assert trained_weights("base", ModelSpec(method=method), "out") == expected
