"""Generation and perplexity for a base model, with or without an adapter. Heavy imports inside functions."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune_pipeline.spec import EvaluationSpec


@dataclass
class ModelOutputs:
    predictions: list[str]
    eos_reached: list[bool]
    perplexity: float
    seconds: float


def _prompt_ids(tok: Any, msgs: list[dict[str, str]]) -> list[int]:
    ids = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def run_model(
    model: Any, tok: Any, messages: list[str], spec: EvaluationSpec, log: Callable[[str], None] = print
) -> ModelOutputs:
    """Greedy generations for each row's prompt, and perplexity of the reference answers."""
    import torch

    t0 = time.perf_counter()
    rows = [json.loads(m) for m in messages]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    preds: list[str] = []
    eos: list[bool] = []
    for start in range(0, len(rows), spec.batch_size):
        batch = [_prompt_ids(tok, r) for r in rows[start : start + spec.batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=spec.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
            )
        for seq in out[:, width:].tolist():
            eos.append(tok.eos_token_id in seq)
            preds.append(tok.decode(seq, skip_special_tokens=True).strip())
        log(f"generated {len(preds)}/{len(rows)}")
    nll, count = 0.0, 0
    for start in range(0, len(rows), spec.batch_size):
        chunk = rows[start : start + spec.batch_size]
        seqs, labels = [], []
        for r in chunk:
            p = _prompt_ids(tok, r)
            full = tok.apply_chat_template(r, tokenize=True, return_dict=False)
            full = list(full["input_ids"] if isinstance(full, dict) else full)
            seqs.append(full)
            labels.append([-100] * len(p) + full[len(p) :])
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        att = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        lab = torch.tensor([lb + [-100] * (width - len(lb)) for lb in labels], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=att).logits.float()
        shift_logits, shift_labels = logits[:, :-1], lab[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        nll += float(loss)
        count += int((shift_labels != -100).sum())
    ppl = math.exp(nll / count) if count else math.nan
    return ModelOutputs(preds, eos, ppl, time.perf_counter() - t0)
