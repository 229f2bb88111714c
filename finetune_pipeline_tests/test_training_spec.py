"""Tier 1: the training sections of the spec, the launcher command and the chat template resolution."""

from pathlib import Path

import pytest

from finetune_pipeline.spec import RuntimeSpec, SpecError, parse_spec
from finetune_pipeline.training.launch import CHILD_MODULE, child_command

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
        parse_spec(BASE + "training: {logging_steps: 2}\nevaluation: {min_improvement_over_base: 0.1}\n", source="t.yaml")
    joined = "\n".join(exc.value.problems)
    assert "t.yaml:4: training.logging_steps: moved: this setting is now runtime.logging_steps" in joined
    assert "evaluation.min_improvement_over_base: moved: this setting is now registry.min_improvement_over_base" in joined


def test_launcher_commands() -> None:
    assert child_command(RuntimeSpec(), python="py") == ["py", "-m", CHILD_MODULE]
    cmd = child_command(RuntimeSpec(launcher="accelerate"), num_processes=4, python="py")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd and cmd[-2:] == ["-m", CHILD_MODULE]


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
