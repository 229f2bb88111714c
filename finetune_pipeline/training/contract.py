"""The end-of-turn contract, checked on the tokenised training rows before any training step.

Every assistant turn that carries loss must end with the end-of-turn / EOS token inside the loss mask (else the
model never learns to stop), and no row may be trained as empty or all-masked (trl silently drops rows that
truncation left all-masked; a template without ``{% generation %}`` markers masks everything). ``check_rows`` is the
pure rule over (input_ids, labels) rows; ``tokenize_rows`` builds those rows the way trl 1.16's SFTTrainer does
(``_prepare_dataset``: chat template, assistant or completion mask, truncation to max_length), so the Dagster check
can run before the training child starts; the child runs ``check_rows`` again on trl's own tokenised dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from finetune_pipeline.spec import TrainingSpec

IGNORE = -100


class EndOfTurnContractError(ValueError):
    """Training rows break the end-of-turn contract: the run stops before training."""


@dataclass
class ContractReport:
    rows: int
    empty_rows: int = 0  # no token carries loss (all-masked, e.g. truncated away)
    no_eos_rows: int = 0  # some loss-carrying span does not end with the EOS token
    example: dict[str, Any] | None = None  # one failing row: its index, reason and the tail of its loss span
    eos_token: str = ""
    failing_indices: list[int] = field(default_factory=list)

    @property
    def failing(self) -> int:
        return len(self.failing_indices)

    @property
    def share_failing(self) -> float:
        return self.failing / self.rows if self.rows else 0.0

    @property
    def passed(self) -> bool:
        return self.rows > 0 and self.failing == 0

    def message(self) -> str:
        if self.rows == 0:
            return "no training rows to check"
        if self.passed:
            return f"all {self.rows} rows end every loss-carrying turn with {self.eos_token!r}"
        return (
            f"{self.failing} of {self.rows} training rows ({self.share_failing:.1%}) break the end-of-turn contract "
            f"({self.empty_rows} carry no loss at all, {self.no_eos_rows} have a trained assistant turn that does not "
            f"end with {self.eos_token!r} inside the loss mask); e.g. row {self.example['row'] if self.example else '?'}"
            f": {self.example['reason'] if self.example else ''}. A model trained on them would not learn to stop. "
            "Fix training.chat_template (the {% generation %} block must include the end-of-turn token), raise "
            "training.max_length or bound rows with cleaning.max_tokens"
        )

    def as_metadata(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "failing_rows": self.failing,
            "share_failing": round(self.share_failing, 4),
            "empty_rows": self.empty_rows,
            "no_eos_rows": self.no_eos_rows,
            "eos_token": self.eos_token,
            "example": self.example,
        }


def loss_spans(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each contiguous run of loss-carrying positions (labels != -100)."""
    spans, start = [], None
    for i, lab in enumerate(labels):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


def check_rows(
    rows: list[tuple[list[int], list[int]]],
    eos_id: int,
    eos_token: str = "",
    decode: Any = None,
    whitespace_ids: set[int] | None = None,
    dropped: list[int] | None = None,
) -> ContractReport:
    """The contract over (input_ids, labels) rows: each loss span must contain ``eos_id`` with only whitespace
    tokens (``whitespace_ids``, e.g. the newline a ChatML completion mask also covers) after it; a row with no loss
    span fails as empty. ``dropped``: indices of rows the trainer already removed as all-masked (counted as empty)."""
    ws = whitespace_ids or set()
    rep = ContractReport(rows=len(rows) + len(dropped or []), eos_token=eos_token)
    for i in dropped or []:
        rep.empty_rows += 1
        rep.failing_indices.append(i)
        rep.example = rep.example or {"row": i, "reason": "all tokens masked: nothing of the answer is trained"}
    for i, (ids, labels) in enumerate(rows):
        spans = loss_spans(labels)
        if not spans:
            rep.empty_rows += 1
            rep.failing_indices.append(i)
            rep.example = rep.example or {"row": i, "reason": "all tokens masked: nothing of the answer is trained"}
            continue
        for s, e in spans:
            span = ids[s:e]
            last_eos = max((k for k, t in enumerate(span) if t == eos_id), default=-1)
            if last_eos < 0 or any(t not in ws for t in span[last_eos + 1 :]):
                rep.no_eos_rows += 1
                rep.failing_indices.append(i)
                tail = decode(span[-12:]) if decode else span[-12:]
                rep.example = rep.example or {
                    "row": i,
                    "reason": f"a trained turn ends without {eos_token or eos_id!r}; its last trained tokens: {tail!r}",
                }
                break
    return rep


def whitespace_token_ids(tok: Any) -> set[int]:
    """Ids of tokens that decode to whitespace only (the newline after ChatML's <|im_end|>, etc.)."""
    ids = set()
    for t in ("\n", "\n\n", " ", "\t"):
        enc = tok.encode(t, add_special_tokens=False)
        if len(enc) == 1:
            ids.add(enc[0])
    return ids


def _ids(out: Any, key: str = "input_ids") -> list[int]:
    return list(out[key] if isinstance(out, dict) or hasattr(out, "keys") else out)


def tokenize_rows(
    tok: Any, template: str, messages: list[str], training: TrainingSpec
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row as trl 1.16's SFTTrainer builds them (before its all-masked filter): messages with
    assistant masks (``assistant_only_loss``), else prompt/completion with the completion mask; then truncated to
    ``max_length`` (keep_start) unless padding-free without packing."""
    from finetune_pipeline.data.messages import to_prompt_completion

    t = training
    out = []
    for m in messages:
        if t.assistant_only_loss:
            msgs = json.loads(m)
            enc = tok.apply_chat_template(
                msgs, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids, mask = _ids(enc), _ids(enc, "assistant_masks")
        else:
            pc = to_prompt_completion(m)
            p = tok.apply_chat_template(
                pc["prompt"], chat_template=template, tokenize=True, return_dict=True, add_generation_prompt=True
            )
            f = tok.apply_chat_template(
                pc["prompt"] + pc["completion"], chat_template=template, tokenize=True, return_dict=True
            )
            p_ids, ids = _ids(p), _ids(f)
            n = 0
            while n < min(len(p_ids), len(ids)) and p_ids[n] == ids[n]:
                n += 1
            mask = [0] * n + [1] * (len(ids) - n) if t.completion_only_loss else [1] * len(ids)
        labels = [i if b else IGNORE for i, b in zip(ids, mask, strict=False)]
        if not (t.padding_free and not t.packing):
            ids, labels = ids[: t.max_length], labels[: t.max_length]
        out.append((ids, labels))
    return out


def check_messages(tok: Any, template: str, messages: list[str], training: TrainingSpec) -> ContractReport:
    """``check_rows`` on ``tokenize_rows``: the contract for a split before training."""
    rows = tokenize_rows(tok, template, messages, training)
    return check_rows(rows, tok.eos_token_id, str(tok.eos_token), tok.decode, whitespace_token_ids(tok))


def check_trainer_dataset(trainer: Any, tok: Any, n_raw: int, packing: bool) -> ContractReport:
    """The contract on trl's own tokenised training dataset (what will be trained); rows trl dropped as all-masked
    (raw rows minus prepared rows, without packing) count as empty."""
    ds = trainer.train_dataset
    rows = [(list(r["input_ids"]), list(r["labels"])) for r in ds]
    dropped = [] if packing else list(range(len(rows), n_raw))
    return check_rows(rows, tok.eos_token_id, str(tok.eos_token), tok.decode, whitespace_token_ids(tok), dropped)
