"""Prompt templates and parsers of the three roles (mrjax.roles)."""
from __future__ import annotations

import pytest

from mrjax import roles
from mrjax.roles import ParseStats

# The judge prompt as the paper prints it (Self-Rewarding Fig. 2), copied by hand.
PAPER_JUDGE = """Review the user's question and the corresponding response using the additive 5-point scoring system described below. Points are accumulated based on the satisfaction of each criterion:

- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and insightful answer.

User: {prompt}
<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"

Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate the response in alignment with this additive scoring model, we'll systematically attribute points based on the outlined criteria."""

PAPER_META_HEAD = (
    "Review the user's question and the corresponding response, along with two judgments. "
    "Determine which judgment is more accurate according to the rubric provided below. "
    "The rubric used for the initial judgments is as follows:\n- Add 1 point if the response is relevant"
)
PAPER_META_TAIL = """User: {prompt}
Response: {response}
Judgment A: {judgment_a}
Judgment B: {judgment_b}

After examining the original question, response, and both judgments:
- Explain which judgment is more accurate according to the original rubric and why. Consider factors such as adherence to the rubric, accuracy in evaluating the response, and consistency in applying the criteria.
- Conclude with a clear statement of which judgment is better using the format: "Winner: [Judgement A | Judgement B]\""""


def test_judge_template_is_the_published_one():
    assert roles.JUDGE_TEMPLATE == PAPER_JUDGE


def test_meta_judge_template_has_the_rubric_written_out():
    t = roles.META_JUDGE_TEMPLATE
    assert t.startswith(PAPER_META_HEAD)
    assert t.endswith(PAPER_META_TAIL)
    rubric = PAPER_JUDGE.split("\n\n")[1].splitlines()
    assert len(rubric) == 5
    assert "\n".join(rubric) in t
    assert "..." not in t


def test_fill_prompts_keep_braces_in_values():
    prompt, response = "Format {name} as JSON: {\"a\": 1}", "Use {response} literally"
    filled = roles.fill_judge_prompt(prompt, response)
    assert f"User: {prompt}\n<response>{response}</response>" in filled
    meta = roles.fill_meta_judge_prompt(prompt, response, "judge {one}", "Score: 4")
    assert "Judgment A: judge {one}\nJudgment B: Score: 4" in meta
    assert "{" not in roles.fill_judge_prompt("p", "r")


def test_self_instruct_prompt_and_parse():
    examples = [f"Task number {i}\nwith a second line" for i in range(8)]
    text = roles.fill_self_instruct_prompt(examples)
    assert text.count("<task>") == 9 and text.endswith("<task>")
    assert "<task>Task number 3 with a second line</task>" in text
    with pytest.raises(ValueError, match="exactly 8"):
        roles.fill_self_instruct_prompt(examples[:7])
    with pytest.raises(TypeError):
        roles.fill_self_instruct_prompt("one string")
    assert roles.parse_self_instruct(" Write a  haiku\nabout rain.</task>\n<task>more") == "Write a haiku about rain."
    assert roles.parse_self_instruct("<task>Explain DNS.</task>") == "Explain DNS."
    assert roles.parse_self_instruct("Name three rivers.<task>Another") == "Name three rivers."
    assert roles.parse_self_instruct("   </task>") is None


def test_actor_messages():
    assert roles.actor_messages("hi") == [{"role": "user", "content": "hi"}]


JUSTIFICATION = (
    "The response is relevant and addresses most of the user's question. It answers the basic "
    "elements usefully and is written from an AI Assistant's perspective, though it could be more concise."
)

# (judge output, expected status, expected score)
JUDGE_CASES = [
    (f"{JUSTIFICATION}\n\nScore: 4", "parsed", 4.0),
    (f"{JUSTIFICATION}\nScore: 3", "parsed", 3.0),
    ("Score: 0", "parsed", 0.0),
    ("Score: 5", "parsed", 5.0),
    ("score: 2", "parsed", 2.0),
    ("SCORE: 1", "parsed", 1.0),
    ("Score:4", "parsed", 4.0),
    (f"{JUSTIFICATION}\n\n**Score: 4**", "parsed", 4.0),
    (f"{JUSTIFICATION}\n\n**Score:** 3", "parsed", 3.0),
    ("**Score**: 5", "parsed", 5.0),
    ("Score: **2**", "parsed", 2.0),
    ("_Score_: 4", "parsed", 4.0),
    ("Total score: 4", "parsed", 4.0),
    ("Final Score: 3.", "parsed", 3.0),
    ("Score: 4.5", "parsed", 4.5),
    ("Score: 5.0", "parsed", 5.0),
    ("Score: 4/5", "parsed", 4.0),
    ("Score: 3 / 5", "parsed", 3.0),
    ("Score: 4 out of 5", "parsed", 4.0),
    ("Score: [4]", "parsed", 4.0),
    ("Score: 4 points", "parsed", 4.0),
    ("Score: 4 (the response is helpful but verbose).\nThank you for the question!", "parsed", 4.0),
    ("Score: 3\n\nOn reflection the answer is complete.\nScore: 4", "parsed", 4.0),
    ("Score: 2\nScore: N/A", "parsed", 2.0),
    ('Conclude with "Score: <total points>".\nThe response earns four points.\nScore: 4', "parsed", 4.0),
    ("The first criterion's score: 1. Overall,\nScore: 3", "parsed", 3.0),
    ("Score:\n4", "parsed", 4.0),
    (JUSTIFICATION, "unparseable", None),
    ("I would give this response a 4.", "unparseable", None),
    ("Score - 4", "unparseable", None),
    ('Conclude with the score using the format: "Score: <total points>"', "unparseable", None),
    ("Score: four", "unparseable", None),
    ("Scores: 4", "unparseable", None),
    ("subscore: 4", "unparseable", None),
    ("", "unparseable", None),
    ("Score: 7", "out_of_range", None),
    ("Score: 5.5", "out_of_range", None),
    ("Score: -1", "out_of_range", None),
    ("Score: 8/10", "out_of_range", None),
    ("Score: 4/10", "out_of_range", None),
    ("Score: 4\nOn second thought, Score: 12", "out_of_range", None),
    ("Score: 45", "out_of_range", None),
]

WINNER_REASON = (
    "Judgment A applies the rubric consistently and awards the fourth point correctly, while "
    "Judgment B overlooks that the response is incomplete."
)

# (meta-judge output, expected status, expected winner)
META_CASES = [
    (f"{WINNER_REASON}\n\nWinner: Judgement A", "parsed", "A"),
    (f"{WINNER_REASON}\n\nWinner: Judgment A", "parsed", "A"),
    ("Winner: Judgement B", "parsed", "B"),
    ("Winner: Judgment B", "parsed", "B"),
    ("winner: judgement a", "parsed", "A"),
    ("WINNER: JUDGMENT B", "parsed", "B"),
    ("**Winner:** Judgment A", "parsed", "A"),
    ("**Winner: Judgement B**", "parsed", "B"),
    ("Winner: **Judgment A**", "parsed", "A"),
    ("Winner: [Judgement B]", "parsed", "B"),
    ('Winner: "Judgment A"', "parsed", "A"),
    ("Winner: A", "parsed", "A"),
    ("Winner: B.", "parsed", "B"),
    ("Winner: JudgementB", "parsed", "B"),
    ("Winner: The Judgment A", "parsed", "A"),
    ("Winner: Judgment A (it follows the rubric)\nThanks for reading.", "parsed", "A"),
    ("Winner: Judgment B's assessment is more accurate.", "parsed", "B"),
    ("Winner: Judgement A\nAfter reconsidering the second criterion:\nWinner: Judgement B", "parsed", "B"),
    ("Winner: Judgement A\nWinner: tie", "parsed", "A"),
    ('Use the format "Winner: [Judgement A | Judgement B]".\nWinner: Judgement B', "parsed", "B"),
    ("Winner:\nJudgment A", "parsed", "A"),
    ("Winner: Judgment A, because it follows the rubric.", "parsed", "A"),
    ("Winner: Judgement B and it is not close.", "parsed", "B"),
    (WINNER_REASON, "unparseable", None),
    ("Judgment A is more accurate.", "unparseable", None),
    ("The better judgment is B.", "unparseable", None),
    ("", "unparseable", None),
    ("Winner: [Judgement A | Judgement B]", "out_of_range", None),
    ("Winner: Tie", "out_of_range", None),
    ("Winner: Both judgments are equally accurate.", "out_of_range", None),
    ("Winner: Neither", "out_of_range", None),
    ("Winner: Judgment A or B", "out_of_range", None),
    ("Winner: Judgement A and Judgement B", "out_of_range", None),
    ("Winner: Judgment C", "out_of_range", None),
    ("Winner: Alpha", "out_of_range", None),
]


def test_tables_are_large_enough():
    assert len(JUDGE_CASES) + len(META_CASES) >= 40
    assert len(JUDGE_CASES) >= 20 and len(META_CASES) >= 20


@pytest.mark.parametrize("text,status,score", JUDGE_CASES)
def test_judge_parse_table(text, status, score):
    assert roles.classify_judgment(text) == (status, score)
    stats = ParseStats()
    assert roles.parse_judge_score(text, stats) == score
    assert stats.total == 1 and getattr(stats, status) == 1


@pytest.mark.parametrize("text,status,winner", META_CASES)
def test_meta_judge_parse_table(text, status, winner):
    assert roles.classify_meta_judgment(text) == (status, winner)
    stats = ParseStats()
    assert roles.parse_meta_judge(text, stats) == winner
    assert stats.total == 1 and getattr(stats, status) == 1


def test_parse_stats_accumulate_and_log():
    judge_stats, meta_stats = ParseStats(), ParseStats()
    for text, _, _ in JUDGE_CASES:
        roles.parse_judge_score(text, judge_stats)
    for text, _, _ in META_CASES:
        roles.parse_meta_judge(text, meta_stats)
    for stats, table in ((judge_stats, JUDGE_CASES), (meta_stats, META_CASES)):
        assert stats.total == len(table)
        for status in ("parsed", "unparseable", "out_of_range"):
            assert getattr(stats, status) == sum(1 for _, s, _ in table if s == status)
    both = judge_stats + meta_stats
    assert both.total == len(JUDGE_CASES) + len(META_CASES)
    logged = both.as_dict("judge/")
    assert logged["judge/total"] == both.total
    assert logged["judge/parse_rate"] == pytest.approx(both.parsed / both.total)
    assert ParseStats().parse_rate == 0.0
    with pytest.raises(ValueError):
        ParseStats().record("bogus")


def test_winner_to_result():
    assert [roles.winner_to_result(w) for w in ("A", "B", None)] == [1, -1, 0]
    with pytest.raises(ValueError):
        roles.winner_to_result("C")


@pytest.mark.parametrize(
    "judgment,expected",
    [
        (f"{JUSTIFICATION}\nScore: 4", f"{JUSTIFICATION}\nScore: "),
        (f"{JUSTIFICATION}\n\n**Score:** 4", f"{JUSTIFICATION}\n\nScore: "),
        (f"{JUSTIFICATION}  \n", f"{JUSTIFICATION}\nScore: "),
        (f"{JUSTIFICATION} Score: 3. Then Score: 5", f"{JUSTIFICATION} Score: "),
        ("score: 2", "Score: "),
        ("", "Score: "),
    ],
)
def test_expected_score_text(judgment, expected):
    text = roles.expected_score_text(judgment)
    assert text == expected
    # The text to score never holds a number after its label.
    assert roles.classify_judgment(text)[0] == "unparseable"


def test_score_mode_default_matches_paper():
    assert roles.DEFAULT_JUDGE_SCORE_MODE == "parse"
    assert set(roles.JUDGE_SCORE_MODES) == {"parse", "expected"}
