"""Training data at the edge: pair / SFT JSONL files → token ids → padded, bucketed numpy batches.

File formats (the ones TRL reads), one JSON object per line, blank lines ignored:

- DPO pairs: ``{"prompt": ..., "chosen": "...", "rejected": "..."}``; optional
  ``ref_chosen_logps`` / ``ref_rejected_logps`` (TRL's precomputed columns) are used as given.
- SFT rows:  ``{"prompt": ..., "completion": "..."}``.

A prompt is a string (one user turn) or a list of chat messages
``[{"role": ..., "content": ...}, ...]``; it is rendered with the tokenizer's chat
template and the generation prompt. A completion is a string (or a one-message
assistant list, TRL's conversational form); the end-of-turn token is appended so
the model learns to stop.

Every problem with a file is a ``DataError`` naming the file and line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
COMPLETION_FIELDS = {"dpo": ("chosen", "rejected"), "sft": ("completion",)}


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


# ---------------------------------------------------------------- files


def resolve_path(path: str | Path) -> Path:
    """``path`` as given if it exists, else relative to the installed package's parent
    (so configs can name bundled files as ``mrjax/data/...`` from any directory)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    bundled = PACKAGE_DIR.parent / p
    return bundled if bundled.exists() else p


def file_fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_text(path: str | Path, text: str) -> Path:
    """Write a file atomically and durably (temp file, fsync, rename, fsync of the folder), so a
    reader never sees half a file and a file that exists survives a crash. In a multi-process
    job only process 0 writes (the others compute the same text)."""
    from mrjax.mesh import is_main_process

    path = Path(path)
    if not is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a result file is as readable as any other
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows atomically and durably (see ``write_text``)."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | Path, what: str = "JSONL") -> list[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line; a missing file, bad JSON or a non-object
    line is an error naming the file and line."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{_where(path, number)}: not UTF-8 text (byte {line[err.start]:#04x} at column "
                                f"{err.start + 1}); save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{_where(path, number)}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(raw, dict):
                raise DataError(f"{_where(path, number)}: expected a JSON object, got {type(raw).__name__}")
            rows.append((number, raw))
    return rows


def mean_or_none(values) -> float | None:
    """The mean of the values that are not None (a figure over rows that may lack it); None if none."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def jsonl_objects(path: str | Path) -> list[dict]:
    """The objects of a JSONL file, without their line numbers (``read_jsonl``)."""
    return [row for _, row in read_jsonl(path)]


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def _check_prompt(value: Any, where: str) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: 'prompt' is empty or whitespace-only")
        return value
    if isinstance(value, list):
        if not value:
            raise DataError(f"{where}: 'prompt' is an empty list of messages")
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: prompt message {i} must be an object with string 'role' and 'content'")
        return value
    raise DataError(f"{where}: 'prompt' must be a string or a list of chat messages, got {type(value).__name__}")


def _check_completion(value: Any, field: str, where: str) -> str:
    if isinstance(value, list):  # TRL conversational form: [{"role": "assistant", "content": "..."}]
        if len(value) != 1 or not isinstance(value[0], dict) or not isinstance(value[0].get("content"), str):
            raise DataError(f"{where}: '{field}' as a message list must hold exactly one message with string 'content'")
        value = value[0]["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: '{field}' is empty or whitespace-only")
    return value


def read_rows(path: str | Path, kind: str) -> list[tuple[int, dict]]:
    """Validated rows ``(line number, row)`` of a DPO pair file (kind='dpo') or SFT file (kind='sft')."""
    if kind not in COMPLETION_FIELDS:
        raise ValueError(f"kind {kind!r} is not dpo or sft")
    path = resolve_path(path)
    fields = ("prompt",) + COMPLETION_FIELDS[kind]
    rows: list[tuple[int, dict]] = []
    for number, raw in read_jsonl(path, "pair" if kind == "dpo" else "SFT"):
        where = _where(path, number)
        missing = [k for k in fields if k not in raw]
        if missing:
            raise DataError(f"{where}: missing field '{missing[0]}' (a {kind} row needs {', '.join(fields)})")
        row = {"prompt": _check_prompt(raw["prompt"], where)}
        for field in COMPLETION_FIELDS[kind]:
            row[field] = _check_completion(raw[field], field, where)
        if kind == "dpo":
            refs = [raw.get("ref_chosen_logps"), raw.get("ref_rejected_logps")]
            if any(r is not None for r in refs):
                if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and np.isfinite(r) for r in refs):
                    raise DataError(f"{where}: ref_chosen_logps and ref_rejected_logps must both be finite numbers")
                row["ref_logps"] = (float(refs[0]), float(refs[1]))
        rows.append((number, row))
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


# ---------------------------------------------------------------- prompt sources

SEED_PROMPTS = PACKAGE_DIR / "data" / "seed_prompts.jsonl"


def prompt_question(prompt: Any) -> str:
    """The user's question of a prompt, as the judge sees it: the string itself, or the last
    user message of a chat (earlier turns are not shown to the judge)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def normalized(text: str) -> str:
    """Case- and whitespace-insensitive form used to deduplicate prompts."""
    return " ".join(str(text).lower().split())


def read_prompts(path: str | Path) -> list[Any]:
    """Prompts of a JSONL file: ``{"prompt": str}`` or ``{"messages": [{"role","content"}, ...]}``."""
    return [prompt for _, prompt in read_prompt_rows(path)]


def read_prompt_rows(path: str | Path) -> list[tuple[str, Any]]:
    """``("file:line", prompt)`` of every prompt of a JSONL file (see ``read_prompts``)."""
    prompts = []
    path = resolve_path(path)
    for number, raw in read_jsonl(path, "prompt"):
        where = _where(path, number)
        if "prompt" in raw:
            prompts.append((where, _check_prompt(raw["prompt"], where)))
        elif "messages" in raw:
            messages = _check_prompt(raw["messages"], where)
            if not isinstance(messages, list):
                raise DataError(f"{where}: 'messages' must be a list of chat messages")
            if not any(m["role"] == "user" and m["content"].strip() for m in messages):
                raise DataError(f"{where}: 'messages' has no non-empty user message")
            prompts.append((where, messages))
        else:
            raise DataError(f"{where}: a prompt row needs a 'prompt' string or a 'messages' list")
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


def tfds_prompts(name: str, split: str, field: str) -> list[str]:
    """Prompts from a TensorFlow Datasets dataset (the ``tfds`` extra)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"prompts.source=tfds ({name!r}) needs tensorflow-datasets: pip install 'mrjax[tfds]'"
        ) from None
    try:
        dataset = tfds.load(name, split=split)
    except Exception as err:  # tfds raises many kinds (not found, not prepared, no network)
        raise DataError(f"tfds dataset {name!r} split {split!r} could not be loaded: {err}") from None
    prompts = []
    for i, example in enumerate(tfds.as_numpy(dataset)):
        if field not in example:
            raise DataError(f"tfds dataset {name!r}: example {i} has no field {field!r} "
                            f"(fields: {', '.join(sorted(example))}); set prompts.tfds_field")
        value = example[field]
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        if text.strip():
            prompts.append(text)
    if not prompts:
        raise DataError(f"tfds dataset {name!r} split {split!r} has no non-empty {field!r}")
    return prompts


def dedupe_prompts(prompts: Sequence[Any], against: Iterable[Any] = ()) -> list[Any]:
    """Prompts in order with repeats (ignoring case and whitespace) and those in ``against`` removed."""
    seen = {normalized(prompt_question(p)) for p in against}
    out = []
    for p in prompts:
        key = normalized(prompt_question(p)) if not isinstance(p, list) else json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


# ---------------------------------------------------------------- EFT rows

JUDGE_ROW_FIELDS = ("question", "response", "justification", "score")
META_JUDGE_ROW_FIELDS = ("question", "response", "judgment_a", "judgment_b", "explanation", "winner")


def _read_eft_rows(path: str | Path, what: str, fields: tuple[str, ...], text_fields: tuple[str, ...],
                   check) -> list[dict]:
    """Rows with every field in ``fields``, non-empty strings in ``text_fields``, and ``check(row)``
    returning an error message or None; errors name the file and line."""
    path = resolve_path(path)
    rows = []
    for number, raw in read_jsonl(path, f"EFT {what}"):
        where = _where(path, number)
        for field in fields:
            if field not in raw:
                raise DataError(f"{where}: missing field '{field}' (a {what} row needs {', '.join(fields)})")
        for field in text_fields:
            if not isinstance(raw[field], str) or not raw[field].strip():
                raise DataError(f"{where}: '{field}' must be a non-empty string")
        problem = check(raw)
        if problem:
            raise DataError(f"{where}: {problem}")
        rows.append({k: raw[k] for k in fields})
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def read_judge_rows(path: str | Path) -> list[dict]:
    """Judge-format EFT rows: question, response, a justification and an integer score 0..5."""
    def check(raw):
        score = raw["score"]
        if not isinstance(score, int) or isinstance(score, bool) or not 0 <= score <= 5:
            return f"'score' must be an integer 0..5, got {score!r}"

    return _read_eft_rows(path, "judge", JUDGE_ROW_FIELDS, JUDGE_ROW_FIELDS[:3], check)


def read_meta_judge_rows(path: str | Path) -> list[dict]:
    """Meta-judge-format EFT rows: two judgments of a response, an explanation and the winner A|B."""
    def check(raw):
        if raw["winner"] not in ("A", "B"):
            return f"'winner' must be \"A\" or \"B\", got {raw['winner']!r}"

    return _read_eft_rows(path, "meta-judge", META_JUDGE_ROW_FIELDS, META_JUDGE_ROW_FIELDS, check)


def judge_sft_row(row: dict) -> dict:
    """SFT row: the filled judge prompt -> the justification ending in ``Score: X``."""
    from mrjax.roles import fill_judge_prompt

    return {"prompt": fill_judge_prompt(row["question"], row["response"]),
            "completion": f"{row['justification'].strip()}\nScore: {row['score']}"}


def meta_judge_sft_row(row: dict) -> dict:
    """SFT row: the filled meta-judge prompt -> the explanation ending in ``Winner: Judgement X``."""
    from mrjax.roles import fill_meta_judge_prompt

    return {"prompt": fill_meta_judge_prompt(row["question"], row["response"], row["judgment_a"], row["judgment_b"]),
            "completion": f"{row['explanation'].strip()}\nWinner: Judgement {row['winner']}"}


# ---------------------------------------------------------------- tokenisation


@dataclasses.dataclass
class Examples:
    """Tokenised examples of one file: a prompt and 2 (DPO) or 1 (SFT) completions each."""

    kind: str
    prompts: list[np.ndarray]
    completions: list[tuple[np.ndarray, ...]]
    source: str
    lines: list[int]
    fingerprint: str
    truncated: int = 0  # completions cut to fit max_length
    ref_logps: np.ndarray | None = None  # [n, 2] summed reference log-probs (DPO)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def repeats(self) -> int:
        return len(COMPLETION_FIELDS[self.kind])


def end_of_turn_text(tokenizer: Any) -> str:
    """The text of the first end-of-turn id (SmolLM2: ``<|im_end|>``; Llama-3: ``<|eot_id|>``)."""
    return tokenizer.hf.convert_ids_to_tokens(int(tokenizer.eos_ids[0]))


def tokenize_rows(
    rows: Sequence[tuple[int, dict]], tokenizer: Any, kind: str, max_length: int, source: str = "<rows>",
    fingerprint: str = "",
) -> Examples:
    """Token ids for each row; a prompt that leaves no room for a completion token is an error,
    a completion longer than the room left is truncated (and counted)."""
    eot = end_of_turn_text(tokenizer)
    prompts, completions, lines, refs = [], [], [], []
    truncated = 0
    for number, row in rows:
        prompt_ids = np.asarray(tokenizer.encode(tokenizer.chat(row["prompt"])), np.int32)
        room = max_length - len(prompt_ids)
        if room < 1:
            raise DataError(
                f"{source}:{number}: the prompt is {len(prompt_ids)} tokens, longer than the context "
                f"(train.max_length={max_length} must leave room for at least one completion token)"
            )
        ids = []
        for field in COMPLETION_FIELDS[kind]:
            c = np.asarray(tokenizer.encode(row[field] + eot), np.int32)
            if len(c) > room:
                c, truncated = c[:room], truncated + 1
            ids.append(c)
        prompts.append(prompt_ids)
        completions.append(tuple(ids))
        lines.append(number)
        refs.append(row.get("ref_logps"))
    if truncated:
        log.warning("%s: %d completions were truncated to fit train.max_length=%d", source, truncated, max_length)
    ref_logps = None
    if kind == "dpo" and all(r is not None for r in refs):
        ref_logps = np.asarray(refs, np.float32)
    return Examples(kind, prompts, completions, source, lines, fingerprint, truncated, ref_logps)


def load_examples(path: str | Path, tokenizer: Any, kind: str, max_length: int) -> Examples:
    """Read, validate and tokenise a DPO pair file or SFT file."""
    resolved = resolve_path(path)
    rows = read_rows(resolved, kind)
    return tokenize_rows(rows, tokenizer, kind, max_length, str(resolved), file_fingerprint(resolved))


# ---------------------------------------------------------------- batches


# Training rows pad up to a multiple of this many tokens (``train.pad_multiple``). A batch group's shape
# (``batch_groups``) compiles one program whatever its lengths, so coarser padding would only add work.
PAD_MULTIPLE = 16


# A batch packs its real tokens when that leaves at most this share of its slots. Packing costs gathers in
# every layer and a larger program to compile: on SmolLM2's bfloat16 steps, 56% of the slots ran the actor
# pairs' DPO step in 4.2 s instead of 6.1 s, while 87% ran an EFT SFT step in 15.8 s against 16.4 s (noise).
PACK_AT_MOST = 0.85


def padded_length(n: int, maximum: int, multiple: int = PAD_MULTIPLE) -> int:
    """A padded length: ``n`` rounded up to a multiple of ``multiple``, at most ``maximum`` (≥ n)."""
    return max(min(-(-max(int(n), 1) // int(multiple)) * int(multiple), int(maximum)), int(n))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of an epoch: a permutation fixed by (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


# Examples whose prompts agree on this many first tokens are batched together (a judge prompt's first
# 64 tokens are the rubric's; two actor prompts part within the user's words after the chat header).
GROUP_PREFIX_TOKENS = 64


def prefix_groups(examples: Examples, length: int = GROUP_PREFIX_TOKENS) -> list[bytes]:
    """A key per example: its prompt's first ``length`` tokens."""
    return [np.asarray(p[:length], np.int32).tobytes() for p in examples.prompts]


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """The padded lengths of every batch of one group, so that a group compiles one program (XLA
    compiles a program per shape: seconds to a minute each on a 2-core CPU)."""

    shared_tokens: int  # prompt tokens all of the group's rows start with, run once per micro-batch (0: none)
    prefix_len: int  # slots for each row's prompt after the shared part (without its last token)
    length: int  # slots for a completion
    # The group's longest prompt rests and completions, longest first (a batch's worth): how many real
    # tokens any batch of the group can hold, so its packed sizes (``make_batch``'s slots) are the group's too.
    longest_prefixes: tuple[int, ...] = ()
    longest_completions: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class BatchGroup:
    members: np.ndarray  # example indices, in file order
    shape: BatchShape


def batch_groups(
    examples: Examples, batch_size: int, max_length: int, pad_multiple: int = PAD_MULTIPLE
) -> list[BatchGroup]:
    """The groups that batches never mix: each prompt template (``prefix_groups``) with at least
    ``batch_size`` rows (the loop's judge pairs, the EFT stage's judge rows, its meta-judge rows), then
    all other rows together; in the order of their first rows. Each with the shape its batches pad to:
    the shared part is the prefix common to all of the group's rows (when at least MIN_SHARED_TOKENS),
    and each length is the group's longest rounded up to a multiple of ``pad_multiple`` (a group
    compiles one program whatever its lengths, so coarser padding would only add work)."""
    by_key: dict[bytes, list[int]] = {}
    for i, key in enumerate(prefix_groups(examples)):
        by_key.setdefault(key, []).append(i)
    groups = [m for m in by_key.values() if len(m) >= batch_size]
    rest = sorted(i for m in by_key.values() if len(m) < batch_size for i in m)
    groups = sorted(groups + ([rest] if rest else []), key=lambda m: m[0])
    out = []
    for members in groups:
        heads = [examples.prompts[i][:-1] for i in members]
        shared = common_prefix_length(heads) if len(members) > 1 else 0
        shared = shared if shared >= MIN_SHARED_TOKENS else 0
        rests = sorted((len(h) - shared for h in heads), reverse=True)
        completions = sorted((len(c) for i in members for c in examples.completions[i]), reverse=True)
        shape = BatchShape(
            shared,
            padded_length(rests[0], max_length, pad_multiple),
            padded_length(completions[0], max_length, pad_multiple),
            tuple(rests[:batch_size]),
            tuple(completions[:batch_size * examples.repeats]),
        )
        out.append(BatchGroup(np.asarray(members, np.int64), shape))
    return out


# A prompt prefix common to a micro-batch's rows runs once when it is at least this long (shorter, the
# extra model call costs more than it saves; the chat template's header alone is about 20 tokens).
MIN_SHARED_TOKENS = 32


def common_prefix_length(seqs: Sequence[np.ndarray]) -> int:
    """Length of the longest token prefix that every sequence starts with."""
    n = min(len(s) for s in seqs)
    first = np.asarray(seqs[0][:n])
    for s in seqs[1:]:
        diff = np.flatnonzero(np.asarray(s[:n]) != first[:n])
        n = int(diff[0]) if len(diff) else n
    return n


def make_batch(
    examples: Examples,
    indices: Sequence[int],
    batch_size: int,
    micro_batches: int,
    pad_id: int,
    max_length: int,
    pad_multiple: int = PAD_MULTIPLE,
    share_prefix: bool = True,
    shape: BatchShape | None = None,
    shards: int = 1,
    pack: bool = True,
    pack_at_most: float = PACK_AT_MOST,
) -> dict[str, np.ndarray]:
    """Numpy arrays [A, b, ...] (A = micro_batches, b = batch_size / A) for ``mrjax.train_step``.

    Fewer than ``batch_size`` indices are padded with weight-0 rows (the end of an epoch).

    With ``share_prefix``, when the real rows of some micro-batch (two or more) share a prompt prefix of
    at least ``MIN_SHARED_TOKENS`` tokens (every judge-format row shares the judge rubric), each
    micro-batch's common prefix goes to ``shared_tokens``/``shared_positions``/``shared_mask`` [A, S]
    (left-padded), and the rows' ``prefix_*`` hold only the rest of their prompt (positions continuing
    after the shared part): the step runs the shared part once per micro-batch, not once per row.
    Otherwise there are no ``shared_*`` keys and ``prefix_*`` hold the whole prompt.

    With a ``shape`` (the rows' ``batch_groups`` group's), the shared part is the group's and the
    arrays have the group's lengths, whatever rows the batch holds.

    With ``pack``, where packing keeps at most ``pack_at_most`` of the slots, ``prefix_slots``
    [A, shards, Np] and ``slots`` [A, shards, Nc] list where the real tokens of the prefix and completion
    segments are: each micro-batch's rows cut into ``shards`` (the mesh's batch shards), the flat slot
    within its shard (spare places: the shard's slot count). The step then runs the per-token work on
    those tokens only (``mrjax.model.llama.Packing``).
    Np and Nc are the group's bound with a ``shape`` (so the group still compiles one program), else
    the batch's own; both rounded up to ``pad_multiple``.
    """
    if not 0 < len(indices) <= batch_size or batch_size % micro_batches:
        raise ValueError(f"{len(indices)} indices for a batch of {batch_size} in {micro_batches} micro-batches")
    r = examples.repeats
    b = batch_size // micro_batches
    weights = np.zeros(batch_size, np.float32)
    weights[: len(indices)] = 1.0
    rows = list(indices) + [indices[0]] * (batch_size - len(indices))
    heads = [examples.prompts[i][:-1] for i in rows]  # the prefix segment: the prompt without its last token

    # Tokens of each row's head that go to its micro-batch's shared part (the rows' common prefix).
    shared_of = np.zeros(batch_size, np.int64)
    if share_prefix and shape is not None:  # every row of the group starts with its shared part
        shared_of[:] = shape.shared_tokens
    elif share_prefix:
        for a in range(micro_batches):
            # Nothing is shared among fewer than two real rows (padding rows, copies of the first row, are
            # included so that every row starts with its micro-batch's shared part).
            if weights[a * b:(a + 1) * b].sum() > 1:
                shared_of[a * b:(a + 1) * b] = common_prefix_length(heads[a * b:(a + 1) * b])
        if shared_of.max() < MIN_SHARED_TOKENS:
            shared_of[:] = 0
    longest_rest = max(len(h) - s for h, s in zip(heads, shared_of))
    longest_completion = max(len(c) for i in rows for c in examples.completions[i])
    if shape is not None and share_prefix:
        if longest_rest > shape.prefix_len or longest_completion > shape.length:
            raise ValueError(f"rows longer than their group's shape {shape}")
        shared_len = padded_length(shape.shared_tokens, max_length, pad_multiple) if shape.shared_tokens else 0
        prefix_len, length = shape.prefix_len, shape.length
    else:
        shared_len = padded_length(int(shared_of.max()), max_length, pad_multiple) if shared_of.max() else 0
        prefix_len = padded_length(longest_rest, max_length, pad_multiple)
        length = padded_length(longest_completion, max_length, pad_multiple)

    prefix_tokens = np.full((batch_size, prefix_len), pad_id, np.int32)
    prefix_positions = np.zeros((batch_size, prefix_len), np.int32)
    prefix_mask = np.zeros((batch_size, prefix_len), bool)
    tokens = np.full((batch_size * r, length), pad_id, np.int32)
    targets = np.full((batch_size * r, length), pad_id, np.int32)
    positions = np.zeros((batch_size * r, length), np.int32)
    mask = np.zeros((batch_size * r, length), bool)
    for row, i in enumerate(rows):
        prompt, head, done = examples.prompts[i], heads[row], int(shared_of[row])
        rest = head[done:]  # left-padded so the prompt's last token sits next to the completion segment
        if len(rest):
            prefix_tokens[row, prefix_len - len(rest):] = rest
            prefix_positions[row, prefix_len - len(rest):] = done + np.arange(len(rest))
            prefix_mask[row, prefix_len - len(rest):] = True
        for j, completion in enumerate(examples.completions[i]):
            k = row * r + j
            n = len(completion)
            tokens[k, 0] = prompt[-1]
            tokens[k, 1:n] = completion[:-1]
            targets[k, :n] = completion
            positions[k] = len(head) + np.arange(length)
            mask[k, :n] = True

    batch = {
        "prefix_tokens": prefix_tokens,
        "prefix_positions": prefix_positions,
        "prefix_mask": prefix_mask,
        "tokens": tokens,
        "positions": positions,
        "targets": targets,
        "mask": mask,
        "weights": weights,
    }
    if examples.kind == "dpo":
        ref = np.zeros((batch_size, 2), np.float32)
        if examples.ref_logps is not None:
            ref = examples.ref_logps[rows].astype(np.float32)
        batch["ref_logps"] = ref
    batch = {k: v.reshape(micro_batches, b * (v.shape[0] // batch_size), *v.shape[1:]) for k, v in batch.items()}
    if shared_len:  # one row per micro-batch, [A, S], left-padded like the rows' prefixes
        shared_tokens = np.full((micro_batches, shared_len), pad_id, np.int32)
        shared_positions = np.zeros((micro_batches, shared_len), np.int32)
        shared_mask = np.zeros((micro_batches, shared_len), bool)
        for a in range(micro_batches):
            n = int(shared_of[a * b])
            if n:
                shared_tokens[a, shared_len - n:] = heads[a * b][:n]
                shared_positions[a, shared_len - n:] = np.arange(n)
                shared_mask[a, shared_len - n:] = True
        batch.update(shared_tokens=shared_tokens, shared_positions=shared_positions, shared_mask=shared_mask)
    if pack:
        batch.update(real_token_slots(batch, shards, pad_multiple, shape if share_prefix else None, pack_at_most))
    return batch


def _slot_lists(mask: np.ndarray, shards: int, size: int) -> np.ndarray:
    """[A, shards, size]: the real slots of each micro-batch's shards of ``mask`` [A, rows, T], flat within
    the shard; spare places hold the shard's slot count."""
    local = mask.reshape(mask.shape[0], shards, -1)
    out = np.full(local.shape[:2] + (size,), local.shape[2], np.int32)
    for a in range(local.shape[0]):
        for s in range(shards):
            real = np.flatnonzero(local[a, s])
            out[a, s, :len(real)] = real
    return out


def real_token_slots(batch: dict[str, np.ndarray], shards: int = 1, pad_multiple: int = PAD_MULTIPLE,
                     shape: BatchShape | None = None, at_most: float = PACK_AT_MOST) -> dict[str, np.ndarray]:
    """``prefix_slots`` and ``slots`` for a batch (see ``make_batch``); none when packing would keep more than
    ``at_most`` of the slots.

    Weight-0 rows (an epoch's short last batch, filled with copies of its first row) are left out: they
    count for nothing, and their copies could exceed the group's bound. Their log-probs are then not
    their rows' (the model's output there is zeros), and nothing reads them."""
    real_rows = batch["weights"] > 0  # [A, rows]
    rows = real_rows.shape[1]
    shards = shards if shards > 0 and rows % shards == 0 else 1
    repeats = batch["mask"].shape[1] // rows
    prefix_mask = batch["prefix_mask"] & real_rows[..., None]
    mask = batch["mask"] & np.repeat(real_rows, repeats, axis=1)[..., None]
    prefix_slots, completion_slots = prefix_mask.shape[2] * rows // shards, mask.shape[2] * rows * repeats // shards

    def size(mask: np.ndarray, longest: tuple[int, ...], per_row: int, slots: int) -> int:
        if longest:  # the group's bound: any rows // shards of its rows hold at most this many tokens
            real = sum(longest[:rows // shards * per_row])
        else:
            real = int(mask.reshape(mask.shape[0], shards, -1).sum(-1).max())
        return padded_length(real, slots, pad_multiple)

    n_prefix = size(prefix_mask, shape.longest_prefixes if shape else (), 1, prefix_slots)
    n_completion = size(mask, shape.longest_completions if shape else (), repeats, completion_slots)
    if n_prefix + n_completion > at_most * (prefix_slots + completion_slots):
        return {}
    return {"prefix_slots": _slot_lists(prefix_mask, shards, n_prefix),
            "slots": _slot_lists(mask, shards, n_completion)}


@dataclasses.dataclass
class DataPosition:
    """Where training is in the data: the next batch is ``batch`` of ``epoch``'s order."""

    epoch: int
    batch: int


class Batcher:
    """Deterministic batches: step s is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``.

    Batches never mix ``batch_groups`` (rows of one prompt template run its prefix once and share one
    compiled shape). Each epoch a fresh (seed, epoch) permutation orders the rows; each group's rows,
    in that order, are cut into batches, and (with several groups) the batches are shuffled. A
    group's last batch may be short (padded with weight-0 rows), so every example is seen exactly
    once per epoch. With one group this is the permutation cut into consecutive batches."""

    def __init__(
        self,
        examples: Examples,
        batch_size: int,
        micro_batches: int,
        seed: int,
        pad_id: int,
        max_length: int,
        shuffle: bool = True,
        pad_multiple: int = PAD_MULTIPLE,
        shards: int = 1,
    ):
        self.examples, self.batch_size, self.micro_batches, self.shards = examples, batch_size, micro_batches, shards
        self.seed, self.pad_id, self.max_length, self.shuffle, self.pad_multiple = (
            seed, pad_id, max_length, shuffle, pad_multiple
        )
        self.groups = batch_groups(examples, batch_size, max_length, pad_multiple)
        self.steps_per_epoch = steps_per_epoch(self.groups, batch_size)
        self._epoch: tuple[int, list[tuple[np.ndarray, BatchShape]]] | None = None  # made once per epoch

    def position(self, step: int) -> DataPosition:
        return DataPosition(step // self.steps_per_epoch, step % self.steps_per_epoch)

    def _batches(self, epoch: int) -> list[tuple[np.ndarray, BatchShape]]:
        if self._epoch is None or self._epoch[0] != epoch:
            rank = np.empty(len(self.examples), np.int64)
            rank[epoch_order(len(self.examples), self.seed, epoch, self.shuffle)] = np.arange(len(self.examples))
            batches = []
            for group in self.groups:
                members = group.members[np.argsort(rank[group.members], kind="stable")]
                batches += [(members[i:i + self.batch_size], group.shape)
                            for i in range(0, len(members), self.batch_size)]
            if self.shuffle and len(self.groups) > 1:
                order = np.random.default_rng([int(self.seed), int(epoch), 1]).permutation(len(batches))
                batches = [batches[i] for i in order]
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def indices(self, step: int) -> np.ndarray:
        pos = self.position(step)
        return self._batches(pos.epoch)[pos.batch][0]

    def batch(self, step: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        pos = self.position(step)
        idx, shape = self._batches(pos.epoch)[pos.batch]
        return (
            make_batch(self.examples, idx, self.batch_size, self.micro_batches, self.pad_id, self.max_length,
                       self.pad_multiple, shape=shape, shards=self.shards),
            idx,
        )


def steps_per_epoch(groups: Sequence[BatchGroup], batch_size: int) -> int:
    """Batches in an epoch: each group's rows, ``batch_size`` at a time."""
    return sum(-(-len(g.members) // batch_size) for g in groups)


def sequential_batches(
    examples: Examples, batch_size: int, pad_id: int, max_length: int, pad_multiple: int = PAD_MULTIPLE,
    shards: int = 1,
) -> Iterable[tuple[dict[str, np.ndarray], np.ndarray]]:
    """All examples, ``batch_size`` at a time, group by group (``batch_groups``: one shape a group), each
    group in file order (for reference log-probs and evaluation)."""
    for group in batch_groups(examples, batch_size, max_length, pad_multiple):
        for start in range(0, len(group.members), batch_size):
            idx = group.members[start:start + batch_size]
            yield make_batch(examples, idx, batch_size, 1, pad_id, max_length, pad_multiple, shape=group.shape,
                             shards=shards), idx


__all__ = [
    "BatchGroup",
    "BatchShape",
    "Batcher",
    "DataError",
    "DataPosition",
    "Examples",
    "GROUP_PREFIX_TOKENS",
    "PAD_MULTIPLE",
    "SEED_PROMPTS",
    "dedupe_prompts",
    "judge_sft_row",
    "meta_judge_sft_row",
    "normalized",
    "prompt_question",
    "read_judge_rows",
    "read_jsonl",
    "read_meta_judge_rows",
    "read_prompts",
    "tfds_prompts",
    "write_text",
    "end_of_turn_text",
    "epoch_order",
    "padded_length",
    "prefix_groups",
    "batch_groups",
    "steps_per_epoch",
    "load_examples",
    "MIN_SHARED_TOKENS",
    "PACK_AT_MOST",
    "common_prefix_length",
    "make_batch",
    "read_rows",
    "resolve_path",
    "sequential_batches",
    "tokenize_rows",
    "write_jsonl",
]
