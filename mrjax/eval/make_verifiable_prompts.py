"""Builds the shipped verifiable-instruction prompt set, ``mrjax/data/verifiable_prompts.jsonl``:

    python -m mrjax.eval.make_verifiable_prompts

Every row is one hand-written task sentence (``TASKS``, twenty topics) followed by the instruction
sentences of 1-3 constraints drawn with a fixed seed. The least-used kinds are drawn first so that every
kind is well represented, and a draw is kept only when ``compose`` can write a text that follows all its
constraints, so no row is contradictory. The output depends on nothing but this file and
``mrjax.eval.verifiable``: running it again rewrites the file byte for byte.
"""
from __future__ import annotations

import json
import random
from collections import Counter

from mrjax.eval.verifiable import KINDS, SHIPPED, compose, describe

SEED = 20240613
SEED_PROMPTS = SHIPPED.parent / "seed_prompts.jsonl"

# topic -> (task sentences, topic words used by the keyword kinds)
TASKS: dict[str, tuple[list[str], list[str]]] = {
    "science": ([
        "Explain how a rainbow forms after a rain shower.",
        "Describe what happens inside a cell when it divides.",
        "Explain why ice floats on water instead of sinking.",
        "Summarize how vaccines teach the immune system to recognize a virus.",
        "Describe the water cycle for a class of ten-year-olds.",
        "Explain the difference between weather and climate.",
        "Write a short explanation of how magnets attract and repel each other.",
        "Explain why we see lightning before we hear thunder.",
        "Describe how plants turn sunlight into food.",
        "Explain what causes the tides in the ocean.",
        "Describe how scientists measure the strength of an earthquake.",
        "Explain why metal feels colder than wood at the same temperature.",
        "Describe how fossils form over millions of years.",
        "Explain what a chemical reaction is, using baking soda and vinegar as the example.",
        "Explain how sound travels through air, water and solid walls.",
        "Describe the role of bacteria in making yogurt.",
    ], ["energy", "light", "water", "heat", "experiment", "matter", "evidence", "theory"]),
    "cooking": ([
        "Write a recipe for a simple tomato soup that serves four.",
        "Explain how to cook rice on the stove so it does not stick to the pot.",
        "Give instructions for making pancakes from scratch.",
        "Describe how to sharpen a kitchen knife safely.",
        "Suggest a week of packed lunches for a busy office worker.",
        "Explain the difference between baking soda and baking powder in recipes.",
        "Write instructions for roasting vegetables in the oven.",
        "Describe how to make a basic vinaigrette salad dressing.",
        "Explain how to tell when a steak is cooked to medium.",
        "Plan a vegetarian dinner menu for six guests.",
        "Describe how to bake a loaf of bread without a bread machine.",
        "Explain how to store leftovers so they stay safe to eat.",
        "Write a recipe for a fruit smoothie that uses frozen berries.",
        "Describe three ways to cook eggs for breakfast.",
        "Explain how to make a stock from vegetable scraps.",
        "Give tips for cooking pasta that does not turn soft and sticky.",
    ], ["salt", "oven", "flavor", "garlic", "butter", "heat", "recipe", "kitchen"]),
    "travel": ([
        "Plan a three-day trip to a coastal town for a family with two children.",
        "Write a packing list for a week of hiking in the mountains.",
        "Describe how to prepare for a long overnight train journey.",
        "Give advice on getting over jet lag after a flight across several time zones.",
        "Write a short guide to visiting a big city on a small budget.",
        "Describe what to do if your luggage is lost at the airport.",
        "Suggest ways to stay safe when traveling alone for the first time.",
        "Plan a weekend camping trip by a lake.",
        "Write a review of an imaginary hotel by the sea.",
        "Explain how to learn a few useful phrases before visiting a foreign country.",
        "Describe a one-day walking tour of an old market town.",
        "Give tips for taking a road trip with a dog.",
        "Write a postcard to a friend from a snowy mountain village.",
        "Suggest how to choose between a hostel and a hotel.",
        "Describe how to plan a cycling holiday along a river.",
        "Explain what travel insurance usually covers.",
    ], ["map", "ticket", "journey", "passport", "luggage", "local", "route", "budget"]),
    "history": ([
        "Summarize why the printing press changed how people shared ideas.",
        "Describe daily life for a farmer in a medieval village.",
        "Explain why the ancient Romans built aqueducts.",
        "Describe how the first telephones changed communication.",
        "Write a short overview of the Silk Road trade routes.",
        "Explain why the pyramids of Egypt were built.",
        "Describe the role of lighthouses before modern navigation tools.",
        "Summarize how people kept time before mechanical clocks.",
        "Explain how the invention of the steam engine changed factories.",
        "Describe what a Viking longship was used for.",
        "Write a short account of the first powered flight by the Wright brothers.",
        "Explain why castles had thick walls and narrow windows.",
        "Describe how postal services worked in the nineteenth century.",
        "Summarize the history of the bicycle in a few paragraphs.",
        "Explain how ancient sailors navigated using the stars.",
        "Describe how people preserved food before refrigerators existed.",
    ], ["century", "empire", "trade", "king", "records", "ancient", "change", "people"]),
    "programming": ([
        "Explain what a variable is to someone who has never written code.",
        "Describe how to find and fix a bug in a short program.",
        "Explain the difference between a list and a dictionary in Python.",
        "Write a guide to naming functions clearly.",
        "Explain what version control is and why teams use it.",
        "Describe how a loop works, with an example that counts to ten.",
        "Explain what an API is using a restaurant as a comparison.",
        "Give advice on writing useful comments in code.",
        "Explain why automated tests help a software project.",
        "Describe the steps to review a colleague's pull request.",
        "Explain what recursion is with a simple example.",
        "Describe how a web browser loads a page after you type an address.",
        "Explain the idea of a database index to a beginner.",
        "Give tips for reading an error message from a compiler.",
        "Explain the difference between a compiled and an interpreted language.",
        "Describe how to split a large function into smaller ones.",
    ], ["code", "function", "data", "error", "test", "program", "value", "memory"]),
    "work email": ([
        "Write an email to a manager asking for a day off next Friday.",
        "Write an email inviting the team to a farewell lunch for a colleague.",
        "Write an email to a client explaining that a delivery will be two days late.",
        "Write an email thanking a coworker for helping with a difficult project.",
        "Write an email asking a supplier for a price quote on office chairs.",
        "Write an email announcing a change to the weekly meeting time.",
        "Write an email following up after a job interview.",
        "Write an email to a landlord reporting a broken heater.",
        "Write an email introducing yourself to a new team.",
        "Write an email reminding colleagues to submit their expense reports.",
        "Write an email declining a meeting invitation politely.",
        "Write an email asking a professor for a letter of recommendation.",
        "Write an email to customers about a short website outage.",
        "Write an email proposing a new process for sharing project files.",
        "Write an email congratulating a colleague on a promotion.",
        "Write an email requesting feedback on a draft report.",
    ], ["schedule", "deadline", "team", "thanks", "meeting", "update", "request", "week"]),
    "poem": ([
        "Write a poem about the first snowfall of winter.",
        "Write a poem about a lighthouse keeper.",
        "Write a short poem about a cup of morning coffee.",
        "Write a poem about an old bicycle in a garage.",
        "Write a poem about the sound of rain on a tin roof.",
        "Write a poem celebrating a grandmother's garden.",
        "Write a poem about a city waking up at dawn.",
        "Write a poem from the point of view of a lost sock.",
        "Write a poem about waiting at a train station.",
        "Write a poem about the moon over a quiet harbor.",
        "Write a poem about a child learning to swim.",
        "Write a poem about autumn leaves in a park.",
        "Write a poem about an empty classroom in summer.",
        "Write a poem about a long-distance friendship.",
        "Write a poem about the smell of fresh bread.",
        "Write a poem about a storm at sea.",
    ], ["silver", "quiet", "memory", "shadow", "morning", "wind", "heart", "light"]),
    "story": ([
        "Write a short story about a robot who learns to paint.",
        "Write a story about a girl who finds a map in her grandfather's attic.",
        "Write a short story set in a bakery at midnight.",
        "Write a story about two rivals who must share a tent.",
        "Write a story about a cat who becomes the mayor of a small town.",
        "Write a short mystery about a missing library book.",
        "Write a story about an astronaut who hears music on the radio far from Earth.",
        "Write a story about a village where it never stops raining.",
        "Write a fairy tale about a clockmaker and a talking owl.",
        "Write a story told by a suitcase on its first journey.",
        "Write a short story about a lost dog finding its way home.",
        "Write a story about a chef who cannot taste anything.",
        "Write a story about a kid who builds a raft from old doors.",
        "Write a ghost story that is funny instead of scary.",
        "Write a story about the last day of a summer job.",
        "Write a story about a tree that remembers everyone who climbed it.",
    ], ["secret", "door", "friend", "night", "surprise", "promise", "journey", "window"]),
    "health": ([
        "Explain why sleep matters for memory.",
        "Give tips for drinking enough water during the day.",
        "Describe a short stretching routine for people who sit at a desk all day.",
        "Explain how to build a habit of walking every day.",
        "Describe the benefits of eating more vegetables.",
        "Explain what to keep in a basic first aid kit.",
        "Give advice on protecting your skin from the sun.",
        "Explain how stress affects the body.",
        "Describe an evening routine that helps with sleep.",
        "Explain why washing hands helps prevent illness.",
        "Give tips for taking care of your eyes when using screens.",
        "Describe how to start running as a complete beginner.",
        "Explain how to read the nutrition label on a food package.",
        "Describe simple breathing exercises to calm down.",
        "Explain why posture matters when lifting heavy boxes.",
        "Give advice for staying healthy during the cold season.",
    ], ["doctor", "rest", "routine", "body", "exercise", "sleep", "habit", "health"]),
    "sport": ([
        "Explain the basic rules of tennis.",
        "Describe how to warm up before a football match.",
        "Write a match report for an imaginary basketball final.",
        "Explain what makes a good team captain.",
        "Describe how to train for a first ten-kilometer race.",
        "Explain the offside rule in soccer in simple terms.",
        "Give tips for improving balance in yoga.",
        "Describe the history of the marathon.",
        "Explain how to choose a pair of running shoes.",
        "Write a pep talk for a youth hockey team before a game.",
        "Explain how scoring works in volleyball.",
        "Describe what a swimmer does to improve speed.",
        "Give advice for a beginner joining a climbing gym.",
        "Explain the difference between sprint and endurance training.",
        "Describe how cyclists ride in a group to save energy.",
        "Explain how a chess tournament is organized.",
    ], ["coach", "score", "practice", "team", "goal", "season", "player", "training"]),
    "finance": ([
        "Explain how to make a monthly budget.",
        "Describe the difference between saving and investing.",
        "Explain what compound interest is with a simple example.",
        "Give tips for paying off a credit card balance.",
        "Explain what an emergency fund is and how big it should be.",
        "Describe how to compare two offers for a car loan.",
        "Explain what inflation does to savings.",
        "Give advice for a teenager opening a first bank account.",
        "Explain how a mortgage works.",
        "Describe ways to save money on groceries.",
        "Explain what a pension plan is.",
        "Describe how to track spending for one month.",
        "Explain the risks of buying shares in a single company.",
        "Give tips for negotiating a lower phone bill.",
        "Explain what a credit score is and how to improve it.",
        "Describe how to plan savings for a holiday.",
    ], ["money", "interest", "bank", "savings", "loan", "income", "risk", "account"]),
    "nature": ([
        "Explain why bees are important for farming.",
        "Describe how a forest recovers after a fire.",
        "Explain how to reduce plastic waste at home.",
        "Describe the life cycle of a butterfly.",
        "Explain why coral reefs are in danger.",
        "Give tips for starting a compost heap.",
        "Describe how rivers shape valleys over time.",
        "Explain why some birds fly south in winter.",
        "Describe what happens to glass after it is recycled.",
        "Explain how wetlands help prevent floods.",
        "Give ideas for making a garden friendlier to wildlife.",
        "Describe how glaciers move.",
        "Explain why planting trees in cities helps people.",
        "Describe the food chain in a pond.",
        "Explain how solar panels turn light into electricity.",
        "Describe how to identify common trees by their leaves.",
    ], ["soil", "climate", "forest", "species", "season", "river", "nature", "seed"]),
    "technology": ([
        "Explain how a smartphone camera focuses on a subject.",
        "Describe how wifi sends data through the air.",
        "Explain what cloud storage is.",
        "Give tips for creating strong passwords.",
        "Explain how a 3D printer builds an object.",
        "Describe how electric cars are charged.",
        "Explain what a computer virus is and how to avoid one.",
        "Describe how GPS finds your position.",
        "Explain how noise-cancelling headphones work.",
        "Give advice on backing up family photos.",
        "Explain what a QR code stores.",
        "Describe how a microwave oven heats food.",
        "Explain the difference between RAM and storage.",
        "Describe how to set up a home printer.",
        "Explain how a touchscreen knows where you touch it.",
        "Give tips for spotting a phishing message.",
    ], ["device", "signal", "battery", "screen", "network", "software", "user", "sensor"]),
    "education": ([
        "Give tips for taking good notes in a lecture.",
        "Explain how to prepare for an oral exam.",
        "Describe a study plan for learning a new language in six months.",
        "Explain how spaced repetition helps memory.",
        "Give advice for writing a clear essay introduction.",
        "Describe how to run a book club for teenagers.",
        "Explain how to teach a child to tie shoelaces.",
        "Give tips for staying motivated in an online course.",
        "Describe how to prepare a science fair project.",
        "Explain how to read a difficult textbook chapter.",
        "Give advice for a first day as a new teacher.",
        "Describe a fun way to practice multiplication tables.",
        "Explain how to cite sources in a school report.",
        "Describe how to organize a group project so everyone contributes.",
        "Give tips for learning to type faster.",
        "Explain how to make flashcards that actually help.",
    ], ["student", "lesson", "practice", "teacher", "notes", "question", "review", "class"]),
    "home": ([
        "Explain how to grow tomatoes on a balcony.",
        "Describe how to paint a room without making a mess.",
        "Give tips for decluttering a small closet.",
        "Explain how to unclog a kitchen sink.",
        "Describe how to plant a young tree so it grows well.",
        "Give advice on keeping a house cool in summer without air conditioning.",
        "Explain how to hang a heavy picture frame.",
        "Describe a weekly cleaning routine for a shared flat.",
        "Explain how to start seeds indoors in spring.",
        "Give tips for saving energy at home in winter.",
        "Describe how to build a simple bookshelf.",
        "Explain how to care for a lawn during a dry summer.",
        "Describe how to organize a garage.",
        "Explain how to fix a dripping tap.",
        "Give ideas for decorating a small bedroom.",
        "Describe how to prune a rose bush.",
    ], ["tools", "wall", "garden", "room", "water", "shelf", "space", "window"]),
    "arts": ([
        "Explain how to tune a guitar by ear.",
        "Describe how to start learning to draw portraits.",
        "Explain what makes a melody easy to remember.",
        "Give tips for practicing piano every day.",
        "Describe the colors and mood of a sunset painting.",
        "Explain how a choir learns a new song.",
        "Describe how to take better photos of landscapes.",
        "Explain the difference between watercolor and oil paint.",
        "Give advice for a first time playing music on stage.",
        "Describe how a pottery bowl is made on a wheel.",
        "Explain what a conductor does in an orchestra.",
        "Describe how to write the lyrics of a simple song.",
        "Give tips for visiting an art museum with children.",
        "Explain how rhythm works in music.",
        "Describe how to make a collage from old magazines.",
        "Explain how street murals are planned and painted.",
    ], ["color", "rhythm", "sound", "canvas", "style", "artist", "melody", "brush"]),
    "space": ([
        "Explain why the moon has phases.",
        "Describe what astronauts eat on a space station.",
        "Explain how a rocket reaches orbit.",
        "Describe the planets of the solar system in order from the sun.",
        "Explain what a black hole is.",
        "Describe how to spot the planet Jupiter in the night sky.",
        "Explain why stars twinkle.",
        "Describe what a total solar eclipse looks like from the ground.",
        "Explain how telescopes collect light.",
        "Describe a day in the life of a Mars rover.",
        "Explain why there are seasons on Earth.",
        "Describe what comets are made of.",
        "Explain how satellites stay in orbit.",
        "Describe how to plan a night of stargazing.",
        "Explain what the Milky Way is.",
        "Describe how astronauts train for a spacewalk.",
    ], ["orbit", "gravity", "planet", "star", "telescope", "mission", "galaxy", "distance"]),
    "animals": ([
        "Explain how to care for a pet goldfish.",
        "Describe how dolphins communicate.",
        "Give tips for training a puppy to sit.",
        "Explain why cats purr.",
        "Describe the daily routine of a honeybee.",
        "Explain how to introduce a new cat to a dog.",
        "Describe how penguins keep warm.",
        "Explain what to feed a pet rabbit.",
        "Describe how elephants live in family groups.",
        "Give advice for welcoming a rescue dog home.",
        "Explain how owls hunt at night.",
        "Describe how ants work together.",
        "Explain how to keep a horse healthy.",
        "Describe the long journey salmon make to spawn.",
        "Explain how chameleons change color.",
        "Describe how to set up a bird feeder.",
    ], ["food", "habitat", "instinct", "nest", "pet", "herd", "wild", "care"]),
    "career": ([
        "Give tips for preparing for a job interview.",
        "Describe how to write a strong cover letter.",
        "Explain how to ask for a raise.",
        "Describe how to start a small online shop.",
        "Give advice for managing a team for the first time.",
        "Explain how to run an effective meeting.",
        "Describe how to build a professional network.",
        "Give tips for working with a difficult client.",
        "Explain how to write a business plan for a cafe.",
        "Describe how to change careers at forty.",
        "Give advice for a first week at a new job.",
        "Explain how to set goals for the next year at work.",
        "Describe how to give a short presentation with confidence.",
        "Explain how to price a freelance service.",
        "Give tips for writing a clear project update.",
        "Describe how to plan a product launch.",
    ], ["skills", "manager", "client", "career", "plan", "growth", "feedback", "customer"]),
    "everyday": ([
        "Describe how to plan a birthday party for a five-year-old.",
        "Explain how to start a vegetable swap with neighbors.",
        "Give tips for learning to juggle.",
        "Describe how to knit a simple scarf.",
        "Explain the rules of a card game you would teach a friend.",
        "Describe how to plan a picnic in the park.",
        "Give tips for solving crossword puzzles.",
        "Explain how to write a thank-you note.",
        "Describe how to organize a family photo album.",
        "Give advice for moving to a new apartment.",
        "Explain how to plan a board game night.",
        "Describe how to start a daily journal.",
        "Give tips for a first visit to a farmers market.",
        "Explain how to fold a paper crane.",
        "Describe how to host a neighborhood cleanup day.",
        "Give tips for remembering people's names.",
    ], ["friends", "weekend", "list", "plan", "fun", "family", "time", "neighbors"]),
}

FORBIDDEN = ["very", "really", "basically", "actually", "simply", "just", "literally", "totally", "obviously",
             "clearly", "definitely", "extremely", "quite", "honestly"]
FIRST_WORDS = ["Absolutely", "Certainly", "Here", "Imagine", "Today", "Yes", "First", "Dear", "Once", "Remember",
               "Hello", "Picture"]
END_PHRASES = ["Is there anything else I can help with?", "Let me know if you have additional questions.",
               "Hope this helps!", "That is all for now.", "Thank you for reading.", "Happy to explain more.",
               "Any other questions?", "Good luck!"]
SECTION_MARKERS = ["Section", "Part", "Step"]
LETTERS = "bfgjkmpvwyz"


def _constraint(kind: str, rng: random.Random, task: str, topic_words: list[str]) -> dict:
    """Draw the parameters of one constraint of ``kind``."""
    relation = rng.choice(["at least", "at most"])
    if kind == "word_count":
        n = rng.choice([50, 80, 100, 120, 150, 200, 250] if relation == "at least" else [30, 40, 60, 80, 100, 150])
        return {"kind": kind, "relation": relation, "n": n}
    if kind == "sentence_count":
        n = rng.choice([3, 4, 5, 6, 8, 10] if relation == "at least" else [2, 3, 4, 5, 6, 8])
        return {"kind": kind, "relation": relation, "n": n}
    if kind == "capital_words":
        return {"kind": kind, "relation": relation, "n": rng.choice([1, 2, 3, 4, 5])}
    if kind in ("paragraph_count", "bullet_count"):
        return {"kind": kind, "n": rng.choice([2, 3, 4, 5])}
    if kind == "numbered_sections":
        return {"kind": kind, "marker": rng.choice(SECTION_MARKERS), "n": rng.choice([2, 3, 4, 5])}
    if kind == "keywords":
        return {"kind": kind, "words": rng.sample(topic_words, rng.choice([1, 2, 2, 3]))}
    if kind == "keyword_frequency":
        return {"kind": kind, "word": rng.choice(topic_words), "n": rng.choice([2, 3, 4])}
    if kind == "forbidden_words":
        return {"kind": kind, "words": rng.sample(FORBIDDEN, rng.choice([1, 2, 2, 3]))}
    if kind == "first_word":
        return {"kind": kind, "word": rng.choice(FIRST_WORDS)}
    if kind == "end_phrase":
        return {"kind": kind, "phrase": rng.choice(END_PHRASES)}
    if kind == "repeat_request":
        return {"kind": kind, "request": task}
    if kind == "postscript":
        return {"kind": kind, "marker": rng.choice(["P.S.", "P.S.", "P.P.S."])}
    if kind in ("placeholders", "highlighted_sections"):
        return {"kind": kind, "n": rng.choice([1, 2, 3, 4])}
    if kind == "letter_frequency":
        return {"kind": kind, "letter": rng.choice(LETTERS), "n": rng.choice([3, 4, 5, 6, 8])}
    return {"kind": kind}


def _redundant(constraints: list[dict]) -> bool:
    """Whether two constraints ask for the same word (a keyword that is also the counted word)."""
    listed = [word for c in constraints for word in c.get("words", [])] + [c["word"] for c in constraints
                                                                          if c["kind"] == "keyword_frequency"]
    return len(listed) != len(set(listed))


def seed_prompt_texts() -> set[str]:
    """The shipped seed prompts, normalised (lowercase, single spaces), which the tasks must not repeat."""
    texts = set()
    for line in SEED_PROMPTS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.add(normalise(json.loads(line)["prompt"]))
    return texts


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def build_rows() -> list[dict]:
    tasks = [(task, topic_words) for task_list, topic_words in TASKS.values() for task in task_list]
    seen = seed_prompt_texts()
    for task, _ in tasks:
        if normalise(task) in seen:
            raise ValueError(f"task repeats a seed prompt or another task: {task!r}")
        seen.add(normalise(task))
    rng = random.Random(SEED)
    usage: Counter = Counter()
    rows = []
    for number, (task, topic_words) in enumerate(tasks, start=1):
        size = rng.choice([1, 2, 2, 3, 3])
        for _ in range(500):
            # Least-used kinds first (with some noise), so that every kind gets its share of rows.
            ranked = sorted(KINDS, key=lambda name: usage[name] + 8 * rng.random())
            kinds = [ranked[0]] + rng.sample(ranked[1:10], size - 1)
            constraints = [_constraint(kind, rng, task, topic_words) for kind in kinds]
            if not _redundant(constraints) and compose(constraints, task) is not None:
                break
        else:
            raise RuntimeError(f"no satisfiable constraints found for {task!r}")
        usage.update(kinds)
        prompt = " ".join([task] + [describe(constraint) for constraint in constraints])
        rows.append({"id": f"v{number:04d}", "prompt": prompt, "constraints": constraints})
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    rows = build_rows()
    SHIPPED.write_text(render(rows), encoding="utf-8")
    usage = Counter(c["kind"] for row in rows for c in row["constraints"])
    print(f"wrote {len(rows)} rows to {SHIPPED}; rows per kind: {dict(sorted(usage.items()))}")


if __name__ == "__main__":
    main()
