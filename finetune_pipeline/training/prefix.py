"""Shared-prefix packing: a micro-batch whose rows all begin with the same unlabelled tokens (a fixed system prompt,
a schema, an instruction) computes that prefix once instead of once per row.

A padded batch of B rows runs the common prefix B times, although every row's prefix has the same tokens at the same
positions and (causal attention) the same hidden states and keys / values in every layer. Packed, the batch is one
sequence: the prefix once, then each row's remaining tokens; each row's tokens keep their own positions (rotary
embeddings see what they saw padded) and each token attends to the prefix and to the earlier tokens of its own row
only. Each row's tokens then attend to exactly what they attended to padded, the labelled positions
predict the same targets, and the prefix's gradient is the sum over the rows, as padded. The loss and gradients are
the padded batch's (float32: equal to rounding; the tests hold it), the padding is gone too.

Attention runs as ``block_attention`` (a transformers attention function, in force only for the packed forward):
the prefix attends to itself, and each row's own tokens, gathered into a padded block, attend to the prefix and to
themselves: no pair the padded batch did not compute, so activations never exceed the padded batch's and the memory
estimate and micro-batch rule still hold. The packed batch is used when it pays (``worth_packing``: at least
``MIN_PREFIX`` shared tokens, at least ``MIN_SAVING`` of the padded batch's FLOPs saved), for model families whose
attention ``block_attention`` reproduces (``PLAIN``). torch and transformers are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

MIN_PREFIX = 8  # shared tokens below this are not worth a second layout
MIN_SAVING = 0.15  # share of the padded batch's FLOPs a packed batch must save
KERNELS = ("eager", "sdpa")  # the model's attention settings block_attention stands in for
# model families whose attention is plain scaled dot-product attention over rotary q / k (no soft-capping, sinks or
# extra attention inputs), which block_attention computes the same way
PLAIN = {"llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo2", "smollm3"}


@dataclass(frozen=True)
class Shape:
    """What the rule needs of the model: hidden size, MLP size, attention heads, key/value width, the sliding
    attention window where the model has one (``block_attention`` applies none: rows longer than the window stay
    padded), and whether its family's attention is one ``block_attention`` reproduces."""

    hidden: int
    intermediate: int
    heads: int
    kv: int
    window: int | None = None
    plain: bool = True  # a PLAIN family without attention dropout

    @classmethod
    def of(cls, config: Any) -> Shape:
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        h = int(getattr(cfg, "hidden_size", 0) or 0)
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        kv = h // heads * int(getattr(cfg, "num_key_value_heads", heads) or heads)
        window = getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None)
        plain = getattr(cfg, "model_type", None) in PLAIN and not float(getattr(cfg, "attention_dropout", 0) or 0)
        inter = int(getattr(cfg, "intermediate_size", 4 * h) or 4 * h)
        return cls(h, inter, heads, kv, int(window) if window else None, plain)

    def flops(self, tokens: int, pairs: int) -> float:
        """FLOPs of one layer's forward: the projections per token (q, o: h x h; k, v: h x kv; MLP: 3 h x i) and the
        attention's two products per query-key pair."""
        h = self.hidden
        return 2 * tokens * (2 * h * h + 2 * h * self.kv + 3 * h * self.intermediate) + 4 * h * pairs


def common_prefix(input_ids: Any, attention_mask: Any, labels: Any) -> int:
    """How many leading tokens every row shares that predict no label: the longest common run of equal, unpadded
    tokens, cut where the first labelled target begins (position t predicts token t + 1)."""
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0)
    run = int(same.int().cumprod(0).sum())
    labelled = (labels[:, 1:] != -100).any(0)
    first = int(labelled.int().argmax()) if bool(labelled.any()) else int(input_ids.shape[1])
    return min(run, first)


def worth_packing(lengths: list[int], prefix: int, padded_length: int, shape: Shape) -> bool:
    """The rule: at least two rows, ``prefix`` >= MIN_PREFIX shared tokens, and the packed batch saves >= MIN_SAVING
    of the padded batch's FLOPs (token projections plus attention pairs: the prefix's own, and each row's block
    of its own tokens against the prefix and themselves, as ``block_attention`` computes them). Fewer tokens and
    fewer pairs: it never keeps more activations than the padded batch. Pure: lengths are the unpadded lengths."""
    if len(lengths) < 2 or prefix < MIN_PREFIX:
        return False
    own = [x - prefix for x in lengths]
    tokens, longest = prefix + sum(own), max(own)
    pairs = prefix * prefix + len(lengths) * longest * (prefix + longest)
    padded = shape.flops(len(lengths) * padded_length, len(lengths) * padded_length**2)
    return shape.flops(tokens, pairs) <= (1 - MIN_SAVING) * padded


@dataclass(frozen=True)
class Packed:
    """One packed sequence: ``input_ids`` / ``position_ids`` (1 x N); ``select``: the packed positions whose next
    token is a target of their row, ``targets``: those targets (-100 where unlabelled); ``saved``: the tokens not
    computed again (the prefix once per row after the first); and the attention layout (``block_attention``):
    ``prefix`` tokens, ``gather`` (rows x longest own part: packed positions of each row's own tokens, 0 where
    padded), ``valid`` (the gathered entries that are real, flat, in packed order), the prefix's causal mask and
    the rows' mask (the prefix, then their own tokens causally), additive for eager and boolean for sdpa."""

    input_ids: Any
    position_ids: Any
    select: Any
    targets: Any
    saved: int
    prefix: int
    gather: Any
    valid: Any
    prefix_mask: Any
    row_mask: Any
    kernel: str


def pack(inputs: dict[str, Any], shape: Shape, attention: str, dtype: Any) -> Packed | None:
    """The packed form of a padded, right-padded micro-batch (``input_ids``, ``attention_mask``, ``labels``), or
    None where the rule says no or the batch is not of that form (other inputs, left padding, an attention kernel
    or model family ``block_attention`` does not cover)."""
    import torch

    if (
        attention not in KERNELS
        or not shape.plain
        or set(inputs) - {"input_ids", "attention_mask", "labels", "position_ids"}
    ):
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
    rows, dev = range(len(lens)), ids.device
    own = [x - s for x in lens]
    seq = torch.cat([ids[0, :s]] + [ids[i, s : lens[i]] for i in rows])
    position = torch.cat([arange[:s]] + [arange[s : lens[i]] for i in rows])
    offsets = [s + sum(own[:i]) for i in rows]
    longest = max(own)
    local = torch.arange(longest, device=dev)
    real = local[None, :] < torch.tensor(own, device=dev)[:, None]  # rows x longest
    gather = (torch.tensor(offsets, device=dev)[:, None] + local[None, :]).masked_fill(~real, 0)
    causal = torch.ones(s, s, dtype=torch.bool, device=dev).tril()
    own_keys = (local[None, :] <= local[:, None])[None] & real[:, None, :]  # causal among a row's own, no padding
    keys = torch.cat([torch.ones(len(lens), longest, s, dtype=torch.bool, device=dev), own_keys], dim=2)
    if attention == "eager":  # added to the scores
        low = torch.finfo(dtype).min
        causal = torch.zeros(s, s, dtype=dtype, device=dev).masked_fill(~causal, low)
        keys = torch.zeros(keys.shape, dtype=dtype, device=dev).masked_fill(~keys, low)
    # row i's token at original position p (s <= p <= len - 2) predicts labels[i, p + 1]; the prefix predicts none
    select = torch.cat([torch.arange(o, o + max(0, n - 1), device=dev) for o, n in zip(offsets, own, strict=True)])
    targets = torch.cat([labels[i, s + 1 : lens[i]] for i in rows])
    return Packed(
        seq[None],
        position[None],
        select,
        targets,
        (len(lens) - 1) * s,
        s,
        gather,
        real.flatten().nonzero().squeeze(1),
        causal[None, None],
        keys[:, None],
        attention,
    )


_LAYOUT: ContextVar[Packed | None] = ContextVar("finetune_pipeline_packed_layout", default=None)
NAME = "finetune_pipeline_shared_prefix"


def block_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None, **kwargs: Any
) -> tuple[Any, None]:
    """transformers' attention interface for a packed batch (in force as ``NAME`` while ``packed_attention`` runs):
    the prefix attends to itself causally; each row's own tokens, gathered into a padded rows x longest block,
    attend to the prefix's keys and causally to their own; the result goes back into packed order. The pairs
    computed are the padded batch's (fewer: the prefix once), never N x N."""
    import torch

    lay = _LAYOUT.get()
    if lay is None:
        raise RuntimeError("block_attention runs only inside prefix.packed_attention")
    s, heads, groups = lay.prefix, query.shape[1], query.shape[1] // key.shape[1]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q, k, v = query[0], key[0], value[0]  # heads x N x d (keys and values: kv heads)

    def attend(q: Any, k: Any, v: Any, mask: Any) -> Any:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # transformers' repeat_kv
        if lay.kernel == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        w = torch.matmul(q, k.transpose(2, 3)) * scaling + mask
        return torch.matmul(torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)

    prefix_out = attend(q[None, :, :s], k[None, :, :s], v[None, :, :s], lay.prefix_mask)[0]  # heads x s x d
    b = lay.gather.shape[0]
    kp, vp = k[None, :, :s].expand(b, -1, -1, -1), v[None, :, :s].expand(b, -1, -1, -1)
    rows_k = torch.cat([kp, k[:, lay.gather].transpose(0, 1)], dim=2)  # rows x kv heads x (s + longest) x d
    rows_v = torch.cat([vp, v[:, lay.gather].transpose(0, 1)], dim=2)
    rows_out = attend(q[:, lay.gather].transpose(0, 1), rows_k, rows_v, lay.row_mask)  # rows x heads x longest x d
    rows_out = rows_out.transpose(0, 1).reshape(heads, -1, q.shape[-1])[:, lay.valid]  # heads x (N - s) x d
    out = torch.cat([prefix_out, rows_out], dim=1)
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None  # 1 x N x heads x d, as the model expects


@contextmanager
def packed_attention(config: Any, packed: Packed) -> Iterator[None]:
    """Run the model's attention as ``block_attention`` over ``packed`` for the duration (one forward pass; the
    backward pass uses the graph it built). The model's own attention setting is restored afterwards."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, block_attention)  # the same entry each time
    token, before = _LAYOUT.set(packed), config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _LAYOUT.reset(token)
