"""Verifiable instructions (mrjax.eval.verifiable) and the shipped prompt set: hand-written texts that follow
and break every kind, loose checking, the metrics, and properties of every shipped row. Pure Python."""
import ast
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, relative: str):
    """Import a module from its file: mrjax.eval's __init__ loads the whole evaluation (jax included), which
    this fast test does not need. The builder's own "from mrjax.eval.verifiable import" then finds the
    library here too."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


vf = _load("mrjax.eval.verifiable", "mrjax/eval/verifiable.py")
builder = _load("mrjax.eval.make_verifiable_prompts", "mrjax/eval/make_verifiable_prompts.py")

LEAST, MOST = "at least", "at most"
REQUEST = "Explain why the sky is blue."

# kind, parameters, texts that follow the constraint, texts that break it (all checked strictly)
CASES = [
    ("word_count", {"relation": MOST, "n": 4},
     ["one two three", "Well-known facts don't lie.", "**Bold** words\nhere\n"],
     ["one two three four five", "a b c d e f", "   \n"]),
    ("word_count", {"relation": LEAST, "n": 3},
     ["a b c", "P.S. hi there", "**Bold** words here"],
     ["two words", "P.S.", "*** --- ***"]),
    ("sentence_count", {"relation": LEAST, "n": 3},
     ["First. Second! Third?", "* one\n* two\n* three", "<<Title>>\nBody text here. And more."],
     ["One sentence only.", "The value is 3.5 today. Done.", "P.S. Remember this. Fine."]),
    ("sentence_count", {"relation": MOST, "n": 2},
     ["The value is 3.5 today. Done.", "P.S. Remember this. Fine.", "e.g. this one.\n***\n"],
     ["A. B. C.", "Line one\nline two\nline three", "Wait... what?! Really."]),
    ("paragraph_count", {"n": 2},
     ["First paragraph.\n***\nSecond paragraph.", "One.\n  ***  \nTwo.\n", "A.\n\nstill A.\n***\nB."],
     ["A.\n***\nB.\n***\nC.", "***\nA.\n***\nB.", "A.\n******\nB."]),
    ("paragraph_count", {"n": 3},
     ["A.\n\n***\n\nB.\n\n***\n\nC.\n", "x\n***\ny\n***\nz", "Intro.\n***\n* a\n* b\n***\nEnd."],
     ["A.\n***\n***\nB.", "A.\n***\nB.", "A.\n***\nB.\n***\n"]),
    ("bullet_count", {"n": 2},
     ["* a\n* b", "Intro:\n  * nested\n- top\n\n**Bold** line", "* first\n* second\n"],
     ["**Bold** start\n* a", "*a\n*b", "1. a\n2. b"]),
    ("bullet_count", {"n": 3},
     ["- a\n- b\n* c", "* a\n* * *\n* b\n* c", "* x *y*\n- z\n* w"],
     ["* a\n* b", "* a\n* b\n* c\n* d", "-5 degrees\n* a\n* b"]),
    ("numbered_sections", {"marker": "Section", "n": 2},
     ["Section 1\nIntro.\nSection 2\nMore.", "## SECTION 1: Start here\nSECTION 2: End here",
      "<<Title>>\n**Section 1** Mix.\n**Section 2** Bake."],
     ["Section 1\nA.\nSection 3\nB.", "Section 2\nA.\nSection 1\nB.", "Section 1\nA.\nSection 2",
      "See Section 1 and Section 2 here."]),
    ("numbered_sections", {"marker": "Part", "n": 3},
     ["Title line\nPart 1 Alpha\nPart 2 Beta\nPart 3 Gamma", "part 1 a\npart 2 b\npart 3 c",
      "PART 1\nx\nPART 2\ny\nPART 3\nz\n"],
     ["Part 1 a\nPart 2 b", "Part 1 a\nPart 2 b\nPart 3 c\nPart 4 d", "Part 1 a\nPart 2 b\nSection 3 c"]),
    ("lowercase", {},
     ["all lowercase here.", "numbers 123 and symbols #!\n", "p.s. école is fine"],
     ["Capital start.", "all lower but one X", "   "]),
    ("uppercase", {},
     ["ALL CAPS 2024!", "HELLO\n", "P.S. ÉCOLE"],
     ["ALL CAPS bUT", "Hello", "École"]),
    ("no_commas", {},
     ["No commas here.", "Semicolons; dashes - fine", "1.000 and 2.5"],
     ["One, two", "Full-width，comma", "a,b"]),
    ("keywords", {"words": ["cat"]},
     ["The cat sat.", "CAT's toy", "A cat-like grin"],
     ["concatenate strings", "cats everywhere", "a dog"]),
    ("keywords", {"words": ["garden", "soil"]},
     ["*Garden* soil", "SOIL and a garden.", "garden\nsoil"],
     ["garden only", "gardens and soil", "gardensoil"]),
    ("keyword_frequency", {"word": "tea", "n": 2},
     ["tea tea", "Tea-time tea", "tea, Tea and TEA"],
     ["tea steady teas", "instead of tea", "tea"]),
    ("forbidden_words", {"words": ["very", "just"]},
     ["Justice matters.", "Plain text.", "veryfine"],
     ["It is Very good.", "Just do it.", "JUST!"]),
    ("first_word", {"word": "yes"},
     ["Yes, of course.", "**YES** we start.", '"yes" she said.'],
     ["Well, yes.", "Yesterday was fine.", "1 yes"]),
    ("first_word", {"word": "Imagine"},
     ["<<Imagine>> text", "imagine this", "  \n Imagine... a world"],
     ["Sure. Imagine.", "Imagined it.", "* Picture"]),
    ("end_phrase", {"phrase": "Hope this helps!"},
     ["Text. Hope this helps!", "Text. Hope this helps!\n", "Hope this helps!  \n\n"],
     ["Hope this helps! Bye.", "Text. hope this helps!", "Text. Hope this helps", '"Hope this helps!"']),
    ("quoted", {},
     ['"Hello there."', '  "Hello."\n', '"Line one.\nLine two."'],
     ["Hello", '"Hello', "“Hello”", '""']),
    ("json", {},
     ['{"a": 1}', '```json\n{"answer": "yes"}\n```', '```\n[1, 2, "x"]\n```\n', '"a string"'],
     ['{"a": 1', 'Here is JSON: {"a": 1}', '```json\n{"a": 1}\n``` extra', "[]"]),
    ("title", {},
     ["<<My Title>>\nText", "Text <<another title>> more", "<<a>>"],
     ["<< >>", "<My Title>", "<<broken\ntitle>>"]),
    ("repeat_request", {"request": REQUEST},
     ["Explain why the sky is blue. Because of scattering.", "Explain why the sky\nis blue.\n\nScattering.",
      "  Explain why the sky is blue.\nAnswer here."],
     ["Sure! Explain why the sky is blue. Scattering.", "explain why the sky is blue. scattering",
      "Explain why the sky is blue.", "Explain why the sky is blue? Scattering."]),
    ("postscript", {"marker": "P.S."},
     ["Body.\n\nP.S. See you soon.", "body.\n\np.s. lowercase is fine.\n", "Body.\n*P.S.* one\ncontinued"],
     ["P.S. early.\n\nBody after.", "Body. P.S. inline", "Body.\n\nP.S.", "Body.\n\nP.P.S. later"]),
    ("postscript", {"marker": "P.P.S."},
     ["Body.\nP.P.S. x", "Body.\n\nP.S. a\n\nP.P.S. b", "BODY\nP.P.S. NOTE\n\n"],
     ["Body.\nP.S. x", "Body.\nP.P.S. x\n\nMore.", "P.P.S."]),
    ("placeholders", {"n": 2},
     ["Dear [name], at [address].", "[a] [b] [c]", "[your name here] and [date]"],
     ["Dear [ ], at [x]", "No brackets", "[one] only", "[broken\nacross] [x]"]),
    ("letter_frequency", {"letter": "a", "n": 3},
     ["Banana", "AaA", "a a a"],
     ["Bana", "bob", "xyz"]),
    ("highlighted_sections", {"n": 2},
     ["This is *key* and **vital**.", "*one* *two* *three*", "* bullet with *highlight*\n* and *another*"],
     ["* bullet\n* another *one*", "2 * 3 * 4 and *x*", "**bold** only", "* spaced * and *a*"]),
    ("two_parts", {},
     ["Part one.\n******\nPart two.", "A.\n\n  ******  \n\nB.\n", "First answer\n******\nSecond\nanswer"],
     ["Only one.", "A.\n******\nB.\n******\nC.", "A.\n******\n", "A.\n***\nB."]),
    ("capital_words", {"relation": LEAST, "n": 2},
     ["NOTE this and KEY", "COVID-19 and NASA", "USA UK"],
     ["Only Title Case", "I A P.S.", "ONE only"]),
    ("capital_words", {"relation": MOST, "n": 1},
     ["I am a fan of P.S. notes", "One NOTE here", "all lowercase"],
     ["NOTE KEY SAFE", "UK and USA", "AB CD"]),
]


def _ids(cases):
    return [f"{kind}-{i}" for i, (kind, *_) in enumerate(cases)]


@pytest.mark.parametrize("kind, args, good, bad", CASES, ids=_ids(CASES))
def test_hand_written_texts(kind, args, good, bad):
    constraint = {"kind": kind, **args}
    vf.KINDS[kind].validate(args)
    for text in good:
        assert vf.check(text, constraint), (text, constraint)
    for text in bad:
        assert not vf.check(text, constraint), (text, constraint)


def test_every_kind_has_cases_and_at_least_20_kinds():
    good, bad = Counter(), Counter()
    for kind, _, follow, fail in CASES:
        good[kind] += len(follow)
        bad[kind] += len(fail)
    assert len(vf.KINDS) >= 20
    assert set(good) == set(vf.KINDS)
    assert min(good.values()) >= 3 and min(bad.values()) >= 3


@pytest.mark.parametrize("kind, args, good, bad", CASES, ids=_ids(CASES))
def test_violate_breaks_a_hand_written_text(kind, args, good, bad):
    edited = vf.KINDS[kind].violate(good[0], **args)
    assert edited is not None and edited != good[0]
    assert not vf.KINDS[kind].check(edited, **args), edited


LOOSE = [  # constraint, text that fails strictly but passes loosely
    ({"kind": "first_word", "word": "yes"}, "Sure, here it is:\nYes, the answer is short."),
    ({"kind": "end_phrase", "phrase": "Hope this helps!"}, "The answer. **Hope this helps!**"),
    ({"kind": "end_phrase", "phrase": "Hope this helps!"}, "The answer. Hope this helps!\nLet me know."),
    ({"kind": "json"}, 'Here is the JSON:\n{"a": 1}'),
    ({"kind": "repeat_request", "request": REQUEST}, f"Of course!\n{REQUEST}\nScattering of light."),
    ({"kind": "quoted"}, 'Sure:\n"The whole answer."\nDone.'),
    ({"kind": "keywords", "words": ["garden"]}, "A *gar*den party"),
    ({"kind": "word_count", "relation": MOST, "n": 3}, "Okay here it is:\nThree words only"),
]
LOOSE_FAILS = [  # constraint, text that fails both ways
    ({"kind": "first_word", "word": "yes"}, "Sure:\nNo\nanswer"),
    ({"kind": "json"}, 'Sure:\n{"a": 1\nDone.'),
    ({"kind": "lowercase"}, "intro\nMiddle Line\noutro"),
    ({"kind": "end_phrase", "phrase": "Hope this helps!"}, "Hope this helps!\nBye.\nBye again."),
]


@pytest.mark.parametrize("constraint, text", LOOSE)
def test_loose_forgives_a_preamble_a_closing_line_and_emphasis(constraint, text):
    assert not vf.check(text, constraint)
    assert vf.check(text, constraint, loose=True)


@pytest.mark.parametrize("constraint, text", LOOSE_FAILS)
def test_loose_still_fails(constraint, text):
    assert not vf.check(text, constraint) and not vf.check(text, constraint, loose=True)


def test_follows_and_the_metrics():
    constraints = [{"kind": "no_commas"}, {"kind": "word_count", "relation": MOST, "n": 5}]
    assert vf.follows("Short and plain.", constraints) == [True, True]
    assert vf.follows("Short, plain, and then a bit longer.", constraints) == [False, False]
    results = [[True, True], [True, False, True], [False], [True]]
    assert vf.prompt_level(results) == pytest.approx(2 / 4)
    assert vf.constraint_level(results) == pytest.approx(5 / 7)
    assert vf.prompt_level([[True, False], [False, False]]) == 0.0
    assert vf.constraint_level([[True, False], [False, False]]) == pytest.approx(1 / 4)
    with pytest.raises(ValueError):
        vf.prompt_level([])


def test_minimal_violation_keeps_the_other_constraints():
    constraints = [{"kind": "no_commas"}, {"kind": "keywords", "words": ["tea"]},
                   {"kind": "end_phrase", "phrase": "Enjoy!"}]
    text = "Brew the tea for three minutes and serve it hot. Enjoy!"
    assert vf.follows(text, constraints) == [True, True, True]
    for i in range(3):
        edited = vf.minimal_violation(text, constraints, i)
        assert vf.follows(edited, constraints) == [j != i for j in range(3)], edited
    assert vf.minimal_violation(text, constraints, 0) == "Brew the tea for three minutes, and serve it hot. Enjoy!"
    assert vf.minimal_violation("Tea, then more.", constraints, 0) is None  # nothing left to break


def test_load_rows_rejects_bad_rows(tmp_path):
    good = {"id": "x1", "prompt": "Do it. Do not use any commas in your answer.",
            "constraints": [{"kind": "no_commas"}]}
    bad_rows = {
        "unknown kind": {**good, "constraints": [{"kind": "rhymes"}]},
        "bad value": {**good, "constraints": [{"kind": "word_count", "relation": "exactly", "n": 3}]},
        "missing parameter": {**good, "constraints": [{"kind": "bullet_count"}]},
        "instruction missing from the prompt": {**good, "prompt": "Do it."},
    }
    for name, row in bad_rows.items():
        path = tmp_path / "rows.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=r"rows\.jsonl:2"):
            vf.load_rows(path)
    path.write_text(json.dumps(good) + "\n\n")
    assert vf.load_rows(path) == [good]


def test_compose_refuses_contradictions():
    assert vf.compose([{"kind": "lowercase"}, {"kind": "uppercase"}]) is None
    assert vf.compose([{"kind": "json"}, {"kind": "bullet_count", "n": 2}]) is None
    assert vf.compose([{"kind": "quoted"}, {"kind": "end_phrase", "phrase": "Bye."}]) is None
    assert vf.compose([{"kind": "word_count", "relation": MOST, "n": 5},
                       {"kind": "sentence_count", "relation": LEAST, "n": 8}]) is None


def test_the_modules_import_only_the_standard_library():
    allowed = {"__future__", "collections", "dataclasses", "json", "random", "re", "pathlib", "typing",
               "mrjax.eval.verifiable"}
    for path in ("mrjax/eval/verifiable.py", "mrjax/eval/make_verifiable_prompts.py"):
        tree = ast.parse((REPO / path).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported <= allowed, (path, imported - allowed)


# ---------------------------------------------------------------------------------------------------------
# The shipped set

ROWS = vf.load_rows(vf.SHIPPED)


def test_shipped_set_size_and_kinds():
    assert len(ROWS) >= 300
    assert [row["id"] for row in ROWS] == [f"v{i:04d}" for i in range(1, len(ROWS) + 1)]
    per_kind = Counter(c["kind"] for row in ROWS for c in row["constraints"])
    assert len(per_kind) >= 20 and min(per_kind.values()) >= 10, per_kind
    for row in ROWS:
        kinds = [c["kind"] for c in row["constraints"]]
        assert 1 <= len(kinds) <= 3 and len(set(kinds)) == len(kinds)


def test_shipped_prompts_are_task_then_instructions():
    for row in ROWS:
        instructions = " ".join(vf.describe(c) for c in row["constraints"])
        assert row["prompt"].endswith(" " + instructions)
        task = row["prompt"][:-len(instructions) - 1]
        assert task.strip() == task and task


def test_shipped_tasks_are_distinct_and_not_seed_prompts():
    tasks = [builder.normalise(row["prompt"][:-len(" ".join(vf.describe(c) for c in row["constraints"])) - 1])
             for row in ROWS]
    assert len(set(tasks)) == len(tasks)
    assert not set(tasks) & builder.seed_prompt_texts()


def test_shipped_rows_round_trip():
    assert builder.render(ROWS) == vf.SHIPPED.read_text(encoding="utf-8")


def test_builder_reproduces_the_shipped_file():
    assert builder.render(builder.build_rows()) == vf.SHIPPED.read_text(encoding="utf-8")


def test_every_shipped_row_can_be_satisfied():
    for row in ROWS:
        text = vf.compose(row["constraints"])
        assert text is not None and all(vf.follows(text, row["constraints"])), row["id"]


def test_minimal_violations_of_shipped_rows():
    pairs, edited = 0, 0
    for row in ROWS:
        constraints = row["constraints"]
        text = vf.compose(constraints)
        for i, constraint in enumerate(constraints):
            if vf.KINDS[constraint["kind"]].violations_fn is None:
                continue
            pairs += 1
            violation = vf.minimal_violation(text, constraints, i)
            if violation is not None:
                edited += 1
                assert vf.follows(violation, constraints) == [j != i for j in range(len(constraints))], (row["id"], i)
    coverage = edited / pairs
    assert coverage >= 0.9, f"minimal edits found for {edited}/{pairs} = {coverage:.1%} of (row, constraint) pairs"
