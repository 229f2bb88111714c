"""Shared-prefix packing (training.prefix): the rule, the packed layout, and that a packed micro-batch trains as the
padded one does (loss, gradients, and a whole training run's adapter)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec
from finetune_pipeline.training import prefix
from finetune_pipeline_tests.conftest import chat_row
from finetune_pipeline_tests.test_sft import lean_trainer, request

pytestmark = pytest.mark.integration

SMOL = prefix.Shape(hidden=576, intermediate=1536, heads=9, kv=192)  # SmolLM2-135M
SYSTEM = "Classify the ticket. Categories: billing, technical, account, shipping, other. Answer with JSON only."


def _row(i: int) -> str:
    messages = chat_row(i)["messages"]
    messages[0]["content"] = SYSTEM  # a system prompt every row shares
    return json.dumps(messages)


ROWS = [_row(i) for i in range(16)]
LORA = ModelSpec(dtype="float32", lora={"r": 4, "alpha": 8, "dropout": 0.0})


@pytest.mark.parametrize(
    ("lengths", "shared", "padded", "expected"),
    [
        ([82, 79, 88, 75, 84, 87, 75, 80], 46, 88, True),  # a schema prompt on short rows: packed
        ([82, 79, 88, 75, 84, 87, 75, 80], 7, 88, False),  # fewer than MIN_PREFIX shared tokens
        ([82], 46, 82, False),  # one row: nothing to share
        ([88] * 8, 9, 88, False),  # no padding and 9 shared tokens: saves under MIN_SAVING of the FLOPs
        ([2048] * 8, 1000, 2048, True),  # long rows sharing half their tokens
        ([2048] * 8, 100, 2048, False),  # long rows sharing 5%
    ],
    ids=["schema-prompt", "prefix-too-short", "one-row", "saves-too-little", "long-rows-half-shared", "long-rows-5%"],
)
def test_worth_packing_rule(lengths: list[int], shared: int, padded: int, expected: bool) -> None:
    assert prefix.worth_packing(lengths, shared, padded, SMOL) is expected


def _batch(rows: list[list[int]], labelled_from: list[int], pad: int = 0) -> dict[str, Any]:
    import torch

    t = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (t - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    for i, start in enumerate(labelled_from):
        labels[i, :start] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_common_prefix_stops_at_the_first_difference_and_the_first_target() -> None:
    b = _batch([[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9], [1, 2, 3, 4, 7]], [5, 4, 4])
    assert prefix.common_prefix(b["input_ids"], b["attention_mask"], b["labels"]) == 3
    # a label at token 3 of one row: position 2 predicts it, so only positions 0-1 are shared
    b = _batch([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5]], [3, 4])
    assert prefix.common_prefix(b["input_ids"], b["attention_mask"], b["labels"]) == 2


def test_pack_layout_keeps_positions_and_keeps_rows_apart() -> None:
    import torch

    shared = list(range(100, 140))  # 40 shared tokens, then 5, 3 and 6 of each row's own
    rows = [shared + [1, 2, 3, 4, 5], shared + [6, 7, 8], shared + [9, 10, 11, 12, 13, 14]]
    b = _batch(rows, [41, 41, 41])
    p = prefix.pack(b, SMOL, "sdpa", torch.float32)
    assert p is not None and p.saved == 2 * 40 and p.prefix == 40
    assert p.input_ids[0].tolist() == shared + [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert p.position_ids[0].tolist() == list(range(45)) + list(range(40, 43)) + list(range(40, 46))
    # each row's own tokens, gathered into a 3 x 6 block; the real entries, in order, are the packed rows' tokens
    assert p.gather.tolist() == [[40, 41, 42, 43, 44, 0], [45, 46, 47, 0, 0, 0], [48, 49, 50, 51, 52, 53]]
    assert p.gather.flatten()[p.valid].tolist() == list(range(40, 54))
    keys = p.row_mask[:, 0]  # rows x own x (prefix + own)
    assert keys.shape == (3, 6, 46) and keys[:, :, :40].all()  # every row sees the whole prefix
    assert keys[1, 2, 40:].tolist() == [True, True, True, False, False, False]  # its own, causal; padding never
    assert not keys[1, 0, 41] and keys[2, 5, 40:].all()
    assert p.prefix_mask[0, 0].tolist() == torch.ones(40, 40, dtype=torch.bool).tril().tolist()
    # each labelled position predicts its own row's next token: the targets are the padded batch's, in order
    padded = torch.cat([b["labels"][i, 41 : len(r)] for i, r in enumerate(rows)])
    assert p.targets.tolist() == padded.tolist()
    assert p.input_ids[0, p.select + 1].tolist() == padded.tolist()
    eager = prefix.pack(b, SMOL, "eager", torch.bfloat16)
    assert eager.row_mask.dtype == torch.bfloat16 and bool((eager.row_mask == 0).eq(p.row_mask).all())


@pytest.mark.parametrize(
    "case",
    ["left-padded", "flash-attention", "other-inputs", "one-row", "window-shorter-than-rows", "other-family"],
)
def test_pack_declines_batches_it_cannot_pack_exactly(case: str) -> None:
    import torch

    shared = list(range(100, 140))
    b = _batch([shared + [1, 2, 3, 4, 5], shared + [6, 7, 8]], [41, 41])
    shape, attention = SMOL, "sdpa"
    if case == "left-padded":
        b["attention_mask"] = b["attention_mask"].flip(1)
    elif case == "flash-attention":
        attention = "flash_attention_2"
    elif case == "other-inputs":
        b["token_type_ids"] = torch.zeros_like(b["input_ids"])
    elif case == "one-row":
        b = {k: v[:1] for k, v in b.items()}
    elif case == "window-shorter-than-rows":
        shape = prefix.Shape(576, 1536, 9, 192, window=32)
    else:  # a family whose attention block_attention does not reproduce (soft-capping, sinks, ...)
        shape = prefix.Shape(576, 1536, 9, 192, plain=False)
    assert prefix.pack(b, shape, attention, torch.float32) is None
    assert prefix.pack(_batch([shared + [1, 2, 3, 4, 5], shared + [6, 7, 8]], [41, 41]), SMOL, "sdpa", torch.float32)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_batch_has_the_padded_batchs_loss_and_gradients(
    tiny_model: Path, tmp_path: Path, attention: str
) -> None:
    import torch

    from finetune_pipeline.training.trainer import lean_loss

    trainer = lean_trainer(tiny_model, tmp_path, ROWS[:6], LORA, attention)
    batch = dict(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    for p in trainer.model.parameters():  # B = 0 at initialisation: give the adapter an output to differentiate
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    results = {}
    for share in (False, True):
        trainer.share_prefix, trainer.prefix_tokens_saved = share, 0
        loss = lean_loss(trainer, trainer.model, batch, None)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        trainer.model.zero_grad(set_to_none=True)
        results[share] = (loss.detach(), grads, trainer.prefix_tokens_saved)
    (padded, g_padded, none_saved), (packed, g_packed, saved) = results[False], results[True]
    shared = prefix.common_prefix(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert none_saved == 0 and shared >= prefix.MIN_PREFIX and saved == (len(batch["input_ids"]) - 1) * shared
    assert torch.allclose(packed, padded, rtol=1e-5, atol=1e-6), (packed, padded)
    assert g_padded.keys() == g_packed.keys() and len(g_padded) > 0
    for name, g in g_padded.items():
        assert torch.allclose(g_packed[name], g, rtol=1e-4, atol=1e-6), name


def test_training_with_and_without_the_shared_prefix_gives_the_same_adapter(tiny_model: Path, tmp_path: Path) -> None:
    """Three optimizer steps through the asset's training code (train): the packed run reports the tokens it did
    not compute again, and its adapter is the padded run's (float32)."""
    from safetensors.torch import load_file

    from finetune_pipeline.training.sft import train

    runs = {}
    for share in (False, True):
        t = TrainingSpec(
            max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3, max_length=128, share_prefix=share
        )
        out = tmp_path / f"share-{share}"
        res = train(request(str(tiny_model), LORA, t, ROWS[:12], [], out, runtime=RuntimeSpec()), log=lambda m: None)
        runs[share] = (res, load_file(str(out / "adapter_model.safetensors")))
    (r0, w0), (r1, w1) = runs[False], runs[True]
    assert r0.prefix_tokens_saved == 0 and r1.prefix_tokens_saved > 0
    assert r0.train_tokens == r1.train_tokens  # the tokens trained on are the same; fewer were computed
    assert w0.keys() == w1.keys() and len(w0) > 0
    import torch

    for name, w in w0.items():
        assert torch.allclose(w1[name], w, rtol=1e-3, atol=1e-5), name
