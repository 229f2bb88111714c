"""Marked chat templates per model family (Llama 3 / 3.1 / 3.2, Mistral, Gemma, Gemma 3, Phi-3, Phi-3.5, Qwen2.5 ChatML).

Each family gets a tokenizer built here, offline: a byte-level BPE without merges (every byte one token) plus the
family's special tokens, with the family's bos/eos/pad and its OFFICIAL chat template, the text of the model
repository's tokenizer_config.json. Those texts come from trl's ``trl/chat_templates`` folder (byte-identical copies
of the Hub templates that trl's CI checks weekly against the repositories; trl is Apache-2.0, the templates are
those of Meta Llama 3 / 3.1 / 3.2 (their Llama Community Licenses), Google Gemma (Gemma Terms of Use), Microsoft Phi-3 (MIT) and Qwen2.5
(Apache-2.0)); trl has no plain Mistral one, so Mistral's is written out below. Tier 1 except the last test (tier 2:
two training steps on a tiny llama with a Llama-3 tokenizer).
"""

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

# mistralai/Mistral-7B-Instruct-v0.2 (and Mixtral-8x7B-Instruct-v0.1) tokenizer_config.json "chat_template" (Apache-2.0)
MISTRAL_OFFICIAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501


def trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


LLAMA31_SPECIAL = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

# name: (official template source, special tokens, bos, eos, pad, end-of-turn token, does the family trim content,
#        does it take a system message)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama3": {
        "official": "trl:llama3",  # meta-llama/Meta-Llama-3-8B-Instruct
        "special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|end_of_text|>",
        "eot": "<|eot_id|>",
        "system": True,
    },
    "llama3.1": {
        "official": "trl:llama3_1",  # meta-llama/Llama-3.1-8B-Instruct
        "special": [*LLAMA31_SPECIAL],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|finetune_right_pad_id|>",
        "eot": "<|eot_id|>",
        "system": True,
    },
    "llama3.2": {
        "official": "trl:llama3_2",  # meta-llama/Llama-3.2-1B-Instruct (dated with today's date)
        "special": [*LLAMA31_SPECIAL],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|finetune_right_pad_id|>",
        "eot": "<|eot_id|>",
        "system": True,
    },
    "mistral": {
        "official": MISTRAL_OFFICIAL,
        "special": ["<unk>", "<s>", "</s>"],
        "bos": "<s>",
        "eos": "</s>",
        "pad": "<unk>",
        "eot": "</s>",
        "system": True,
    },
    "gemma": {
        "official": "trl:gemma",  # google/gemma-2b-it, google/gemma-2-2b-it
        "special": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>",
        "eos": "<eos>",  # as Gemma ships it: the end-of-turn token is another one
        "pad": "<pad>",
        "eot": "<end_of_turn>",
        "system": False,  # Gemma 1/2 refuse a system message
    },
    "gemma3": {
        "official": "trl:gemma3",  # google/gemma-3-*-it
        "special": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>",
        "eos": "<eos>",
        "pad": "<pad>",
        "eot": "<end_of_turn>",
        "system": True,
    },
    "phi3": {
        "official": "trl:phi3",  # microsoft/Phi-3-mini-4k-instruct
        "special": ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "bos": "<s>",
        "eos": "<|endoftext|>",  # the chat ends with it; turns end with <|end|>
        "pad": "<|endoftext|>",
        "eot": "<|end|>",
        "system": True,
    },
    "phi3.5": {
        "official": "trl:phi3_5",  # microsoft/Phi-3.5-mini-instruct
        "special": ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "bos": "<s>",
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "eot": "<|end|>",
        "system": True,
    },
    "qwen2.5": {
        "official": "trl:qwen2_5",  # Qwen/Qwen2.5-*-Instruct
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "eot": "<|im_end|>",
        "system": True,
    },
}


def official(name: str) -> str:
    src = FAMILIES[name]["official"]
    return trl_template(src.removeprefix("trl:")) if src.startswith("trl:") else src


def family_tokenizer(name: str, template: str | None = None, eos: str | None = None) -> Any:
    """A byte-level tokenizer with the family's special tokens, bos/eos/pad and (official) chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[name]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    tok.add_special_tokens({"additional_special_tokens": f["special"]})
    tok.bos_token, tok.eos_token, tok.pad_token = f["bos"], eos or f["eos"], f["pad"]
    tok.chat_template = official(name) if template is None else template
    return tok


def chat(system: bool) -> list[dict[str, str]]:
    return ([{"role": "system", "content": "Answer in one word."}] if system else []) + [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six."},
    ]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_template_is_chosen_and_renders_like_the_official_one(name: str) -> None:
    from finetune_pipeline.training.chat import _PROBES, MARKED, resolve_chat_template

    tok = family_tokenizer(name)
    own = tok.chat_template
    chosen = resolve_chat_template(tok, "auto")
    assert chosen.source == name and chosen.eos_token == FAMILIES[name]["eot"]
    assert "{% generation %}" in chosen.template and MARKED[name].end_of_turn in (FAMILIES[name]["eot"], None)
    before = {}
    for msgs in [*_PROBES, chat(FAMILIES[name]["system"])]:
        for gen in (False, True):
            part = msgs[:-1] if gen else msgs
            try:
                want = tok.apply_chat_template(part, chat_template=own, tokenize=False, add_generation_prompt=gen)
            except Exception:  # the family refuses this chat (Gemma 1/2: a system message): so must the marked one
                with pytest.raises(Exception, match="System role not supported"):
                    tok.apply_chat_template(part, chat_template=chosen.template, tokenize=False)
                continue
            got = tok.apply_chat_template(
                part, chat_template=chosen.template, tokenize=False, add_generation_prompt=gen
            )
            assert got == want
            before[(json.dumps(part), gen)] = want
    # once installed, the end-of-turn token is the tokenizer's EOS token and the text is still the official one
    chosen.install(tok)
    assert tok.eos_token == FAMILIES[name]["eot"] and tok.chat_template == chosen.template
    for (part, gen), want in before.items():
        assert tok.apply_chat_template(json.loads(part), tokenize=False, add_generation_prompt=gen) == want
    # naming the family picks the same template, still verified
    assert resolve_chat_template(family_tokenizer(name), name) == chosen


@pytest.mark.parametrize("name", FAMILIES)
def test_assistant_mask_covers_each_answer_and_its_end_of_turn_token_only(name: str) -> None:
    from finetune_pipeline.training.chat import resolve_chat_template

    tok = family_tokenizer(name)
    chosen = resolve_chat_template(tok, "auto")
    chosen.install(tok)
    enc = tok.apply_chat_template(
        chat(FAMILIES[name]["system"]), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    spans, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    eot = FAMILIES[name]["eot"]
    assert [tok.decode(s) for s in spans] == [f"Four.{eot}", f"Six.{eot}"]
    assert all(s[-1] == tok.convert_tokens_to_ids(eot) for s in spans)  # the end-of-turn token itself is trained


@pytest.mark.parametrize("name", FAMILIES)
def test_altered_official_template_is_refused(name: str) -> None:
    from finetune_pipeline.training.chat import resolve_chat_template

    # one space more after every end of turn: a template this model was not served with
    eot = FAMILIES[name]["eot"]
    altered = official(name).replace(f"{eot}", f"{eot} ") if eot != "</s>" else official(name) + "{{ ' ' }}"
    if altered == official(name):  # the end-of-turn token comes from a variable (eos_token): append instead
        altered = official(name) + "{{ ' ' }}"
    tok = family_tokenizer(name, template=altered)
    with pytest.raises(ValueError, match=r"training.chat_template: .*no \{% generation %\} markers and renders like"):
        resolve_chat_template(tok, "auto")
    with pytest.raises(ValueError, match=rf"'{name}' does not render what the model's own chat template renders"):
        resolve_chat_template(tok, name)


def test_name_of_another_family_is_refused() -> None:
    from finetune_pipeline.training.chat import resolve_chat_template

    tok = family_tokenizer("llama3")
    with pytest.raises(ValueError, match="'gemma' ends answers with '<end_of_turn>', which is not one token"):
        resolve_chat_template(tok, "gemma")
    # same tokens, other rules: Phi-3.5 skips an empty system message, Phi-3 does not
    with pytest.raises(ValueError, match="'phi3.5' does not render .*probe chat 3"):
        resolve_chat_template(family_tokenizer("phi3"), "phi3.5")


def test_base_model_without_template_takes_a_named_one() -> None:
    from finetune_pipeline.training.chat import resolve_chat_template

    tok = family_tokenizer("llama3", template="")
    tok.chat_template = None
    with pytest.raises(ValueError, match="the model has no chat template; name one"):
        resolve_chat_template(tok, "auto")
    assert resolve_chat_template(tok, "llama3").source == "llama3"
