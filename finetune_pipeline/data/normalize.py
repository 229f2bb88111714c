"""Turn records of any format into one chat schema and validate them column-wise (Arrow + NumPy, no loop per row).

Every record format becomes a flat list of messages (row, role, content). Whitespace is normalised, the
conversation structure is checked (known roles in order, a user turn, a final non-empty assistant answer),
lengths are bounded, and each valid row gets its canonical ``messages`` JSON text (exactly what
``json.dumps(messages, ensure_ascii=False)`` gives) and content hashes. Each invalid row gets the first
reason that applies, with the message it concerns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from finetune_pipeline.data.readers.record_formats import record_format
from finetune_pipeline.spec import DEFAULT_ROLES, CleaningSpec, ColumnMap

ROLES = ("system", "user", "assistant")
CONTEXT_PREFIX = "Earlier in this conversation, the assistant said:\n"
_SYS, _USER, _ASSIST = 0, 1, 2
_CTRL = "[\\x00-\\x07\\x0b\\x0e-\\x1f]"
_HASH_KEY = "finetune-rows-v2"  # 16 bytes: the SipHash key


@dataclass
class Flat:
    """n rows as a flat message list: message j belongs to row ``parent[j]``; rows' messages are contiguous."""

    n: int
    parent: np.ndarray  # int64
    role: np.ndarray  # int8 code: 0 system, 1 user, 2 assistant, -1 unknown
    role_text: pa.Array  # original role strings (for messages)
    content: pa.Array  # string, may hold nulls


def _combine(a: pa.ChunkedArray | pa.Array) -> pa.Array:
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


def _role_codes(roles: pa.Array, mapping: dict[str, str]) -> np.ndarray:
    """Role code of each speaker name (case-insensitive lookup in ``mapping``); -1 for unknown names."""
    enc = pc.dictionary_encode(roles)
    names = enc.dictionary.to_pylist()
    code_of = {"system": _SYS, "user": _USER, "assistant": _ASSIST}
    lut = np.array([code_of.get(mapping.get(str(x).lower(), ""), -1) for x in names] + [-1], np.int8)
    idx = enc.indices.fill_null(len(names)).to_numpy(zero_copy_only=False)
    return lut[idx]


def flatten(table: pa.Table, fmt: str, cols: ColumnMap, roles: dict[str, str] | None = None) -> Flat:
    """The rows as a flat message list, as the record format's entry in the table (record_formats.py) says."""
    mapping = {k.lower(): v for k, v in (roles if roles is not None else DEFAULT_ROLES).items()}
    f = record_format(fmt)
    system = getattr(cols, f.system) if f.system else None
    if system not in table.column_names:
        system = None
    if f.messages is not None:
        return _flatten_messages(table, [getattr(cols, a) for a in f.messages], system, mapping)
    return _flatten_turns(table, [(r, [getattr(cols, a) for a in fields]) for r, fields in f.turns], system)


def _flatten_messages(table: pa.Table, keys: list[str], system: str | None, mapping: dict[str, str]) -> Flat:
    """A list of {role, content} messages per row; the optional system field becomes the first message."""
    name, role_k, content_k = keys
    lst = _combine(table.column(name))
    parent = pc.list_parent_indices(lst).to_numpy().astype(np.int64)
    items = pc.list_flatten(lst)
    roles = pc.struct_field(items, role_k)
    content = pc.struct_field(items, content_k)
    codes = _role_codes(roles, mapping)
    roles = pa.array(np.array(["system", "user", "assistant", "unknown"])[codes], pa.string())
    roles = pc.if_else(pc.equal(roles, "unknown"), pc.struct_field(items, role_k), roles)
    if system is not None:  # a top-level system prompt becomes the first message
        parent, codes, roles, content = _prepend_system(table, system, parent, codes, roles, content)
    return Flat(table.num_rows, parent, codes, roles, content)


def _joined(table: pa.Table, fields: list[str]) -> pa.Array:
    """The first field, followed by each further one that is present and not blank, a blank line between."""
    out = _combine(table.column(fields[0]))
    for name in fields[1:]:
        more = _combine(table.column(name))
        has = pc.and_(pc.is_valid(more), pc.not_equal(pc.utf8_trim_whitespace(more.fill_null("")), ""))
        out = pc.if_else(has, pc.binary_join_element_wise(out, more, "\n\n"), out)
    return out


def _flatten_turns(table: pa.Table, turns: list[tuple[str, list[str]]], system: str | None) -> Flat:
    """One message per turn (role, fields joined), after the optional system field."""
    n = table.num_rows
    code_of = {"system": _SYS, "user": _USER, "assistant": _ASSIST}
    slots = [(code_of[role], _joined(table, fields)) for role, fields in turns]
    if system is not None:
        slots.insert(0, (_SYS, _combine(table.column(system))))
    parents, codes, contents = [], [], []
    for code, arr in slots:
        present = np.ones(n, bool)
        if code == _SYS:  # optional: only where given and non-empty
            present = pc.and_(pc.is_valid(arr), pc.not_equal(arr.fill_null(""), "")).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(present)
        parents.append(idx)
        codes.append(np.full(len(idx), code, np.int8))
        contents.append(arr.filter(pa.array(present)) if not present.all() else arr)
    parent = np.concatenate(parents)
    order = np.argsort(parent, kind="stable")
    code = np.concatenate(codes)[order]
    content = pa.concat_arrays([c.cast(pa.string()) for c in contents]).take(pa.array(order))
    role_text = pa.array(np.array(ROLES)[code], pa.string())
    return Flat(n, parent[order], code, role_text, content)


def _prepend_system(table, field, parent, codes, roles, content):  # type: ignore[no-untyped-def]
    sysv = _combine(table.column(field))
    present = pc.and_(pc.is_valid(sysv), pc.not_equal(sysv.fill_null(""), "")).to_numpy(zero_copy_only=False)
    idx = np.flatnonzero(present)
    if not len(idx):
        return parent, codes, roles, content
    all_parent = np.concatenate([idx, parent])
    order = np.argsort(all_parent, kind="stable")
    codes = np.concatenate([np.full(len(idx), _SYS, np.int8), codes])[order]
    roles = pa.concat_arrays([pa.array(["system"] * len(idx), pa.string()), roles.cast(pa.string())]).take(order)
    content = pa.concat_arrays([sysv.filter(pa.array(present)).cast(pa.string()), content.cast(pa.string())]).take(
        order
    )
    return all_parent[order], codes, roles, content


def _bytes_present(arr: pa.Array) -> np.ndarray:
    """Which bytes among control characters, '"' and '\\' occur anywhere in a string array's data (one
    vectorised pass each): lets the rare fixes skip whole passes over the column."""
    out = np.zeros(256, bool)
    bufs = arr.buffers()
    if len(arr) == 0 or bufs[2] is None:
        return out
    wide = pa.types.is_large_string(arr.type)
    off = np.frombuffer(bufs[1], np.int64 if wide else np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], np.uint8)[off[0] : off[-1]]
    ctrl = data < 32
    if ctrl.any():
        out[np.unique(data[ctrl])] = True
    out[ord('"')] = bool((data == ord('"')).any())
    out[ord("\\")] = bool((data == ord("\\")).any())
    return out


def _string_offsets(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    bufs = arr.buffers()
    wide = pa.types.is_large_string(arr.type)
    off = np.frombuffer(bufs[1], np.int64 if wide else np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return off.astype(np.int64), data


_WS_NEEDLES = ("\t", "\r", "  ", " \n", "\n ")


def _needs_whitespace_fix(arr: pa.Array) -> np.ndarray:
    """Strings that hold "  ", a tab, a CR, a space next to a line break, or whitespace (or a non-ASCII byte,
    which may be Unicode whitespace) at either end. Each pattern is first looked for in the whole byte buffer at
    once (bytes.find); only a pattern that occurs is then matched string by string."""
    off, data = _string_offsets(arr)
    n = len(arr)
    if n == 0:
        return np.zeros(0, bool)
    raw = data[off[0] : off[-1]].tobytes()
    need = np.zeros(n, bool)
    has_newline = raw.find(b"\n") >= 0
    for needle in _WS_NEEDLES:
        if "\n" in needle and not has_newline:
            continue
        if raw.find(needle.encode()) >= 0:
            need |= pc.match_substring(arr, needle).fill_null(False).to_numpy(zero_copy_only=False)
    nonempty = off[1:] > off[:-1]
    if len(data):
        first = data[np.minimum(off[:-1], len(data) - 1)]
        last = data[np.maximum(off[1:] - 1, 0)]
        edge = lambda b: (b <= 32) | (b >= 0x80)  # noqa: E731  (control/space or a possible Unicode space)
        need |= nonempty & (edge(first) | edge(last))
    return need


def normalise_whitespace(content: pa.Array) -> pa.Array:
    """CRLF to LF, runs of spaces/tabs to one space, no spaces around line breaks, trimmed ends.

    The regular expressions and the trim run only on the strings that need them (most text has nothing to fix)."""
    content = content.cast(pa.string())
    if content.null_count:
        valid = content.is_valid().to_numpy(zero_copy_only=False)
        need = np.zeros(len(content), bool)
        filled = content.fill_null("")
        need = _needs_whitespace_fix(filled) & valid
    else:
        need = _needs_whitespace_fix(content)
    if not need.any():
        return content
    mask = pa.array(need)
    x = content.filter(mask)
    x = pc.replace_substring(x, "\r\n", "\n")
    x = pc.replace_substring_regex(x, "[ \t]+", " ")
    x = pc.replace_substring_regex(x, " ?\n ?", "\n")
    x = pc.utf8_trim_whitespace(x)
    return pc.replace_with_mask(content, mask, x)


def json_string(content: pa.Array) -> pa.Array:
    """Each string as a JSON string literal, exactly as json.dumps(s, ensure_ascii=False)."""
    present = _bytes_present(content)
    x = pc.replace_substring(content, "\\", "\\\\") if present[ord("\\")] else content
    for a, b in (('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\b", "\\b"), ("\f", "\\f")):
        if present[ord(a)]:
            x = pc.replace_substring(x, a, b)
    x = pc.binary_join_element_wise('"', x, '"', "")
    other_ctrl = [i for i in range(32) if present[i] and chr(i) not in "\n\r\t\b\f"]
    if other_ctrl:  # other control characters: rare, let json.dumps escape them
        ctrl = pc.match_substring_regex(content, _CTRL)
        idx = np.flatnonzero(ctrl.to_numpy(zero_copy_only=False))
        vals = x.to_pylist()
        src = content.to_pylist()
        for i in idx:
            vals[i] = json.dumps(src[i], ensure_ascii=False)
        x = pa.array(vals, pa.string())
    return x


_HEX = np.array([f"{i:02x}" for i in range(256)], dtype="S2")


def hash_values(values: pa.Array) -> np.ndarray:
    """64-bit keyed SipHash-2-4 of each string (pandas' C implementation), as uint64."""
    obj = values.to_numpy(zero_copy_only=False)
    return pd.util.hash_array(obj.astype(object, copy=False), hash_key=_HASH_KEY, categorize=False)


def to_hex(h: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """uint64 -> 16-character lower-case hex strings (vectorised; an Arrow-backed pandas array)."""
    raw = _HEX[h.astype(">u8").view(np.uint8).reshape(-1, 8)].view("S16").ravel()
    return pd.arrays.ArrowExtensionArray(pa.array(raw, pa.binary()).cast(pa.large_string()))


@dataclass
class Normalised:
    frame: (
        pd.DataFrame
    )  # one row per valid record: messages, content_hash, n_messages, chars, _key, _pos (input position)
    prompt_text: pa.Array  # per valid row: every message's content but the last, joined (near-dedup prompt side)
    answer_text: pa.Array  # per valid row: the final message's content (near-dedup answer side)
    assistant_text: pa.Array  # per valid row: the assistant turns joined (for the quality score)
    reject_rows: np.ndarray  # positions in the input table
    reject_reasons: np.ndarray
    reject_details: list[str]
    leading_moved: int = 0  # rows whose leading assistant turns were moved to context or dropped
    pii: pd.DataFrame | None = None  # cleaning.pii findings: pos (input position), message, kind, start, end


def _first_per_row(n: int, parent: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """For each row: the position (within the row) of its first message where mask holds; -1 if none."""
    out = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(out, parent[mask], pos[mask])
    out[out == np.iinfo(np.int64).max] = -1
    return out


def handle_leading_assistant(flat: Flat, mode: str) -> tuple[Flat, int]:
    """Conversations that begin (after an optional system message) with assistant turns and go on with a user
    turn: ``drop`` removes those turns, ``context`` moves their text into the system message (prefixed by
    CONTEXT_PREFIX, so nothing is lost and it is not trained on), ``quarantine`` leaves them (misordered_roles).
    Returns the new Flat and the number of rows changed."""
    n, parent, code = flat.n, flat.parent, flat.role
    if mode == "quarantine" or not len(parent):
        return flat, 0
    content = flat.content.cast(pa.string())
    counts = np.bincount(parent, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    pos = np.arange(len(parent)) - starts[parent]
    has = counts > 0
    sys_first = np.zeros(n, np.int64)
    sys_first[has] = code[starts[has]] == _SYS
    k = pos - sys_first[parent]  # position after the optional system message
    first_other = _first_per_row(n, parent, (k >= 0) & (code != _ASSIST), pos)
    lead_n = np.where(first_other >= 0, first_other - sys_first, 0)
    at = np.where(first_other >= 0, starts + first_other, 0)
    rows_ok = (lead_n > 0) & (code[np.minimum(at, len(code) - 1)] == _USER)
    lead = rows_ok[parent] & (k >= 0) & (k < lead_n[parent])
    null = content.is_null().to_numpy(zero_copy_only=False)
    if (lead & null).any():  # a null turn stays for the null_content check
        rows_ok &= np.bincount(parent[lead & null], minlength=n) == 0
        lead = rows_ok[parent] & (k >= 0) & (k < lead_n[parent])
    if not lead.any():
        return flat, 0
    keep = ~lead
    role_text = flat.role_text.cast(pa.string())
    if mode == "context":
        texts = content.filter(pa.array(lead)).to_pylist()
        owners = parent[lead]
        ctx: dict[int, list[str]] = {}
        for r, t in zip(owners.tolist(), texts, strict=True):
            ctx.setdefault(r, []).append(t)
        at_pos, values = [], []
        all_content = None
        for r, parts in ctx.items():
            text = CONTEXT_PREFIX + "\n\n".join(parts)
            if sys_first[r]:
                if all_content is None:
                    all_content = content
                old = all_content[int(starts[r])].as_py() or ""
                text = f"{old}\n\n{text}" if old else text
            else:  # the first leading turn becomes the system message
                keep[starts[r]] = True
            at_pos.append(int(starts[r]))
            values.append(text)
        mask = np.zeros(len(parent), bool)
        mask[at_pos] = True
        order = np.argsort(at_pos)
        content = pc.replace_with_mask(content, pa.array(mask), pa.array([values[i] for i in order], pa.string()))
        code = code.copy()
        code[mask] = _SYS
        role_text = pc.replace_with_mask(role_text, pa.array(mask), pa.array(["system"] * int(mask.sum()), pa.string()))
    km = pa.array(keep)
    return Flat(n, parent[keep], code[keep], role_text.filter(km), content.filter(km)), int(rows_ok.sum())


def normalise(
    table: pa.Table,
    fmt: str,
    cols: ColumnMap,
    cleaning: CleaningSpec,
    roles: dict[str, str] | None = None,
    leading_assistant: str = "quarantine",
) -> Normalised:
    """``roles``: speaker name -> role (default DEFAULT_ROLES); ``leading_assistant``: quarantine, drop or context
    for conversations that begin with assistant turns (see ``handle_leading_assistant``)."""
    flat = flatten(table, fmt, cols, roles)
    moved = 0
    if record_format(fmt).messages is not None:  # conversations
        flat, moved = handle_leading_assistant(flat, leading_assistant)
    m = _Messages.of(flat)
    null = m.content.is_null().to_numpy(zero_copy_only=False)
    content = normalise_whitespace(m.content) if cleaning.normalize_whitespace else m.content
    content = content.fill_null("")
    pii_found = None
    if cleaning.pii.mode != "off":
        from finetune_pipeline.data import pii

        found = pii.scan(content, list(cleaning.pii.kinds), cleaning.pii.mode == "mask", cleaning.pii.phone_region)
        content, t = found.texts, found.table
        msg = t["text"].to_numpy()
        pii_found = pd.DataFrame(
            {"pos": m.parent[msg], "message": m.pos[msg], "kind": t["kind"], "start": t["start"], "end": t["end"]}
        )
    lengths = pc.utf8_length(content).to_numpy().astype(np.int64)
    flags = _Flags(m.n)
    _check_structure(flags, m, flat, null, roles, record_format(fmt).dialogue)
    total = _check_lengths(flags, m, lengths, cleaning)
    ok = flags.reason == ""
    frame, texts = _canonical_rows(m, flat, content, ok, total)
    bad = np.flatnonzero(~ok)
    return Normalised(
        frame,
        *texts,
        bad,
        flags.reason[bad].astype(str),
        [flags.detail[int(r)] for r in bad],
        moved,
        None if pii_found is None else pii_found[ok[pii_found["pos"].to_numpy()]].reset_index(drop=True),
    )


@dataclass
class _Messages:
    """A Flat's index arithmetic: messages per row, where each row starts, each message's position in its row."""

    n: int
    parent: np.ndarray
    code: np.ndarray
    content: pa.Array
    counts: np.ndarray
    starts: np.ndarray
    pos: np.ndarray

    @classmethod
    def of(cls, flat: Flat) -> _Messages:
        n, parent = flat.n, flat.parent
        counts = np.bincount(parent, minlength=n)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        pos = np.arange(len(parent)) - starts[parent] if len(parent) else np.zeros(0, np.int64)
        return cls(n, parent, flat.role, flat.content.cast(pa.string()), counts, starts, pos)


class _Flags:
    """The first reason that applies to each row, with its detail."""

    def __init__(self, n: int):
        self.reason = np.full(n, "", dtype=object)
        self.detail: dict[int, str] = {}

    def __call__(self, rows_mask: np.ndarray, why: str, text) -> None:  # type: ignore[no-untyped-def]
        new = rows_mask & (self.reason == "")
        for r in np.flatnonzero(new):
            self.detail[int(r)] = text(int(r))
        self.reason[new] = why


def _check_structure(
    flag: _Flags, m: _Messages, flat: Flat, null: np.ndarray, roles: dict[str, str] | None, dialogue: bool
) -> None:
    """Null contents, unknown roles, empty conversations; for dialogues the answer last, a user turn, the order."""
    n, parent, code, counts, starts, pos = m.n, m.parent, m.code, m.counts, m.starts, m.pos
    role_list = flat.role_text.to_pylist() if (code < 0).any() else None
    first_null = _first_per_row(n, parent, null, pos)
    flag(first_null >= 0, "null_content", lambda r: f"message {first_null[r]} has null content")
    first_unknown = _first_per_row(n, parent, code < 0, pos)
    allowed = ", ".join(roles if roles is not None else DEFAULT_ROLES)
    flag(
        first_unknown >= 0,
        "unknown_role",
        lambda r: (
            f"message {first_unknown[r]} has role {role_list[starts[r] + first_unknown[r]]!r}; allowed: {allowed}"
        ),  # type: ignore[index]
    )
    flag(counts == 0, "empty_conversation", lambda r: "the record has no messages")
    if not dialogue:
        return
    has = counts > 0
    last_code = np.full(n, -9, np.int8)
    last_code[has] = code[starts[has] + counts[has] - 1]
    flag(
        has & (last_code != _ASSIST),
        "no_final_assistant",
        lambda r: "the last message must be the assistant's answer to learn from",
    )
    users = np.bincount(parent[code == _USER], minlength=n)
    flag(users == 0, "no_user_turn", lambda r: "the conversation has no user message")
    # order: an optional system message first, then user and assistant alternating, starting with user
    is_sys = code == _SYS
    sys_first = np.zeros(n, np.int64)
    first_is_sys = has & (code[np.minimum(starts, max(len(code) - 1, 0))] == _SYS) if len(code) else has
    sys_first[first_is_sys] = 1
    k = pos - sys_first[parent]
    expected = np.where(k % 2 == 0, _USER, _ASSIST)
    wrong = (is_sys & (pos > 0)) | (~is_sys & (code >= 0) & (code != expected))
    first_wrong = _first_per_row(n, parent, wrong, pos)
    names = np.array(ROLES)
    flag(
        first_wrong >= 0,
        "misordered_roles",
        lambda r: (
            f"message {first_wrong[r]} is '{names[code[starts[r] + first_wrong[r]]]}' out of order: expected "
            "an optional system message, then user and assistant turns alternating"
        ),
    )


def _check_lengths(flag: _Flags, m: _Messages, lengths: np.ndarray, cleaning: CleaningSpec) -> np.ndarray:
    """Empty or short answers, too long or too short rows; returns each row's characters."""
    n, parent, code, counts, starts, pos = m.n, m.parent, m.code, m.counts, m.starts, m.pos
    has = counts > 0
    empty_assist = (code == _ASSIST) & (lengths == 0)
    first_empty = _first_per_row(n, parent, empty_assist, pos)
    flag(first_empty >= 0, "empty_assistant", lambda r: f"assistant message {first_empty[r]} is empty")
    last_len = np.zeros(n, np.int64)
    last_len[has] = lengths[starts[has] + counts[has] - 1]
    flag(
        has & (last_len < cleaning.min_assistant_chars),
        "assistant_too_short",
        lambda r: (
            f"the final answer has {last_len[r]} characters < cleaning.min_assistant_chars={cleaning.min_assistant_chars}"
        ),
    )
    total = np.bincount(parent, weights=lengths, minlength=n).astype(np.int64)
    flag(
        total > cleaning.max_total_chars,
        "too_long",
        lambda r: f"{total[r]} characters > cleaning.max_total_chars={cleaning.max_total_chars}",
    )
    flag(
        total < cleaning.min_total_chars,
        "too_short",
        lambda r: f"{total[r]} characters < cleaning.min_total_chars={cleaning.min_total_chars}",
    )
    return total


def _canonical_rows(
    m: _Messages, flat: Flat, content: pa.Array, ok: np.ndarray, total: np.ndarray
) -> tuple[pd.DataFrame, tuple[pa.Array, pa.Array, pa.Array]]:
    """The valid rows' canonical messages JSON, hashes and sizes; their prompt, answer and assistant texts."""
    parent, code, counts = m.parent, m.code, m.counts
    ok_msgs = ok[parent] if len(parent) else np.zeros(0, bool)
    keep = pa.array(ok_msgs)
    c_ok = content.filter(keep)
    r_ok = flat.role_text.cast(pa.string()).filter(keep)
    elems = pc.binary_join_element_wise('{"role": ', json_string(r_ok), ', "content": ', json_string(c_ok), "}", "")
    ok_counts = counts[ok]
    offsets = np.zeros(len(ok_counts) + 1, np.int32)
    np.cumsum(ok_counts, out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets), elems)
    messages = pc.binary_join_element_wise("[", pc.binary_join(lists, ", "), "]", "")
    ckey = hash_values(messages) if len(messages) else np.zeros(0, np.uint64)
    chash = to_hex(ckey) if len(messages) else np.zeros(0, object)
    frame = pd.DataFrame(
        {
            "messages": pd.arrays.ArrowExtensionArray(messages.cast(pa.large_string())),
            "content_hash": chash,
            "n_messages": ok_counts.astype(np.int32),
            "chars": total[ok],
            "_key": ckey,
            "_pos": np.flatnonzero(ok),
        }
    )
    is_assist = code[ok_msgs] == _ASSIST
    assistant_text = pc.binary_join(
        pa.ListArray.from_arrays(pa.array(_sub_offsets(ok_counts, is_assist)), c_ok.filter(pa.array(is_assist))), "\n"
    )
    not_last = np.ones(len(c_ok), bool)
    not_last[offsets[1:][ok_counts > 0] - 1] = False
    prompt_text = pc.binary_join(
        pa.ListArray.from_arrays(pa.array(_sub_offsets(ok_counts, not_last)), c_ok.filter(pa.array(not_last))), "\n"
    )
    answer_text = c_ok.take(pa.array(np.maximum(offsets[1:] - 1, 0))) if len(c_ok) else c_ok
    return frame, (prompt_text, answer_text, assistant_text)


def _sub_offsets(counts: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """List offsets after keeping only the masked elements of each row."""
    row = np.repeat(np.arange(len(counts)), counts)
    kept = np.bincount(row[mask], minlength=len(counts))
    out = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(kept, out=out[1:])
    return out
