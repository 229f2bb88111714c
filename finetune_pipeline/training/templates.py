"""Marked chat templates per model family: each renders exactly what the family's own template renders, with the
assistant's answer and the token that ends it inside ``{% generation %}...{% endgeneration %}``.

trl's ``assistant_only_loss`` (through ``apply_chat_template(..., return_assistant_tokens_mask=True)``) trains on the
characters inside those blocks, so the model learns the answer and to stop. Whitespace the family prints after the
end-of-turn token (ChatML's, Gemma's and Phi-3's newline) stays outside: the end-of-turn contract allows it.

None of these is ever chosen by name matching alone: ``chat.resolve_chat_template`` picks one only when it renders the
same text as the model's own template on probe chats (see ``chat._PROBES``). The official templates they mirror are
those in the model repositories' ``tokenizer_config.json`` (trl ships byte-identical copies in ``trl/chat_templates``,
which the tests compare against); the Mistral one is Mistral-7B-Instruct-v0.2's / Mixtral-8x7B-Instruct-v0.1's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Marked:
    name: str
    template: str
    # The token that ends an assistant turn; None: the tokenizer's EOS token (the template prints ``eos_token``).
    end_of_turn: str | None
    family: str


def _gen(expr: str) -> str:
    return "{% generation %}{{ " + expr + " }}{% endgeneration %}"


# --- ChatML (SmolLM2, Qwen) ------------------------------------------------------------------------------------------
_CHATML_MESSAGE = (
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}" + _gen("message['content'] + '<|im_end|>'") + "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
)
_CHATML_PROMPT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"


def _chatml(default_system: str | None) -> str:
    """ChatML, optionally with the default system turn the model's template adds when the chat has none."""
    head = ""
    if default_system is not None:
        head = (
            "{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}"
            "{% endif %}"
        )
    return "{% for message in messages %}" + head + _CHATML_MESSAGE + "{% endfor %}" + _CHATML_PROMPT


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN2_5_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML_SMOL = _chatml(SMOLLM2_SYSTEM)
CHATML = _chatml(None)
QWEN2_5 = _chatml(QWEN2_5_SYSTEM)

# --- Llama 3 (Meta-Llama-3-*-Instruct): BOS first, headers, content trimmed, <|eot_id|> ends every turn -------------
_L3_HEADER = "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
# One turn of the Llama 3 family (the answer and its <|eot_id|> inside the generation markers), and the prompt end.
_L3_TURN = (
    "{% if message['role'] == 'assistant' %}"
    "{{ " + _L3_HEADER + " }}" + _gen("message['content'] | trim + '<|eot_id|>'") + "{% else %}"
    "{{ " + _L3_HEADER + " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
)
_L3_PROMPT = "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
LLAMA3 = (
    "{% for message in messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}" + _L3_TURN + "{% endfor %}" + _L3_PROMPT
)


def _llama3_dated(date: str) -> str:
    """Llama 3.1 / 3.2 Instruct without tools: a system turn always opens the chat, with the knowledge cut-off, the
    date (``date`` is Jinja setting ``date_string`` when the caller gave none) and the system message, if any."""
    return (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] | trim %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% if not date_string is defined %}" + date + "{% endif %}"
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: ' "
        "+ date_string + '\\n\\n' + system_message + '<|eot_id|>' }}"
        "{% for message in loop_messages %}" + _L3_TURN + "{% endfor %}" + _L3_PROMPT
    )


LLAMA3_1 = _llama3_dated("{% set date_string = '26 Jul 2024' %}")
# 3.2 dates the chat with today's date, as its own template does (both render the same day's date)
LLAMA3_2 = _llama3_dated(
    "{% if strftime_now is defined %}{% set date_string = strftime_now('%d %b %Y') %}"
    "{% else %}{% set date_string = '26 Jul 2024' %}{% endif %}"
)

# --- Mistral (Mistral-7B-Instruct-v0.2, Mixtral-8x7B-Instruct-v0.1): the system message goes before the first user
# message inside its [INST]; answers end with EOS; roles must alternate, as the family's template enforces ------------
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message is defined %}"
    "{{ ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' }}" + _gen("message['content'] + eos_token") + "{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported, with the exception of an initial optional "
    "system message!') }}"
    "{% endif %}"
    "{% endfor %}"
)

# --- Gemma: no system role. Gemma 1/2 refuse a system message (as their template does); Gemma 3 puts it before the
# first user message. The model's turn is "model"; content trimmed; <end_of_turn> ends every turn ---------------------
_GEMMA_ALTERNATE = (
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
)
_GEMMA_MODEL_TURN = (
    "{{ '<start_of_turn>model\\n' }}" + _gen("message['content'] | trim + '<end_of_turn>'") + "{{ '\\n' }}"
)
_GEMMA_PROMPT = "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    + _GEMMA_ALTERNATE
    + "{% if message['role'] == 'assistant' %}"
    + _GEMMA_MODEL_TURN
    + "{% else %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}" + _GEMMA_PROMPT
)
GEMMA3 = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    + _GEMMA_ALTERNATE
    + "{% if message['role'] == 'assistant' %}"
    + _GEMMA_MODEL_TURN
    + "{% else %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}" + _GEMMA_PROMPT
)


# --- Phi-3 / Phi-3.5 (mini-instruct): <|role|>\n...<|end|>\n; the chat ends with EOS unless a prompt follows -------
def _phi3(skip_empty_system: bool) -> str:
    system = "message['role'] == 'system'" + (" and message['content']" if skip_empty_system else "")
    return (
        "{% for message in messages %}"
        "{% if " + system + " %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\\n' }}" + _gen("message['content'] + '<|end|>'") + "{{ '\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    )


PHI3 = _phi3(skip_empty_system=False)
PHI3_5 = _phi3(skip_empty_system=True)

MARKED: dict[str, Marked] = {
    m.name: m
    for m in (
        Marked("chatml-smollm2", CHATML_SMOL, "<|im_end|>", "ChatML with SmolLM2's default system turn"),
        Marked("chatml", CHATML, "<|im_end|>", "ChatML without a default system turn"),
        Marked("qwen2.5", QWEN2_5, "<|im_end|>", "ChatML with Qwen2.5's default system turn"),
        Marked("llama3", LLAMA3, "<|eot_id|>", "Llama 3 Instruct"),
        Marked("llama3.1", LLAMA3_1, "<|eot_id|>", "Llama 3.1 Instruct (without tools)"),
        Marked("llama3.2", LLAMA3_2, "<|eot_id|>", "Llama 3.2 Instruct (without tools)"),
        Marked("mistral", MISTRAL, None, "Mistral-7B-Instruct-v0.2 / Mixtral-8x7B-Instruct-v0.1"),
        Marked("gemma", GEMMA, "<end_of_turn>", "Gemma / Gemma 2 (no system role)"),
        Marked("gemma3", GEMMA3, "<end_of_turn>", "Gemma 3 (system message merged into the first user turn)"),
        Marked("phi3", PHI3, "<|end|>", "Phi-3 mini/medium instruct"),
        Marked("phi3.5", PHI3_5, "<|end|>", "Phi-3.5 mini instruct (an empty system message is skipped)"),
    )
}
