"""The three roles' prompts and their parsers (docs/method.md, "Prompt templates", steps 1, 3, 5).

One model plays actor, judge and meta-judge. This module holds the text side:
the judge and meta-judge templates exactly as the papers print them, a
self-instruct template for new prompts, and parsers that turn the model's
answers into numbers while counting what could not be used.

Parse rules (deliberate; tests/test_roles.py has a table of cases):

Judge -> score in [0, 5] or None
  * The label is the word ``score`` in any case (``Score``, ``SCORE``,
    ``Total score``, ``Final Score``), not part of a longer word (``Scores``,
    ``subscore`` do not count), followed by a colon. Markdown bold/italics
    around the label, the colon or the number are ignored
    (``**Score:** 4``, ``**Score**: 4``, ``Score: **4**``, ``_Score_: 4``);
    one opening bracket before the number is allowed (``Score: [4]``).
  * The number is an integer or a decimal with a dot (``4``, ``4.5``,
    ``5.0``); a sign is read so that ``-1`` counts as out of range.
  * ``X/5``, ``X / 5`` and ``X out of 5`` read as X. Any other denominator
    (``8/10``) is a different scale: counted as out of range, not rescaled.
  * The **last** ``Score: <number>`` in the text wins, even if earlier ones
    were in range ("Score: 3 ... on reflection, Score: 4" -> 4). A later
    ``Score: N/A`` is not a match and does not cancel an earlier number.
  * No colon, no number: unparseable ("I give it a 4", "Score - 4",
    the echoed instruction ``"Score: <total points>"``).
  * A last match outside [0, 5] (``Score: 7``, ``Score: 5.5``, ``8/10``):
    out of range -> None.

Meta-judge -> "A", "B" or None
  * The label is ``winner`` in any case followed by a colon, markdown ignored
    (``**Winner:** Judgment A``, ``Winner: **Judgement B**``).
  * After it: optional brackets/quotes, optional ``the``, optional
    ``Judgement``/``Judgment`` (both spellings, any case, with or without a
    space before the letter), then the letter A or B as a whole word
    (``Winner: A`` counts; ``Winner: Alpha`` does not).
  * A letter followed by ``|``, ``/``, ``or``, ``and``, ``&`` or ``,`` and
    the other letter names both (the echoed format
    ``[Judgement A | Judgement B]``, ``A or B``): not an answer.
  * The **last** matching ``Winner: ... A|B`` wins.
  * Prose without the label ("Judgment A is more accurate") is unparseable.
  * A ``Winner:`` label whose answer names neither A nor B alone (tie, both,
    neither, the echoed format, "Judgment C") counts as out of range; the
    caller records r = 0 for it, as for an unparseable answer.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

# The five rubric lines of the additive 5-point judge (Self-Rewarding Fig. 2),
# shared verbatim by the judge and the meta-judge prompt.
RUBRIC_LINES: tuple[str, ...] = (
    "- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it is incomplete or contains some irrelevant content.",
    "- Add another point if the response addresses a substantial portion of the user's question, but does not completely resolve the query or provide a direct answer.",
    "- Award a third point if the response answers the basic elements of the user's question in a useful way, regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in blogs or search results.",
    "- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room for improvement in clarity, conciseness or focus.",
    "- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and insightful answer.",
)
RUBRIC = "\n".join(RUBRIC_LINES)

# Filled with str.format: the template holds no braces other than its fields,
# and format never re-reads braces inside the values it substitutes.
JUDGE_TEMPLATE = (
    "Review the user's question and the corresponding response using the additive 5-point scoring system described below. "
    "Points are accumulated based on the satisfaction of each criterion:\n"
    "\n"
    + RUBRIC
    + "\n"
    "\n"
    "User: {prompt}\n"
    "<response>{response}</response>\n"
    "\n"
    "After examining the user's instruction and the response:\n"
    "- Briefly justify your total score, up to 100 words.\n"
    '- Conclude with the score using the format: "Score: <total points>"\n'
    "\n"
    "Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. "
    "To evaluate the response in alignment with this additive scoring model, we'll systematically attribute points based on the outlined criteria."
)

META_JUDGE_TEMPLATE = (
    "Review the user's question and the corresponding response, along with two judgments. "
    "Determine which judgment is more accurate according to the rubric provided below. "
    "The rubric used for the initial judgments is as follows:\n"
    + RUBRIC
    + "\n"
    "\n"
    "User: {prompt}\n"
    "Response: {response}\n"
    "Judgment A: {judgment_a}\n"
    "Judgment B: {judgment_b}\n"
    "\n"
    "After examining the original question, response, and both judgments:\n"
    "- Explain which judgment is more accurate according to the original rubric and why. "
    "Consider factors such as adherence to the rubric, accuracy in evaluating the response, and consistency in applying the criteria.\n"
    '- Conclude with a clear statement of which judgment is better using the format: "Winner: [Judgement A | Judgement B]"'
)

# The evaluation's pairwise judge (mrjax.eval): which of two responses is better, answered in
# the meta-judge's format so that it parses the same way (classify_pairwise). Every comparison
# is asked in both orders, so a preference for one position cancels out.
PAIRWISE_TEMPLATE = (
    "Review the user's question and two responses to it. Determine which response is better: more helpful, "
    "relevant, accurate and clear, as an expert would judge it. Do not let the order of the responses or "
    "their length decide.\n"
    "\n"
    "User: {prompt}\n"
    "Response A: {response_a}\n"
    "Response B: {response_b}\n"
    "\n"
    "After examining the question and both responses:\n"
    "- Briefly explain which response is better and why.\n"
    '- Conclude with a clear statement of which response is better using the format: "Winner: [Response A | Response B]"'
)

# Self-instruct in the style of the Self-Rewarding paper: the model continues
# a list of <task> examples with one new task. The paper uses 8 examples.
SELF_INSTRUCT_NUM_EXAMPLES = 8
SELF_INSTRUCT_HEADER = (
    "Come up with a series of tasks and questions. Only the task/question, no further text/explanation, "
    "no additional information. The task or question should be something a person would ask a chatbot.\n"
    "\n"
)

# How the judge's score is obtained: "parse" reads the last "Score: X" (the
# papers' method, the default); "expected" appends "Score: " to the judgment
# and takes the probability-weighted mean over the tokens "0".."5"
# (see expected_score_text here and mrjax.preferences.expected_score).
JUDGE_SCORE_MODES = ("parse", "expected")
DEFAULT_JUDGE_SCORE_MODE = "parse"

SCORE_MIN = 0.0
SCORE_MAX = 5.0

Status = Literal["parsed", "unparseable", "out_of_range"]
Winner = Literal["A", "B"]


def actor_messages(prompt: str) -> list[dict[str, str]]:
    """Chat messages for the actor: the prompt as the single user turn."""
    return [{"role": "user", "content": prompt}]


def fill_judge_prompt(prompt: str, response: str) -> str:
    """The judge prompt for one (prompt, response)."""
    return JUDGE_TEMPLATE.format(prompt=prompt, response=response)


def fill_meta_judge_prompt(prompt: str, response: str, judgment_a: str, judgment_b: str) -> str:
    """The meta-judge prompt comparing judgment A (first position) with B (second)."""
    return META_JUDGE_TEMPLATE.format(
        prompt=prompt, response=response, judgment_a=judgment_a, judgment_b=judgment_b
    )


def fill_pairwise_prompt(prompt: str, response_a: str, response_b: str) -> str:
    """The evaluation's pairwise prompt: response A (first position) against B."""
    return PAIRWISE_TEMPLATE.format(prompt=prompt, response_a=response_a, response_b=response_b)


def fill_self_instruct_prompt(examples: Sequence[str], num_examples: int = SELF_INSTRUCT_NUM_EXAMPLES) -> str:
    """A prompt asking for one new instruction after `num_examples` example tasks.

    Each example is put on one line (whitespace collapsed) so the list stays
    one task per line. The text ends with an open ``<task>`` so the model
    writes the new task and closes it; read it with :func:`parse_self_instruct`.
    """
    if isinstance(examples, str):
        raise TypeError("examples must be a sequence of strings, not one string")
    if len(examples) != num_examples:
        raise ValueError(f"self-instruct needs exactly {num_examples} examples, got {len(examples)}")
    lines = [f"<task>{' '.join(str(e).split())}</task>" for e in examples]
    return SELF_INSTRUCT_HEADER + "\n".join(lines) + "\n<task>"


_TASK_END = re.compile(r"</task>|<task>", re.IGNORECASE)


def parse_self_instruct(text: str) -> str | None:
    """The new instruction written after the open ``<task>``, or None if empty.

    Reads up to the first ``</task>`` (or a new ``<task>``); whitespace is
    collapsed so prompts deduplicate cleanly.
    """
    text = re.sub(r"^\s*<task>", "", text, flags=re.IGNORECASE)
    task = " ".join(_TASK_END.split(text, maxsplit=1)[0].split())
    return task or None


@dataclass
class ParseStats:
    """Counts of parse outcomes; add them up across batches and log `as_dict`.

    total = parsed + unparseable + out_of_range.
    """

    total: int = 0
    parsed: int = 0
    unparseable: int = 0
    out_of_range: int = 0

    def record(self, status: Status) -> None:
        if status not in ("parsed", "unparseable", "out_of_range"):
            raise ValueError(f"unknown parse status {status!r}")
        self.total += 1
        setattr(self, status, getattr(self, status) + 1)

    def __add__(self, other: "ParseStats") -> "ParseStats":
        if not isinstance(other, ParseStats):
            return NotImplemented
        return ParseStats(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    @property
    def parse_rate(self) -> float:
        return self.parsed / self.total if self.total else 0.0

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out: dict[str, float] = {f"{prefix}{k}": v for k, v in asdict(self).items()}
        out[f"{prefix}parse_rate"] = self.parse_rate
        return out


# Markdown emphasis that models wrap around labels and numbers.
_MD = r"[\s*_]*"

_SCORE_RE = re.compile(
    r"(?<![A-Za-z])score" + _MD + r":" + _MD + r"[\[(]?\s*"
    r"(?P<num>[-+]?\d+(?:\.\d+)?)"
    r"(?:\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?))?",
    re.IGNORECASE,
)

# The label alone, used to cut a judgment before its score.
_SCORE_LABEL_RE = re.compile(r"[*_]*(?<![A-Za-z])score" + _MD + r":", re.IGNORECASE)

_WINNER_LABEL = r"(?<![A-Za-z])winner" + _MD + r":"


def _winner_re(word: str) -> re.Pattern:
    """``Winner: [the] [<word>] A|B`` (see the module docstring), for a word such as Judgement."""
    return re.compile(
        _WINNER_LABEL + r"[\s*_\[(\"'`]*(?:the\s+)?" + word + r"?"
        r"(?P<letter>[AB])(?![A-Za-z0-9])"
        # "A | B", "A or B", "A and B": the answer names both, so it is no answer.
        r"(?![\s*_]*(?:\||/|&|,|\bor\b|\band\b)\s*" + word + r"?[AB](?![A-Za-z0-9]))",
        re.IGNORECASE,
    )


_WINNER_RE = _winner_re(r"(?:judg(?:e)?ment\s*)")
_PAIRWISE_WINNER_RE = _winner_re(r"(?:response\s*)")
_WINNER_LABEL_RE = re.compile(_WINNER_LABEL, re.IGNORECASE)


def classify_judgment(text: str) -> tuple[Status, float | None]:
    """(status, score): the score is set only when status == "parsed"."""
    matches = list(_SCORE_RE.finditer(text))
    if not matches:
        return "unparseable", None
    last = matches[-1]
    value = float(last.group("num"))
    den = last.group("den")
    if den is not None and float(den) != SCORE_MAX:
        return "out_of_range", None
    if not SCORE_MIN <= value <= SCORE_MAX:
        return "out_of_range", None
    return "parsed", value


def parse_judge_score(text: str, stats: ParseStats | None = None) -> float | None:
    """The judge's score in [0, 5], or None; records the outcome in `stats`."""
    status, value = classify_judgment(text)
    if stats is not None:
        stats.record(status)
    return value


def classify_meta_judgment(text: str, pattern: re.Pattern = _WINNER_RE) -> tuple[Status, Winner | None]:
    """(status, winner): the winner is set only when status == "parsed"."""
    matches = list(pattern.finditer(text))
    if matches:
        return "parsed", matches[-1].group("letter").upper()  # type: ignore[return-value]
    if _WINNER_LABEL_RE.search(text):
        return "out_of_range", None
    return "unparseable", None


def classify_pairwise(text: str) -> tuple[Status, Winner | None]:
    """The pairwise judge's verdict, parsed by the meta-judge's rules with "Response" for "Judgement"."""
    return classify_meta_judgment(text, _PAIRWISE_WINNER_RE)


def parse_meta_judge(text: str, stats: ParseStats | None = None) -> Winner | None:
    """"A" (first-position judgment wins), "B" (second wins) or None; records in `stats`."""
    status, winner = classify_meta_judgment(text)
    if stats is not None:
        stats.record(status)
    return winner


def winner_to_result(winner: Winner | None) -> int:
    """The method's r for one meta-judge call: +1 first position wins, -1 second wins, 0 otherwise."""
    if winner == "A":
        return 1
    if winner == "B":
        return -1
    if winner is None:
        return 0
    raise ValueError(f"winner must be 'A', 'B' or None, got {winner!r}")


def expected_score_text(judgment: str, suffix: str = "Score: ") -> str:
    """The judgment to score by expectation: cut before its first score label, then `suffix`.

    The model's next-token distribution after this text, restricted to the
    tokens "0".."5", gives the expected score
    (mrjax.preferences.expected_score). Everything from the first ``Score:``
    label on (with markdown around it) is dropped so the model's own number
    does not leak in; a judgment without a label gets the suffix on a new line.
    Note: ``suffix`` ends in a space so that, for Llama-3-style tokenizers, the
    digit is the next token on its own; check this for other tokenizers.
    """
    label = _SCORE_LABEL_RE.search(judgment)
    if label is not None:
        head = judgment[: label.start()]
    else:
        head = judgment.rstrip()
        head = head + "\n" if head else head
    return head + suffix


def expected_verdict_text(meta_judgment: str, suffix: str = "Winner: Judgement") -> str:
    """The meta-judgment to read a verdict from by expectation: cut before its first ``Winner:``
    label (so its own answer does not leak in), then ``suffix`` on a new line; the model's
    probabilities of " A" and " B" after this text give the verdict."""
    label = _WINNER_LABEL_RE.search(meta_judgment)
    body = (meta_judgment[: label.start()] if label else meta_judgment).rstrip()
    return (body + "\n" if body else "") + suffix
