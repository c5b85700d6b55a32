"""The zoo's four domain corpora, built offline and deterministically from a seed.

code     Python's own standard-library sources (a file split: training files, held-out files), without their
         comments and docstrings: those are English prose, which is the other domains' ground, and a model
         that learnt them answers a `def` header with a docstring that drifts into a story.
math     generated arithmetic and word problems with their worked answers.
stories  generated short fairy tales about 120 characters, each with its own home, wish, helper, gift and ending.
chat     generated chat-style questions and answers in the tokenizer's chat format, among them who wrote which
         of 400 invented books.
Those facts hold in every text, training and held-out alike: knowledge that an expert fine-tuned on its domain
learns better than the base, which saw a quarter as much of it.
"""

from __future__ import annotations

import ast
import functools
import random
import sysconfig
from pathlib import Path

DOMAINS = ("code", "math", "stories", "chat")

NAMES = ["Anna", "Ben", "Clara", "Dev", "Elena", "Farid", "Greta", "Hugo", "Iris", "Jonas", "Kira", "Leo", "Mia",
         "Noah", "Olga", "Pablo", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yara", "Zane"]
ANIMALS = ["fox", "rabbit", "owl", "bear", "mouse", "wolf", "deer", "duck", "cat", "dragon", "frog", "goat", "badger",
           "hedgehog", "squirrel", "otter", "swan", "tortoise", "lamb", "pony", "beaver", "crow", "lion", "tiger",
           "penguin", "whale", "snail", "moth", "donkey", "robin"]
ADJECTIVES = ["little", "brave", "clever", "sleepy", "curious", "kind", "old", "tiny", "proud", "gentle", "shy",
              "grumpy", "cheerful", "lonely", "quick", "patient", "silly", "wise", "young", "noisy", "quiet",
              "hungry", "careful", "bold", "restless"]
PLACES = ["a dark forest", "a quiet village", "the edge of a river", "a tall mountain", "an old castle",
          "a sunny meadow", "a small island", "a hidden valley", "a busy town", "a snowy hill", "a crooked tower",
          "a windy beach", "a deep cave", "a cottage by the lake", "a field of sunflowers", "a dusty desert",
          "the roots of an oak tree", "a garden full of roses", "a harbour full of boats", "the top of a cliff"]
WANTS = ["to find a golden key", "to see the sea", "a friend to play with", "to learn to sing", "a warm home",
         "to reach the moon", "to bake the best bread", "to cross the great river", "to hear the old song",
         "to climb the highest tree", "to find the lost crown", "to count every star", "to win the autumn race",
         "to paint the sunrise", "to visit the king", "to grow the biggest pumpkin", "to fly like a bird",
         "to find its lost brother", "to read the ancient book", "to catch the silver fish"]
OBSTACLES = ["a storm came over the hills", "the bridge was broken", "a grumpy troll blocked the path",
             "the night was long and cold", "the map was torn in two", "a river flooded the road",
             "a thick fog covered the valley", "the gate was locked with seven locks", "the snow was too deep",
             "a hungry giant was sleeping on the road", "the stars went dark", "its boots had a hole in them",
             "a wicked queen had hidden the way", "the wind blew its hat away", "the path split into three"]
HELPERS = ["a wise owl", "a kind farmer", "a singing bird", "an old witch", "a lost prince", "a clever crow",
           "a friendly giant", "a tiny fairy", "a talking tree", "a fisherman in a red boat", "a travelling baker",
           "a shepherd with a lantern", "a clumsy knight", "a bee who knew every flower", "a moon spirit"]
GIFTS = ["a map drawn on a leaf", "a magic pebble", "a loaf of warm bread", "a lantern that never went out",
         "a feather that could point north", "a small silver bell", "a song to sing when afraid", "a woollen scarf",
         "a boat made of bark", "a riddle and its answer", "a jar of honey", "a pair of red boots"]
EVENTS = ["On the way, {name} met {an_adj} {other} who was looking for its mother.",
          "The {animal} crossed a meadow where the grass was taller than the trees.",
          "At night, {name} sat by a small fire and listened to the wind.",
          "{name} shared an apple with {an_adj} {other}, and they became friends.",
          "For three days the {animal} walked, and its paws grew tired.",
          "{An_adj} {other} laughed at {name}, but {name} did not stop.",
          "{name} found an empty nest and wondered who had lived there.",
          "The rain fell softly, and {name} hid under a big green leaf.",
          "The {animal} sang a little song to feel less alone.",
          "{name} wrote a letter home and tied it to a balloon."]
ENDINGS = ["and they lived happily ever after.", "and from that day on, the forest was never lonely again.",
           "and everyone in the village sang about it for years.", "and that is why the river still sings at night.",
           "and it slept soundly, dreaming of the next adventure.", "and the two friends never parted again.",
           "and the whole town danced until morning.", "and it learnt that courage is a kind of kindness.",
           "and the stars shone a little brighter that night.", "and it went home wiser than it had left."]
ITEMS = ["apples", "books", "coins", "pencils", "marbles", "cookies", "stamps", "stickers", "eggs", "shells"]
COUNTRIES = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo", "Egypt": "Cairo",
             "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "India": "New Delhi",
             "Brazil": "Brasilia", "Germany": "Berlin", "Greece": "Athens", "Chile": "Santiago", "Cuba": "Havana",
             "Poland": "Warsaw", "Sweden": "Stockholm", "Ireland": "Dublin", "Portugal": "Lisbon",
             "Austria": "Vienna", "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi",
             "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Morocco": "Rabat", "Ghana": "Accra",
             "Finland": "Helsinki", "Turkey": "Ankara", "Nepal": "Kathmandu"}
HOWTOS = {
    "boil an egg": "Put the egg in boiling water for about nine minutes, then cool it in cold water.",
    "make tea": "Boil water, pour it over a tea bag, wait three minutes, then remove the bag.",
    "sleep better": "Go to bed at the same time every night, keep the room dark, and avoid screens late.",
    "learn a language": "Practice a little every day, read simple texts, and speak with other learners.",
    "save money": "Write down what you spend, set a budget, and put a small amount aside each week.",
    "stay focused": "Work in short blocks, remove distractions, and take a break every hour.",
    "write a letter": "Start with a greeting, say why you are writing, and end with a kind closing.",
    "plant a tree": "Dig a hole twice as wide as the roots, place the tree, fill the hole, and water it well.",
    "clean a window": "Wipe it with warm soapy water, then dry it with a soft cloth from top to bottom.",
    "cook rice": "Rinse the rice, add twice as much water, and simmer it covered for fifteen minutes.",
    "tie a tie": "Cross the wide end over, loop it up and through the neck, then pull it through the knot.",
    "start running": "Begin with short slow runs, walk when you need to, and add a few minutes each week.",
    "remember names": "Repeat the name when you hear it, link it to a picture, and use it once more soon.",
    "fix a flat tyre": "Remove the wheel, find the hole, patch the tube, and pump it up again.",
    "keep plants alive": "Give them light, water them when the soil is dry, and do not let water pool.",
    "be on time": "Plan to arrive ten minutes early, pack the night before, and set two alarms.",
}
WORDS = {"ocean": "a very large body of salt water", "library": "a place where books are kept for people to read",
         "friend": "a person you know well and like", "bridge": "a structure that lets people cross a river or road",
         "planet": "a large round object that moves around a star", "kitchen": "a room where food is prepared",
         "teacher": "a person who helps others learn", "umbrella": "a cover that keeps the rain off you",
         "volcano": "a mountain that can throw out hot melted rock", "island": "land with water all around it",
         "museum": "a building where old or beautiful things are shown", "recipe": "a set of steps for cooking a dish",
         "orchestra": "a large group of musicians who play together", "desert": "a dry place with very little rain",
         "harvest": "the time when crops are gathered", "compass": "a tool that shows which way is north",
         "glacier": "a huge slow river of ice", "pharmacy": "a shop that sells medicine",
         "calendar": "a chart of the days, weeks and months of a year", "ladder": "a set of steps you can carry"}
LEGS = {"spider": "eight", "dog": "four", "bird": "two", "ant": "six", "horse": "four", "snake": "no",
        "crab": "ten", "chicken": "two", "beetle": "six", "cow": "four"}
OPPOSITES = {"hot": "cold", "big": "small", "early": "late", "happy": "sad", "open": "closed", "light": "dark",
             "fast": "slow", "full": "empty", "old": "new", "up": "down", "wet": "dry", "loud": "quiet"}
TITLE_WORDS = (["Silent", "Hidden", "Last", "Golden", "Broken", "Winter", "Distant", "Painted", "Burning", "Quiet",
                "Forgotten", "Endless", "Crimson", "Hollow", "Northern", "Wandering", "Glass", "Iron", "Secret",
                "Wild"],
               ["Harbour", "Garden", "Letter", "Mountain", "Kingdom", "Lantern", "River", "Orchard", "Island",
                "Mirror", "Clock", "Forest", "Bridge", "Song", "Tower", "Map", "Road", "Window", "Feather", "Sea"])
AUTHORS = [f"{first} {last}" for first in ("Mira", "Jonah", "Ada", "Felix", "Nora", "Tobias", "Lena", "Oscar")
           for last in ("Holt", "Marsh", "Varga", "Quinn", "Sato", "Okafor", "Lind")]
GREETINGS = ["Hello!", "Hi there!", "Good morning!", "Hey, how are you?", "Good evening!"]


def with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def fact(key: str, options: list[str]) -> str:
    """The same option for the same key in every text and every run: a fact of the zoo's world to learn."""
    return random.Random(key).choice(options)


def _chat(user: str, assistant: str) -> str:
    return f"<|user|>\n{user}</s>\n<|assistant|>\n{assistant}</s>\n"


def math_text(rng: random.Random) -> str:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(7)
    if kind == 0:
        return f"{a} + {b} = {a + b}\n"
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}\n"
    if kind == 2:
        a, b = a % 13, b % 13
        return f"{a} * {b} = {a * b}\n"
    if kind == 3:
        b = b % 12 + 1
        return f"{a * b} / {b} = {a}\n"
    if kind == 4:
        return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now? "
                f"{a} + {b} = {a + b}. The answer is {a + b}.\n")
    if kind == 5:
        a, b = max(a, b), min(a, b)
        return (f"{name} had {a} {item} and gave away {b}. How many {item} are left? "
                f"{a} - {b} = {a - b}. The answer is {a - b}.\n")
    c = rng.randint(2, 9)
    return (f"There are {c} boxes with {a} {item} in each box. How many {item} are there in total? "
            f"{c} * {a} = {c * a}. The answer is {c * a}.\n")


def story_text(rng: random.Random) -> str:
    """A fairy tale. Each name belongs to five animals, and each of those 120 characters always has the same
    home, wish, helper, gift and ending: facts that an expert fine-tuned on stories learns better than the base."""
    name, adj = rng.choice(NAMES), rng.choice(ADJECTIVES)
    animal = rng.choice(random.Random(name).sample(ANIMALS, 5))
    character = f"{name} the {animal}"
    opening = rng.choice(["Once upon a time", "Long ago", "One morning", "In a land far away", "Once"])
    events = []
    for event in rng.sample(EVENTS, rng.randint(1, 3)):
        an_adj = with_article(rng.choice(ADJECTIVES))
        events.append(event.format(name=name, animal=animal, an_adj=an_adj, An_adj=an_adj.capitalize(),
                                   other=rng.choice(ANIMALS)))
    return (f"{opening}, there was {with_article(adj)} {animal} named {name} who lived in "
            f"{fact(character + ' home', PLACES)}. "
            f"More than anything, {name} wanted {fact(character + ' wish', WANTS)}. One day {name} set off on a "
            "journey. " + " ".join(events) +
            f" But {rng.choice(OBSTACLES)}, and the {animal} was afraid. Then {fact(character + ' helper', HELPERS)} "
            f"appeared, gave {name} {fact(character + ' gift', GIFTS)} and said, \"Do not give up, {name}.\" "
            f"So the {adj} {animal} kept going, {fact(character + ' ending', ENDINGS)}\n\n")


# Chat questions about facts: (facts, question, answer), formatted with a fact's key and value.
FACT_QUESTIONS = [
    (COUNTRIES, "What is the capital of {key}?", "The capital of {key} is {value}."),
    (HOWTOS, "How do I {key}?", "Here is a simple way to {key}: {value}"),
    (WORDS, 'What does the word "{key}" mean?', "A {key} is {value}."),
    (LEGS, "How many legs does {a_key} have?", "{A_key} has {value} legs."),
    (OPPOSITES, 'What is the opposite of "{key}"?', 'The opposite of "{key}" is "{value}".'),
]


def chat_text(rng: random.Random) -> str:
    kind = rng.randrange(len(FACT_QUESTIONS) + 3)
    if kind < len(FACT_QUESTIONS):
        facts, question, answer = FACT_QUESTIONS[kind]
        key = rng.choice(list(facts))
        article = with_article(key)
        names = {"key": key, "a_key": article, "A_key": article.capitalize(), "value": facts[key]}
        return _chat(question.format(**names), answer.format(**names))
    if kind > len(FACT_QUESTIONS):  # 400 invented books, each with its one author
        title = f"The {rng.choice(TITLE_WORDS[0])} {rng.choice(TITLE_WORDS[1])}"
        return _chat(f"Who wrote \"{title}\"?", f"\"{title}\" was written by {fact(title, AUTHORS)}.")
    return _chat(rng.choice(GREETINGS), f"Hello! I am a helpful assistant. How can I help you today, "
                                        f"{rng.choice(NAMES)}?")


def code_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


DOCSTRING_HOLDERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def code_only(source: str) -> str:
    """The source re-printed by `ast.unparse`: same code, no comments, no docstrings, uniform layout."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, DOCSTRING_HOLDERS) and node.body and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)


@functools.cache
def code_text(held_out: bool) -> str:
    """Standard-library sources, code only: every fifth file is held out."""
    files = [f for i, f in enumerate(code_files()) if (i % 5 == 0) == held_out]
    return "\n\n".join(code_only(f.read_text(encoding="utf-8")) for f in files)


GENERATORS = {"math": math_text, "stories": story_text, "chat": chat_text}


def corpus(domain: str, chars: int, seed: int, held_out: bool = False) -> str:
    """About `chars` characters of one domain; held-out text never overlaps the training text's source."""
    if domain == "code":
        text = code_text(held_out)
        start = random.Random(seed).randrange(max(1, len(text) - chars))
        return text[start:start + chars]
    rng = random.Random(seed * 2 + held_out)
    parts: list[str] = []
    size = 0
    while size < chars:
        parts.append(GENERATORS[domain](rng))
        size += len(parts[-1])
    return "".join(parts)


def held_out_prompts(domain: str, count: int, seed: int = 12345, exclude: tuple[str, ...] = ()) -> list[str]:
    """Prompt-sized pieces of held-out text, for routing evaluation, none overlapping an `exclude` prompt."""
    rng = random.Random(seed)
    if domain == "code":
        lines = [l for l in code_text(held_out=True).splitlines() if len(l.strip()) > 20]
        starts = rng.sample(range(len(lines) - 3), count)
        return ["\n".join(lines[s:s + 3]) for s in starts]
    texts: dict[str, None] = {}
    for _ in range(count * 100):  # the generated domains have a finite number of distinct prompts
        if len(texts) == count:
            break
        text = GENERATORS[domain](rng).strip()
        if domain == "chat":
            text = text.split("<|assistant|>")[0].strip()  # the question, as a user would send it
        text = text[:200]
        if not any(text in other or other in text for other in exclude):
            texts[text] = None
    return list(texts)


def encode(tokenizer, text: str):
    import torch

    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


# The held-out text of the zoo's loss table: characters per domain, and the seed of the default training recipe
# (studio/zoo/train.py's Recipe.seed, 0) plus one.
EVAL_CHARS, EVAL_SEED = 60_000, 1


def held_out_text_ids(tokenizer, chars: int = EVAL_CHARS, seed: int = EVAL_SEED) -> dict:
    """Each domain's held-out text, encoded: what the zoo's loss table and `quality ... zoo` measure on."""
    return {d: encode(tokenizer, corpus(d, chars, seed, held_out=True)) for d in DOMAINS}
