"""Personal data and secrets in message texts (cleaning.pii): found, counted per kind, and masked in place or only
reported.

Kinds and what finds them:

- ``email``: an address pattern (local part @ domain with a dot and a top-level domain of letters);
- ``phone``: Google's libphonenumber (the ``phonenumbers`` package, ``PhoneNumberMatcher`` at leniency VALID: a
  number must be a valid number of its region; numbers without a +country code are read in
  ``cleaning.pii.phone_region``);
- ``card``: runs of 13 to 19 digits (spaces or dashes between groups allowed) that pass the Luhn checksum
  (``python-stdnum``'s ``luhn``);
- ``secret``: the token patterns of Yelp's ``detect-secrets`` (its regex plugins: AWS, GitHub, GitLab, Slack, Stripe,
  OpenAI, SendGrid, Twilio, PyPI, npm, JWT, private-key blocks, URL credentials, ...). Its entropy and keyword
  plugins are left out: on prose they flag ordinary words.

Every pattern runs once over all texts of a drop joined (not once per row); matches are mapped back to their
message. Overlapping findings keep the first kind in the order secret, card, email, phone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

KINDS = ("secret", "card", "email", "phone")
MASKS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "secret": "[SECRET]"}
SEP = "\n\x00\n"  # between texts when they are joined: no pattern matches across it
EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}(?![\w-])"
)
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE_HINT = r"\d[\d\s().+-]{5,}\d"  # RE2 (Arrow): texts without this cannot hold a phone number
TOKEN_TAIL = re.compile(r"[A-Za-z0-9_\-+/=.]*")
PRIVATE_KEY_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----|---- END SSH2 ENCRYPTED PRIVATE KEY ----")
LEFT_OUT_PLUGINS = {"IPPublicDetector"}  # a public IP address is not a secret


@lru_cache(maxsize=1)
def secret_patterns() -> tuple[re.Pattern[str], ...]:
    """The regexes of detect-secrets' pattern plugins (its own list, so new token kinds come with its updates)."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.plugins.base import RegexBasedDetector

    out: list[re.Pattern[str]] = []
    for cls in get_mapping_from_secret_type_to_class().values():
        if issubclass(cls, RegexBasedDetector) and cls.__name__ not in LEFT_OUT_PLUGINS:
            out.extend(cls().denylist)
    return tuple(out)


@dataclass
class Findings:
    """What one scan found: one row per finding (``text`` = index of the text scanned, ``kind``, ``start``, ``end``),
    and the texts after masking (the input unchanged in report mode)."""

    table: pd.DataFrame
    texts: pa.Array

    def counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.table["kind"].value_counts().sort_index().items()}


def _secret_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for pat in secret_patterns():
        for m in pat.finditer(text):
            g = m.lastindex or 0
            start, end = m.span(g) if g and m.group(g) and len(m.group(g)) >= 8 else m.span()
            if "PRIVATE KEY" in m.group(0) or "PuTTY" in m.group(0):
                tail = PRIVATE_KEY_END.search(text, end)
                nxt = text.find(SEP, end)
                if tail and (nxt < 0 or tail.end() <= nxt):
                    end = tail.end()
            else:
                end = TOKEN_TAIL.match(text, end).end()  # type: ignore[union-attr]
            spans.append((start, end))
    return spans


def _card_spans(text: str) -> list[tuple[int, int]]:
    from stdnum import luhn

    out = []
    for m in CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn.is_valid(digits):
            out.append(m.span())
    return out


def _phone_spans(texts: list[str], region: str) -> list[tuple[int, int, int]]:
    import phonenumbers

    out = []
    for i, t in enumerate(texts):
        for m in phonenumbers.PhoneNumberMatcher(t, region, leniency=phonenumbers.Leniency.VALID):
            out.append((i, m.start, m.end))
    return out


def scan(texts: pa.Array, kinds: list[str], mask: bool, phone_region: str = "US") -> Findings:
    """Find the ``kinds`` in every text of ``texts`` (a string array without nulls); with ``mask`` the texts come
    back with each finding replaced by its mask (``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[SECRET]``)."""
    n = len(texts)
    empty = pd.DataFrame({"text": np.zeros(0, np.int64), "kind": [], "start": [], "end": []})
    if not n or not kinds:
        return Findings(empty, texts)
    lengths = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + len(SEP))[:-1]]).astype(np.int64)
    joined = SEP.join(texts.to_pylist()) if any(k in kinds for k in ("secret", "card", "email")) else ""
    rows: list[tuple[int, str, int, int]] = []

    def add(kind: str, spans: list[tuple[int, int]]) -> None:
        if not spans:
            return
        s = np.array([a for a, _ in spans], np.int64)
        e = np.array([b for _, b in spans], np.int64)
        idx = np.searchsorted(starts, s, side="right") - 1
        ok = e <= starts[idx] + lengths[idx]  # never across two texts
        rows.extend(
            (int(i), kind, int(a - starts[i]), int(b - starts[i]))
            for i, a, b in zip(idx[ok], s[ok], e[ok], strict=True)
        )

    if "secret" in kinds:
        add("secret", _secret_spans(joined))
    if "card" in kinds:
        add("card", _card_spans(joined))
    if "email" in kinds and "@" in joined:
        add("email", [m.span() for m in EMAIL.finditer(joined)])
    if "phone" in kinds:
        cand = np.flatnonzero(pc.match_substring_regex(texts, PHONE_HINT).to_numpy(zero_copy_only=False))
        if len(cand):
            found = _phone_spans(texts.take(pa.array(cand)).to_pylist(), phone_region)
            rows.extend((int(cand[i]), "phone", a, b) for i, a, b in found)
    if not rows:
        return Findings(empty, texts)
    table = _without_overlaps(pd.DataFrame(rows, columns=["text", "kind", "start", "end"]))
    return Findings(table, _masked(texts, table) if mask else texts)


def _without_overlaps(table: pd.DataFrame) -> pd.DataFrame:
    """One finding per stretch of text: the first kind in KINDS order wins, then the earlier, longer span."""
    rank = table["kind"].map({k: i for i, k in enumerate(KINDS)})
    t = table.assign(_rank=rank).sort_values(["text", "_rank", "start"], kind="stable")
    keep = np.ones(len(t), bool)
    taken: dict[int, list[tuple[int, int]]] = {}
    for j, (i, a, b) in enumerate(zip(t["text"], t["start"], t["end"], strict=True)):
        spans = taken.setdefault(int(i), [])
        if any(a < y and x < b for x, y in spans):
            keep[j] = False
        else:
            spans.append((a, b))
    return t[keep].drop(columns="_rank").sort_values(["text", "start"]).reset_index(drop=True)


def mask_text(text: str, spans: list[tuple[int, int, str]]) -> str:
    """``text`` with each (start, end, kind) span replaced by the kind's mask."""
    out, last = [], 0
    for a, b, kind in sorted(spans):
        out += [text[last:a], MASKS[kind]]
        last = b
    return "".join([*out, text[last:]])


def _masked(texts: pa.Array, table: pd.DataFrame) -> pa.Array:
    hit = np.unique(table["text"].to_numpy())
    originals = texts.take(pa.array(hit)).to_pylist()
    spans = {int(i): list(zip(g["start"], g["end"], g["kind"], strict=True)) for i, g in table.groupby("text")}
    new = [mask_text(t, spans[int(i)]) for i, t in zip(hit, originals, strict=True)]
    sel = np.zeros(len(texts), bool)
    sel[hit] = True
    return pc.replace_with_mask(texts, pa.array(sel), pa.array(new, pa.string()))


def scrub(text: str, kinds: list[str], phone_region: str = "US") -> str:
    """One text with every finding masked (quarantine previews and the affected-rows table)."""
    return scan(pa.array([text], pa.string()), kinds, True, phone_region).texts[0].as_py()
