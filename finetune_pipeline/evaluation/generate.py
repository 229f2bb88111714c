"""Generation and perplexity for one model on the test rows. Heavy imports inside functions.

Generation goes through models.chat_generation, the same function the registered model serves with.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from finetune_pipeline.models.chat_generation import generate_answers, prompt_ids
from finetune_pipeline.spec import EvaluationSpec


class ModelOutputs(BaseModel):
    """One model's greedy answers on the test rows and the log-likelihood of each reference answer."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    predictions: list[str]
    eos_reached: list[bool]
    row_nll: list[float]
    row_tokens: list[int]
    seconds: float

    @property
    def perplexity(self) -> float:
        n = sum(self.row_tokens)
        return math.exp(sum(self.row_nll) / n) if n else math.nan


def run_model(
    model: Any, tok: Any, messages: list[str], spec: EvaluationSpec, log: Callable[[str], None] = print
) -> ModelOutputs:
    """Greedy generations for each row's prompt, and the summed NLL of each row's reference answer."""
    t0 = time.perf_counter()
    rows = [json.loads(m) for m in messages]
    preds: list[str] = []
    eos: list[bool] = []
    for start in range(0, len(rows), spec.batch_size):
        chunk = [r[:-1] for r in rows[start : start + spec.batch_size]]
        p, e = generate_answers(model, tok, chunk, spec.max_new_tokens, 0.0, spec.batch_size)
        preds += p
        eos += e
        log(f"generated {len(preds)}/{len(rows)}")
    nll, count = reference_nll(model, tok, rows, spec.batch_size)
    return ModelOutputs(
        predictions=preds, eos_reached=eos, row_nll=nll, row_tokens=count, seconds=time.perf_counter() - t0
    )


def _nll_batch(model: Any, seqs: list[list[int]], labels: list[list[int]], pad: int) -> tuple[list[float], list[int]]:
    import torch

    device = next(model.parameters()).device
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    att = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    lab = torch.tensor([lb + [-100] * (width - len(lb)) for lb in labels], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits.float()
    shift_logits, shift_labels = logits[:, :-1], lab[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
    )
    return loss.sum(dim=1).tolist(), (shift_labels != -100).sum(dim=1).tolist()


def reference_nll(
    model: Any, tok: Any, rows: list[list[dict[str, str]]], batch_size: int
) -> tuple[list[float], list[int]]:
    """Per row: summed NLL of the final (assistant) message given the rest, and its token count."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    nll: list[float] = []
    count: list[int] = []
    for start in range(0, len(rows), batch_size):
        seqs, labels = [], []
        for r in rows[start : start + batch_size]:
            p = prompt_ids(tok, r[:-1])
            full = tok.apply_chat_template(r, tokenize=True, return_dict=False)
            full = list(full["input_ids"] if isinstance(full, dict) else full)
            seqs.append(full)
            labels.append([-100] * len(p) + full[len(p) :])
        a, b = _nll_batch(model, seqs, labels, pad)
        nll += a
        count += b
    return nll, count


def text_nll(
    model: Any, tok: Any, texts: list[str], batch_size: int = 8, max_length: int = 256
) -> tuple[list[float], list[int]]:
    """Per passage: summed NLL of plain text (no chat template) and its scored token count (forgetting probe)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    nll: list[float] = []
    count: list[int] = []
    for start in range(0, len(texts), batch_size):
        seqs = [
            list(tok(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts[start : start + batch_size]
        ]
        a, b = _nll_batch(model, seqs, [list(s) for s in seqs], pad)
        nll += a
        count += b
    return nll, count
