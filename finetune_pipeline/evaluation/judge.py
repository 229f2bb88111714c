"""Optional LLM-as-judge: pairwise comparison of two answers to the same prompt, asked in both orders (position
swap), by a local judge model or an OpenAI-compatible endpoint whose URL and key come from environment variables.
Off by default; its verdicts go into the report and never into a gate."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable
from typing import Any

from finetune_pipeline.spec import JudgeSpec

PROMPT = (
    "You compare two answers to the same request. Request:\n{prompt}\n\nReference answer:\n{reference}\n\n"
    "Answer A:\n{a}\n\nAnswer B:\n{b}\n\nWhich answer is better? Reply with the single letter A or B."
)
Prefer = Callable[[str], str]  # judge prompt -> "A" or "B"


def local_judge(path: str) -> Prefer:
    """A local causal LM (a folder, or a hub id already in the local cache: nothing downloads): the letter with the
    higher next-token logit after the chat-templated question (deterministic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    ids_ab = [tok.encode(x, add_special_tokens=False)[0] for x in ("A", "B")]

    def prefer(question: str) -> str:
        msgs = [{"role": "user", "content": question}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        return "A" if logits[ids_ab[0]] >= logits[ids_ab[1]] else "B"

    return prefer


def endpoint_judge(spec: JudgeSpec) -> Prefer:
    """An OpenAI-compatible chat endpoint: base URL from ``spec.endpoint_env``, key from ``spec.api_key_env``."""
    url = os.environ.get(spec.endpoint_env)
    if not url:
        raise ValueError(f"evaluation.judge: set {spec.endpoint_env} (an OpenAI-compatible base URL) or judge.model")
    key = os.environ.get(spec.api_key_env, "")

    def prefer(question: str) -> str:
        body = {
            "model": spec.endpoint_model,
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": 1,
        }
        req = urllib.request.Request(
            url.rstrip("/") + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            text = json.loads(r.read())["choices"][0]["message"]["content"].strip().upper()
        return "A" if text.startswith("A") else "B"

    return prefer


def judge_pairs(
    prefer: Prefer, prompts: list[str], refs: list[str], candidate: list[str], other: list[str], label: str
) -> dict[str, Any]:
    """Per row: the candidate wins only if preferred in both orders, loses only if the other is preferred in both,
    else a tie (the judge followed position, not content)."""
    rows = []
    for p, r, c, o in zip(prompts, refs, candidate, other, strict=True):
        first = prefer(PROMPT.format(prompt=p, reference=r, a=c, b=o))  # candidate in position A
        second = prefer(PROMPT.format(prompt=p, reference=r, a=o, b=c))  # swapped
        verdict = "win" if (first, second) == ("A", "B") else "loss" if (first, second) == ("B", "A") else "tie"
        rows.append({"first": first, "swapped": second, "verdict": verdict})
    counts = {v: sum(x["verdict"] == v for x in rows) for v in ("win", "tie", "loss")}
    return {
        "against": label,
        "rows": rows,
        **counts,
        "summary": f"tuned vs {label}, {len(rows)} rows judged in both orders: {counts['win']} wins, "
        f"{counts['tie']} ties (position-dependent or equal), {counts['loss']} losses",
    }


def run_judge(
    spec: JudgeSpec, prompts: list[str], refs: list[str], tuned: list[str], other: list[str], label: str
) -> dict[str, Any]:
    prefer = local_judge(spec.model) if spec.model else endpoint_judge(spec)
    n = spec.max_rows
    return {
        **judge_pairs(prefer, prompts[:n], refs[:n], tuned[:n], other[:n], label),
        "judge": spec.model or os.environ.get(spec.endpoint_env, ""),
    }
