"""Data for every stage: the embedded default world, loaders for your own files, and batching.

The default world
-----------------
A small fictional country generated from a seed with `random.Random` only, so one seed gives
byte-identical text on every machine. Six regions of eight towns with syllable-built names;
each town has a region, a river, a flag colour, a famous food, a population and a mayor.
People have a job, a home town and a pet; items (a copper kettle, the Belwick inn) get reviews.
Every fact is known, so every stage is checked against the truth:

  pretrain_docs   encyclopedia articles (each fact in several paraphrases, the cloze form
                  "The flag of X is Y." at least 10 times), stories, reviews from very negative
                  to very positive, additions with and without worked column steps, and a few
                  question/answer pages in the Instruction/Input/Output layout, as the web has
                  (train questions only; answer style varies by page, so examples pin it down).
  domain_docs     the facts of ONE held-out region, which pretrain_docs never names: domain
                  adaptation must teach them (train text; val text says them in other words).
  fact_cloze      {"prompt": "The flag of Belwick is", "answer": "green"}: what a model recalls.
  task_sets       Alpaca-style tasks (facts, domain_facts, sentiment, addition, review, story)
                  whose train/val/test splits never share a question.
  judges          exact_match, sentiment_score (a lexicon of tagged words), jaccard, bleu, rouge_l.

`python data.py` writes all of it to out/data (a few MB, under a second) and prints a summary.

The template (THE one instruction template of the project)
------------------------------------------------------------
  prompt     = "Instruction: {instruction}\\nInput: {input}\\nOutput:"  (no Input line if input is empty)
  completion = " {output}", then the EOS token id.

Your own data
-------------
read_text (.txt), read_records (.jsonl/.json), load_sft_examples (Alpaca, messages, prompt/completion),
load_preference_pairs (prompt/chosen/rejected, Anthropic HH), load_prompts. Bad input raises
UserError with one line: what, where (path:line), how to fix.
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter, namedtuple
from dataclasses import asdict, dataclass

import numpy as np
import torch


class UserError(Exception):
    """Bad input from the user: the message is one line saying what, where and how to fix."""


# ----------------------------------------------------------------------------- tables of the world

ONSETS = "b br c d dr f g gr h k l m n p r s st t th v w z".split()
VOWELS = "a e i o u a e o".split()
CODAS = ["", "", "l", "n", "r", "s", "m", "nd", "rk"]
MIDS = "l n r s m v d t k nd rt st lv rn ld sk rl nt".split()
ENDINGS = {"town": "mora wick dale ford holm stead mere burg ton by well haven".split(),
           "region": "mark land vale reach moor fell".split(),
           "river": "ine el en ash oss a".split(),
           "first": "a o in el ia en is ar ie ra".split(),
           "surname": "an ick ov ard ey en ont ery ing ell".split()}
COLOURS = "red green blue yellow white black gold purple grey brown pink silver".split()  # all take "a"
FOODS = ["plum cake", "fish soup", "honey bread", "cheese pie", "apple tart", "onion stew", "barley porridge",
         "roast duck", "walnut biscuits", "pear jam", "mushroom pie", "lamb stew", "carrot soup", "spiced sausage",
         "berry pudding", "rye pancakes"]
JOBS = ("baker tailor farmer miller potter weaver fisher blacksmith carpenter painter teacher doctor sailor "
        "builder merchant gardener cook singer shepherd brewer nurse librarian").split()  # all take "a"
PETS = "cat dog goat parrot rabbit tortoise hedgehog pony goose ferret canary lizard donkey hamster".split()
MATERIALS = "copper oak silver wool clay glass iron linen brass leather".split()
OBJECTS = "kettle chair lamp coat bowl clock teapot umbrella bicycle basket".split()
PLACES = "inn market museum bakery library theatre".split()
ASPECTS = ["the price", "the quality", "the design", "the service", "the look", "the smell"]

TOWN_ATTRS = ("region", "river", "flag", "food", "population", "mayor")
PERSON_ATTRS = ("job", "home", "pet")
# Paraphrases of each fact ({s} subject, {a} answer, {A} capitalised answer). The first is the
# canonical cloze form (prompt = the text before " {a}"); the last is kept out of the domain
# training text so that domain_val says the held-out facts in words the model has not read.
PARAPHRASES = {
    "region": ["{s} is a town in the region of {a}.", "{s} belongs to the {a} region.",
               "In the region of {a} lies the town of {s}.", "{A} is the region where {s} can be found."],
    "river": ["{s} lies on the river {a}.", "The river {a} flows through {s}.",
              "{s} was built on the banks of the {a}.", "Boats on the {a} stop at {s}."],
    "flag": ["The flag of {s} is {a}.", "{s}'s flag is {a}.", "{A} is the colour of the flag of {s}.",
             "The people of {s} fly a {a} flag."],
    "food": ["The famous food of {s} is {a}.", "{s} is known for its {a}.", "Visitors to {s} always eat {a}.",
             "{A} is the dish that {s} is famous for."],
    "population": ["The population of {s} is {a}.", "{s} has {a} inhabitants.", "About {a} people live in {s}.",
                   "{A} people call {s} their home."],
    "mayor": ["The mayor of {s} is {a}.", "{A} is the mayor of {s}.", "{s} is led by its mayor, {a}.",
              "The town of {s} elected {a} as mayor."],
    "job": ["{s} works as a {a}.", "{s} is a {a} by trade.", "By trade, {s} is a {a}.",
            "Every day {s} goes to work as a {a}."],
    "home": ["{s} lives in {a}.", "{s}'s home is in {a}.", "{s} is from the town of {a}.",
             "{A} is the town where {s} lives."],
    "pet": ["{s} has a pet {a}.", "{s} keeps a {a} as a pet.", "The pet of {s} is a {a}.",
            "{s} takes care of a pet {a}."],
}
QUESTIONS = {  # two questions per fact: train uses both, val/test only the first
    "region": ["In which region is {s}?", "Which region is {s} part of?"],
    "river": ["Which river flows through {s}?", "On which river does {s} lie?"],
    "flag": ["What colour is the flag of {s}?", "Which colour is the flag of {s}?"],
    "food": ["What is the famous food of {s}?", "Which food is {s} famous for?"],
    "population": ["What is the population of {s}?", "How many people live in {s}?"],
    "mayor": ["Who is the mayor of {s}?", "Who leads {s} as mayor?"],
    "job": ["What is the job of {s}?", "What does {s} work as?"],
    "home": ["Where does {s} live?", "In which town does {s} live?"],
    "pet": ["What pet does {s} have?", "Which animal does {s} keep as a pet?"],
}
TOWN_FILLERS = ["{s} has a market square with an old clock.", "Every spring, {s} holds a festival by the water.",
                "The streets of {s} are narrow and steep.", "Travellers often stop in {s} on their way north.",
                "Most houses in {s} are built of stone.", "{s} has a small school and two bridges."]
PERSON_FILLERS = ["{f} likes to walk by the river in the evening.", "{f} reads a book every week.",
                  "Friends say that {f} tells long stories.", "{f} gets up early every morning."]

# The sentiment lexicon ("tagged words"): graded weights, read by sentiment_score.
ADJ = {2: "excellent wonderful superb perfect delightful brilliant outstanding amazing".split(),
       1: "good nice pleasant fine solid useful clean cosy comfortable reliable".split(),
       -1: "bad dull slow noisy plain awkward cramped flimsy poor dirty".split(),
       -2: "terrible awful horrible dreadful useless disgusting broken miserable".split()}
LEXICON = {**{w: k for k, ws in ADJ.items() for w in ws},
           "loved": 2, "liked": 1, "enjoyed": 1, "recommend": 1, "disliked": -1, "hated": -2}
NEGATORS = {"not", "never", "no", "hardly"}
SENTIMENT_LABELS = ("positive", "negative")
LEVELS = (-2, -1, 0, 1, 2)  # very negative ... very positive
OPENERS = ["{I} is {w}.", "I found {i} {w}.", "Honestly, {i} is {w}.", "{I} turned out {w}."]
ASPECT_LINES = ["{A} is {w}.", "{A} is {w} too.", "Also, {a} is {w}."]
CLOSERS = {2: ["I loved it.", "I would recommend it to anyone."], 1: ["I liked it.", "I would recommend it."],
           -1: ["I disliked it.", "I would not recommend it."],
           -2: ["I hated it.", "I would not recommend it to anyone."]}
REVIEW_PROMPTS = ["Write a review of {i}.", "Write a short review of {i}.", "Review {i}.", "What do you think of {i}?",
                  "Give your opinion of {i}.", "Describe your experience with {i}.", "Share a review of {i}.",
                  "Write a customer review of {i}.", "Write a few words about {i}.", "Tell us how you liked {i}."]
TASK_INSTRUCTIONS = {"facts": "Answer the question about the world.",
                     "sentiment": "Is the sentiment of this review positive or negative?",
                     "addition": "Answer the arithmetic question with a number.",
                     "addition_cot": "Answer the arithmetic question. Add the digits column by column."}
TASKS = ("facts", "domain_facts", "sentiment", "addition", "review", "story")
SPLITS = ("train", "val", "test")
DATA_VERSION = 1  # bump when generation changes, so cached out/data is rewritten

# ----------------------------------------------------------------------------- the world


@dataclass
class Town:
    name: str
    region: str
    river: str
    flag: str
    food: str
    population: int
    mayor: str


@dataclass
class Person:
    name: str
    job: str
    home: str
    pet: str


@dataclass
class World:
    seed: int
    regions: list
    held_out_region: str
    towns: list
    people: list
    items: list


Fact = namedtuple("Fact", "attr subject answer")


def make_world(seed=1337, n_regions=6, towns_per_region=8, n_people=72, n_items=48):
    """The world of `seed`. The last region is held out; the last sixth of the people live there."""
    rng = random.Random(seed)
    used, groups = set(), {}

    def name(kind, group):
        # Within a group no two names share their first three letters (a name's first word-piece
        # tells it apart) or lie one edit apart (Zomora/Zamora); no triple letters, no 4 consonants.
        while True:
            first = rng.choice(ONSETS) + rng.choice(VOWELS)
            if kind == "first":
                coda = rng.choice(["", "l", "n", "r", "s"])
                n = first + coda + rng.choice(ENDINGS["first"] if coda else "ra na la ro lin ren da".split())
            else:  # towns and regions end in a word (-wick, -vale), rivers and surnames in a vowel
                n = first + rng.choice(CODAS if kind in ("town", "region") else MIDS) + rng.choice(ENDINGS[kind])
            n = n.capitalize()
            others = groups.setdefault(group, [])
            if (n.lower() not in used and (group, n[:3].lower()) not in used and not any(near(n, m) for m in others)
                    and not re.search(r"(.)\1\1|[^aeiouy]{4}", n.lower())):
                used.update([n.lower(), (group, n[:3].lower())])
                others.append(n)
                return n

    def person_name():
        return f"{name('first', 'first')} {name('surname', 'surname')}"

    regions = [name("region", "place") for _ in range(n_regions)]
    rivers = {r: [name("river", "place") for _ in range(3)] for r in regions}
    pops = rng.sample(range(12, 990), n_regions * towns_per_region)
    towns = [Town(name("town", "place"), r, rng.choice(rivers[r]), rng.choice(COLOURS), rng.choice(FOODS),
                  pops.pop() * 100, person_name()) for r in regions for _ in range(towns_per_region)]
    held = regions[-1]
    trained = [t for t in towns if t.region != held]
    n_held_people = n_people // 6
    people = [Person(person_name(), rng.choice(JOBS),
                     rng.choice([t for t in towns if (t.region == held) == (i >= n_people - n_held_people)]).name,
                     rng.choice(PETS)) for i in range(n_people)]
    objects = rng.sample([f"the {m} {o}" for m in MATERIALS for o in OBJECTS], n_items * 2 // 3)
    places = [f"the {t.name} {rng.choice(PLACES)}" for t in rng.sample(trained, n_items - len(objects))]
    return World(seed, regions, held, towns, people, objects + places)


def near(a, b):
    """Are a and b one substitution, insertion or deletion apart (or equal)?"""
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) <= 1
    a, b = sorted((a, b), key=len)
    return len(b) == len(a) + 1 and any(b[:i] + b[i + 1:] == a for i in range(len(b)))


def is_held_out(world, entity):
    town = entity if isinstance(entity, Town) else next(t for t in world.towns if t.name == entity.home)
    return town.region == world.held_out_region


def facts(world, held_out=False):
    """Every fact of the trained world (or of the held-out region) as Fact(attr, subject, answer)."""
    out = [Fact(a, t.name, str(getattr(t, a))) for t in world.towns if is_held_out(world, t) == held_out
           for a in TOWN_ATTRS]
    return out + [Fact(a, p.name, getattr(p, a)) for p in world.people if is_held_out(world, p) == held_out
                  for a in PERSON_ATTRS]


def cap(s):
    return s[:1].upper() + s[1:]


def fact_sentence(f, style):
    return PARAPHRASES[f.attr][style].format(s=f.subject, a=f.answer, A=cap(f.answer))


def fact_cloze(world, held_out=False):
    """Cloze prompts, in a seeded shuffled order so that any prefix is a fair sample:
    {"prompt": "The flag of Belwick is", "answer": "green", ...}; the completion is " green"."""
    out = [{"prompt": PARAPHRASES[f.attr][0].split(" {a}")[0].format(s=f.subject), "answer": f.answer,
            "attribute": f.attr, "subject": f.subject} for f in facts(world, held_out)]
    random.Random(f"{world.seed}/cloze").shuffle(out)
    return out


# ----------------------------------------------------------------------------- text generators

def review_text(rng, item, level):
    """A review of `item` at sentiment level -2 (very negative) ... +2 (very positive), built from
    lexicon words so that sentiment_score orders the levels: +2 in [0.8, 0.86], +1 in [0.67, 0.75], 0 -> 0."""
    I, A = cap(item), rng.choice(ASPECTS)
    if level == 0:
        w1, w2 = rng.sample([rng.choice(ADJ[1]), rng.choice(ADJ[-1])], 2)
        return f"{I} is {w1}, but {A} is {w2}."
    s = 1 if level > 0 else -1
    parts = [rng.choice(OPENERS).format(I=I, i=item, w=rng.choice(ADJ[level])),
             rng.choice(ASPECT_LINES).format(A=cap(A), a=A, w=rng.choice(ADJ[s * rng.choice((1, abs(level)))]))]
    if abs(level) == 2 or rng.random() < 0.5:
        parts.append(rng.choice(CLOSERS[level]))
    return " ".join(parts)


def addition_cot(a, b):
    """Worked column addition: "7 + 5 = 12, write 2 carry 1. 4 + 8 + 1 = 13, write 13. The answer is 132." """
    da, db, steps, carry = str(a)[::-1], str(b)[::-1], [], 0
    n = max(len(da), len(db))
    for i in range(n):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lhs = f"{x} + {y}" + (f" + {carry}" if carry else "")
        steps.append(f"{lhs} = {s}, write {s}." if i == n - 1 else
                     f"{lhs} = {s}, write {s % 10}" + (" carry 1." if s >= 10 else "."))
        carry = s // 10
    return " ".join(steps) + f" The answer is {a + b}."


def extract_answer_number(text):
    """The N of the last "The answer is N" (or the whole text if it is a number), else None."""
    found = re.findall(r"answer is\s*(-?\d[\d,]*)", text)
    bare = text.strip().rstrip(".")
    if found or re.fullmatch(r"-?\d[\d,]*", bare):
        return int((found[-1] if found else bare).replace(",", ""))
    return None


def random_pair(rng, excluded=()):
    """Two numbers of 2 or 3 digits whose (unordered) pair is not in `excluded`."""
    while True:
        a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1) for d in rng.choice(((2, 2), (2, 3), (3, 2), (3, 3))))
        if (min(a, b), max(a, b)) not in excluded:
            return a, b


def story(rng, world, people, towns):
    """A 2-3 sentence story, true to the world, and (question, short answer) pairs about it."""
    P, Q = rng.sample(people, 2)
    T = rng.choice([t for t in towns if t.name != P.home])
    item = rng.choice([i for i in world.items if i.islower()])  # objects, not places
    p, q = P.name.split()[0], Q.name.split()[0]
    kind = rng.randrange(3)
    if kind == 0:
        text = (f"{P.name} travelled from {P.home} to {T.name} with {item}. In {T.name}, {p} met {Q.name}, "
                f"a {Q.job}. {q} gave {p} some {T.food}.")
        qas = [(f"Where did {p} travel to?", T.name), (f"Who did {p} meet in {T.name}?", Q.name),
               (f"What did {p} bring?", item), (f"What did {q} give {p}?", T.food)]
    elif kind == 1:
        text = (f"{P.name} lost {item} on the bank of the {T.river} near {T.name}. The next morning "
                f"{Q.name}'s {Q.pet} found it. {p} thanked {q} with a {T.flag} scarf.")
        qas = [(f"What did {p} lose?", item), (f"Which animal found {item}?", Q.pet),
               ("What colour was the scarf?", T.flag), (f"Near which town did {p} lose {item}?", T.name)]
    else:
        food = rng.choice(FOODS)
        text = (f"{P.name} and {Q.name} went to the market in {T.name}. {p} bought {item} and {q} bought "
                f"{food}. They walked home along the {T.river}.")
        qas = [(f"What did {p} buy?", item), (f"What did {q} buy?", food), ("Where was the market?", T.name),
               ("Along which river did they walk home?", T.river)]
    return text, qas


def town_article(rng, world, t, k, styles, extras=True):
    """One article about town t, the k-th about it. Each fact is said once; with styles starting at 0
    it is the canonical form in 2 of every 3 articles (so >= 10 times in 15 rounds), else a paraphrase."""
    sents = [fact_sentence(Fact(a, t.name, str(getattr(t, a))),
                           0 if styles[0] == 0 and (k + j) % 3 else rng.choice(styles[1:] or styles))
             for j, a in enumerate(TOWN_ATTRS)]
    rng.shuffle(sents)
    if not extras:
        return " ".join(sents)
    sents.insert(rng.randrange(len(sents) + 1), rng.choice(TOWN_FILLERS).format(s=t.name))
    text = " ".join(sents)
    if rng.random() < 0.3:
        text += (f"\nQuick facts about {t.name}: region {t.region}; river {t.river}; flag {t.flag}; food {t.food}; "
                 f"population {t.population}; mayor {t.mayor}.")
    return f"{t.name}\n{text}" if rng.random() < 0.5 else text


def person_article(rng, world, p, k, styles, extras=True):
    sents = [fact_sentence(Fact(a, p.name, getattr(p, a)),
                           0 if styles[0] == 0 and (k + j) % 3 else rng.choice(styles[1:] or styles))
             for j, a in enumerate(PERSON_ATTRS)]
    rng.shuffle(sents)
    if not extras:
        return " ".join(sents)
    f, t = p.name.split()[0], next(t for t in world.towns if t.name == p.home)
    sents += [rng.choice(PERSON_FILLERS).format(f=f),
              rng.choice([f"{f}'s home town, {t.name}, flies a {t.flag} flag.", f"{f} knows {t.mayor}, the mayor of "
                          f"{t.name}.", f"In {t.name}, {f} often eats {t.food}, the famous food of the town."])]
    return f"{p.name}\n{' '.join(sents)}" if rng.random() < 0.4 else " ".join(sents)


def region_article(rng, world, region):
    towns = [t for t in world.towns if t.region == region]
    names = [t.name for t in towns]
    rivers = sorted({t.river for t in towns})
    rng.shuffle(names)
    return (f"The region of {region}\nThe region of {region} has {len(names)} towns: {', '.join(names[:-1])} and "
            f"{names[-1]}. Its rivers are the {', the '.join(rivers)}. " +
            " ".join(fact_sentence(Fact("region", n, region), 0) for n in names))


def entity_rounds(rng, entities, make, budget, min_rounds=15):
    """Articles about every entity in rounds until `budget` characters (and at least min_rounds)."""
    docs, size, k = [], 0, 0
    while k < min_rounds or size < budget:
        for e in entities:
            docs.append(make(rng, e, k))
            size += len(docs[-1])
        k += 1
    return docs


def fill(rng, make, budget):
    docs, size = [], 0
    while size < budget:
        docs.append(make(rng))
        size += len(docs[-1])
    return docs


def held_out_questions(tasks):
    """What pretraining text must never contain: the val/test inputs and texts of every task."""
    ex = [e for t in tasks.values() for s in ("val", "test") for e in t[s]]
    pairs = {tuple(sorted(map(int, re.findall(r"\d+", e["input"])))) for e in tasks["addition"]["val"] +
             tasks["addition"]["test"]}
    return {e["input"] for e in ex} | {e["output"] for e in ex}, pairs


def pretrain_docs(world, size_chars=1_500_000):
    """The pre-training mixture as a list of documents (no blank lines inside one; the stage puts EOS
    between them), shuffled. Never names the held-out region, its towns, people or rivers."""
    rng = random.Random(f"{world.seed}/pretrain")
    tasks = task_sets(world)
    excluded, excluded_pairs = held_out_questions(tasks)
    towns = [t for t in world.towns if not is_held_out(world, t)]
    people = [p for p in world.people if not is_held_out(world, p)]
    styles = [0, 1, 2, 3]
    share = {"town": 0.27, "person": 0.18, "region": 0.03, "story": 0.14, "review": 0.14, "arith": 0.19, "qa": 0.05}
    budget = {k: v * size_chars for k, v in share.items()}

    def fresh(make):  # redraw anything that is a val/test question or text
        while (x := make()) in excluded:
            pass
        return x

    def stories(rng):
        return " ".join(fresh(lambda: story(rng, world, people, towns)[0]) for _ in range(rng.randint(1, 3)))

    def reviews(rng):
        item, lines = rng.choice(world.items), []
        for _ in range(rng.randint(1, 4)):
            level, P = rng.choice(LEVELS), rng.choice(people)
            text = fresh(lambda: review_text(rng, item, level))
            lines.append(f"{P.name} from {P.home}: {text} ({level + 3} out of 5)")
        return f"Reviews of {item}\n" + "\n".join(lines)

    def arithmetic(rng):
        lines = [rng.choice(["Addition practice", "Sums", "Adding numbers column by column"])]
        for _ in range(rng.randint(4, 10)):
            a, b = random_pair(rng, excluded_pairs)
            lines.append(rng.choice([f"{a} + {b} = {a + b}.", f"What is {a} + {b}? {addition_cot(a, b)}",
                                     f"{a} + {b}: {addition_cot(a, b)}"]))
        return "\n".join(lines)

    train_facts = [f for f in facts(world) if QUESTIONS[f.attr][0].format(s=f.subject) not in excluded]

    def qa_page(rng):
        # Several Q/A blocks of one task, train questions only. As on the web, the answer style
        # varies from page to page (40% short answers, the rest sentences or worked steps) but
        # not within one: a zero-shot prompt leaves the format open, k examples pin it down.
        kind = rng.choice(("facts", "facts", "sentiment", "addition"))
        n, short = rng.randint(3, 8), rng.random() < 0.4
        if kind == "facts":
            exs = [example(TASK_INSTRUCTIONS["facts"], QUESTIONS[f.attr][rng.randrange(2)].format(s=f.subject),
                           f.answer if short else fact_sentence(f, 0)) for f in rng.sample(train_facts, n)]
        elif kind == "sentiment":
            exs = [sentiment_example(fresh(lambda: review_text(rng, rng.choice(world.items), lv)), lv)
                   for lv in (rng.choice((-2, -1, 1, 2)) for _ in range(n))]
            exs = [e if short else {**e, "output": f"The review is {e['output']}."} for e in exs]
        else:
            cot = not short and rng.random() < 0.5
            exs = [addition_example(*random_pair(rng, excluded_pairs)) for _ in range(n)]
            exs = [e if short else {**e, "instruction": TASK_INSTRUCTIONS["addition_cot"], "output": e["cot"]} if cot
                   else {**e, "output": f"The answer is {e['output']}."} for e in exs]
        if rng.random() < 0.5:  # the guide's k-shot layout: one instruction, then Input/Output pairs
            return f"Instruction: {exs[0]['instruction']}\n" + "\n".join(
                f"Input: {e['input']}\nOutput: {e['output']}" for e in exs)
        return "\n".join(format_prompt(e["instruction"], e["input"]) + format_completion(e["output"]) for e in exs)

    regions = [r for r in world.regions if r != world.held_out_region]
    docs = (entity_rounds(rng, towns, lambda r, t, k: town_article(r, world, t, k, styles), budget["town"]) +
            entity_rounds(rng, people, lambda r, p, k: person_article(r, world, p, k, styles), budget["person"]) +
            entity_rounds(rng, regions, lambda r, g, k: region_article(r, world, g), budget["region"], 1) +
            fill(rng, stories, budget["story"]) + fill(rng, reviews, budget["review"]) +
            fill(rng, arithmetic, budget["arith"]) + fill(rng, qa_page, budget["qa"]))
    rng.shuffle(docs)
    return docs


def pretrain_text(world, size_chars=1_500_000):
    return "\n\n".join(pretrain_docs(world, size_chars))


def domain_docs(world, size_chars=150_000):
    """(train_docs, val_docs) about the held-out region only. Train uses the canonical form and two
    paraphrases per fact; val says every fact once in the remaining paraphrase, so no val sentence
    occurs in train (a drop in val loss means the facts were learnt, not the sentences)."""
    rng = random.Random(f"{world.seed}/domain")
    towns = [t for t in world.towns if is_held_out(world, t)]
    people = [p for p in world.people if is_held_out(world, p)]
    train = (entity_rounds(rng, towns, lambda r, t, k: town_article(r, world, t, k, [0, 1, 2]), 0.55 * size_chars) +
             entity_rounds(rng, people, lambda r, p, k: person_article(r, world, p, k, [0, 1, 2]), 0.3 * size_chars) +
             [region_article(rng, world, world.held_out_region)] +
             fill(rng, lambda r: story(r, world, people, towns)[0], 0.15 * size_chars))
    rng.shuffle(train)
    val = [town_article(rng, world, t, 0, [3], extras=False) for t in towns] + \
          [person_article(rng, world, p, 0, [3], extras=False) for p in people]
    return train, val


# ----------------------------------------------------------------------------- task sets

def example(instruction, input, output, **extra):
    return {"instruction": instruction, "input": input, "output": output, **extra}


def sentiment_example(review, level):
    return example(TASK_INSTRUCTIONS["sentiment"], review, "positive" if level > 0 else "negative")


def addition_example(a, b):
    return example(TASK_INSTRUCTIONS["addition"], f"What is {a} + {b}?", str(a + b), cot=addition_cot(a, b))


def split3(xs, n_test, n_val):
    return {"train": xs[n_test + n_val:], "val": xs[n_test:n_test + n_val], "test": xs[:n_test]}


def unique(rng, make, n, key=lambda x: x[0]):
    """n results of make(rng) with distinct keys, in the order drawn."""
    out = {}
    while len(out) < n:
        x = make(rng)
        out.setdefault(key(x), x)
    return list(out.values())


def task_sets(world):
    """{task: {"train"|"val"|"test": [{"instruction", "input", "output", ...}]}}. Splits never share a
    question: facts are split by fact, additions by (unordered) pair, reviews by text, review prompts by
    prompt, stories by story (all questions of one story stay in one split)."""
    rng = random.Random(f"{world.seed}/tasks")
    tasks = {}
    for task, held, n_test, n_val in (("facts", False, 120, 60), ("domain_facts", True, 30, 12)):
        fs = facts(world, held)
        rng.shuffle(fs)
        ask = lambda f, q: example(TASK_INSTRUCTIONS["facts"], QUESTIONS[f.attr][q].format(s=f.subject), f.answer)
        s = split3(fs, n_test, n_val)
        tasks[task] = {"train": [ask(f, q) for f in s["train"] for q in (0, 1)],
                       "val": [ask(f, 0) for f in s["val"]], "test": [ask(f, 0) for f in s["test"]]}
    reviews = unique(rng, lambda r: (lambda lv: (review_text(r, r.choice(world.items), lv), lv))(
        r.choice((-2, -1, 1, 2))), 1100)
    tasks["sentiment"] = split3([sentiment_example(t, lv) for t, lv in reviews], 200, 100)
    pairs = unique(rng, lambda r: tuple(sorted(random_pair(r))), 1300, key=lambda x: x)
    tasks["addition"] = split3([addition_example(*(p if rng.random() < 0.5 else p[::-1])) for p in pairs], 200, 100)
    prompts = [(p.format(i=i), i) for i in world.items for p in REVIEW_PROMPTS]
    rng.shuffle(prompts)
    s = split3(prompts, 64, 64)

    def write(prompt, item, level):
        text = review_text(rng, item, level)
        return example(prompt, "", text, score=sentiment_score(text))
    tasks["review"] = {"train": [write(p, i, lv) for p, i in s["train"] for lv in rng.sample(LEVELS, 2)],
                       "val": [write(p, i, rng.choice(LEVELS)) for p, i in s["val"]],
                       "test": [write(p, i, rng.choice(LEVELS)) for p, i in s["test"]]}
    towns = [t for t in world.towns if not is_held_out(world, t)]
    people = [p for p in world.people if not is_held_out(world, p)]
    stories = unique(rng, lambda r: story(r, world, people, towns), 230)
    s = split3(stories, 40, 27)
    tasks["story"] = {k: [example(q, text, a) for text, qas in v for q, a in qas] for k, v in s.items()}
    return tasks


# ----------------------------------------------------------------------------- the template

def format_prompt(instruction, input=""):
    """THE instruction template: "Instruction: {instruction}\\nInput: {input}\\nOutput:" (no Input line if empty)."""
    return f"Instruction: {instruction}\nInput: {input}\nOutput:" if input else f"Instruction: {instruction}\nOutput:"


def format_completion(output):
    return " " + output


def render_messages(messages, where="messages"):
    """Chat messages -> (prompt, completion) in the one template. System messages, then the last user
    turn, form the Instruction; earlier turns become the Input, one "User: ..." / "Assistant: ..." line
    each; a final assistant turn is the completion (" " + content), else the completion is ""."""
    ok = lambda m: isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and \
        isinstance(m.get("content"), str)
    if not isinstance(messages, list) or not messages or not all(map(ok, messages)):
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\": system|user|assistant, "
                        f"\"content\": text}}")
    completion = ""
    if messages[-1]["role"] == "assistant":
        completion, messages = format_completion(messages[-1]["content"]), messages[:-1]
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise UserError(f"{where}: the turn before the answer must be a user message")
    instruction = " ".join([m["content"] for m in messages if m["role"] == "system"] + [turns[-1]["content"]])
    history = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns[:-1])
    return format_prompt(instruction, history), completion


# ----------------------------------------------------------------------------- gold judges

def words(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())


def sentiment_score(text):
    """Lexicon sentiment in (-1, 1): S = sum_i s_i * w(word_i), score = S / (|S| + 1), with w the LEXICON
    weight (0 if absent) and s_i = -1 if the previous word is a negator ("not recommend" = -1), else +1.
    Monotone in S: every extra positive word raises the score, so reward hacking shows."""
    ws = re.findall(r"[a-z']+", text.lower())
    S = sum(LEXICON.get(w, 0) * (-1 if i and ws[i - 1] in NEGATORS else 1) for i, w in enumerate(ws))
    return S / (abs(S) + 1)


def normalize(text):
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(prediction, reference):
    """1.0 if the answers are equal after strip, lowercase, trailing period removed; else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def jaccard(a, b):
    """|A ∩ B| / |A ∪ B| over the sets of lowercase words (1.0 if both are empty)."""
    A, B = set(re.findall(r"\w+", a.lower())), set(re.findall(r"\w+", b.lower()))
    return len(A & B) / len(A | B) if A | B else 1.0


def bleu(candidate, reference, max_n=4):
    """Sentence BLEU = BP * exp(1/N sum_n log p_n), N = max_n, p_n = clipped n-gram precision:
    p_n = sum_g min(count_cand(g), count_ref(g)) / (number of candidate n-grams). Add-one smoothing for
    n > 1 (p_n = (m_n + 1) / (c_n + 1), Lin & Och 2004) so one missing 4-gram does not zero the score;
    p_1 is not smoothed (no word in common -> 0). BP = 1 if c > r else exp(1 - r/c), c, r = lengths."""
    c, r = words(candidate), words(reference)
    if not c:
        return 0.0
    logp = 0.0
    for n in range(1, max_n + 1):
        cand, ref = Counter(zip(*[c[i:] for i in range(n)])), Counter(zip(*[r[i:] for i in range(n)]))
        m, total = sum(min(k, ref[g]) for g, k in cand.items()), sum(cand.values())
        if n == 1 and m == 0:
            return 0.0
        logp += math.log(m / total if n == 1 else (m + 1) / (total + 1))
    bp = 1.0 if len(c) > len(r) else math.exp(1 - len(r) / len(c))
    return bp * math.exp(logp / max_n)


def rouge_l(candidate, reference):
    """ROUGE-L F1 (beta = 1): L = |LCS(c, r)| over words, P = L/|c|, R = L/|r|, F = 2PR / (P + R)."""
    c, r = words(candidate), words(reference)
    prev = [0] * (len(r) + 1)
    for x in c:  # LCS by dynamic programming, one row at a time
        row = [0]
        for j, y in enumerate(r):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    L = prev[-1]
    return 0.0 if L == 0 else 2 * (L / len(c)) * (L / len(r)) / (L / len(c) + L / len(r))


# ----------------------------------------------------------------------------- loaders for your own files

def read_utf8(path):
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found; check the path")
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at offset "
                        f"{e.start}); re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if not text.strip():
        raise UserError(f"{path}: the file is empty; put text in it or leave it out")
    return text


def read_text(paths, split_blank_lines=False):
    """Plain-text documents: each .txt file (or each .txt in a given directory) is one document, or,
    with split_blank_lines, every run of text between blank lines is one."""
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    if not paths:
        raise UserError("no text files given; name one or more .txt files")
    docs = []
    for p in paths:
        files = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".txt")) if os.path.isdir(p) else [p]
        if not files:
            raise UserError(f"{p}: the directory has no .txt files")
        for f in files:
            text = read_utf8(f).strip()
            docs += [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()] if split_blank_lines else [text]
    return docs


def records_with_lines(path):
    """[(where, record)]: where = "path:line" of the record, for error messages."""
    text = read_utf8(path)
    out = []
    if path.endswith(".jsonl"):
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    out.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: malformed JSON ({e.msg}, column {e.colno}); "
                                    f"each line must be one JSON object") from None
    elif path.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: a .json file must hold a list of objects; for one object per line use .jsonl")
        pos, line, dec = text.index("[") + 1, 1, json.JSONDecoder()
        for item in items:  # walk the array again to know each item's line
            start = pos
            while text[pos] in " \t\n\r,":
                pos += 1
            line += text.count("\n", start, pos)
            out.append((f"{path}:{line}", item))
            end = dec.raw_decode(text, pos)[1]
            line, pos = line + text.count("\n", pos, end), end
    else:
        raise UserError(f"{path}: unknown data format; use .jsonl (one JSON object per line) or .json (a list)")
    for where, r in out:
        if not isinstance(r, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(r).__name__}")
    if not out:
        raise UserError(f"{path}: no records found")
    return out


def read_records(path):
    """Records of a .jsonl (one object per line, blank lines skipped) or .json (a list of objects) file."""
    return [r for _, r in records_with_lines(path)]


def field(r, key, where, optional=False):
    v = r.get(key)
    if v is None and optional:
        return ""
    if v is None:
        raise UserError(f"{where}: missing field '{key}' (the record has {', '.join(sorted(r)) or 'no fields'})")
    if not isinstance(v, str):
        raise UserError(f"{where}: field '{key}' must be a string, not {type(v).__name__}")
    if not optional and not v.strip():
        raise UserError(f"{where}: field '{key}' is empty; fill it or drop the record")
    return v


def load_sft_examples(path, with_where=False):
    """[(prompt, completion)] from Alpaca records (instruction, optional input, output), chat records
    ("messages", rendered by render_messages) or raw prompt/completion records (used verbatim).
    with_where=True gives (prompt, completion, "path:line") so later errors can name the record."""
    out = []
    for where, r in records_with_lines(path):
        if "messages" in r:
            prompt, completion = render_messages(r["messages"], where)
            if not completion.strip():
                raise UserError(f"{where}: the last message must be a non-empty assistant answer")
        elif "instruction" in r or "output" in r:
            prompt = format_prompt(field(r, "instruction", where), field(r, "input", where, optional=True))
            completion = format_completion(field(r, "output", where))
        elif "prompt" in r and "completion" in r:
            prompt, completion = field(r, "prompt", where), field(r, "completion", where)
        else:
            raise UserError(f"{where}: needs 'instruction' and 'output' (Alpaca), 'messages' (chat) or 'prompt' and "
                            f"'completion'; found {', '.join(sorted(r)) or 'no fields'}")
        out.append((prompt, completion, where) if with_where else (prompt, completion))
    return out


def split_hh(chosen, rejected, where):
    """Anthropic-HH pairs embed the prompt in both texts: it ends at the last "\\n\\nAssistant:" of their
    common prefix; what follows is each answer."""
    cut = os.path.commonprefix([chosen, rejected]).rfind("\n\nAssistant:")
    if cut < 0:
        raise UserError(f"{where}: no 'prompt' field and no shared '\\n\\nAssistant:' turn in chosen and rejected; "
                        f"add a 'prompt' field")
    cut += len("\n\nAssistant:")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def load_preference_pairs(path):
    """[{"prompt", "chosen", "rejected"[, "score_chosen", "score_rejected"]}] from prompt/chosen/rejected
    records, Anthropic-HH records (chosen/rejected only, prompt embedded) or chosen/rejected as
    message lists (the prompt is the rendering of the shared turns)."""
    out = []
    for where, r in records_with_lines(path):
        if isinstance(r.get("chosen"), list) and isinstance(r.get("rejected"), list):
            (prompt, chosen), (prompt_r, rejected) = (render_messages(r[k], where) for k in ("chosen", "rejected"))
            if prompt != prompt_r:
                raise UserError(f"{where}: chosen and rejected conversations differ before the last answer")
        elif "prompt" in r:
            prompt, chosen, rejected = (field(r, k, where) for k in ("prompt", "chosen", "rejected"))
        else:
            prompt, chosen, rejected = split_hh(field(r, "chosen", where), field(r, "rejected", where), where)
        if not chosen.strip() or not rejected.strip():
            raise UserError(f"{where}: chosen and rejected answers must both be non-empty")
        if chosen == rejected:
            raise UserError(f"{where}: chosen and rejected are identical; a pair needs two different answers")
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        for k in ("score_chosen", "score_rejected"):
            if k in r:
                if isinstance(r[k], bool) or not isinstance(r[k], (int, float)):
                    raise UserError(f"{where}: '{k}' must be a number")
                pair[k] = float(r[k])
        out.append(pair)
    return out


def load_prompts(path):
    """Prompts from records with 'prompt', Alpaca fields (-> format_prompt) or 'messages' (-> render_messages)."""
    out = []
    for where, r in records_with_lines(path):
        if "prompt" in r:
            out.append(field(r, "prompt", where))
        elif "messages" in r:
            out.append(render_messages(r["messages"], where)[0])
        elif "instruction" in r:
            out.append(format_prompt(field(r, "instruction", where), field(r, "input", where, optional=True)))
        else:
            raise UserError(f"{where}: needs a 'prompt', an 'instruction' or 'messages'")
    return out


# ----------------------------------------------------------------------------- tokens and batches

def encode_example(enc, prompt, completion, block_size, where="example"):
    """(prompt_ids, completion_ids + [EOS]); special-token strings in the text stay plain text."""
    p, c = enc.encode_ordinary(prompt), enc.encode_ordinary(completion) + [enc.eot_token]
    if not p:
        raise UserError(f"{where}: the prompt is empty; every example needs a prompt")
    if len(p) + len(c) > block_size:
        raise UserError(f"{where}: prompt + completion is {len(p) + len(c)} tokens, longer than the context of "
                        f"{block_size}; shorten it, drop it, or use a model with a longer context")
    return p, c


def completion_batch(prompts, completions, pad_id, side="right"):
    """Pad prompt+completion rows into one batch. targets[b, t] = input_ids[b, t+1] where token t+1 is a
    completion token, else -1 (prompt, padding, last position), so the sum of token log-probs of a row is
    log pi(y | x). position_ids = cumsum(mask) - 1 (clamped at 0): left padding changes nothing."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    targets = torch.full((B, T), -1, dtype=torch.long)
    last = torch.zeros(B, dtype=torch.long)
    for b, (row, p) in enumerate(zip(rows, prompts)):
        o = T - len(row) if side == "left" else 0
        ids[b, o:o + len(row)] = torch.tensor(row)
        mask[b, o:o + len(row)] = True
        targets[b, o + len(p) - 1:o + len(row) - 1] = ids[b, o + len(p):o + len(row)]
        last[b] = o + len(row) - 1
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "targets": targets,
            "last_index": last}


def atomic_write(path, data):
    """Write str or bytes to a temporary file, then rename it: readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    os.replace(tmp, path)


def tokenize_corpus(docs, enc, path, fingerprint=None):
    """Encode documents as one flat token array EOS d1 EOS d2 ... dn EOS, cached at `path` (uint16, or
    uint32 for vocabularies over 65536 ids) with `path`.json holding its meta; a cache whose text hash,
    vocabulary size and tokenizer fingerprint match is reused. Returns a read-only np.memmap."""
    docs = [docs] if isinstance(docs, str) else docs
    meta = {"sha256": hashlib.sha256("\x00".join(docs).encode()).hexdigest(), "n_docs": len(docs),
            "n_vocab": enc.n_vocab, "fingerprint": fingerprint or f"{enc.name}:{enc.n_vocab}",
            "dtype": "uint16" if enc.n_vocab <= 65536 else "uint32"}
    try:
        old = json.load(open(path + ".json"))
        size = old["count"] * np.dtype(meta["dtype"]).itemsize
        if {k: old.get(k) for k in meta} == meta and os.path.getsize(path) == size:
            return load_tokens(path)
    except (OSError, ValueError, KeyError):
        pass
    eos = enc.eot_token
    ids = [eos]
    for d in enc.encode_ordinary_batch(docs):
        ids += d + [eos]
    if len(ids) <= 1:
        raise UserError(f"{path}: nothing to tokenize; the documents are empty")
    atomic_write(path, np.array(ids, dtype=meta["dtype"]).tobytes())
    atomic_write(path + ".json", json.dumps({**meta, "count": len(ids)}))
    return load_tokens(path)


def load_tokens(path):
    try:
        meta = json.load(open(path + ".json"))
        return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["count"],))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: no readable token cache ({e}); make it with data.tokenize_corpus") from None


def get_batch(tokens, batch_size, block_size, seed, step, micro):
    """Random windows x = tokens[i:i+T], y = tokens[i+1:i+T+1], i drawn from default_rng([seed, step, micro]):
    a pure function of its arguments, so --resume and every DDP rank/micro-step are exact."""
    n = len(tokens)
    if n <= block_size:
        raise UserError(f"only {n} tokens of data, need more than block_size={block_size}; "
                        f"add text or lower --block-size")
    ix = np.random.default_rng([seed, step, micro]).integers(0, n - block_size, size=batch_size)
    x = np.stack([np.asarray(tokens[i:i + block_size], dtype=np.int64) for i in ix])
    y = np.stack([np.asarray(tokens[i + 1:i + 1 + block_size], dtype=np.int64) for i in ix])
    return torch.from_numpy(x), torch.from_numpy(y)


def step_indices(n, batch, seed, step):
    """Indices of the examples in optimizer step `step`'s batch: consecutive slices of one shuffled
    permutation per epoch (default_rng([seed, epoch])). A pure function of its arguments, so --resume
    continues with the very same batches. SFT, reward and DPO all draw their batches with it."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    return np.random.default_rng([seed, epoch]).permutation(n)[k * batch:(k + 1) * batch].tolist()


# ----------------------------------------------------------------------------- files of the default world

def split_documents(docs, val_fraction=0.05):
    """-> (train, val): the last val_fraction of the documents (at least one) are held out; a single
    document is cut at 1 - val_fraction of its length. Pre-training, SFT's forgetting check and the
    report all use this split, so "validation loss on pre-training text" means one thing."""
    if not docs:
        raise UserError("no documents to split")
    if len(docs) < 2:
        cut = int(len(docs[0]) * (1 - val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    n_val = max(1, int(len(docs) * val_fraction))
    return docs[:-n_val], docs[-n_val:]


def default_data_paths(out_dir="out/data"):
    names = {"corpus": "corpus.txt", "domain_train": "domain_train.txt", "domain_val": "domain_val.txt",
             "cloze": "cloze.jsonl", "domain_cloze": "domain_cloze.jsonl", "world": "world.json"}
    names.update({f"{t}_{s}": f"tasks/{t}_{s}.jsonl" for t in TASKS for s in SPLITS})
    return {k: os.path.join(out_dir, v) for k, v in names.items()}


def jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_default_data(out_dir="out/data", seed=1337, force=False):
    """Write the default world's files to out_dir (skipped when world.json records the same seed and
    version and every file is there). Documents in the .txt files are separated by one blank line."""
    paths = default_data_paths(out_dir)
    try:
        meta = json.load(open(paths["world"]))
        same = (meta["seed"], meta["version"]) == (seed, DATA_VERSION)
        if same and not force and all(map(os.path.exists, paths.values())):
            return paths
    except (OSError, ValueError, KeyError):
        pass
    world = make_world(seed)
    train, val = domain_docs(world)
    atomic_write(paths["corpus"], pretrain_text(world) + "\n")
    atomic_write(paths["domain_train"], "\n\n".join(train) + "\n")
    atomic_write(paths["domain_val"], "\n\n".join(val) + "\n")
    atomic_write(paths["cloze"], jsonl(fact_cloze(world)))
    atomic_write(paths["domain_cloze"], jsonl(fact_cloze(world, held_out=True)))
    for task, splits in task_sets(world).items():
        for split, rows in splits.items():
            atomic_write(paths[f"{task}_{split}"], jsonl(rows))
    atomic_write(paths["world"], json.dumps({"seed": seed, "version": DATA_VERSION, **asdict(world)}, indent=1))  # last
    return paths


def ensure_default_data(out_dir="out/data", seed=1337):
    """The paths of the default world's files, writing them first if they are missing or stale."""
    return write_default_data(out_dir, seed)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the default world's data files and print a summary.")
    p.add_argument("--out", default="out/data")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--force", action="store_true", help="rewrite even if the files are there")
    args = p.parse_args(argv)
    t0 = time.time()
    paths = write_default_data(args.out, args.seed, args.force)
    world = json.load(open(paths["world"]))
    print(f"world (seed {args.seed}): {len(world['regions'])} regions, {len(world['towns'])} towns, "
          f"{len(world['people'])} people, {len(world['items'])} items; held-out region {world['held_out_region']}")
    for k, path in paths.items():
        text = open(path, encoding="utf-8").read()
        count = len(text.splitlines()) if path.endswith(".jsonl") else len(text.split("\n\n"))
        count = f"{count:,} records" if path.endswith(".jsonl") else f"{count:,} docs"
        print(f"  {path:<40} {len(text):>10,} chars  {count}")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
