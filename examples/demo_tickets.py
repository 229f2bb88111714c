"""Deterministic synthetic customer-support tickets for the bundled ``ticket_triage`` demo.

Every row is a chat record (system prompt, user ticket, assistant JSON answer). The labels are drawn
first and the ticket text is then composed so that every label *follows from the text*:

* ``product``   -- the product name is written in the ticket (exactly one of :data:`PRODUCTS`);
* ``category``  -- the body template describes an issue of that category (see :data:`CATEGORY_CUES`);
* ``priority``  -- the ticket contains an explicit cue of that priority and of no other
  (see :data:`PRIORITY_CUES`); billing amounts also scale with it (:data:`PRIORITY_AMOUNT_RANGES`);
* ``sentiment`` -- positive/negative tickets contain tone words from :data:`SENTIMENT_CUES`,
  neutral tickets contain none of them.

:func:`write_demo_drops` writes the demo's incoming drop files, with planted duplicates and
malformed lines (see :data:`FAULT_KINDS`) so the cleaning/quarantine stages have work to do.

Standard library only. Run ``python -m examples.demo_tickets OUT_DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CATEGORIES",
    "CATEGORY_CUES",
    "DEMO_DROPS",
    "FAULT_KINDS",
    "LABEL_KEYS",
    "MIN_TICKET_WORDS",
    "PRIORITIES",
    "PRIORITY_AMOUNT_RANGES",
    "PRIORITY_CUES",
    "PRODUCTS",
    "SENTIMENTS",
    "SENTIMENT_CUES",
    "SYSTEM_PROMPT",
    "CROSS_FILE_DUPLICATE_FRACTION",
    "WITHIN_FILE_DUPLICATE_FRACTION",
    "DropSpec",
    "generate_tickets",
    "is_valid_row",
    "main",
    "write_demo_drops",
]

# --------------------------------------------------------------------------------------------------
# Label space
# --------------------------------------------------------------------------------------------------

LABEL_KEYS: tuple[str, ...] = ("category", "priority", "product", "sentiment")
CATEGORIES: tuple[str, ...] = ("billing", "technical", "account", "shipping", "feature_request")
PRIORITIES: tuple[str, ...] = ("low", "medium", "high", "urgent")
PRODUCTS: tuple[str, ...] = ("CloudSync", "PayFlow", "DataVault", "MailPilot", "TeamBoard")
SENTIMENTS: tuple[str, ...] = ("positive", "neutral", "negative")

SYSTEM_PROMPT: str = (
    "Classify the support ticket. Reply with only a JSON object with keys "
    "category, priority, product, sentiment. "
    f"category: {'|'.join(CATEGORIES)}. "
    f"priority: {'|'.join(PRIORITIES)}. "
    f"product: {'|'.join(PRODUCTS)}. "
    f"sentiment: {'|'.join(SENTIMENTS)}."
)

# --------------------------------------------------------------------------------------------------
# Cues (public so that tests and docs can check label/text consistency; matched case-insensitively)
# --------------------------------------------------------------------------------------------------

#: Each priority's cue phrases. A ticket of priority P contains at least one cue of P and no cue of
#: any other priority.
PRIORITY_CUES: dict[str, tuple[str, ...]] = {
    "low": ("no rush", "whenever you get a chance", "low priority", "no hurry", "minor thing", "not time-sensitive"),
    "medium": ("this week", "in the next few days", "slowing us down", "when you can"),
    "high": (
        "blocking our whole team",
        "as soon as possible",
        "high priority",
        "resolved today",
        "can't do our work",
    ),
    "urgent": ("urgent", "emergency", "immediately", "production is down", "losing money every minute"),
}

#: Tone phrases. Positive tickets contain a positive cue and no negative one, negative tickets the
#: reverse, neutral tickets neither.
SENTIMENT_CUES: dict[str, tuple[str, ...]] = {
    "positive": (
        "love",
        "thanks so much",
        "really appreciate",
        "big fan",
        "always been great",
        "great work",
        "amazing",
    ),
    "negative": (
        "frustrated",
        "unacceptable",
        "disappointed",
        "fed up",
        "furious",
        "terrible",
        "not happy",
        "third time",
    ),
}

#: Words describing each category's issue; every ticket contains at least one cue of its category.
CATEGORY_CUES: dict[str, tuple[str, ...]] = {
    "billing": ("charged", "invoice", "refund", "billed", "billing", "payment", "price"),
    "technical": ("error", "crash", "stuck", "returning", "slow", "0 kb", "code"),
    "account": ("log in", "password", "ownership", "locked", "two-factor", "deactivated", "email on my"),
    "shipping": ("order", "tracking", "delivered", "shipped", "delivery", "arrived"),
    "feature_request": ("feature", "add ", "supported", "would save", "offer", "plan to"),
}

#: Billing tickets quote an amount of money in this (inclusive) dollar range for each priority.
PRIORITY_AMOUNT_RANGES: dict[str, tuple[int, int]] = {
    "low": (5, 49),
    "medium": (50, 199),
    "high": (200, 999),
    "urgent": (1000, 25000),
}

#: Lower bound on the number of whitespace-separated words of a ticket.
MIN_TICKET_WORDS: int = 30

#: Kinds of malformed lines planted once in every drop file by :func:`write_demo_drops`.
FAULT_KINDS: tuple[str, ...] = (
    "truncated_json",  # the line is a JSON object cut in half (not parseable)
    "empty_assistant",  # last message is from the assistant but its content is ""
    "missing_messages",  # the object has no "messages" key (prompt/completion schema instead)
    "no_assistant_turn",  # the last message is the user's
    "null_assistant",  # assistant content is null
    "blank_line",  # an empty line
)


@dataclass(frozen=True)
class DropSpec:
    """One demo drop file: its name and how many distinct valid tickets it holds."""

    filename: str
    n_unique: int


#: The files written by :func:`write_demo_drops` (2,200 distinct valid tickets in total).
DEMO_DROPS: tuple[DropSpec, ...] = (
    DropSpec("tickets_2026_10.jsonl", 1300),
    DropSpec("tickets_2026_11.jsonl", 900),
)
#: Share of exact duplicate rows planted inside each file (relative to its distinct rows).
WITHIN_FILE_DUPLICATE_FRACTION: float = 0.02
#: Share of rows of the first file repeated in each later file (relative to the later file's rows).
CROSS_FILE_DUPLICATE_FRACTION: float = 0.02

# --------------------------------------------------------------------------------------------------
# Text material
# --------------------------------------------------------------------------------------------------

_CATEGORY_WEIGHTS: tuple[float, ...] = (0.22, 0.26, 0.20, 0.16, 0.16)
_PRIORITY_WEIGHTS: dict[str, tuple[float, ...]] = {
    # low, medium, high, urgent
    "default": (0.20, 0.35, 0.28, 0.17),
    "feature_request": (0.45, 0.40, 0.15, 0.0),
}
_SENTIMENT_WEIGHTS: dict[str, tuple[float, ...]] = {
    # positive, neutral, negative
    "low": (0.40, 0.50, 0.10),
    "medium": (0.25, 0.50, 0.25),
    "high": (0.15, 0.40, 0.45),
    "urgent": (0.10, 0.30, 0.60),
}

_PRODUCT_DETAILS: dict[str, dict[str, tuple[str, ...]]] = {
    "CloudSync": {
        "action": ("sync the shared folder", "upload files larger than 2 GB", "open a file from the web app"),
        "feature": ("selective sync for external drives", "version history longer than 30 days", "a Linux client"),
        "item": ("backup drive", "sync hub"),
        "endpoint": ("/v2/files", "/v2/folders/share"),
    },
    "PayFlow": {
        "action": ("connect a new bank account", "run the payout report", "add a payment link"),
        "feature": ("multi-currency payouts", "scheduled transfers", "CSV export of settlements"),
        "item": ("card reader", "receipt printer"),
        "endpoint": ("/v1/payouts", "/v1/charges"),
    },
    "DataVault": {
        "action": ("restore a snapshot", "run a query on the archive", "rotate the encryption keys"),
        "feature": ("column-level encryption", "scheduled snapshots", "a read-only audit role"),
        "item": ("hardware security key", "backup appliance"),
        "endpoint": ("/api/snapshots", "/api/query"),
    },
    "MailPilot": {
        "action": ("send a campaign", "import a contact list", "edit an email template"),
        "feature": ("A/B testing for subject lines", "a send-time optimizer", "shared template folders"),
        "item": ("onboarding kit", "welcome box"),
        "endpoint": ("/v3/campaigns", "/v3/contacts"),
    },
    "TeamBoard": {
        "action": ("create a new board", "assign tasks to guests", "attach files to a card"),
        "feature": ("a Gantt chart view", "recurring tasks", "dark mode on mobile"),
        "item": ("desk display", "wall planner kit"),
        "endpoint": ("/api/boards", "/api/cards"),
    },
}

_BODIES: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged {amount} twice for my {product} {plan} subscription on {date}. "
        "Invoice {invoice} shows both payments. Can you refund the duplicate charge?",
        "Our {product} invoice {invoice} came to {amount}, but we moved to the {plan} last month. "
        "Please correct the billing and send an updated invoice.",
        "My card was billed {amount} for {product} after I cancelled on {date}. "
        "I would like a refund for that payment.",
        "The {product} renewal of {amount} does not match the price listed for the {plan}. "
        "Could someone explain the difference on invoice {invoice}?",
        "We were charged {amount} for {seats} extra {product} seats that nobody on our side added. "
        "Please review the billing and issue a refund.",
        "{product} shows a failed payment banner, yet my bank confirms the {amount} payment "
        "went through on {date}. Please check invoice {invoice}.",
    ),
    "technical": (
        "{product} throws error {error} every time I try to {action}. "
        "I already cleared the cache and reinstalled it on {os}, same result.",
        "Since the update on {date}, {product} crashes on startup with code {error}. "
        "It happens on {os} for {count} of our users.",
        "Sync in {product} has been stuck at {pct}% since {date}. The logs show {error} and nothing uploads.",
        "The {product} API started returning {http} for calls to {endpoint}. Nothing changed on our side.",
        "{product} is very slow: pages take over {secs} seconds to load and sometimes fail with {error}. "
        "Tested on {os} with a wired connection.",
        "Exports from {product} come out blank. The job finishes, but the file is 0 KB "
        "and the activity log shows {error}.",
    ),
    "account": (
        "I can't log in to my {product} account. The password reset email to {email} never arrives, "
        "and I checked spam.",
        "Our admin left the company and we need to transfer ownership of the {product} workspace "
        "to {email}. How do we do that?",
        "My {product} account got locked after too many login attempts on {date}. Please unlock it for {email}.",
        "Two-factor authentication for {product} is tied to an old phone I no longer have. "
        "Can you reset it for {email}?",
        "Please change the email on my {product} account from {email} to {email2}. I can verify ownership if needed.",
        "A teammate's {product} account was deactivated by mistake on {date}. Can you restore access for {email}?",
    ),
    "shipping": (
        "I ordered the {product} {item} on {date} (order {order}) and tracking has not updated in {days} days.",
        "The {product} {item} from order {order} arrived damaged. The box was crushed and the device "
        "won't power on. Please send a replacement.",
        "Order {order} for {qty} {product} {item}s was marked delivered on {date}, but nothing arrived at our office.",
        "We received the wrong item in order {order}. We ordered the {product} {item} but got a "
        "different device. How do I return it?",
        "Can you change the delivery address on order {order} ({product} {item})? "
        "The tracking page says it has not shipped yet.",
        "The delivery estimate for my {product} {item} (order {order}) was {days} days, "
        "but it has been over two weeks.",
    ),
    "feature_request": (
        "It would help a lot if {product} supported {feature}. Right now we work around it with spreadsheets.",
        "Feature request: please add {feature} to {product}. Several people on our side keep asking for it.",
        "Is there any plan to add {feature} in {product}? We would use it every day.",
        "Suggestion for {product}: {feature} would save us hours of manual work each week.",
        "Could {product} offer {feature}? Other tools have it and it is the main thing missing for us.",
    ),
}

# (sentence, categories it fits or None for all). Every sentence holds >= 1 cue of its own priority.
_PRIORITY_LINES: dict[str, tuple[tuple[str, frozenset[str] | None], ...]] = {
    "low": (
        ("No rush on this one.", None),
        ("Whenever you get a chance, no hurry.", None),
        ("This is low priority, I just wanted to flag it.", None),
        ("Just a minor thing and not time-sensitive.", None),
        ("Please look at it whenever you get a chance.", None),
    ),
    "medium": (
        ("It would be good to get this sorted this week.", None),
        ("Could you take a look in the next few days?", None),
        ("It is slowing us down, although we have a workaround.", None),
        ("Please reply when you can, ideally this week.", None),
    ),
    "high": (
        ("This is blocking our whole team.", None),
        ("Please look at this as soon as possible.", None),
        ("This is high priority for us.", None),
        ("We really need this resolved today.", None),
        ("Several of us can't do our work until this is fixed.", frozenset({"technical", "account"})),
    ),
    "urgent": (
        ("This is urgent, please escalate it.", None),
        ("URGENT: we need this fixed immediately.", None),
        ("Please treat this as an emergency.", None),
        ("Production is down and we are losing money every minute.", frozenset({"technical"})),
        ("Our checkout relies on this and we are losing money every minute.", frozenset({"billing", "technical"})),
    ),
}

_TONE_OPENERS: dict[str, tuple[str, ...]] = {
    "positive": (
        "I love your products and recommend them to everyone.",
        "Big fan of your tools for years now.",
        "Your support has always been great to us.",
        "First, thanks so much for the recent improvements.",
        "We love working with your team.",
    ),
    "negative": (
        "I'm really frustrated right now.",
        "This is the third time I have had to write in about this.",
        "Honestly, this is unacceptable.",
        "I am extremely disappointed with the service lately.",
        "I am fed up with this.",
        "What a terrible experience this has been.",
    ),
}

_TONE_CLOSERS: dict[str, tuple[str, ...]] = {
    "positive": (
        "Thanks so much for your help!",
        "Really appreciate all you do.",
        "Keep up the great work!",
        "You folks are amazing, thanks.",
    ),
    "negative": (
        "I expect a real answer this time, I'm furious.",
        "Not happy at all.",
        "Very disappointed that I have to chase this.",
        "This is frankly unacceptable for a paid service.",
    ),
}

# Neutral background sentences (no label cues) that add variety and length.
_CONTEXT_LINES: tuple[str, ...] = (
    "We are a team of {team} people at {company}.",
    "I have been a customer since {year}.",
    "Account email: {email}.",
    "Our workspace ID is ws-{wsid}.",
    "We use {product} across {team} locations.",
    "I am writing on behalf of {company}.",
    "For reference, we are on the {plan}.",
)

_GREETINGS: tuple[str, ...] = ("Hi,", "Hello,", "Hi support team,", "Hello support,", "Good morning,", "Hey there,", "")
_SIGNOFFS: tuple[str, ...] = ("Regards,", "Best,", "Kind regards,", "Best regards,", "Cheers,", "")

_FIRST_NAMES: tuple[str, ...] = (
    "Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Kemal", "Lena", "Marco", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
    "Umar", "Vera", "Wei", "Yusuf", "Zoe",
)  # fmt: skip
_LAST_NAMES: tuple[str, ...] = (
    "Keller", "Novak", "Okafor", "Silva", "Tanaka", "Moreau", "Berg", "Costa", "Haddad", "Ivanova",
    "Jensen", "Kowalski", "Lindqvist", "Meyer", "Nguyen", "Patel", "Rossi", "Schmidt", "Walsh", "Young",
)  # fmt: skip
_COMPANIES: tuple[tuple[str, str], ...] = (
    ("Northwind Traders", "northwind.example"),
    ("Blue Harbor Dental", "blueharbor.example"),
    ("Kestrel Analytics", "kestrel.example"),
    ("Maple & Stone", "maplestone.example"),
    ("Orbit Logistics", "orbitlog.example"),
    ("Pinecrest School", "pinecrest.example"),
    ("Riverside Bakery", "riverside.example"),
    ("Vantage Legal", "vantagelegal.example"),
)
_PLANS: tuple[str, ...] = ("Starter plan", "Pro plan", "Business plan", "annual plan", "monthly plan")
_OSES: tuple[str, ...] = ("Windows 11", "macOS 14", "Ubuntu 22.04", "iOS 17", "Android 14", "Chrome on Windows")
_HTTP: tuple[str, ...] = (
    "HTTP 500",
    "502 Bad Gateway",
    "503 Service Unavailable",
    "429 Too Many Requests",
    "HTTP 401",
)
_ERROR_WORDS: tuple[str, ...] = ("SYNC", "AUTH", "TIMEOUT", "QUOTA", "IO", "TOKEN", "SCHEMA", "LOCK")
_MONTHS: tuple[str, ...] = ("Sep", "Oct", "Nov")
_MONTH_NUM: dict[str, int] = {"Sep": 9, "Oct": 10, "Nov": 11}
_MONTH_LONG: dict[str, str] = {"Sep": "September", "Oct": "October", "Nov": "November"}


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def _derived_rng(seed: int, *parts: object) -> random.Random:
    """A ``random.Random`` seeded from a SHA-256 of the seed and a tag (stable across runs/platforms)."""
    key = ":".join([str(seed), *(str(p) for p in parts)]).encode("utf-8")
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def _pick_weighted(rng: random.Random, values: Sequence[str], weights: Sequence[float]) -> str:
    return rng.choices(list(values), weights=list(weights), k=1)[0]


def _draw_labels(rng: random.Random) -> dict[str, str]:
    category = _pick_weighted(rng, CATEGORIES, _CATEGORY_WEIGHTS)
    priority = _pick_weighted(rng, PRIORITIES, _PRIORITY_WEIGHTS.get(category, _PRIORITY_WEIGHTS["default"]))
    product = rng.choice(PRODUCTS)
    sentiment = _pick_weighted(rng, SENTIMENTS, _SENTIMENT_WEIGHTS[priority])
    return {"category": category, "priority": priority, "product": product, "sentiment": sentiment}


def _date(rng: random.Random) -> str:
    month = rng.choice(_MONTHS)
    day = rng.randint(1, 28)
    style = rng.randrange(4)
    if style == 0:
        return f"{month} {day}"
    if style == 1:
        return f"{day} {_MONTH_LONG[month]}"
    if style == 2:
        return f"2026-{_MONTH_NUM[month]:02d}-{day:02d}"
    return f"{_MONTH_LONG[month]} {day}"


def _error_code(rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return f"E{rng.randint(1000, 9999)}"
    if style == 1:
        return f"ERR_{rng.choice(_ERROR_WORDS)}_{rng.choice(_ERROR_WORDS)}"
    return f"0x{rng.getrandbits(32):08X}"


def _order_number(rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return f"#{rng.randint(10000, 99999)}"
    if style == 1:
        return f"ORD-2026-{rng.randint(10000, 99999)}"
    letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2))
    return f"{letters}{rng.randint(100000, 999999)}"


def _amount(rng: random.Random, priority: str) -> str:
    low, high = PRIORITY_AMOUNT_RANGES[priority]
    dollars = rng.randint(low, high)
    cents = rng.choice((0, 0, 0, 99, 50, rng.randint(1, 98)))
    if dollars == high:
        cents = 0
    return f"${dollars:,}.{cents:02d}"


def _ticket_text(rng: random.Random, labels: dict[str, str]) -> str:
    category, priority = labels["category"], labels["priority"]
    product, sentiment = labels["product"], labels["sentiment"]
    details = _PRODUCT_DETAILS[product]
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    company, domain = rng.choice(_COMPANIES)
    other_first = rng.choice([n for n in _FIRST_NAMES if n != first])
    fields = {
        "product": product,
        "amount": _amount(rng, priority),
        "plan": rng.choice(_PLANS),
        "date": _date(rng),
        "invoice": f"INV-{rng.randint(20000, 89999)}",
        "seats": str(rng.randint(2, 40)),
        "error": _error_code(rng),
        "action": rng.choice(details["action"]),
        "os": rng.choice(_OSES),
        "count": str(rng.randint(3, 60)),
        "pct": str(rng.randint(5, 97)),
        "http": rng.choice(_HTTP),
        "endpoint": rng.choice(details["endpoint"]),
        "secs": str(rng.randint(8, 45)),
        "email": f"{first.lower()}.{last.lower()}@{domain}",
        "email2": f"{first.lower()}@{domain}",
        "order": _order_number(rng),
        "item": rng.choice(details["item"]),
        "days": str(rng.randint(5, 12)),
        "qty": str(rng.randint(2, 25)),
        "feature": rng.choice(details["feature"]),
        "team": str(rng.randint(3, 250)),
        "company": company,
        "year": str(rng.randint(2015, 2025)),
        "wsid": f"{rng.getrandbits(24):06x}",
    }
    body = rng.choice(_BODIES[category]).format(**fields)
    lines = [line for line, cats in _PRIORITY_LINES[priority] if cats is None or category in cats]
    priority_line = rng.choice(lines)

    sentences: list[str] = []
    if sentiment in _TONE_OPENERS:
        # At least one tone sentence; sometimes both an opener and a closer.
        where = rng.choice(("open", "close", "both"))
        opener = rng.choice(_TONE_OPENERS[sentiment]) if where in ("open", "both") else ""
        closer = rng.choice(_TONE_CLOSERS[sentiment]) if where in ("close", "both") else ""
    else:
        opener = closer = ""
    if opener:
        sentences.append(opener)
    if rng.random() < 0.3:
        sentences.extend([priority_line, body])
    else:
        sentences.extend([body, priority_line])
    contexts = rng.sample(_CONTEXT_LINES, k=len(_CONTEXT_LINES))
    if rng.random() < 0.6:
        sentences.insert(rng.randint(0, len(sentences)), contexts.pop().format(**fields))
    if closer:
        sentences.append(closer)
    if category == "account" and rng.random() < 0.2:
        sentences.append(f"My colleague {other_first} has the same problem.")

    greeting = rng.choice(_GREETINGS)
    signoff = rng.choice(_SIGNOFFS)
    signature_style = rng.randrange(3)
    if signature_style == 0:
        signature = first
    elif signature_style == 1:
        signature = f"{first} {last}"
    else:
        signature = f"{first} {last}, {company}"
    ending = f"{signoff}\n{signature}" if signoff else signature

    def render() -> str:
        parts = [p for p in (greeting, " ".join(sentences)) if p]
        return "\n\n".join(parts) + "\n\n" + ending

    text = render()
    # Keep tickets at least MIN_TICKET_WORDS long by adding neutral background sentences.
    while len(text.split()) < MIN_TICKET_WORDS and contexts:
        sentences.insert(rng.randint(0, len(sentences)), contexts.pop().format(**fields))
        text = render()
    return text


def _labels_json(labels: dict[str, str]) -> str:
    return json.dumps({key: labels[key] for key in LABEL_KEYS}, sort_keys=False)


def _make_row(seed: int, index: int) -> dict[str, Any]:
    rng = _derived_rng(seed, "ticket", index)
    labels = _draw_labels(rng)
    text = _ticket_text(rng, labels)
    return {
        "id": f"tt-{seed}-{index}",
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": text},
            {"role": "assistant", "content": _labels_json(labels)},
        ],
    }


def generate_tickets(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` chat rows ``{"id": "tt-<seed>-<i>", "messages": [system, user, assistant]}``.

    Deterministic: each row depends only on ``(seed, index)``, so the same arguments give identical
    output and ``generate_tickets(k, s)`` is a prefix of ``generate_tickets(n, s)`` for ``k <= n``.
    The assistant content is ``json.dumps`` of the labels with keys in :data:`LABEL_KEYS` order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [_make_row(seed, i) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Demo drops
# --------------------------------------------------------------------------------------------------


def _dump(row: object) -> str:
    return json.dumps(row, ensure_ascii=False)


def _fault_line(kind: str, row: dict[str, Any]) -> str:
    broken = copy.deepcopy(row)
    if kind == "truncated_json":
        full = _dump(row)
        return full[: len(full) // 2]
    if kind == "empty_assistant":
        broken["messages"][-1]["content"] = ""
        return _dump(broken)
    if kind == "missing_messages":
        messages = broken.pop("messages")
        broken["prompt"] = messages[1]["content"]
        broken["completion"] = messages[2]["content"]
        return _dump(broken)
    if kind == "no_assistant_turn":
        broken["messages"] = broken["messages"][:-1]
        return _dump(broken)
    if kind == "null_assistant":
        broken["messages"][-1]["content"] = None
        return _dump(broken)
    if kind == "blank_line":
        return ""
    raise ValueError(f"unknown fault kind {kind!r}")


def _insert_at_random(rng: random.Random, lines: list[str], extra: Sequence[str]) -> None:
    """Insert ``extra`` lines at random positions, never as the very first line."""
    for line in extra:
        lines.insert(rng.randint(1, len(lines)), line)


def _build_drop_lines(seed: int) -> list[tuple[str, list[str]]]:
    total = sum(spec.n_unique for spec in DEMO_DROPS)
    n_faults = len(FAULT_KINDS) * len(DEMO_DROPS)
    rows = generate_tickets(total + n_faults, seed)
    valid, fault_rows = rows[:total], rows[total:]

    out: list[tuple[str, list[str]]] = []
    first_file_rows: list[dict[str, Any]] = []
    start = 0
    for file_index, spec in enumerate(DEMO_DROPS):
        rng = _derived_rng(seed, "drop", spec.filename)
        own = valid[start : start + spec.n_unique]
        start += spec.n_unique
        if file_index == 0:
            first_file_rows = own
        lines = [_dump(row) for row in own]

        # Exact duplicates inside the file (same id, byte-identical line).
        n_dup = round(spec.n_unique * WITHIN_FILE_DUPLICATE_FRACTION)
        dup_lines = [_dump(row) for row in rng.sample(own, n_dup)]
        # Rows repeated from the first file (same id, byte-identical line).
        cross_lines: list[str] = []
        if file_index > 0:
            n_cross = round(spec.n_unique * CROSS_FILE_DUPLICATE_FRACTION)
            cross_lines = [_dump(row) for row in rng.sample(first_file_rows, n_cross)]
        # One malformed line of every kind, built from tickets that appear nowhere else.
        faults = fault_rows[file_index * len(FAULT_KINDS) : (file_index + 1) * len(FAULT_KINDS)]
        fault_lines = [_fault_line(kind, row) for kind, row in zip(FAULT_KINDS, faults, strict=True)]

        _insert_at_random(rng, lines, dup_lines + cross_lines + fault_lines)
        out.append((spec.filename, lines))
    return out


def write_demo_drops(out_dir: Path, seed: int = 7) -> list[Path]:
    """Write the demo's drop files (see :data:`DEMO_DROPS`) into ``out_dir``; return their paths, sorted.

    Each file holds its distinct valid tickets plus ~2% exact duplicates of its own rows, one
    malformed line of every kind in :data:`FAULT_KINDS`, and (for every file after the first) ~2% of
    rows copied verbatim from the first file. Output is byte-identical for the same seed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for filename, lines in _build_drop_lines(seed):
        path = out_dir / filename
        with path.open("w", encoding="utf-8", newline="\n") as fh:
            fh.write("\n".join(lines) + "\n")
        paths.append(path)
    return sorted(paths)


def is_valid_row(row: object) -> bool:
    """True for a well-formed chat row: ``messages`` is a list of ``{role, content: str}`` dicts
    ending with a non-empty assistant turn."""
    if not isinstance(row, dict):
        return False
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return False
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return False
        if not isinstance(message.get("content"), str):
            return False
    last = messages[-1]
    return bool(last["role"] == "assistant" and last["content"].strip())


def _file_stats(path: Path) -> dict[str, int]:
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    valid = 0
    unique: set[str] = set()
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if is_valid_row(row):
            valid += 1
            unique.add(line)
    return {"lines": len(lines), "valid": valid, "unique_valid": len(unique), "malformed": len(lines) - valid}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo_tickets",
        description="Write the ticket_triage demo drop files (JSONL chat rows with planted faults).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the drop files into")
    parser.add_argument("--seed", type=int, default=7, help="generator seed (default: 7)")
    args = parser.parse_args(argv)
    for path in write_demo_drops(args.out_dir, seed=args.seed):
        stats = _file_stats(path)
        print(
            f"{path}: {stats['lines']} lines, {stats['valid']} valid rows "
            f"({stats['unique_valid']} distinct), {stats['malformed']} malformed"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
