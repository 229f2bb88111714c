"""One chat template for training, evaluation and serving, with ``{% generation %}`` markers for assistant-only loss.

``resolve_chat_template`` picks the template once; the trainer tokenizes with it, the adapter folder stores it
(``chat_template.jinja`` next to the tokenizer) and evaluation and the registry load the tokenizer from there, so the
model is served with the template and EOS token it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# One ChatML message, the assistant's content and its <|im_end|> inside {% generation %}: trl's assistant_only_loss
# then trains on the answer and on the token that ends it. Shared by both marked templates below.
_CHATML_MESSAGE = (
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
)
_GENERATION_PROMPT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
# ChatML as SmolLM2 ships it (a default system turn when the chat has none), with the markers.
CHATML_SMOL = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + _SMOL_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}" + _CHATML_MESSAGE + "{% endfor %}" + _GENERATION_PROMPT
)
# Plain ChatML (Qwen-style without a default system turn), same markers.
CHATML = "{% for message in messages %}" + _CHATML_MESSAGE + "{% endfor %}" + _GENERATION_PROMPT
KNOWN_MARKED = {"chatml-smollm2": CHATML_SMOL, "chatml": CHATML}

_PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
]


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # "model" | a known name | a file path
    template: str
    eos_token: str


def _render(tok: Any, template: str, msgs: list[dict[str, str]], gen_prompt: bool) -> str:
    return tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen_prompt)


def _same_text(tok: Any, a: str, b: str) -> bool:
    for m in _PROBES:
        if _render(tok, a, m, False) != _render(tok, b, m, False):
            return False
        if _render(tok, a, m[:-1], True) != _render(tok, b, m[:-1], True):
            return False
    return True


def resolve_chat_template(
    tok: Any, setting: str, base_dir: Path | None = None, need_markers: bool = True
) -> ChatTemplate:
    """The template to train with, given ``training.chat_template`` ('auto' or a .jinja path).

    'auto': the model's own template when it already has generation markers; otherwise a known marked template
    that renders exactly the same text as the model's own (so nothing changes for serving); otherwise a clear error.
    Either way the assistant turn must end with the tokenizer's EOS token, or generations would never stop.
    ``need_markers=False`` (no assistant-only loss): 'auto' keeps the model's own template as it is.
    """
    field = "training.chat_template"
    if setting == "auto" and not need_markers:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{field}: the model has no chat template; give a .jinja file")
        return ChatTemplate("model", tok.chat_template, tok.eos_token)
    if setting != "auto":
        p = Path(setting).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.is_file():
            raise FileNotFoundError(f"{field}: {p} does not exist; give a .jinja file or 'auto'")
        chosen = ChatTemplate(str(p), p.read_text(encoding="utf-8"), tok.eos_token)
    else:
        own = getattr(tok, "chat_template", None)
        if own and "{% generation %}" in own.replace("{%- generation %}", "{% generation %}"):
            chosen = ChatTemplate("model", own, tok.eos_token)
        else:
            match = next((n for n, t in KNOWN_MARKED.items() if own and _same_text(tok, own, t)), None)
            if match is None:
                raise ValueError(
                    f"{field}: the model's chat template has no {{% generation %}} markers and matches no known "
                    "template, so assistant-only loss cannot find the answers. Give a .jinja file with the markers in "
                    f"{field}, or set training.assistant_only_loss: false"
                )
            chosen = ChatTemplate(match, KNOWN_MARKED[match], tok.eos_token)
    text = _render(tok, chosen.template, _PROBES[0], False)
    if need_markers and "{% generation %}" not in chosen.template.replace("{%- generation %}", "{% generation %}"):
        raise ValueError(f"{field}: {chosen.source} has no {{% generation %}} markers around the assistant answer")
    if f"Hello!{tok.eos_token}" not in text:
        raise ValueError(
            f"{field}: {chosen.source} does not end the assistant answer with the EOS token {tok.eos_token!r}; "
            "a model trained with it would not learn to stop"
        )
    return chosen
