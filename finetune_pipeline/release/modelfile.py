"""An Ollama Modelfile whose Go template renders what the model's Jinja chat template renders.

The Go template is derived from the Jinja template itself (rendered on marker messages: the text before, between
and after each message), then checked by rendering the derived form on probe chats and comparing with Jinja's output.
Templates that do not reduce to "prefix, one wrapper per message, generation prompt" (with at most a default system
turn, which becomes the Modelfile's SYSTEM) get no TEMPLATE line, and the reason is written into the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_S, _U, _A = "\x02SYSMARK\x03", "\x02USRMARK\x03", "\x02ASTMARK\x03"
_PROBES = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]


class NotRepresentable(ValueError):
    """The Jinja template has no equivalent in the simple Go form."""


@dataclass(frozen=True)
class ChatShape:
    """``prefix`` + per message (``head`` + role + ``mid`` + content + ``tail``) + ``generation``; ``system`` is
    the default system message the template adds when a chat has none."""

    prefix: str
    head: str
    mid: str
    tail: str
    generation: str
    system: str | None

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template renders (Ollama prepends SYSTEM when the chat's first message is not a system one)."""
        if self.system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system}, *messages]
        body = "".join(f"{self.head}{m['role']}{self.mid}{m['content']}{self.tail}" for m in messages)
        return self.prefix + body + self.generation

    def go_template(self) -> str:
        return (
            f"{self.prefix}{{{{ range .Messages }}}}{self.head}{{{{ .Role }}}}{self.mid}{{{{ .Content }}}}"
            f"{self.tail}{{{{ end }}}}{self.generation}"
        )


def _render(tok: Any, template: str, messages: list[dict[str, str]], gen: bool) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


def chat_shape(tok: Any, template: str) -> ChatShape:
    """The template's parts, verified on probe chats; raises NotRepresentable otherwise."""
    try:
        two = _render(tok, template, [{"role": "system", "content": _S}, {"role": "user", "content": _U}], False)
        with_gen = _render(tok, template, [{"role": "system", "content": _S}, {"role": "user", "content": _U}], True)
        alone = _render(tok, template, [{"role": "user", "content": _U}], False)
    except Exception as exc:  # a template that raises on these chats (e.g. roles must alternate)
        raise NotRepresentable(f"the template does not render a system + user chat: {exc}") from exc
    if two.count(_S) != 1 or two.count(_U) != 1 or not with_gen.startswith(two):
        raise NotRepresentable("the template does not print each message once, in order")
    a, rest = two.split(_S)
    b, tail = rest.split(_U)
    if not b.startswith(tail):
        raise NotRepresentable("messages do not end with the same text")
    user_head = b[len(tail) :]
    if "user" not in user_head:
        raise NotRepresentable("the role name is not printed in the message header")
    head, mid = user_head.split("user", 1)
    sys_head = f"{head}system{mid}"
    if not a.endswith(sys_head):
        raise NotRepresentable("system and user messages are wrapped differently")
    prefix = a[: -len(sys_head)]
    system = None
    expected_alone = f"{prefix}{head}user{mid}{_U}{tail}"
    if alone != expected_alone:
        lead = f"{prefix}{head}system{mid}"
        end = f"{tail}{head}user{mid}{_U}{tail}"
        if not (alone.startswith(lead) and alone.endswith(end)):
            raise NotRepresentable("a chat without a system message renders in a way the Go form cannot express")
        system = alone[len(lead) : -len(end)]
    shape = ChatShape(prefix, head, mid, tail, with_gen[len(two) :], system)
    for probe in _PROBES:
        if shape.render(probe) + "" != _render(tok, template, probe, True):
            raise NotRepresentable(f"the derived Go template renders {probe!r} differently from the Jinja template")
    return shape


def modelfile(tok: Any, template: str, gguf_name: str, stop: str | None, max_tokens: int, title: str) -> str:
    """Modelfile text: FROM the GGUF next to it, the Go TEMPLATE and SYSTEM equivalent to ``template``, the stop
    token, greedy decoding (what the evaluation scored)."""
    lines = [f"# {title}", "# ollama create <name> -f Modelfile   (run in this folder)", f"FROM ./{gguf_name}"]
    try:
        shape = chat_shape(tok, template)
        go = shape.go_template()
        if '"""' in go or (shape.system and '"""' in shape.system):
            raise NotRepresentable('the template contains """, which a Modelfile string cannot hold')
        lines.append(f'TEMPLATE """{go}"""')
        if shape.system is not None:
            lines.append(f'SYSTEM """{shape.system}"""')
    except NotRepresentable as exc:
        lines.append(f"# no TEMPLATE: {exc}; Ollama falls back to the GGUF's tokenizer.chat_template")
    if stop:
        lines.append(f'PARAMETER stop "{stop}"')
    lines += ["PARAMETER temperature 0", f"PARAMETER num_predict {max_tokens}"]
    return "\n".join(lines) + "\n"
