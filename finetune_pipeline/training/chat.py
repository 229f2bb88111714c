"""One chat template for training, evaluation and serving, with ``{% generation %}`` markers for assistant-only loss.

``resolve_chat_template`` picks the template once; the trainer tokenizes with it, the adapter folder stores it
(``chat_template.jinja`` next to the tokenizer) and evaluation and the registry load the tokenizer from there, so the
model is served with the template and EOS token it was trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_pipeline.training.templates import CHATML, CHATML_SMOL, MARKED, Marked

__all__ = ["CHATML", "CHATML_SMOL", "KNOWN_MARKED", "MARKED", "ChatTemplate", "resolve_chat_template"]

KNOWN_MARKED = {n: m.template for n, m in MARKED.items()}

_PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
    # whitespace around content (some families trim it) and an empty system message (some skip it)
    [{"role": "user", "content": "  Hi there\n"}, {"role": "assistant", "content": " Hello! \n"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
]
FIELD = "training.chat_template"


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # "model" | a known name | a file path
    template: str
    eos_token: str  # the token that ends an assistant turn; training and serving stop on it

    def install(self, tok: Any) -> None:
        """Set the template on the tokenizer and make its end-of-turn token the tokenizer's EOS token (Gemma's
        <end_of_turn> instead of <eos>, say), so training checks, saved generation config and serving stop on it."""
        tok.chat_template = self.template
        if tok.eos_token != self.eos_token:
            tok.eos_token = self.eos_token


def _render(tok: Any, template: str, msgs: list[dict[str, str]], gen_prompt: bool) -> str:
    return tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen_prompt)


def _outcome(tok: Any, template: str, msgs: list[dict[str, str]], gen_prompt: bool) -> str:
    """The rendered text, or the refusal (a template that raises, e.g. Gemma 1/2 on a system message)."""
    from jinja2 import TemplateError

    try:
        return _render(tok, template, msgs, gen_prompt)
    except TemplateError as e:
        return f"<refused: {e}>"


def first_difference(tok: Any, own: str, marked: str) -> str | None:
    """None when ``marked`` renders what ``own`` renders on every probe chat (whole and as a prompt with
    add_generation_prompt; a chat both refuse counts as the same); else a description of the first difference."""
    for i, m in enumerate(_PROBES):
        for msgs, gen in ((m, False), (m[:-1], True)):
            a, b = _outcome(tok, own, msgs, gen), _outcome(tok, marked, msgs, gen)
            if a != b and not (a.startswith("<refused") and b.startswith("<refused")):
                at = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                return (
                    f"probe chat {i}{' (with add_generation_prompt)' if gen else ''} differs at character {at}: "
                    f"the model's own template renders {a[max(0, at - 20) : at + 40]!r}, "
                    f"the marked one {b[max(0, at - 20) : at + 40]!r}"
                )
    return None


def _same_text(tok: Any, a: str, b: str) -> bool:
    return first_difference(tok, a, b) is None


def _is_token(tok: Any, text: str) -> bool:
    return len(tok.encode(text, add_special_tokens=False)) == 1


def _pinned(m: Marked, tok: Any) -> ChatTemplate:
    """``m`` for this tokenizer. When the family's end-of-turn token is not the tokenizer's EOS token (Gemma's <eos>,
    Phi-3's <|endoftext|>), the EOS token the template prints (Phi-3 ends a chat with it) is pinned as text: the
    tokenizer's EOS becomes the end-of-turn token (ChatTemplate.install) and the text must not change with it."""
    eot = m.end_of_turn or str(tok.eos_token)
    template = m.template
    if eot != tok.eos_token and tok.eos_token is not None and "eos_token" in template:
        template = "{% set eos_token = " + json.dumps(str(tok.eos_token)) + " %}" + template
    return ChatTemplate(m.name, template, eot)


def _known_names() -> str:
    return ", ".join(MARKED)


def _named(tok: Any, name: str) -> ChatTemplate:
    """A marked template chosen by name, still verified: it must render what the model's own template renders."""
    chosen = _pinned(MARKED[name], tok)
    if not _is_token(tok, chosen.eos_token):
        raise ValueError(
            f"{FIELD}: '{name}' ends answers with {chosen.eos_token!r}, which is not one token of this tokenizer: "
            f"the model is not of the {MARKED[name].family} family. Use 'auto' or a .jinja file"
        )
    own = getattr(tok, "chat_template", None)
    diff = first_difference(tok, own, chosen.template) if own else None
    if diff:
        raise ValueError(
            f"{FIELD}: '{name}' does not render what the model's own chat template renders ({diff}); training with it "
            "would teach a format the model is not served with. Use 'auto' or a .jinja file with "
            "{% generation %} markers"
        )
    return chosen


def _auto(tok: Any) -> ChatTemplate:
    own = getattr(tok, "chat_template", None)
    if not own:
        raise ValueError(
            f"{FIELD}: the model has no chat template; name one ({_known_names()}) or give a .jinja file with "
            "{% generation %} markers"
        )
    if "{% generation %}" in own.replace("{%- generation %}", "{% generation %}"):
        return ChatTemplate("model", own, str(tok.eos_token))
    for m in MARKED.values():
        if m.end_of_turn is not None and not _is_token(tok, m.end_of_turn):
            continue  # not this family's tokenizer: its end-of-turn token would be split into pieces
        chosen = _pinned(m, tok)
        if _same_text(tok, own, chosen.template):
            return chosen
    raise ValueError(
        f"{FIELD}: the model's chat template has no {{% generation %}} markers and renders like none of the known "
        f"marked templates ({_known_names()}), so assistant-only loss cannot find the answers. Give a .jinja file "
        f"with the markers in {FIELD}, or set training.assistant_only_loss: false"
    )


def resolve_chat_template(
    tok: Any, setting: str, base_dir: Path | None = None, need_markers: bool = True
) -> ChatTemplate:
    """The template to train with, given ``training.chat_template``: 'auto', a known name or a .jinja path.

    'auto': the model's own template when it already has generation markers; otherwise the known marked template
    (ChatML, Qwen2.5, Llama 3 / 3.1 / 3.2, Mistral, Gemma, Gemma 3, Phi-3, Phi-3.5;
    ``templates.MARKED``) that renders exactly the same text as the
    model's own on probe chats (so nothing changes for serving); otherwise a clear error. A name picks one marked
    template, verified the same way. Either way the assistant turn must end with the end-of-turn token, which
    becomes the tokenizer's EOS token (``ChatTemplate.install``), or generations would never stop.
    ``need_markers=False`` (no assistant-only loss): 'auto' keeps the model's own template as it is.
    """
    if setting == "auto" and not need_markers:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{FIELD}: the model has no chat template; give a .jinja file")
        return ChatTemplate("model", tok.chat_template, str(tok.eos_token))
    if setting == "auto":
        chosen = _auto(tok)
    elif setting in MARKED:
        chosen = _named(tok, setting)
    else:
        p = Path(setting).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.is_file():
            raise FileNotFoundError(
                f"{FIELD}: {p} does not exist; give a .jinja file, 'auto' or a known template ({_known_names()})"
            )
        chosen = ChatTemplate(str(p), p.read_text(encoding="utf-8"), str(tok.eos_token))
    text = _render(tok, chosen.template, _PROBES[0], False)
    if need_markers and "{% generation %}" not in chosen.template.replace("{%- generation %}", "{% generation %}"):
        raise ValueError(f"{FIELD}: {chosen.source} has no {{% generation %}} markers around the assistant answer")
    if f"Hello!{chosen.eos_token}" not in text:
        raise ValueError(
            f"{FIELD}: {chosen.source} does not end the assistant answer with the EOS token {chosen.eos_token!r}; "
            "a model trained with it would not learn to stop"
        )
    return chosen
