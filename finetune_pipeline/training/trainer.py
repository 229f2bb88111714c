"""trl's SFTTrainer with two additions: the data-order record (a digest of every micro-batch trained on) and the
lean training loss (the LM head projects only the labelled positions).

This module imports trl at import time (the trainer subclasses ``SFTTrainer``): import it only inside functions
that train, as ``sft.setup`` does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from trl import SFTTrainer


def _digest(t: Any) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]


class RecordingSFTTrainer(SFTTrainer):
    """SFTTrainer that records a digest of every micro-batch it trains on (the data-order record) and computes the
    training loss with ``lean_loss`` where that applies."""

    order_file: Path | None = None
    session: int = 0  # the step this session resumed from (0: a fresh run)
    share_prefix: bool = False  # training.share_prefix: pack micro-batches whose rows share a prefix (prefix.pack)
    prefix_tokens_saved: int = 0  # tokens the packing did not compute again, this session

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        if self.order_file is not None and self.is_world_process_zero():
            line = {
                "step": self.state.global_step + 1,
                "batch": _digest(inputs["input_ids"]),
                "resumed_from": self.session,
            }
            with self.order_file.open("a") as fh:  # written as it happens: a killed run's record survives
                fh.write(json.dumps(line) + "\n")
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if return_outputs or not self.model.training or not lean_ok(self):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return lean_loss(self, model, inputs, num_items_in_batch)


def lean_ok(trainer: Any) -> bool:
    """The lean loss applies to one process, plain NLL, and models without logit scaling or soft-capping."""
    cfg = trainer.model.config.get_text_config()
    return (
        trainer.accelerator.num_processes == 1
        and trainer.compute_loss_func is None
        and trainer.label_smoother is None
        and not trainer.aux_loss_enabled
        and trainer.args.loss_type == "nll"
        and getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) is None
        and getattr(cfg, "logits_scaling", None) is None
    )


def lean_loss(trainer: Any, model: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> Any:
    """Training loss without trl's per-step extras: the LM head projects only the positions that carry a label
    (on CPU trl's fused head scores every position, prompt and padding included) and no full-vocabulary entropy is
    computed for the logs. Same value as trl's loss: summed answer-token NLL over ``num_items_in_batch``."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    packed = _packed(trainer, base, inputs) if trainer.share_prefix else None
    if packed is not None:  # the rows' shared prefix computed once (training.prefix)
        from finetune_pipeline.training.prefix import packed_attention

        placeholder = torch.zeros(1, 1, 1, 1, device=packed.input_ids.device)  # a 4D mask is passed on as it is
        with packed_attention(backbone.config, packed):
            out = backbone(
                input_ids=packed.input_ids,
                attention_mask=placeholder,
                position_ids=packed.position_ids,
                use_cache=False,
            )
        hidden, target = out.last_hidden_state[0, packed.select], packed.targets
        trainer.prefix_tokens_saved += packed.saved
    else:
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        fwd["use_cache"] = False
        hidden = backbone(**fwd).last_hidden_state[:, :-1]
        target = inputs["labels"][:, 1:]
    mask = target != -100
    head = base.get_output_embeddings()
    logits = head(hidden[mask].to(head.weight.device)).float()
    picked = target[mask].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits, picked, reduction="sum")
    denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = nll / torch.as_tensor(denom, device=nll.device).clamp(min=1)
    with torch.no_grad():
        acc = (logits.argmax(-1) == picked).float().mean().item() if picked.numel() else 0.0
    n_tok = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(inputs["input_ids"].numel())
    trainer._total_train_tokens += n_tok
    trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]
    trainer._metrics["train"]["mean_token_accuracy"].append(acc)
    return loss


def _packed(trainer: Any, base: Any, inputs: dict[str, Any]) -> Any:
    """The micro-batch with its rows' shared prefix computed once (``prefix.pack``), or None where it does not pay
    or does not apply (gradient checkpointing, LoRA dropout: each row would share the prefix's dropout mask)."""
    from finetune_pipeline.training import prefix

    if trainer.args.gradient_checkpointing or _lora_dropout(trainer.model):
        return None
    dtype = base.get_input_embeddings().weight.dtype
    return prefix.pack(inputs, prefix.Shape.of(base.config), str(base.config._attn_implementation), dtype)


def _lora_dropout(model: Any) -> bool:
    cfg = getattr(model, "peft_config", None) or {}
    return any(float(getattr(c, "lora_dropout", 0.0) or 0.0) > 0 for c in cfg.values())
