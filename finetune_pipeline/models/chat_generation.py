"""Chat-template generation shared by evaluation and the served model, so that served = evaluated.

Self-contained on purpose (no package imports, torch inside functions): the registered MLflow model ships this
file next to its serving code (``code_paths``) and calls the same function the evaluation called.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]


def prompt_ids(tok: Any, messages: list[Message]) -> list[int]:
    """Token ids of a conversation up to the assistant's turn, through the tokenizer's chat template."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def generate_answers(
    model: Any,
    tok: Any,
    conversations: list[list[Message]],
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[list[str], list[bool]]:
    """(answers, eos reached) for each conversation (its last turn is the user's): greedy when temperature is 0,
    else sampled with ``seed``. Prompts are left-padded in batches."""
    out = generate_detailed(model, tok, conversations, max_new_tokens, temperature, batch_size, seed)
    return [g["text"] for g in out], [g["eos"] for g in out]


def generate_detailed(
    model: Any,
    tok: Any,
    conversations: list[list[Message]],
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    top_p: float = 1.0,
    streamer: Any = None,
) -> list[dict[str, Any]]:
    """The generation behind ``generate_answers``, per conversation: ``text`` (decoded, special tokens skipped,
    stripped), ``eos`` (the EOS token was generated), ``prompt_tokens`` and ``completion_tokens`` (generated tokens
    up to and including EOS). ``top_p`` < 1 applies nucleus sampling when temperature > 0. ``streamer`` (a
    transformers streamer: ``put`` gets the prompt, then each step's new tokens of the whole batch) sees the tokens
    as they are generated; it changes nothing that is generated."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    sample = temperature > 0
    if sample:
        torch.manual_seed(seed)
    for start in range(0, len(conversations), batch_size):
        batch = [prompt_ids(tok, c) for c in conversations[start : start + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        kw: dict[str, Any] = {"do_sample": True, "temperature": temperature} if sample else {"do_sample": False}
        if sample and top_p < 1.0:
            kw["top_p"] = top_p
        if streamer is not None:
            kw["streamer"] = streamer
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
                **kw,
            )
        for prompt, seq in zip(batch, gen[:, width:].tolist(), strict=True):
            eos = tok.eos_token_id in seq
            out.append(
                {
                    "text": tok.decode(seq, skip_special_tokens=True).strip(),
                    "eos": eos,
                    "prompt_tokens": len(prompt),
                    "completion_tokens": seq.index(tok.eos_token_id) + 1 if eos else len(seq),
                }
            )
    return out
