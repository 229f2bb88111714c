"""A short-row NL->SQL task for the training benchmarks, with a compositional held-out split.

Each row is a chat (a one-line schema as the system prompt, a question, the SQL answer), about 100-150 tokens with
SmolLM2's chat template. Questions filter one table on one or two fields; the held-out rows combine two fields that
never appear together in a training row (each field is seen alone and with other partners), so they test whether the
model composes parts it has seen in a way it has not. Standard library only; deterministic from the seed.
"""

from __future__ import annotations

import itertools
import json
import random

TABLES = {
    "orders": {
        "city": ["Berlin", "Lisbon", "Osaka", "Denver", "Lagos", "Quito"],
        "status": ["shipped", "pending", "returned", "cancelled"],
        "amount": [20, 50, 100, 250, 500],
        "year": [2021, 2022, 2023, 2024],
    },
    "customers": {
        "country": ["Chile", "Kenya", "Norway", "Vietnam", "Canada"],
        "tier": ["gold", "silver", "bronze"],
        "age": [25, 30, 40, 60],
        "channel": ["web", "store", "phone"],
    },
    "products": {
        "category": ["toys", "garden", "books", "audio", "tools"],
        "brand": ["Acme", "Zenit", "Orca", "Pika"],
        "price": [10, 30, 75, 200],
        "stock": [0, 5, 50, 100],
    },
}
NUMERIC = {"amount", "year", "age", "price", "stock"}
SYSTEM = "Write one SQLite query. Tables: " + "; ".join(f"{t}({', '.join(c)})" for t, c in TABLES.items()) + "."
HELD_OUT_PAIRS = {("orders", "city", "year"), ("customers", "tier", "channel"), ("products", "brand", "price")}


def _phrase(field: str, value: object, op: str) -> tuple[str, str]:
    if field in NUMERIC:
        word = {">": "over", "<": "under", "=": "exactly"}[op]
        return f"{field} {word} {value}", f"{field} {op} {value}"
    return f"{field} {value}", f"{field} = '{value}'"


def _row(rng: random.Random, table: str, fields: tuple[str, ...]) -> list[dict[str, str]]:
    what = rng.choice(["count", "list", "avg"]) if table == "orders" else rng.choice(["count", "list"])
    words, conds = [], []
    for f in fields:
        op = rng.choice([">", "<", "="]) if f in NUMERIC else "="
        w, c = _phrase(f, rng.choice(TABLES[table][f]), op)
        words.append(w)
        conds.append(c)
    where = " AND ".join(conds)
    if what == "count":
        q, sql = f"How many {table} have {' and '.join(words)}?", f"SELECT COUNT(*) FROM {table} WHERE {where};"
    elif what == "avg":
        q, sql = (
            f"Average amount of orders with {' and '.join(words)}?",
            f"SELECT AVG(amount) FROM orders WHERE {where};",
        )
    else:
        q, sql = f"List all {table} with {' and '.join(words)}.", f"SELECT * FROM {table} WHERE {where};"
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": q},
        {"role": "assistant", "content": sql},
    ]


def make_rows(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training rows, held-out rows) as JSON-encoded message lists. Training rows use one field or a pair not in
    ``HELD_OUT_PAIRS``; held-out rows use exactly those pairs."""
    rng = random.Random(seed)
    seen_shapes = [(t, (f,)) for t, cols in TABLES.items() for f in cols]
    seen_shapes += [
        (t, p) for t, cols in TABLES.items() for p in itertools.combinations(cols, 2) if (t, *p) not in HELD_OUT_PAIRS
    ]
    held_shapes = [(t, (a, b)) for t, a, b in sorted(HELD_OUT_PAIRS)]
    train = [json.dumps(_row(rng, *rng.choice(seen_shapes))) for _ in range(n_train)]
    held = [json.dumps(_row(rng, *rng.choice(held_shapes))) for _ in range(n_heldout)]
    return train, held
