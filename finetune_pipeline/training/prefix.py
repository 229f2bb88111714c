"""Shared-prefix packing: a micro-batch whose rows all begin with the same unlabelled tokens (a fixed system prompt,
a schema, an instruction) computes that prefix once instead of once per row.

A padded batch of B rows runs the common prefix B times, although every row's prefix has the same tokens at the same
positions and (causal attention) the same hidden states and keys / values in every layer. Packed, the batch is one
sequence: the prefix once, then each row's remaining tokens; each row's tokens keep their own positions (rotary
embeddings see what they saw padded) and a 4D mask lets each token attend to the prefix and to the earlier tokens of
its own row only. Each row's tokens then attend to exactly what they attended to padded, the labelled positions
predict the same targets, and the prefix's gradient is the sum over the rows, as padded. The loss and gradients are
the padded batch's (float32: equal to rounding; the tests hold it), the padding is gone too.

The packed batch is used when it pays (``worth_packing``): at least ``MIN_PREFIX`` shared tokens, at least
``MIN_SAVING`` of the padded batch's FLOPs saved (token matmuls plus attention pairs: the mask makes attention dense
over the packed length), and no more activation memory than the padded batch (the memory estimate and the
micro-batch rule hold for the padded batch). torch is imported inside the functions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIN_PREFIX = 8  # shared tokens below this are not worth a second layout
MIN_SAVING = 0.15  # share of the padded batch's FLOPs a packed batch must save
KERNELS = ("eager", "sdpa")  # attention implementations that take a custom 4D mask


@dataclass(frozen=True)
class Shape:
    """What the cost rule needs of the model: hidden size, MLP size, attention heads, key/value width, and the
    sliding attention window where the model has one (a packed batch's mask is dense: rows longer than the window
    stay padded)."""

    hidden: int
    intermediate: int
    heads: int
    kv: int
    window: int | None = None

    @classmethod
    def of(cls, config: Any) -> Shape:
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        h = int(getattr(cfg, "hidden_size", 0) or 0)
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        kv = h // heads * int(getattr(cfg, "num_key_value_heads", heads) or heads)
        window = getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None)
        return cls(
            h, int(getattr(cfg, "intermediate_size", 4 * h) or 4 * h), heads, kv, int(window) if window else None
        )

    def flops(self, tokens: int, pairs: int) -> float:
        """FLOPs of one layer's forward: the projections per token (q, o: h x h; k, v: h x kv; MLP: 3 h x i) and the
        attention's two products per query-key pair."""
        h = self.hidden
        return 2 * tokens * (2 * h * h + 2 * h * self.kv + 3 * h * self.intermediate) + 4 * h * pairs

    def memory(self, tokens: int, pairs: int) -> float:
        """Values autograd keeps in one layer (the memory estimate's per-token block and one probability per head
        and query-key pair: ``cost.estimate_memory``)."""
        return tokens * (12 * self.hidden + 2 * self.kv + 4 * self.intermediate) + self.heads * pairs


def common_prefix(input_ids: Any, attention_mask: Any, labels: Any) -> int:
    """How many leading tokens every row shares that predict no label: the longest common run of equal, unpadded
    tokens, cut where the first labelled target begins (position t predicts token t + 1)."""
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0)
    run = int(same.int().cumprod(0).sum())
    labelled = (labels[:, 1:] != -100).any(0)
    first = int(labelled.int().argmax()) if bool(labelled.any()) else int(input_ids.shape[1])
    return min(run, first)


def worth_packing(lengths: list[int], prefix: int, padded_length: int, shape: Shape) -> bool:
    """The rule: ``prefix`` >= MIN_PREFIX shared tokens, the packed batch saves >= MIN_SAVING of the padded batch's
    FLOPs, and keeps no more activations than the padded batch. Pure: lengths are the rows' unpadded lengths."""
    if len(lengths) < 2 or prefix < MIN_PREFIX:
        return False
    n = prefix + sum(x - prefix for x in lengths)
    padded_tokens, padded_pairs = len(lengths) * padded_length, len(lengths) * padded_length**2
    if shape.flops(n, n * n) > (1 - MIN_SAVING) * shape.flops(padded_tokens, padded_pairs):
        return False
    return shape.memory(n, n * n) <= shape.memory(padded_tokens, padded_pairs)


@dataclass(frozen=True)
class Packed:
    """One packed sequence: ``input_ids`` / ``position_ids`` (1 x N), the 4D ``attention_mask`` (1 x 1 x N x N),
    ``select``: the packed positions whose next token is a target of their row, ``targets``: those targets (-100
    where unlabelled), and ``saved``: the tokens not computed again (the prefix once per row after the first)."""

    input_ids: Any
    position_ids: Any
    attention_mask: Any
    select: Any
    targets: Any
    saved: int


def pack(inputs: dict[str, Any], shape: Shape, attention: str, dtype: Any) -> Packed | None:
    """The packed form of a padded, right-padded micro-batch (``input_ids``, ``attention_mask``, ``labels``), or
    None where the rule says no or the batch is not of that form (other inputs, left padding, an attention kernel
    without custom masks)."""
    import torch

    if attention not in KERNELS or set(inputs) - {"input_ids", "attention_mask", "labels", "position_ids"}:
        return None
    ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
    if mask is None or labels is None or ids.dim() != 2 or ids.shape[0] < 2:
        return None
    if shape.window is not None and ids.shape[1] > shape.window:
        return None
    lengths = mask.sum(1)
    arange = torch.arange(ids.shape[1], device=ids.device)
    if not bool((mask == (arange[None, :] < lengths[:, None]).to(mask.dtype)).all()):
        return None  # not right-padded
    pos = inputs.get("position_ids")
    if pos is not None and not bool((pos[mask == 1] == arange.expand_as(pos)[mask == 1]).all()):
        return None  # rows already packed (trl's padding-free / packing): positions restart inside a row
    s = common_prefix(ids, mask, labels)
    lens = [int(x) for x in lengths.tolist()]
    if not worth_packing(lens, s, int(ids.shape[1]), shape):
        return None
    rows = range(len(lens))
    seq = torch.cat([ids[0, :s]] + [ids[i, s : lens[i]] for i in rows])
    position = torch.cat([arange[:s]] + [arange[s : lens[i]] for i in rows])
    row = torch.cat([torch.full((x - s,), i, device=ids.device) for i, x in enumerate(lens)])
    row = torch.cat([torch.full((s,), -1, device=ids.device), row])
    n = int(seq.shape[0])
    index = torch.arange(n, device=ids.device)
    allowed = (index[None, :] <= index[:, None]) & ((row[None, :] == -1) | (row[None, :] == row[:, None]))
    if attention == "eager":  # added to the scores
        mask4d = torch.zeros(n, n, dtype=dtype, device=ids.device).masked_fill(~allowed, torch.finfo(dtype).min)
    else:
        mask4d = allowed
    # row i's token at original position p (s <= p <= len - 2) predicts labels[i, p + 1]; the prefix predicts none
    offsets = [s + sum(x - s for x in lens[:i]) for i in rows]
    select = torch.cat(
        [torch.arange(o, o + max(0, x - s - 1), device=ids.device) for o, x in zip(offsets, lens, strict=True)]
    )
    targets = torch.cat([labels[i, s + 1 : lens[i]] for i in rows])
    return Packed(seq[None], position[None], mask4d[None, None], select, targets, (len(lens) - 1) * s)
