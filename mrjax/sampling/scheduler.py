"""The host side of the sampler: which rows wait, which slots they get, and when the pool refills or shrinks.

* Prompts are already tokenised. The tokens every prompt of the call starts with (the chat header,
  the judge's rubric, ...) are the *shared prefix*: it is prefilled once, and the decoder keeps its
  keys/values once and reads them once per step for all rows.
* Prompts that share a further prefix of at least ``MIN_GROUP_PREFIX`` tokens (the meta-judge's
  calls for one response: its question and response) form a *group*: the group's prefix is
  prefilled once, and each row keeps a copy of its slots in its own cache.
* Rows (one sample of one prompt) wait group by group, in order of prompt length, for a fixed pool
  of ``batch_size`` decode slots (continuous batching). A refill prefills the rest of each distinct
  waiting prompt after the prefix's (or its group's) cache, in runs of like length
  (``prefill_chunks``), puts its rows into free slots and samples their first tokens. Each slot's
  own cache reserves a prompt bucket for the call's longest prompt after the shared prefix, then
  the generated tokens; a row's keys and values fill it without the buckets' padding (keys carry
  their positions, so attention does not care where a slot is).
* The decoder returns to the host once 1/``REFILL_FRACTION`` of the slots are free, to refill them;
  once no rows wait, the pool halves whenever half of it is free, so finished rows stop costing
  decode steps.
"""
from __future__ import annotations

import collections
import functools
import math
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrjax import mesh as mesh_lib
from mrjax.model.llama import KV_CACHE_AXES, KVCache, LlamaConfig
from mrjax.sampling import engine

FINISH_STOP = "stop"
FINISH_LENGTH = "length"

MIN_PROMPT_BUCKET = 16
# Generated-token buffers and the cache are sized to max_new_tokens rounded up to this.
NEW_TOKENS_ROUNDING = 32
# Prompts that share at least this many tokens beyond the call's prefix prefill them once as a group
# (fewer would not pay for the slots every row of the call then reserves for them).
MIN_GROUP_PREFIX = 64
# The decoder returns to the host to refill its slots once 1/REFILL_FRACTION of them are free.
REFILL_FRACTION = 8
# Once no rows wait, the pool shrinks (live rows gathered into a smaller one, of a power of two
# slots) whenever half of it is free, down to this many slots: finished rows stop costing decode steps.
MIN_SHRUNK_POOL = 8
# A prefill call costs about this many padded (row x token) positions besides its tokens
# (dispatch, the prefix's cache broadcast, the inserted rows' first tokens).
PREFILL_CALL_COST = 256


# --------------------------------------------------------------------------- buckets


def round_up(n: int, multiple: int) -> int:
    """The least multiple of ``multiple`` that is >= n."""
    return -(-n // multiple) * multiple


def prompt_bucket(length: int) -> int:
    """Padded prompt length for prefill: multiples of 8 up to 64, then 4 steps per doubling
    (80, 96, 112, 128, 160, ...), so padding wastes at most 1/4 of the prefill work."""
    size = MIN_PROMPT_BUCKET
    while size < length:
        size += max(8, (1 << (size.bit_length() - 1)) // 4)
    return size


def cache_bucket(length: int) -> int:
    """16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x between): ``plan``'s bound on the
    decoder's prompt slots (a prompt bucket, or a group's kept slots plus its own bucket)."""
    size = MIN_PROMPT_BUCKET
    while True:
        for candidate in (size, size * 3 // 2):
            if candidate >= length:
                return candidate
        size *= 2


def row_bucket(rows: int, ways: int) -> int:
    """Rows of a batch: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x between, as
    ``cache_bucket``), a multiple of the mesh's batch ways."""
    size = 1
    while size < rows and size * 3 // 2 < rows:
        size *= 2
    if size < rows:
        size = size * 3 // 2
    return max(ways, round_up(size, ways))


def prefill_chunks(lengths: Sequence[int], ways: int) -> list[tuple[int, int]]:
    """Split prompts sorted by length into consecutive runs [start, end), each one prefill of
    ``row_bucket`` rows x the ``prompt_bucket`` of its longest, so that the padded work plus
    ``PREFILL_CALL_COST`` per run is least (one bucket for all would pad short prompts to the
    longest, and a dozen prompts to 16 rows)."""
    n = len(lengths)
    best = [0.0] + [math.inf] * n  # best[j]: least cost of the first j prompts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + row_bucket(j - i, ways) * prompt_bucket(lengths[j - 1]) + PREFILL_CALL_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def packed_slots(mask: np.ndarray, P: int) -> tuple[np.ndarray, np.ndarray]:
    """For prefill rows' cache masks [rows, W] (a group prefix's kept slots, then the row's own
    left-padded bucket): the indices [rows, P] of each row's real slots, right-aligned, and where
    they are real. The padding in between costs no decode slots (keys carry their positions)."""
    packing = np.zeros((len(mask), P), np.int32)
    packed = np.zeros((len(mask), P), bool)
    for j, row in enumerate(mask):
        real = np.flatnonzero(row)
        packing[j], packed[j, P - len(real):] = real[0], True  # unused slots read a real one, masked
        packing[j, P - len(real):] = real
    return packing, packed


def left_padded(sequences: Sequence[Sequence[int]], rows: int, width: int, start: int = 0):
    """tokens, positions, mask [rows, width] of prefill input: each sequence right-aligned, its
    positions counted from ``start``; rows past the sequences hold one dummy token (a finite softmax)."""
    tokens = np.zeros((rows, width), np.int32)
    positions = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), bool)
    mask[len(sequences):, width - 1] = True
    for j, ids in enumerate(sequences):
        tokens[j, width - len(ids):] = ids
        positions[j, width - len(ids):] = np.arange(start, start + len(ids))
        mask[j, width - len(ids):] = True
    return tokens, positions, mask


# --------------------------------------------------------------------------- shared prefixes


def shared_prefix_length(prompt_ids: Sequence[Sequence[int]]) -> int:
    """Tokens at the start of every prompt in common, leaving each prompt at least one of its own
    (whose prefill gives the first generated token)."""
    limit = min(len(ids) for ids in prompt_ids) - 1
    return min([limit] + [_common_length(prompt_ids[0], ids) for ids in prompt_ids[1:]])


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(suffixes: Sequence[Sequence[int]], min_length: int = MIN_GROUP_PREFIX) -> tuple[list[int], list[int]]:
    """Groups of prompts that share a further prefix (after the call's shared one): the
    meta-judge's calls for one response share its question, response and rubric. Returns per
    prompt its group id (-1: none, the prompts prefilled after the call's prefix alone) and the
    group prefix's length (0: none; else at least ``min_length``, leaving each prompt at least
    one token of its own).

    Prompts are sorted; a run grows while the next prompt shares at least ``min_length`` tokens
    with it, joining does not shrink the run's total of shared tokens, and a run of one is not
    left for a prompt that shares twice as much with the next one."""
    order = sorted(range(len(suffixes)), key=lambda i: (list(suffixes[i]), i))
    runs: list[tuple[list[int], int]] = []  # (members, common length)
    for at, i in enumerate(order):
        if runs:
            members, common = runs[-1]
            shared = min(common, _common_length(suffixes[members[0]], suffixes[i]))
            following = _common_length(suffixes[i], suffixes[order[at + 1]]) if at + 1 < len(order) else 0
            if shared >= min_length and shared * len(members) >= common * (len(members) - 1) and (
                    len(members) > 1 or following < 2 * shared):
                runs[-1] = (members + [i], shared)
                continue
        runs.append(([i], len(suffixes[i])))
    group, length = [0] * len(suffixes), [0] * len(suffixes)
    for g, (members, common) in enumerate(runs):
        G = min([common] + [len(suffixes[i]) - 1 for i in members]) if len(members) > 1 else 0
        for i in members:
            group[i], length[i] = (g, G) if G >= min_length else (-1, 0)
    return group, length


def kept_slots(C: int, G: int) -> int:
    """Slots of a group prefix's cache that its rows keep: a bucket of its own G tokens (0: no group)."""
    return min(prompt_bucket(G), prompt_bucket(C + G)) if G else 0


def prefill_shared_prefix(model, prompt_ids, ways: int):
    """The common prefix's length C and cache, prefilled once: a KVCache [L, ways, Cb, Kh, D] (each
    row the same) with the prefix right-aligned in Cb slots, and its mask [Cb]."""
    c: LlamaConfig = model.config
    C = shared_prefix_length(prompt_ids)
    Cb = prompt_bucket(C)
    tokens, positions, mask = left_padded([prompt_ids[0][:C]] * ways, ways, Cb)
    if C == 0:
        shape = (c.num_layers, ways, Cb, c.num_kv_heads, c.head_dim)
        sharding = mesh_lib.named_sharding(model.mesh, KV_CACHE_AXES, shape)
        prefix = KVCache(*(mesh_lib.put(np.zeros(shape, model.dtype), sharding) for _ in range(2)))
    else:
        put = functools.partial(mesh_lib.put_batch, model.mesh)
        _, prefix = engine.prefill(model.module, model.params, put(tokens), put(positions), put(mask))
    return C, prefix, mesh_lib.put_replicated(model.mesh, mask[0])


def prefill_group_prefix(model, prompt_ids, C: int, G: int, ways: int):
    """The cache of a group's prefix (its first C + G tokens, right-aligned in a prompt bucket), its
    mask, how many trailing slots hold the group's own part (a bucket of G) and their mask."""
    width = prompt_bucket(C + G)
    tokens, positions, mask = left_padded([prompt_ids[:C + G]] * ways, ways, width)
    put = functools.partial(mesh_lib.put_batch, model.mesh)
    _, cache = engine.prefill(model.module, model.params, put(tokens), put(positions), put(mask))
    keep = kept_slots(C, G)
    own = np.arange(width - keep, width) >= width - G  # the group's tokens, not the call's prefix
    return cache, mesh_lib.put_replicated(model.mesh, mask[0]), keep, own


# --------------------------------------------------------------------------- the schedule


class Scheduler:
    """Runs one ``generate_ids`` call: rows wait, get slots, decode, finish, and the pool refills or shrinks.

    ``run()`` returns per prompt, per sample: the generated ids, their log-probabilities and the
    finish reason. ``on_rows(rows, tokens)`` (optional) hears of every batch of finished rows.
    ``probe`` (optional, an ``api.NextTokenProbe``) reads the next-token log-probs after each finished
    row's text, cut and continued, from the row's own cache before its slot is refilled
    (``probe_logprobs``, per prompt and sample).
    """

    def __init__(self, model, prompt_ids: Sequence[Sequence[int]], config, params, candidates: int, on_rows=None,
                 probe=None):
        self.model, self.module, self.mesh = model, model.module, model.mesh
        self.probe = probe
        self.prompt_ids, self.n = prompt_ids, config.n
        self.params, self.greedy, self.candidates = params, config.greedy, candidates
        self.on_rows = on_rows
        self.ways = mesh_lib.batch_ways(self.mesh)
        self.put = functools.partial(mesh_lib.put_batch, self.mesh)
        self.new_capacity = round_up(config.max_new_tokens, NEW_TOKENS_ROUNDING)
        n_prompts = len(prompt_ids)
        self.weights = engine.prepare(self.module, model.params)
        self.C, self.prefix, self.prefix_mask = prefill_shared_prefix(model, prompt_ids, self.ways)
        self.suffixes = [ids[self.C:] for ids in prompt_ids]
        self.group, self.group_len = prefix_groups(self.suffixes)
        members = collections.defaultdict(list)
        for p in range(n_prompts):
            members[self.group[p]].append(p)
        self.own_len = [len(self.suffixes[p]) - self.group_len[p] for p in range(n_prompts)]  # prefilled per prompt

        # Rows (prompt, sample) wait group by group, in order of prompt length, so each refill
        # prefills tight buckets and a group's prefix cache lives while its rows are placed.
        group_rank = {g: (min(self.own_len[p] for p in ps), ps[0]) for g, ps in members.items()}
        order = sorted(range(n_prompts), key=lambda i: (group_rank[self.group[i]], self.own_len[i], i))
        self.waiting = collections.deque((p, s) for p in order for s in range(self.n))
        self.rows = min(row_bucket(len(self.waiting), self.ways), round_up(config.batch_size, self.ways))
        # Each row's prompt slots hold its real tokens only. The coarser cache buckets (two a doubling, where
        # prefill has four) let more of a stage's calls share one pool shape, hence one compiled decoder.
        self.prompt_slots = cache_bucket(max(map(len, self.suffixes)))
        self.unplaced = collections.Counter(self.group[p] for p, _ in self.waiting)
        self.group_caches: dict[int, tuple] = {}
        self.refill_at = max(1, self.rows // REFILL_FRACTION)
        # A probe's appended tokens go after the row's generated ones: room for them in every slot.
        appended = round_up(probe.max_appended, NEW_TOKENS_ROUNDING) if probe else 0
        self.pool = engine.empty_pool(self.module, rows=self.rows, prompt_slots=self.prompt_slots,
                                      cache_slots=self.prompt_slots + self.new_capacity + appended,
                                      new_capacity=self.new_capacity)
        self.slot_row: list[tuple[int, int] | None] = [None] * self.rows

        self.token_ids: list[list[list[int]]] = [[[] for _ in range(self.n)] for _ in range(n_prompts)]
        self.logprobs: list[list[list[float]]] = [[[] for _ in range(self.n)] for _ in range(n_prompts)]
        self.finish: list[list[str]] = [[FINISH_LENGTH] * self.n for _ in range(n_prompts)]
        self.probe_logprobs: list[list[list[float]]] | None = (
            [[[] for _ in range(self.n)] for _ in range(n_prompts)] if probe else None)

    def run(self):
        try:
            while self.waiting or any(r is not None for r in self.slot_row):
                free = [b for b, r in enumerate(self.slot_row) if r is None]
                if self.waiting and free and (len(free) >= self.refill_at or len(free) == len(self.slot_row)):
                    rows = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
                    self.refill(rows, free)
                size = len(self.slot_row)  # the first pool's size, or less once it has shrunk
                stop_at = self.refill_at if self.waiting else size // 2 if size > MIN_SHRUNK_POOL else size + 1
                self.pool = engine.decode(self.module, self.weights, self.prefix, self.prefix_mask, self.pool, self.params,
                                          jnp.int32(stop_at), greedy=self.greedy, candidates=self.candidates)
                self.collect()
                self.shrink()
        finally:
            del self.weights, self.pool
        return self.token_ids, self.logprobs, self.finish

    def refill(self, rows, where) -> None:
        """Prefill the prompts of ``rows`` (each distinct prompt once; group by group, in runs of
        like length: ``prefill_chunks``) and put the rows in slots ``where``."""
        slot = dict(zip(rows, where))
        for row, b in slot.items():
            self.slot_row[b] = row
        for g in dict.fromkeys(self.group[p] for p, _ in rows):
            unique = sorted({p for p, _ in rows if self.group[p] == g}, key=lambda p: (self.own_len[p], p))
            for start, end in prefill_chunks([self.own_len[p] for p in unique], self.ways):
                run = set(unique[start:end])
                mine = [row for row in rows if row[0] in run]
                self.refill_run(g, unique[start:end], mine, [slot[row] for row in mine])
                self.unplaced[g] -= len(mine)
            if self.unplaced[g] == 0:
                self.group_caches.pop(g, None)

    def refill_run(self, g: int, unique: list[int], rows, where) -> None:
        """One prefill of prompts ``unique`` (of group ``g``) and the insert of their ``rows`` into ``where``."""
        C, G = self.C, self.group_len[unique[0]]
        own_bucket = prompt_bucket(max(self.own_len[p] for p in unique))
        Bp = row_bucket(len(unique), self.ways)
        tokens, positions, mask = left_padded([self.suffixes[p][G:] for p in unique], Bp, own_bucket, start=C + G)
        if g not in self.group_caches:  # ungrouped prompts read the call's prefix and keep none of it
            self.group_caches[g] = (prefill_group_prefix(self.model, self.prompt_ids[unique[0]], C, G, self.ways) if G
                                    else (self.prefix, self.prefix_mask, 0, np.zeros(0, bool)))
        group_cache, group_mask, keep, own = self.group_caches[g]
        last_hidden, cache = engine.prefill_after(self.module, self.model.params, group_cache, group_mask,
                                                  self.put(tokens), self.put(positions), self.put(mask), keep=keep)
        packing, packed_mask = packed_slots(np.concatenate([np.broadcast_to(own, (Bp, keep)), mask], axis=1),
                                            self.prompt_slots)
        N = row_bucket(len(rows), 1)
        fields = np.zeros((5, N), np.int32)  # slot, prefill row, prompt length, prompt index, sample index
        fields[0] = self.rows  # padding entries go nowhere
        row_of = {p: j for j, p in enumerate(unique)}
        for r, ((p, s), b) in enumerate(zip(rows, where)):
            fields[:, r] = (b, row_of[p], len(self.prompt_ids[p]), p, s)
        where, row_prompt, prompt_len, prompt_index, sample_index = (mesh_lib.put_replicated(self.mesh, f)
                                                                     for f in fields)
        hidden, k, v, prompt_mask = engine.pack_rows(last_hidden, cache, self.put(packing), self.put(packed_mask),
                                                     row_prompt)
        token, logprob = engine.first_tokens(self.weights, hidden, prompt_index, sample_index, self.params,
                                             greedy=self.greedy, candidates=self.candidates)
        self.pool = engine.insert(self.pool, k, v, prompt_mask, where, prompt_len, prompt_index, sample_index, token,
                                  logprob, self.params)

    def collect(self) -> None:
        """Record the rows that finished and free their slots."""
        step, done, stopped = mesh_lib.fetch((self.pool.step, self.pool.done, self.pool.stopped))
        finished = [b for b, r in enumerate(self.slot_row) if r is not None and done[b]]
        if not finished:
            return
        out_tokens, out_logprobs = mesh_lib.fetch((self.pool.out_tokens, self.pool.out_logprobs))
        if self.probe is not None:
            self.read_probes(finished, step, stopped, out_tokens)
        for b in finished:
            (p, s), n = self.slot_row[b], int(step[b])
            self.token_ids[p][s] = out_tokens[b, :n].tolist()
            self.logprobs[p][s] = out_logprobs[b, :n].tolist()
            self.finish[p][s] = FINISH_STOP if stopped[b] else FINISH_LENGTH
            self.slot_row[b] = None
        if self.on_rows is not None:
            self.on_rows(len(finished), int(sum(step[b] for b in finished)))

    def read_probes(self, finished: list[int], step, stopped, out_tokens) -> None:
        """The probe's log-probs for the finished rows in slots ``finished``, in one ``engine.probe`` call."""
        keep, feeds = [], []
        for b in finished:
            n = int(step[b])
            text_ids = out_tokens[b, :n - 1 if stopped[b] else n].tolist()  # the end-of-turn id is not text
            k, appended = self.probe.continuation(text_ids)
            if not 0 <= k <= len(text_ids) or len(appended) > self.probe.max_appended:
                raise ValueError(f"probe continuation: keep {k} of {len(text_ids)} tokens and append "
                                 f"{len(appended)} (at most {self.probe.max_appended})")
            kept = min(k, n - 1)  # a row's last token was never fed back: its keys are not in the cache
            feed = text_ids[kept:k] + list(appended)
            if not feed:  # nothing after the cut: feed its last token again, to read what follows it
                if kept == 0:
                    raise ValueError("probe continuation: an empty text (keep 0, nothing appended) has no next token")
                kept -= 1
                feed = [text_ids[kept]]
            keep.append(kept)
            feeds.append(feed)
        N = row_bucket(len(finished), self.ways)
        T = round_up(max(map(len, feeds)), 8)
        where = np.full(N, finished[0], np.int32)  # padding rows read the first one again (ignored)
        keep_a, feed_len = np.zeros(N, np.int32), np.ones(N, np.int32)
        feed = np.zeros((N, T), np.int32)
        feed[:, 0] = feeds[0][0]
        for r, (b, kept, ids) in enumerate(zip(finished, keep, feeds)):
            where[r], keep_a[r], feed_len[r] = b, kept, len(ids)
            feed[r, :len(ids)] = ids
        rep = functools.partial(mesh_lib.put_replicated, self.mesh)
        logprobs = mesh_lib.fetch(engine.probe(self.module, self.weights, self.prefix, self.prefix_mask, self.pool,
                                               rep(where), rep(keep_a), rep(feed), rep(feed_len),
                                               rep(np.asarray(self.probe.candidate_ids, np.int32))))
        for r, b in enumerate(finished):
            p, s = self.slot_row[b]
            self.probe_logprobs[p][s] = logprobs[r].tolist()

    def shrink(self) -> None:
        """Once no rows wait and half of the pool is free, gather the live rows into a smaller pool."""
        size = len(self.slot_row)
        live = [b for b, r in enumerate(self.slot_row) if r is not None]
        if self.waiting or not live or size <= MIN_SHRUNK_POOL or len(live) > size // 2:
            return
        # A power of two (as few pool shapes, hence decoder compilations, as halving gives), jumping
        # straight to the one that holds the live rows.
        power_of_two = 1 << (len(live) - 1).bit_length()
        size = max(round_up(power_of_two, self.ways), min(MIN_SHRUNK_POOL, size // 2))
        if size >= len(self.slot_row):
            return
        dead = next(b for b, r in enumerate(self.slot_row) if r is None)  # done: pads compute, record nothing
        keep = live + [dead] * (size - len(live))
        self.pool = engine.compact(self.module, self.pool, mesh_lib.put_replicated(self.mesh, np.asarray(keep, np.int32)))
        self.slot_row = [self.slot_row[b] for b in live] + [None] * (size - len(live))


def progress_bar(total: int, enabled: bool | None):
    """A tqdm bar of finished rows (with their tokens), or None when disabled or not on a terminal."""
    show = enabled if enabled is not None else sys.stderr.isatty()
    if not show or total <= 1 or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="row", leave=False)
