"""Tier 1: near-duplicates judged on what distinguishes rows (shared context ignored, prompt and answer sides
compared separately) and label conflicts reported, on an alpaca set whose rows all share a ~40-word schema."""

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune_pipeline.data import dedup
from finetune_pipeline.data.clean import clean_file
from finetune_pipeline.data.split import SPLITS, build_splits
from finetune_pipeline.spec import DedupSpec, SplitSpec
from finetune_pipeline_tests.conftest import make_spec, write_jsonl

pytestmark = pytest.mark.unit

SCHEMA = (
    "CREATE TABLE clients (id INTEGER PRIMARY KEY, name TEXT, country TEXT, segment TEXT, signup_year INTEGER); "
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, client_id INTEGER REFERENCES clients(id), amount DECIMAL, "
    "status TEXT, order_year INTEGER, channel TEXT);"
)
COUNTRIES = ["France", "Germany", "Spain", "Italy", "Japan"]
YEARS = [2019, 2020, 2021, 2022, 2023]
STATUSES = ["open", "shipped", "cancelled", "returned"]


def sql_questions() -> list[tuple[str, str]]:
    """300 distinct (question, SQL) pairs that differ in a few words: top-k, country, status, channel, year."""
    out = []
    for k, year, country in itertools.product((3, 5, 10), YEARS, COUNTRIES):
        out.append(
            (
                f"Top {k} clients by revenue in {year} from {country}",
                f"SELECT c.name, SUM(o.amount) AS revenue FROM clients c JOIN orders o ON o.client_id = c.id "
                f"WHERE o.order_year = {year} AND c.country = '{country}' GROUP BY c.name ORDER BY revenue DESC "
                f"LIMIT {k};",
            )
        )
    for status, year, country in itertools.product(STATUSES, YEARS, COUNTRIES):
        out.append(
            (
                f"How many {status} orders did clients in {country} place in {year}?",
                f"SELECT COUNT(*) FROM orders o JOIN clients c ON o.client_id = c.id WHERE o.status = '{status}' "
                f"AND c.country = '{country}' AND o.order_year = {year};",
            )
        )
    for status, year in itertools.product(STATUSES, YEARS):
        out.append(
            (
                f"Average amount of {status} orders in {year}",
                f"SELECT AVG(amount) FROM orders WHERE status = '{status}' AND order_year = {year};",
            )
        )
    for country, year in itertools.product(COUNTRIES, YEARS):
        out.append(
            (
                f"Which clients from {country} signed up in {year}?",
                f"SELECT name FROM clients WHERE country = '{country}' AND signup_year = {year};",
            )
        )
    for status, channel, year in itertools.product(STATUSES, ("web", "store", "phone", "partner"), YEARS):
        out.append(
            (
                f"Total revenue from {status} orders placed through the {channel} channel in {year}",
                f"SELECT SUM(amount) FROM orders WHERE status = '{status}' AND channel = '{channel}' "
                f"AND order_year = {year};",
            )
        )
    assert len(out) == 300 and len(set(out)) == 300
    return out


def alpaca(rid: str, question: str, sql: str) -> dict:
    return {"id": rid, "instruction": question, "input": SCHEMA, "output": sql}


def test_shared_schema_keeps_every_distinct_question(tmp_path: Path) -> None:
    rows = [alpaca(f"q{i}", q, a) for i, (q, a) in enumerate(sql_questions())]
    f = write_jsonl(tmp_path / "sql.jsonl", rows)
    res = clean_file(f, "d", make_spec(source={"record_format": "alpaca"}))
    assert res.accounted() and len(res.duplicates) == 0
    assert len(res.kept) == 300
    # comparing whole rows (what near dedup did before) calls most of them near-duplicates
    whole = clean_file(f, "d", make_spec(source={"record_format": "alpaca"}, dedup={"boilerplate_share": 1.0}))
    # without the boilerplate rule (what near dedup did before: the schema counts) most rows are "near-duplicates"
    assert whole.near_duplicates > 150 and whole.accounted()


def test_planted_near_duplicates_under_the_shared_schema_are_still_found(tmp_path: Path) -> None:
    qs = sql_questions()
    rows = [alpaca(f"q{i}", q, a) for i, (q, a) in enumerate(qs)]
    planted = {}
    for j, src in enumerate(range(7, 300, 30)):
        q, a = qs[src]
        if j % 2:  # the question's first word dropped
            rows.append(alpaca(f"near{j}", q.split(" ", 1)[1], a))
        else:  # case and punctuation of the question, a comment after the SQL
            rows.append(alpaca(f"near{j}", q.lower() + "!", a + " -- checked"))
        planted[f"near{j}"] = f"q{src}"
    f = write_jsonl(tmp_path / "sql.jsonl", rows)
    res = clean_file(f, "d", make_spec(source={"record_format": "alpaca"}))
    near = res.duplicates[res.duplicates["kind"] == "near"]
    assert dict(zip(near["row_id"], near["duplicate_of"], strict=True)) == planted
    assert len(res.kept) == 300 and res.accounted()


def _frame(records: list[tuple[str, str, str]], drop: str = "a") -> pd.DataFrame:
    msgs = [
        json.dumps([{"role": "user", "content": f"{q}\n{SCHEMA}"}, {"role": "assistant", "content": a}])
        for _, q, a in records
    ]
    return pd.DataFrame(
        {
            "row_id": [r for r, _, _ in records],
            "messages": msgs,
            "content_hash": [f"h{r}" for r, _, _ in records],
            "drop": drop,
            "source_line": range(1, len(records) + 1),
        }
    )


def _with_conflicts() -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    qs = sql_questions()
    recs = [(f"q{i}", q, a) for i, (q, a) in enumerate(qs)]
    conflicts = {}
    for j, src in enumerate((4, 90, 200)):  # the same question with another answer: label noise
        recs.append((f"c{j}", qs[src][0], f"SELECT * FROM orders LIMIT {j + 1};"))
        conflicts[f"c{j}"] = f"q{src}"
    return recs, conflicts


def test_conflicts_across_drops_are_reported_with_both_rows_and_kept_by_default() -> None:
    recs, conflicts = _with_conflicts()
    res = build_splits([_frame(recs[:300], "a"), _frame(recs[300:], "b")], SplitSpec(), ["a", "b"], DedupSpec())
    assert sum(len(res.frames[s]) for s in SPLITS) == 303 and res.cross_drop_duplicates.empty
    got = dict(zip(res.conflicts["row_id"], res.conflicts["conflicts_with"], strict=True))
    assert got == conflicts
    row = res.conflicts.set_index("row_id").loc["c0"]
    assert row["answer"].startswith("SELECT * FROM orders") and "c.country" in row["other_answer"]
    assert row["prompt_similarity"] >= 0.8 and row["action"] == "kept"
    assert res.conflict_share == pytest.approx(6 / 303)
    assert res.boilerplate_shingles > 30  # the schema's shingles


@pytest.mark.parametrize(
    ("policy", "removed"),
    [("keep_first", {"c0", "c1", "c2"}), ("quarantine", {"c0", "c1", "c2", "q4", "q90", "q200"})],
)
def test_conflict_policy(policy: str, removed: set[str]) -> None:
    recs, _ = _with_conflicts()
    res = build_splits([_frame(recs)], SplitSpec(), ["a"], DedupSpec(conflicts=policy))
    kept = {r for s in SPLITS for r in res.frames[s]["row_id"]}
    assert set(res.conflict_quarantine["row_id"]) == removed and not kept & removed
    assert len(kept) + len(res.conflict_quarantine) == len(recs)  # nothing lost
    assert set(res.conflict_quarantine["reason"]) == {"conflict"}


def test_cross_drop_near_duplicates_under_shared_context_and_no_false_leaks() -> None:
    qs = sql_questions()
    recs = [(f"q{i}", q, a) for i, (q, a) in enumerate(qs)]
    later = [(f"n{i}", q.upper(), a + " -- v2") for i, (q, a) in enumerate(qs[:20])]
    res = build_splits([_frame(recs, "a"), _frame(later, "b")], SplitSpec(), ["a", "b"], DedupSpec())
    near = res.cross_drop_duplicates[res.cross_drop_duplicates["kind"] == "near"]
    assert sorted(near["row_id"]) == sorted(f"n{i}" for i in range(20))
    assert sum(len(res.frames[s]) for s in SPLITS) == 300 and res.leaks.empty


def test_rows_without_a_distinctive_prompt_are_compared_on_their_answers() -> None:
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(500)]
    answers = [" ".join(rng.choice(words, 20)) for _ in range(60)]
    answers.append(answers[5] + " extra")  # a near copy of row 5's answer under the same instruction
    sides = dedup.side_shingles(["Summarise the ticket."] * len(answers), answers, 3)
    nd = dedup.near_duplicates(sides, 0.8, 128, conflicts=True)
    assert list(zip(nd.row, nd.matched, strict=True)) == [(60, 5)]
    assert nd.conflicts.empty  # a prompt made only of boilerplate says nothing: no conflicts


ANSWER = "the refund reaches your card within five working days"  # 9 words: 7 word 3-grams


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # the last word replaced: 3-gram Jaccard 6/8 = 0.75 < 0.8, but the same question edited at its answer's end
        (ANSWER.rsplit(" ", 1)[0] + " weeks", "near"),
        (ANSWER + " normally", "near"),  # a word appended: 7/8
        # a word in the middle replaced: 3 of 7 shingles change (0.4): another label under the same question
        (ANSWER.replace("five", "ten"), "conflict"),
        ("please contact the bank about it", "conflict"),
    ],
)
def test_same_question_with_an_edited_answer(answer: str, expected: str) -> None:
    rng = np.random.default_rng(5)
    words = [f"w{i}" for i in range(800)]
    prompts = [f"{SCHEMA}\n" + " ".join(rng.choice(words, 12)) for _ in range(40)]
    answers = [" ".join(rng.choice(words, 10)) for _ in range(40)]
    prompts.append(f"{SCHEMA}\nWhen will my refund arrive on my card?")
    answers.append(ANSWER)
    prompts.append(prompts[-1])  # the same question (schema and all) once more
    answers.append(answer)
    nd = dedup.near_duplicates(dedup.side_shingles(prompts, answers, 3), 0.8, 128, conflicts=True)
    near = list(zip(nd.row.tolist(), nd.matched.tolist(), strict=True))
    conflicts = list(zip(nd.conflicts["row"], nd.conflicts["matched"], strict=True))
    assert (near, conflicts) == (([(41, 40)], []) if expected == "near" else ([], [(41, 40)]))


def test_identical_prompts_are_candidates_even_when_lsh_would_miss_them() -> None:
    """A short shared question with answers at 0.6-0.7 similarity: whole-row LSH rarely pairs them, the exact
    same-prompt key always does."""
    rng = np.random.default_rng(9)
    words = [f"w{i}" for i in range(800)]
    base = [" ".join(rng.choice(words, 14)) for _ in range(30)]
    prompts = [f"question {i} about {words[i]}" for i in range(30)] * 2
    answers = base + [a.rsplit(" ", 2)[0] + " x y" for a in base]  # the last two words replaced: 10/14 = 0.71
    nd = dedup.near_duplicates(dedup.side_shingles(prompts, answers, 3), 0.8, 128)
    assert sorted(zip(nd.row.tolist(), nd.matched.tolist(), strict=True)) == [(30 + i, i) for i in range(30)]
