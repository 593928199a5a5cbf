"""Verifiable instructions: constraints on an answer that a program can check (word counts, bullets, case,
keywords, JSON, ...), written for this project.

A constraint is a dict ``{"kind": <name>, **parameters}``; ``KINDS[name]`` gives its ``check``, its
``describe`` (the instruction sentence a model sees) and its ``violate`` (a minimal edit of a text that
breaks it). A prompt row of the shipped set (``SHIPPED``) is
``{"id": "v0001", "prompt": "<task> <instruction sentences>", "constraints": [...]}``.

Shared definitions (every kind uses the same ones, so that the kinds agree with each other):

- A *word* is a run of letters and digits; an apostrophe or hyphen between two such runs keeps them one
  word ("don't", "well-known"). Markdown symbols, brackets and punctuation are not words; "P.S." is the
  two words "P" and "S".
- A *sentence* ends at ``.``, ``!`` or ``?`` (a run of them, optionally followed by closing quotes,
  brackets or asterisks) when whitespace or the end of the text follows, and at every line break.
  A piece counts only if it holds a word, so divider lines do not count and a bullet or a title line
  without a full stop is one sentence. A full stop after the abbreviations Mr, Mrs, Ms, Dr, Prof, vs,
  e.g, i.e, P.S and P.P.S does not end a sentence; one inside a number ("3.5") never does.
- A *whole-word* match of a keyword ignores case and requires no letter or digit right before or after
  it: "cat" is found in "Cat," and "cat's", not in "concatenate" or "cats".
- A text without a single word follows no constraint (an empty answer is no lowercase answer).

Checking is *strict* (the text as it is) or *loose*: the text also passes when one of its variants passes:
the text with its first line dropped, with its last line dropped, with both dropped, and each of those
four with every ``*`` removed; this forgives a preamble ("Sure, here it is:"), a closing remark and
markdown emphasis around a required word.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "verifiable_prompts.jsonl"

RELATIONS = ("at least", "at most")
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S.")
PARAGRAPH_DIVIDER = "***"
PARTS_DIVIDER = "******"

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_TERMINATOR = re.compile(r"[.!?]+[\"'”’)\]}*]*(?=\s|$)")
_ABBREVIATION = re.compile(r"(?<![^\W_])(?:mrs?|ms|dr|prof|vs|e\.g|i\.e|p\.s|p\.p\.s)$", re.IGNORECASE)
_BULLET = re.compile(r"[ \t]*[*-][ \t]+(?=\S)")
_MARKUP_ONLY = re.compile(r"[\s*-]+")
_TITLE = re.compile(r"<<([^<>\n]*?[^\W_][^<>\n]*?)>>")
_PLACEHOLDER = re.compile(r"\[([^\[\]\n]*?[^\W_][^\[\]\n]*?)\]")
_BOLD = re.compile(r"(?<!\*)\*\*(?![\s*])([^*\n]+?)(?<!\s)\*\*(?!\*)")
_ITALIC = re.compile(r"(?<!\*)\*(?![\s*])([^*\n]+?)(?<!\s)\*(?!\*)")
_JSON_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*)```", re.DOTALL | re.IGNORECASE)

# Words that an edit inserts or substitutes: plain, comma-free, and outside the forbidden-word lists the
# prompt builder uses, so that an edit breaks the targeted constraint and, where possible, nothing else.
_EXTRA_WORDS = ("and", "this", "also", "holds", "true", "in", "everyday", "practice")
_NEUTRAL_NOUNS = ("thing", "item", "note", "part", "plan", "idea", "area", "unit", "work", "way")
_SHORT_SENTENCES = ("It helps.", "Keep going.", "Try it.", "Stay calm.", "That matters.", "Note this.")
_CAPITALS = ("NOTE", "KEY", "SAFE", "FAST", "CLEAR", "FIRST", "GOAL", "PLAN", "TIP", "STEP")


# ---------------------------------------------------------------------------------------------------------
# Shared text helpers


def words(text: str) -> list[str]:
    """The words of ``text`` (see the module docstring)."""
    return _WORD.findall(text)


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", re.IGNORECASE)


def count_word(text: str, word: str) -> int:
    """Whole-word, case-insensitive occurrences of ``word`` in ``text``."""
    return len(_word_pattern(word).findall(text))


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of the sentences, leading whitespace excluded, in text order."""
    spans = []
    offset = 0
    for line in text.split("\n"):
        start = 0
        pieces = []
        for match in _TERMINATOR.finditer(line):
            if match.group() == "." and _ABBREVIATION.search(line[:match.start()]):
                continue
            pieces.append((start, match.end()))
            start = match.end()
        pieces.append((start, len(line)))
        for s, e in pieces:
            if _WORD.search(line, s, e):
                while line[s].isspace():
                    s += 1
                spans.append((offset + s, offset + e))
        offset += len(line) + 1
    return spans


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (see the module docstring)."""
    return [text[s:e] for s, e in _sentence_spans(text)]


def _split_on_divider(text: str, divider: str) -> list[str]:
    """The pieces of ``text`` between lines that hold only ``divider`` (surrounding spaces allowed)."""
    pieces: list[list[str]] = [[]]
    for line in text.split("\n"):
        if line.strip() == divider:
            pieces.append([])
        else:
            pieces[-1].append(line)
    return ["\n".join(piece) for piece in pieces]


def _bullet_line_indices(text: str) -> list[int]:
    return [i for i, line in enumerate(text.split("\n"))
            if _BULLET.match(line) and not _MARKUP_ONLY.fullmatch(line)]


def _highlight_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, inner text) of the highlighted spans, bold first (italics are looked for outside them)."""
    spans = [(m.start(), m.end(), m.group(1)) for m in _BOLD.finditer(text)]
    masked = list(text)
    for start, end, _ in spans:
        masked[start:end] = ["\0"] * (end - start)
    spans += [(m.start(), m.end(), m.group(1)) for m in _ITALIC.finditer("".join(masked))]
    return sorted(spans)


def _json_payload(text: str) -> str:
    stripped = text.strip()
    fenced = _JSON_FENCE.fullmatch(stripped)
    return fenced.group(1) if fenced else stripped


def _is_capital_word(word: str) -> bool:
    return word.isupper() and sum(c.isalpha() for c in word) >= 2


def _compare(value: int, relation: str, n: int) -> bool:
    return value >= n if relation == "at least" else value <= n


def _case_like(word: str, model: str) -> str:
    """``word`` written in the case pattern of ``model`` (all capitals, capitalised or lowercase)."""
    if _is_capital_word(model):
        return word.upper()
    if model[:1].isupper():
        return word[:1].upper() + word[1:].lower()
    return word.lower()


def _case_for(text: str, phrase: str) -> str:
    """``phrase`` in capitals when the text has no lowercase letters, else as written (lowercased when the
    text has no capitals), so that an inserted phrase does not change the text's case."""
    if any(c.isalpha() for c in text) and not any(c.islower() for c in text):
        return phrase.upper()
    if not any(c.isupper() for c in text):
        return phrase.lower()
    return phrase


def _extra_words(k: int) -> list[str]:
    return [_EXTRA_WORDS[i % len(_EXTRA_WORDS)] for i in range(k)]


def _apply_edits(text: str, edits: Iterable[tuple[int, int, str]]) -> str:
    """Replace text[start:end] by new for each (start, end, new); the edits must not overlap."""
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _orders(items: Sequence[Any], key: Callable[[Any], Any] | None = None) -> list[list[Any]]:
    """A few orders in which to try edit sites: last first, first first and, given a key, largest first."""
    orders = [list(reversed(items)), list(items)]
    if key is not None:
        orders.insert(0, sorted(items, key=key, reverse=True))
    return orders


def _words_in(text: str, start: int, end: int) -> list[re.Match]:
    return list(_WORD.finditer(text, start, end))


# ---------------------------------------------------------------------------------------------------------
# The kinds: check, describe and the candidate edits that break the constraint.


def check_word_count(text: str, relation: str, n: int) -> bool:
    """At least / at most ``n`` words."""
    return _compare(len(words(text)), relation, n)


def describe_word_count(relation: str, n: int) -> str:
    return f"Answer with {relation} {n} words."


def violate_word_count(text: str, relation: str, n: int) -> Iterator[str]:
    """At least: delete the last words of one sentence, or of several (never a sentence's first word, so
    no sentence disappears). At most: insert plain words before a sentence's closing punctuation."""
    spans = _sentence_spans(text)
    by_length = sorted(spans, key=lambda sp: len(_words_in(text, *sp)), reverse=True)
    total = len(words(text))
    if relation == "at most":
        extra = _case_for(text, " " + " ".join(_extra_words(n - total + 1)))
        for s, e in by_length[:4] + spans[::-1][:4]:
            last = _words_in(text, s, e)[-1]
            yield _apply_edits(text, [(last.end(), last.end(), extra)])
        return
    cut = total - n + 1
    for s, e in by_length[:8]:
        found = _words_in(text, s, e)
        if len(found) > cut:
            yield _apply_edits(text, [(found[-cut - 1].end(), found[-1].end(), "")])
    for order in _orders(spans, key=lambda sp: len(_words_in(text, *sp))):  # spread over several sentences
        missing, edits = cut, []
        for s, e in order:
            found = _words_in(text, s, e)
            take = min(missing, len(found) - 1)
            if take > 0:
                edits.append((found[-take - 1].end(), found[-1].end(), ""))
                missing -= take
            if missing == 0:
                yield _apply_edits(text, edits)
                break


def check_sentence_count(text: str, relation: str, n: int) -> bool:
    """At least / at most ``n`` sentences (see the module docstring for what a sentence is)."""
    return _compare(len(_sentence_spans(text)), relation, n)


def describe_sentence_count(relation: str, n: int) -> str:
    return f"Your answer must contain {relation} {n} sentences."


def violate_sentence_count(text: str, relation: str, n: int) -> Iterator[str]:
    """At least: join sentences that share a line with a semicolon. At most: split sentences with a full
    stop after a middle word (capitalising the next word unless the text has no capitals); neither edit
    changes a word. When a short text has too few words to split, add short sentences instead."""
    spans = _sentence_spans(text)
    has_capitals = any(c.isupper() for c in text)
    has_lowercase = any(c.islower() for c in text)
    if relation == "at least":
        joints = []
        for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
            if "\n" in text[e1:s2]:
                continue
            end_mark = re.search(r"[.!?]+(?=[\"'”’)\]}*]*$)", text[s1:e1])
            if end_mark is None:
                continue
            following = _WORD.search(text, s2, e2)
            edits = [(s1 + end_mark.start(), s1 + end_mark.end(), ";")]
            word = following.group()
            if has_lowercase and word[0].isupper() and word[1:].islower():
                edits.append((following.start(), following.start() + 1, word[0].lower()))
            joints.append(edits)
        need = len(spans) - n + 1
        for order in _orders(joints):
            if len(order) >= need:
                yield _apply_edits(text, [edit for joint in order[:need] for edit in joint])
        return
    need = n - len(spans) + 1
    for order in _orders(spans, key=lambda sp: len(_words_in(text, *sp))):
        edits, left = [], need
        for s, e in order:
            found = _words_in(text, s, e)
            if len(found) < 4 or left == 0:
                continue
            cuts = min(left, len(found) // 3)  # keep two words or more on each side of a cut where possible
            for j in range(1, cuts + 1):
                after = found[j * len(found) // (cuts + 1) - 1]
                nxt = found[j * len(found) // (cuts + 1)]
                edits.append((after.end(), after.end(), "."))
                if has_capitals and nxt.group()[0].islower():
                    edits.append((nxt.start(), nxt.start() + 1, nxt.group()[0].upper()))
            left -= cuts
        if left == 0:
            yield _apply_edits(text, edits)
    added = " " + " ".join(_SHORT_SENTENCES[i % len(_SHORT_SENTENCES)] for i in range(need))
    for s, e in _orders(spans)[0][:4]:
        closers = re.search(r"[\"'”’)\]}*]*$", text[s:e])  # keep closing quotes and brackets after the new ones
        yield _apply_edits(text, [(s + closers.start(), s + closers.start(), _case_for(text, added))])


def check_paragraph_count(text: str, n: int) -> bool:
    """Exactly ``n`` paragraphs, separated by lines holding only the markdown divider ``***`` (spaces
    around it allowed). Every paragraph must hold a word: a divider at the very start or end, or two
    dividers in a row, make an empty paragraph and fail. Blank lines inside a paragraph do not split it,
    and a line of six asterisks is not this divider."""
    pieces = _split_on_divider(text, PARAGRAPH_DIVIDER)
    return len(pieces) == n and all(_WORD.search(piece) for piece in pieces)


def describe_paragraph_count(n: int) -> str:
    return (f"Write exactly {n} paragraphs and separate them with a line that contains only the markdown "
            f"divider {PARAGRAPH_DIVIDER}.")


def violate_paragraph_count(text: str, n: int) -> Iterator[str]:
    """Turn a divider line into a blank line (two paragraphs become one), or add a divider at a blank
    line inside a paragraph."""
    lines = text.split("\n")
    dividers = [i for i, line in enumerate(lines) if line.strip() == PARAGRAPH_DIVIDER]
    for i in _orders(dividers)[0]:
        yield "\n".join(lines[:i] + [""] + lines[i + 1:])
    for i in range(1, len(lines) - 1):
        if not lines[i].strip() and _WORD.search("\n".join(lines[:i])) and _WORD.search("\n".join(lines[i:])):
            if PARAGRAPH_DIVIDER not in (lines[i - 1].strip(), lines[i + 1].strip()):
                yield "\n".join(lines[:i] + ["", PARAGRAPH_DIVIDER, ""] + lines[i + 1:])


def check_bullet_count(text: str, n: int) -> bool:
    """Exactly ``n`` markdown bullets: lines starting (after optional indentation, so nested bullets count)
    with ``* `` or ``- `` followed by some text. ``**bold**`` at a line start, ``-5 degrees``, numbered
    items and divider lines such as ``* * *`` or ``***`` are not bullets."""
    return len(_bullet_line_indices(text)) == n


def describe_bullet_count(n: int) -> str:
    return f"Your answer must contain exactly {n} bullet points, each on its own line starting with \"* \"."


def violate_bullet_count(text: str, n: int) -> Iterator[str]:
    """Drop the marker of a bullet (its text stays as a plain line), remove a bullet line, or add one."""
    lines = text.split("\n")
    bullets = _bullet_line_indices(text)
    for i in dict.fromkeys(bullets[-1:] + bullets[:1]):  # the last bullet, then the first
        marker = _BULLET.match(lines[i])
        yield "\n".join(lines[:i] + [lines[i][marker.end():]] + lines[i + 1:])
    for i in bullets[-1:]:
        yield "\n".join(lines[:i] + lines[i + 1:])
        prefix = _BULLET.match(lines[i]).group()
        yield "\n".join(lines[:i + 1] + [prefix + _case_for(text, "One more point.")] + lines[i + 1:])


def _section_markers(text: str, marker: str) -> list[re.Match]:
    return list(re.finditer(rf"^[ \t#*]*{re.escape(marker)}[ \t]+(\d+)\b", text, re.IGNORECASE | re.MULTILINE))


def check_numbered_sections(text: str, marker: str, n: int) -> bool:
    """``n`` sections, each starting at a line that begins with the marker and its number (``Section 1``,
    ``Section 2``, ... in this order; the marker's case does not matter and markdown ``#`` or ``*`` may
    come before it). Text before the first marker (an introduction or a title) is allowed; every
    section must hold a word after its marker."""
    found = _section_markers(text, marker)
    if [int(m.group(1)) for m in found] != list(range(1, n + 1)):
        return False
    ends = [m.start() for m in found[1:]] + [len(text)]
    return all(_WORD.search(text, m.end(), end) for m, end in zip(found, ends))


def describe_numbered_sections(marker: str, n: int) -> str:
    return (f"Divide your answer into {n} sections and start each one on a new line with its marker: "
            f"{marker} 1, {marker} 2 and so on.")


def violate_numbered_sections(text: str, marker: str, n: int) -> Iterator[str]:
    """Renumber the last section marker (to n + 1) or the first (to 0)."""
    found = _section_markers(text, marker)
    if found:
        last, first = found[-1], found[0]
        yield _apply_edits(text, [(last.start(1), last.end(1), str(int(last.group(1)) + 1))])
        yield _apply_edits(text, [(first.start(1), first.end(1), "0")])


def check_lowercase(text: str) -> bool:
    """No capital letter anywhere (digits and symbols are fine)."""
    return not any(c.isupper() for c in text)


def describe_lowercase() -> str:
    return "Write your whole answer in lowercase letters; no capital letters are allowed."


def violate_lowercase(text: str) -> Iterator[str]:
    """Capitalise one letter: the first letter of a sentence (the most natural place for a capital), or
    else of some other word."""
    starts = [_WORD.search(text, s, e) for s, e in _sentence_spans(text)]
    first_letters = {m.start() for m in starts}
    others = [m for m in _WORD.finditer(text) if m.start() not in first_letters]
    sites = [m for m in starts[1:] + starts[:1] + others[::-1] if m.group()[0].islower()]
    for match in sites[:12]:
        yield _apply_edits(text, [(match.start(), match.start() + 1, match.group()[0].upper())])


def check_uppercase(text: str) -> bool:
    """No lowercase letter anywhere (digits and symbols are fine)."""
    return not any(c.islower() for c in text)


def describe_uppercase() -> str:
    return "Write your whole answer in capital letters only."


def violate_uppercase(text: str) -> Iterator[str]:
    """Write one word with a lowercase tail ("PLANT" -> "Plant")."""
    found = [m for m in _WORD.finditer(text) if any(c.isupper() for c in m.group()[1:])]
    for match in found[::-1][:12]:
        yield _apply_edits(text, [(match.start() + 1, match.end(), match.group()[1:].lower())])


def check_no_commas(text: str) -> bool:
    """No comma, ASCII or full-width."""
    return "," not in text and "，" not in text


def describe_no_commas() -> str:
    return "Do not use any commas in your answer."


def violate_no_commas(text: str) -> Iterator[str]:
    """Add one comma: before a conjunction, or after the first word of a sentence."""
    conjunctions = list(re.finditer(r"(?<=[^\W_]) (?=(?:and|but|so|or) )", text, re.IGNORECASE))
    for match in conjunctions[::-1][:8]:
        yield _apply_edits(text, [(match.start(), match.start(), ",")])
    for s, e in _sentence_spans(text)[::-1][:6]:
        found = _words_in(text, s, e)
        if len(found) >= 3:
            yield _apply_edits(text, [(found[0].end(), found[0].end(), ",")])


def check_keywords(text: str, words: Sequence[str]) -> bool:
    """Every listed word at least once, as a whole word, in any case ("cat" is not found in "concatenate"
    nor in "cats", but is in "Cat," and "cat's")."""
    return all(count_word(text, word) for word in words)


def _quoted_list(items: Sequence[str], conjunction: str) -> str:
    quoted = [f'"{item}"' for item in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" {conjunction} " + quoted[-1]


def describe_keywords(words: Sequence[str]) -> str:
    noun = "word" if len(words) == 1 else "words"
    return f"Include the {noun} {_quoted_list(words, 'and')} in your answer."


def _replace_occurrences(text: str, occurrences: Sequence[re.Match], neutral: str) -> str:
    return _apply_edits(text, [(m.start(), m.end(), _case_like(neutral, m.group())) for m in occurrences])


def violate_keywords(text: str, words: Sequence[str]) -> Iterator[str]:
    """Replace every occurrence of one keyword by a neutral noun in the same case."""
    for word in words:
        occurrences = list(_word_pattern(word).finditer(text))
        for neutral in _NEUTRAL_NOUNS[:3]:
            if neutral != word.lower():
                yield _replace_occurrences(text, occurrences, neutral)


def check_keyword_frequency(text: str, word: str, n: int) -> bool:
    """``word`` at least ``n`` times (whole word, any case; see keywords)."""
    return count_word(text, word) >= n


def describe_keyword_frequency(word: str, n: int) -> str:
    return f'Use the word "{word}" at least {n} times.'


def violate_keyword_frequency(text: str, word: str, n: int) -> Iterator[str]:
    """Replace just enough occurrences (the last ones, or the first ones) by a neutral noun."""
    occurrences = list(_word_pattern(word).finditer(text))
    drop = len(occurrences) - n + 1
    if drop > 0:
        for order in _orders(occurrences):
            for neutral in _NEUTRAL_NOUNS[:3]:
                if neutral != word.lower():
                    yield _replace_occurrences(text, order[:drop], neutral)


def check_forbidden_words(text: str, words: Sequence[str]) -> bool:
    """None of the listed words, as whole words in any case ("just" does not forbid "justice")."""
    return not any(count_word(text, word) for word in words)


def describe_forbidden_words(words: Sequence[str]) -> str:
    noun = "word" if len(words) == 1 else "words"
    return f"Do not use the {noun} {_quoted_list(words, 'or')} anywhere in your answer."


def violate_forbidden_words(text: str, words: Sequence[str]) -> Iterator[str]:
    """Insert one forbidden word before the last word of a sentence, in the text's case."""
    spans = _sentence_spans(text)
    for word in words[:2]:
        for s, e in sorted(spans, key=lambda sp: len(_words_in(text, *sp)), reverse=True)[:5]:
            found = _words_in(text, s, e)
            if len(found) >= 2:
                yield _apply_edits(text, [(found[-1].start(), found[-1].start(), _case_for(text, word) + " ")])


def check_first_word(text: str, word: str) -> bool:
    """The first word of the text is ``word``, in any case; punctuation and markup around it (quotes,
    ``**``, ``<<``, a following comma) are ignored."""
    first = _WORD.search(text)
    return first is not None and first.group().lower() == word.lower()


def describe_first_word(word: str) -> str:
    return f'The very first word of your answer must be "{word}".'


def violate_first_word(text: str, word: str) -> Iterator[str]:
    """Put "So" before the first word (which then loses a sentence-start capital), or drop the first word."""
    first = _WORD.search(text)
    if first is None:
        return
    opener = _case_like("so", first.group()) if first.group()[0].isupper() else _case_for(text, "so")
    old = first.group()
    if old[0].isupper() and old[1:].islower() and any(c.islower() for c in text):
        yield _apply_edits(text, [(first.start(), first.start() + 1, opener + " " + old[0].lower())])
    yield _apply_edits(text, [(first.start(), first.start(), opener + " ")])
    after = re.match(r"[,;:]?\s*", text[first.end():])
    following = _WORD.search(text, first.end())
    edits = [(first.start(), first.end() + after.end(), "")]
    if following is not None and old[0].isupper() and following.group()[0].islower():
        edits.append((following.start(), following.start() + 1, following.group()[0].upper()))
    yield _apply_edits(text, edits)


def check_end_phrase(text: str, phrase: str) -> bool:
    """The text ends with exactly ``phrase`` (case and punctuation included); only whitespace, such as a
    trailing newline, may follow it."""
    return text.rstrip().endswith(phrase)


def describe_end_phrase(phrase: str) -> str:
    return f'Finish your answer with the exact phrase "{phrase}" and write nothing after it.'


def violate_end_phrase(text: str, phrase: str) -> Iterator[str]:
    """Change the phrase's closing punctuation mark, drop it, or add a short sentence after the phrase."""
    body = text.rstrip()
    tail = text[len(body):]
    if phrase and phrase[-1] in ".!?":
        yield body[:-1] + ("!" if phrase[-1] == "." else ".") + tail
    if phrase and not phrase[-1].isalnum():
        yield body[:-1] + tail
    yield body + " " + _case_for(text, "Thanks.") + tail


def check_quoted(text: str) -> bool:
    """The whole text (surrounding whitespace aside) is wrapped in straight double quotes ``"..."``."""
    stripped = text.strip()
    return len(stripped) >= 2 and stripped[0] == '"' and stripped[-1] == '"'


def describe_quoted() -> str:
    return "Wrap your entire answer in double quotation marks."


def violate_quoted(text: str) -> Iterator[str]:
    """Drop the closing quote, or the opening one."""
    start = len(text) - len(text.lstrip())
    end = len(text.rstrip())
    yield text[:end - 1] + text[end:]
    yield text[:start] + text[start + 1:]


def check_json(text: str) -> bool:
    """The whole text is one JSON value (an object, an array, a string, ...); a markdown code fence
    (```json or ``` on the first line, ``` on the last) around it is accepted."""
    try:
        json.loads(_json_payload(text))
    except ValueError:
        return False
    return True


def describe_json() -> str:
    return "Format your entire answer as valid JSON; you may put it inside a markdown code block."


def violate_json(text: str) -> Iterator[str]:
    """Delete the last closing brace or bracket, or the first opening one."""
    last = max(text.rfind("}"), text.rfind("]"))
    if last >= 0:
        yield text[:last] + text[last + 1:]
    openers = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if openers:
        yield text[:min(openers)] + text[min(openers) + 1:]


def check_title(text: str) -> bool:
    """A title in double angular brackets, ``<<like this>>``, anywhere in the text, on one line and
    holding a word (``<< >>`` is no title)."""
    return _TITLE.search(text) is not None


def describe_title() -> str:
    return "Give your answer a title wrapped in double angular brackets, such as <<my title>>."


def violate_title(text: str) -> Iterator[str]:
    """Drop the angular brackets around every title (its words stay)."""
    yield _TITLE.sub(lambda m: m.group(1), text)


def _request_match(text: str, request: str) -> re.Match | None:
    pattern = r"\s*" + r"\s+".join(re.escape(part) for part in request.split())
    return re.match(pattern, text)


def check_repeat_request(text: str, request: str) -> bool:
    """The text starts with the request, repeated word for word (case and punctuation included; only
    line breaks and runs of spaces may differ), with nothing before it, and then goes on with an answer
    (at least one more word)."""
    repeated = _request_match(text, request)
    return repeated is not None and _WORD.search(text, repeated.end()) is not None


def describe_repeat_request(request: str) -> str:
    # The request is the task sentence that comes first in the prompt; the instruction points at it
    # rather than quoting it a second time.
    return ("Before you answer, repeat the request above word for word without any change (leave out these "
            "instructions), then give your answer.")


def violate_repeat_request(text: str, request: str) -> Iterator[str]:
    """In the repeated request: drop its closing punctuation, swap the case of its first letter, or drop
    its last word."""
    repeated = _request_match(text, request)
    if repeated is None:
        return
    end = repeated.end()
    if not text[end - 1].isalnum():
        yield text[:end - 1] + text[end:]
    first = _WORD.search(text, repeated.start(), end)
    if first is not None:
        letter = first.group()[0]
        yield _apply_edits(text, [(first.start(), first.start() + 1, letter.swapcase())])
    found = _words_in(text, repeated.start(), end)
    if len(found) >= 2:
        yield _apply_edits(text, [(found[-2].end(), found[-1].end(), "")])


def _postscript_line(lines: list[str], marker: str) -> int | None:
    pattern = re.compile(rf"[ \t*_]*{re.escape(marker)}", re.IGNORECASE)
    found = [i for i, line in enumerate(lines) if pattern.match(line)]
    return found[-1] if found else None


def check_postscript(text: str, marker: str) -> bool:
    """The text ends with a postscript: a line that starts with the marker (``P.S.``; any case, so that a
    lowercase answer can say ``p.s.``; markdown ``*`` or ``_`` may come before it), holding a word
    after the marker, and no blank line after it (the postscript is the last block; trailing whitespace
    is fine). ``P.P.S.`` does not start a ``P.S.`` line."""
    lines = text.rstrip().split("\n")
    i = _postscript_line(lines, marker)
    if i is None:
        return False
    after_marker = lines[i].lower().split(marker.lower(), 1)[1]
    rest = [after_marker] + lines[i + 1:]
    return _WORD.search("\n".join(rest)) is not None and all(line.strip() for line in lines[i + 1:])


def describe_postscript(marker: str) -> str:
    return f"At the end of your answer, add a postscript starting with {marker}"


def violate_postscript(text: str, marker: str) -> Iterator[str]:
    """Join the postscript line to the line before it (so it no longer starts a line), drop the marker, or
    drop the postscript."""
    lines = text.split("\n")
    i = _postscript_line(text.rstrip().split("\n"), marker)
    if i is None:
        return
    previous = next((j for j in range(i - 1, -1, -1) if lines[j].strip()), None)
    if previous is not None:
        yield "\n".join(lines[:previous] + [lines[previous].rstrip() + " " + lines[i].lstrip()] + lines[i + 1:])
    marker_at = lines[i].lower().index(marker.lower())
    yield "\n".join(lines[:i] + [lines[i][:marker_at] + lines[i][marker_at + len(marker):].lstrip()] + lines[i + 1:])
    if previous is not None:
        yield "\n".join(lines[:previous + 1])


def check_placeholders(text: str, n: int) -> bool:
    """At least ``n`` square-bracket placeholders such as ``[address]``: brackets on one line around text
    holding a word (``[ ]`` does not count; the bracketed part of a markdown link does)."""
    return len(_PLACEHOLDER.findall(text)) >= n


def describe_placeholders(n: int) -> str:
    noun = "placeholder" if n == 1 else "placeholders"
    return f"Include at least {n} {noun} in square brackets, such as [name]."


def violate_placeholders(text: str, n: int) -> Iterator[str]:
    """Drop the brackets of just enough placeholders (the last ones, or the first ones)."""
    found = list(_PLACEHOLDER.finditer(text))
    drop = len(found) - n + 1
    if drop > 0:
        for order in _orders(found):
            yield _apply_edits(text, [(m.start(), m.end(), m.group(1)) for m in order[:drop]])


def check_letter_frequency(text: str, letter: str, n: int) -> bool:
    """The letter at least ``n`` times, counting both cases."""
    return text.lower().count(letter.lower()) >= n


def describe_letter_frequency(letter: str, n: int) -> str:
    return f'The letter "{letter}" must appear at least {n} times in your answer.'


def violate_letter_frequency(text: str, letter: str, n: int) -> Iterator[str]:
    """Replace words that hold the letter by a neutral noun without it, in the same case, until the letter
    is one short (the last such words first, then the first ones, then the richest in the letter)."""
    neutral = next(word for word in _NEUTRAL_NOUNS if letter.lower() not in word)
    holders = [m for m in _WORD.finditer(text) if letter.lower() in m.group().lower()]
    excess = text.lower().count(letter.lower()) - n + 1
    if excess <= 0:
        return
    for order in _orders(holders, key=lambda m: m.group().lower().count(letter.lower())):
        chosen, removed = [], 0
        for match in order:
            if removed >= excess:
                break
            chosen.append(match)
            removed += match.group().lower().count(letter.lower())
        if removed >= excess and len(chosen) <= 20:
            yield _replace_occurrences(text, chosen, neutral)


def check_highlighted_sections(text: str, n: int) -> bool:
    """At least ``n`` markdown-highlighted spans, ``*like this*`` or ``**like this**``, each on one line
    with no space just inside the asterisks; a bullet's ``* `` and ``2 * 3 * 4`` are not highlights."""
    return len(_highlight_spans(text)) >= n


def describe_highlighted_sections(n: int) -> str:
    noun = "part" if n == 1 else "parts"
    return f"Highlight at least {n} {noun} of your answer with markdown, for example *highlighted part*."


def violate_highlighted_sections(text: str, n: int) -> Iterator[str]:
    """Drop the asterisks of just enough highlights (the last ones, or the first ones)."""
    found = _highlight_spans(text)
    drop = len(found) - n + 1
    if drop > 0:
        for order in _orders(found):
            yield _apply_edits(text, [(start, end, inner) for start, end, inner in order[:drop]])


def check_two_parts(text: str) -> bool:
    """Exactly two parts separated by one line holding only six asterisks ``******``; each part must hold
    a word (a divider at the start or the end leaves an empty part and fails)."""
    pieces = _split_on_divider(text, PARTS_DIVIDER)
    return len(pieces) == 2 and all(_WORD.search(piece) for piece in pieces)


def describe_two_parts() -> str:
    return f"Give two different answers separated by a line that contains only six asterisks ({PARTS_DIVIDER})."


def violate_two_parts(text: str) -> Iterator[str]:
    """Turn the divider line into a blank line (one part only)."""
    yield "\n".join("" if line.strip() == PARTS_DIVIDER else line for line in text.split("\n"))


def check_capital_words(text: str, relation: str, n: int) -> bool:
    """At least / at most ``n`` words written entirely in capitals, counting words of two letters or more
    ("NOTE" and "COVID-19" count; "I", "A" and the "P" of "P.S." do not)."""
    return _compare(sum(_is_capital_word(word) for word in words(text)), relation, n)


def describe_capital_words(relation: str, n: int) -> str:
    noun = "word" if n == 1 else "words"
    return f"Use {relation} {n} {noun} written entirely in capital letters."


def violate_capital_words(text: str, relation: str, n: int) -> Iterator[str]:
    """At least: write just enough capital words with a lowercase tail ("NOTE" -> "Note"). At most: write
    just enough ordinary words in capitals, or, in a text with too few words, insert capital words."""
    found = list(_WORD.finditer(text))
    capitals = [m for m in found if _is_capital_word(m.group())]
    if relation == "at least":
        sites, need = capitals, len(capitals) - n + 1
        rewrite = lambda word: word[0] + word[1:].lower()  # noqa: E731
    else:
        sites = [m for m in found if not _is_capital_word(m.group()) and sum(c.isalpha() for c in m.group()) >= 2]
        need, rewrite = n - len(capitals) + 1, str.upper
    if need > 0:
        for order in _orders(sites):
            if len(order) >= need:
                yield _apply_edits(text, [(m.start(), m.end(), rewrite(m.group())) for m in order[:need]])
        if relation == "at most":
            added = " ".join(_CAPITALS[i % len(_CAPITALS)] for i in range(need)) + " "
            for s, e in _orders(_sentence_spans(text))[0][:4]:
                last = _words_in(text, s, e)[-1]
                yield _apply_edits(text, [(last.start(), last.start(), added)])


# ---------------------------------------------------------------------------------------------------------
# Registry


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10_000


def _is_relation(value: Any) -> bool:
    return value in RELATIONS


def _is_word(value: Any) -> bool:
    return isinstance(value, str) and _WORD.fullmatch(value) is not None


def _is_word_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) >= 1 and all(_is_word(word) for word in value)


def _is_phrase(value: Any) -> bool:
    return isinstance(value, str) and value == value.strip() and _WORD.search(value) is not None


def _is_letter(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 1 and value.isalpha() and value.islower()


def _is_postscript_marker(value: Any) -> bool:
    return value in POSTSCRIPT_MARKERS


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of constraint: its parameters (name -> validator) and its three functions."""

    name: str
    params: dict[str, Callable[[Any], bool]]
    check_fn: Callable[..., bool]
    describe_fn: Callable[..., str]
    violations_fn: Callable[..., Iterator[str]] | None

    def check(self, text: str, **args: Any) -> bool:
        """Strict check; a text without any word fails every kind."""
        return _WORD.search(text) is not None and bool(self.check_fn(text, **args))

    def describe(self, **args: Any) -> str:
        """The instruction sentence a model sees."""
        return self.describe_fn(**args)

    def violations(self, text: str, **args: Any) -> Iterator[str]:
        """Candidate minimal edits of ``text`` that fail this constraint (strict), each once, most natural
        first; nothing when the kind has no edit."""
        if self.violations_fn is None:
            return
        seen = {text}
        for candidate in self.violations_fn(text, **args):
            if candidate not in seen:
                seen.add(candidate)
                if not self.check(candidate, **args):
                    yield candidate

    def violate(self, text: str, **args: Any) -> str | None:
        """The first candidate of ``violations``, or None when there is no sensible edit."""
        return next(self.violations(text, **args), None)

    def validate(self, args: dict[str, Any]) -> None:
        """Raise ValueError unless ``args`` are exactly this kind's parameters, each valid."""
        if set(args) != set(self.params):
            raise ValueError(f"{self.name} takes parameters {sorted(self.params)}, got {sorted(args)}")
        for key, valid in self.params.items():
            if not valid(args[key]):
                raise ValueError(f"{self.name}: bad value for {key}: {args[key]!r}")


def _kind(name: str, **params: Callable[[Any], bool]) -> Kind:
    namespace = globals()
    return Kind(name, params, namespace[f"check_{name}"], namespace[f"describe_{name}"],
                namespace.get(f"violate_{name}"))


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    _kind("word_count", relation=_is_relation, n=_is_count),
    _kind("sentence_count", relation=_is_relation, n=_is_count),
    _kind("paragraph_count", n=_is_count),
    _kind("bullet_count", n=_is_count),
    _kind("numbered_sections", marker=_is_word, n=_is_count),
    _kind("lowercase"),
    _kind("uppercase"),
    _kind("no_commas"),
    _kind("keywords", words=_is_word_list),
    _kind("keyword_frequency", word=_is_word, n=_is_count),
    _kind("forbidden_words", words=_is_word_list),
    _kind("first_word", word=_is_word),
    _kind("end_phrase", phrase=_is_phrase),
    _kind("quoted"),
    _kind("json"),
    _kind("title"),
    _kind("repeat_request", request=_is_phrase),
    _kind("postscript", marker=_is_postscript_marker),
    _kind("placeholders", n=_is_count),
    _kind("letter_frequency", letter=_is_letter, n=_is_count),
    _kind("highlighted_sections", n=_is_count),
    _kind("two_parts"),
    _kind("capital_words", relation=_is_relation, n=_is_count),
)}


def _split(constraint: dict) -> tuple[Kind, dict[str, Any]]:
    if not isinstance(constraint, dict) or constraint.get("kind") not in KINDS:
        raise ValueError(f"unknown constraint kind in {constraint!r}")
    return KINDS[constraint["kind"]], {k: v for k, v in constraint.items() if k != "kind"}


def describe(constraint: dict) -> str:
    """The instruction sentence of a constraint."""
    kind, args = _split(constraint)
    return kind.describe(**args)


def _loose_variants(text: str) -> list[str]:
    lines = text.split("\n")
    trimmed = [text, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    return trimmed + [variant.replace("*", "") for variant in trimmed]


def check(text: str, constraint: dict, loose: bool = False) -> bool:
    """Whether ``text`` follows ``constraint``: strictly, or loosely (any of the variants in the module
    docstring passes)."""
    kind, args = _split(constraint)
    variants = _loose_variants(text) if loose else [text]
    return any(kind.check(variant, **args) for variant in variants)


def follows(text: str, constraints: Sequence[dict], loose: bool = False) -> list[bool]:
    """One verdict per constraint."""
    return [check(text, constraint, loose) for constraint in constraints]


def minimal_violation(text: str, constraints: Sequence[dict], target_index: int) -> str | None:
    """A minimal edit of ``text`` that fails ``constraints[target_index]`` (strict) and still passes every
    other constraint that ``text`` passes (strict): the target kind's candidate edits are tried in order
    and the first that qualifies is returned. None when the text does not pass the target to begin with,
    or when no candidate qualifies."""
    kind, args = _split(constraints[target_index])
    if not kind.check(text, **args):
        return None
    others = [c for i, c in enumerate(constraints) if i != target_index and check(text, c)]
    for candidate in kind.violations(text, **args):
        if all(check(candidate, other) for other in others):
            return candidate
    return None


# ---------------------------------------------------------------------------------------------------------
# Composing a text that follows a set of constraints (the proof that a prompt row can be satisfied)

_FILLER = (
    "This point is worth keeping in mind.",
    "Small steps add up over time.",
    "A clear plan makes the work easier.",
    "Each part builds on the one before it.",
    "Good habits grow with practice.",
    "It helps to start with the basics.",
    "The details matter more than they seem.",
    "Patience pays off in the end.",
    "Careful checks prevent most mistakes.",
    "Everyone learns at a different pace.",
    "Short breaks keep the mind fresh.",
    "A second look often reveals more.",
)
_BULLET_TEXTS = ("Start with the basics.", "Keep notes as you go.", "Ask for help early.",
                 "Check the result twice.", "Review the plan each week.", "Share what you learn.",
                 "Rest before the next step.", "Write down the main goal.")
_PLACEHOLDER_NAMES = ("name", "address", "date", "city", "company", "phone", "email", "time")
_HIGHLIGHTS = ("*first point*", "*second point*", "*third point*", "*fourth point*", "*fifth point*",
               "*sixth point*", "*seventh point*", "*eighth point*")
_LETTER_WORDS = ("quiet", "quick", "quest", "jazz", "zebra", "maze", "zone", "box", "fox", "next", "jump",
                 "joy", "kayak", "kind", "vivid", "wave", "yellow", "yard", "fog", "gift", "bubble", "map",
                 "hope", "cloud", "drum", "lamp", "north", "river", "wish", "house", "time")
_POSTSCRIPT_TEXT = "Thanks for reading this far."
_STRUCTURE_KINDS = ("numbered_sections", "paragraph_count", "two_parts")


def _pad_sentence(index: int, clauses: int) -> str:
    """A filler sentence made of ``clauses`` filler sentences joined with "and" (no commas)."""
    parts = [_FILLER[(index * clauses + j) % len(_FILLER)].rstrip(".") for j in range(clauses)]
    return " and ".join([parts[0]] + [part[0].lower() + part[1:] for part in parts[1:]]) + "."


def _letter_words(letter: str, already: int, n: int, base: str) -> str:
    """A fragment "using words like x and y" that brings the letter's count from ``already`` to >= n."""
    chosen: list[str] = []
    candidates = [w for w in _LETTER_WORDS if letter in w] or [letter * 2]
    while True:
        fragment = base + " and ".join(chosen)
        if already + fragment.lower().count(letter) >= n and chosen:
            return fragment
        chosen.append(candidates[len(chosen) % len(candidates)])


def _assemble(spec: dict[str, dict], padding: list[str], letter_fragment: str) -> str | None:
    """The text asked for by ``spec`` (kind -> parameters) with the filler sentences ``padding`` in its last
    block; None when two of sections, paragraphs and two parts are asked for (this builder nests none)."""
    request = spec.get("repeat_request", {}).get("request")
    first_word = spec.get("first_word", {}).get("word")
    top = []
    if request is not None:
        top.append(request)
    if "title" in spec:
        top.append(f"<<{first_word} notes>>" if first_word and request is None else "<<Answer notes>>")
    opening = first_word if first_word and request is None and "title" not in spec else None

    fragments = []
    if "keywords" in spec:
        fragments.append("it touches on " + " and ".join(spec["keywords"]["words"]))
    if "keyword_frequency" in spec:
        args = spec["keyword_frequency"]
        fragments.append("it comes back to " + " and ".join([args["word"]] * args["n"]))
    if "placeholders" in spec:
        fragments.append("fill in " + " and ".join(f"[{p}]" for p in _PLACEHOLDER_NAMES[:spec["placeholders"]["n"]]))
    if "highlighted_sections" in spec:
        fragments.append("keep " + " and ".join(_HIGHLIGHTS[:spec["highlighted_sections"]["n"]]) + " in view")
    if "capital_words" in spec and spec["capital_words"]["relation"] == "at least":
        fragments.append("mark " + " and ".join(_CAPITALS[:spec["capital_words"]["n"]]))
    if letter_fragment:
        fragments.append(letter_fragment)
    main = None
    if opening or fragments:
        body = " and ".join(fragments)
        if opening:
            main = f"{opening} here is the answer" + (f" and {body}" if body else "") + "."
        else:
            main = body[0].upper() + body[1:] + "."

    structures = [kind for kind in _STRUCTURE_KINDS if kind in spec]
    if len(structures) > 1:
        return None
    structure = structures[0] if structures else None
    blocks_count = 1 if structure is None else 2 if structure == "two_parts" else spec[structure]["n"]
    blocks: list[list[str]] = [[] for _ in range(blocks_count)]
    intro = []
    if main is not None:
        (intro if opening and "numbered_sections" in spec else blocks[0]).append(main)
    if "bullet_count" in spec:
        blocks[0].append("\n".join(f"* {_BULLET_TEXTS[i % len(_BULLET_TEXTS)]}"
                                   for i in range(spec["bullet_count"]["n"])))
    if padding:
        blocks[-1].append(" ".join(padding))
    for i, block in enumerate(blocks):
        if not block:
            block.append(_FILLER[-1 - i % len(_FILLER)])
    if "numbered_sections" in spec:
        marker = spec["numbered_sections"]["marker"]
        for i, block in enumerate(blocks):
            block.insert(0, f"{marker} {i + 1}")
    separator = {"paragraph_count": f"\n\n{PARAGRAPH_DIVIDER}\n\n",
                 "two_parts": f"\n\n{PARTS_DIVIDER}\n\n"}.get(structure, "\n\n")
    chunks = top + intro + [separator.join("\n\n".join(block) for block in blocks)]
    if "postscript" in spec:
        chunks.append(f"{spec['postscript']['marker']} {_POSTSCRIPT_TEXT}")
    text = "\n\n".join(chunks)
    if "end_phrase" in spec:
        text += " " + spec["end_phrase"]["phrase"]
    if "lowercase" in spec:
        text = text.lower()
    if "uppercase" in spec:
        text = text.upper()
    if "json" in spec:
        text = json.dumps({"ANSWER" if "uppercase" in spec else "answer": text}, ensure_ascii=False)
    if "quoted" in spec:
        text = f'"{text}"'
    return text


def compose(constraints: Sequence[dict], task: str = "") -> str | None:
    """A text that follows every constraint strictly, or None when this builder cannot make one (for
    contradictory constraints, such as lowercase with uppercase, or JSON with bullets, it never can).

    The text is assembled from the structure the constraints ask for (repeated request, title, first word,
    sections / paragraphs / two parts, bullets, one sentence carrying the keywords, placeholders,
    highlights, capital words and letters, postscript, end phrase), then put in the required case and
    wrapped in JSON or quotes; neutral filler sentences are added, fewest first, until the counts are met.
    ``task`` (the prompt's task sentence) is accepted so that callers can pass a row's parts uniformly, but
    the text does not need it: a repeat_request constraint carries the request to repeat.
    """
    spec = {}
    for constraint in constraints:
        kind, args = _split(constraint)
        kind.validate(args)
        spec[kind.name] = args
    letter = spec.get("letter_frequency")
    word_budget = 2 * max([c["n"] for c in constraints if c["kind"] == "word_count"] + [200])
    for clauses in (1, 4, 12):  # filler sentence length: short, long, very long (few sentences, many words)
        for count in range(0, 200):
            padding = [_pad_sentence(i, clauses) for i in range(count)]
            fragment = ""
            if letter is not None:
                base = _assemble(spec, padding, "")
                if base is None:
                    return None
                already = base.lower().count(letter["letter"])
                if already < letter["n"]:
                    fragment = _letter_words(letter["letter"], already, letter["n"], "it uses words like ")
            text = _assemble(spec, padding, fragment)
            if text is None:
                return None
            verdicts = [check(text, c) for c in constraints]
            if all(verdicts):
                return text
            failing = [c for c, ok in zip(constraints, verdicts) if not ok]
            if not all(_padding_helps(c, spec) for c in failing):
                break  # a structural conflict, or an upper bound that more padding only pushes further past
            if len(words(text)) > word_budget:
                break
    return None


def _padding_helps(constraint: dict, spec: dict[str, dict]) -> bool:
    """Whether adding filler sentences can make a failing constraint pass."""
    if constraint.get("relation") != "at least":
        return False
    return constraint["kind"] in ("word_count", "sentence_count") or (
        constraint["kind"] == "capital_words" and "uppercase" in spec)


# ---------------------------------------------------------------------------------------------------------
# Rows and metrics


def load_rows(path: str | Path = SHIPPED) -> list[dict]:
    """The prompt rows of a JSONL file, validated: each line an object with a unique string ``id`` (optional:
    a row without one is named by its line, ``line<number>``), a
    non-empty ``prompt`` and a non-empty list of ``constraints`` of known kinds with valid parameters, each
    constraint's instruction sentence found in the prompt (and the prompt starting with the request that
    a repeat_request constraint asks to repeat). Blank lines are skipped; any problem is a
    ValueError naming the file and line."""
    rows, ids = [], set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{where}: not JSON ({error})") from None
        if not isinstance(row, dict) or not {"prompt", "constraints"} <= set(row) <= {"id", "prompt", "constraints"}:
            raise ValueError(f"{where}: a row has the keys prompt and constraints, and optionally id")
        row = {"id": f"line{number}", **row}  # a user's file may leave the ids out
        if not isinstance(row["id"], str) or not row["id"] or row["id"] in ids:
            raise ValueError(f"{where}: missing or repeated id {row['id']!r}")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"{where}: empty prompt")
        if not isinstance(row["constraints"], list) or not row["constraints"]:
            raise ValueError(f"{where}: constraints must be a non-empty list")
        for constraint in row["constraints"]:
            try:
                kind, args = _split(constraint)
                kind.validate(args)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            if kind.describe(**args) not in row["prompt"]:
                raise ValueError(f"{where}: the prompt lacks the instruction of {constraint!r}")
            if kind.name == "repeat_request" and not row["prompt"].startswith(args["request"]):
                raise ValueError(f"{where}: the prompt does not start with the request to repeat")
        ids.add(row["id"])
        rows.append(row)
    return rows


def prompt_level(results: Sequence[Sequence[bool]]) -> float:
    """Share of prompts whose constraints all pass (``results[i]`` holds prompt i's verdicts)."""
    if not results:
        raise ValueError("no prompts")
    return sum(all(verdicts) for verdicts in results) / len(results)


def constraint_level(results: Sequence[Sequence[bool]]) -> float:
    """Share of all constraints, over all prompts, that pass."""
    total = sum(len(verdicts) for verdicts in results)
    if not total:
        raise ValueError("no constraints")
    return sum(sum(bool(v) for v in verdicts) for verdicts in results) / total
