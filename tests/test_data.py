"""data.py: the default world (determinism, held-out region, splits, facts in the corpus), the gold
judges on hand-worked examples, the loaders on small bad files, batching and token caches."""
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import tiktoken
import torch

import data
import evals
import world
from common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def w():
    return world.make_world(1337)


@pytest.fixture(scope="module")
def docs(w):
    return world.pretrain_docs(w)


@pytest.fixture(scope="module")
def corpus(docs):
    return "\n\n".join(docs)


@pytest.fixture(scope="module")
def tasks(w):
    return world.task_sets(w)


def byte_enc():
    """A byte-level tiktoken Encoding with EOS and PAD, independent of tokenizer.py."""
    return tiktoken.Encoding("bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256, "<|pad|>": 257})


def digest(w):
    return hashlib.sha256((world.pretrain_text(w) + json.dumps(world.task_sets(w)) +
                           json.dumps(world.domain_docs(w))).encode()).hexdigest()


# ----------------------------------------------------------------------------- the world

def test_world_is_byte_identical_for_a_seed_and_differs_for_another(w):
    h = digest(w)
    assert asdict(world.make_world(1337)) == asdict(w)
    assert digest(world.make_world(1337)) == h
    assert digest(world.make_world(1338)) != h
    # another process with another hash seed (set iteration order) gives the same bytes
    code = "import world, tests.test_data as t; print(t.digest(world.make_world(1337)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": ROOT}, check=True)
    assert out.stdout.strip() == h


def test_world_shape_and_names(w):
    assert len(w.regions) == 6 and len(w.towns) == 48 and len(w.people) == 72 and len(w.items) == 48
    assert w.held_out_region in w.regions
    places = w.regions + [t.name for t in w.towns] + sorted({t.river for t in w.towns})
    firsts = [p.name.split()[0] for p in w.people] + [t.mayor.split()[0] for t in w.towns]
    for group in (places, firsts):
        assert len({n[:3] for n in group}) == len(group)  # distinct first three letters
        assert not any(world.near(a, b) for i, a in enumerate(group) for b in group[i + 1:])
    held_people = [p for p in w.people if world.is_held_out(w, p)]
    assert len(held_people) == 12 and len(world.facts(w)) == 40 * 6 + 60 * 3


def test_near():
    assert world.near("Zomora", "Zamora") and world.near("Wahaven", "Wanhaven") and world.near("abc", "ab")
    assert not world.near("Zomora", "Zamorb") and not world.near("abc", "abcde")


def test_docs_have_no_blank_lines_and_the_right_size(docs, corpus):
    assert not any("\n\n" in d or not d.strip() for d in docs)
    assert 1_400_000 < len(corpus) < 1_700_000
    qa = sum(len(d) for d in docs if d.startswith("Instruction:"))
    assert 0.03 < qa / len(corpus) < 0.08  # about 5% question/answer pages


def test_every_cloze_fact_is_in_the_corpus_at_least_ten_times(w, corpus):
    cloze = world.fact_cloze(w)
    assert len(cloze) == 420 and len({c["prompt"] for c in cloze}) == 420
    for c in cloze:
        assert corpus.count(f"{c['prompt']} {c['answer']}.") >= 10, c
    assert world.fact_cloze(w)[0] == cloze[0]
    flag = next(c for c in cloze if c["attribute"] == "flag")
    assert flag["prompt"] == f"The flag of {flag['subject']} is" and flag["answer"] in world.COLOURS


def test_held_out_region_never_appears_in_pretraining(w, corpus):
    held_towns = [t for t in w.towns if t.region == w.held_out_region]
    names = ([w.held_out_region] + [t.name for t in held_towns] + [t.mayor for t in held_towns] +
             [t.river for t in held_towns] + [p.name for p in w.people if world.is_held_out(w, p)])
    assert len(names) > 30
    corpus_words = set(re.findall(r"\w+", corpus))
    for n in names:
        assert not set(n.split()) & corpus_words, n  # not even a first name or a surname


def test_domain_docs_teach_the_held_out_facts_and_val_is_other_sentences(w):
    train, val = world.domain_docs(w)
    text = "\n\n".join(train)
    cloze = world.fact_cloze(w, held_out=True)
    assert len(cloze) == 8 * 6 + 12 * 3
    for c in cloze:
        assert text.count(f"{c['prompt']} {c['answer']}.") >= 10, c
        assert any(c["subject"] in v and c["answer"].lower() in v.lower() for v in val)
    for v in val:
        for sentence in re.split(r"(?<=\.) ", v):
            assert sentence not in text, sentence
    trained = {t.name for t in w.towns if t.region != w.held_out_region}
    assert not any(re.search(rf"\b{n}\b", text) for n in trained)


# ----------------------------------------------------------------------------- task sets

def question_keys(examples):
    return {(e["instruction"], e["input"]) for e in examples}


def fact_of(question):
    for attr, qs in world.QUESTIONS.items():
        for q in qs:
            m = re.fullmatch(re.escape(q).replace(re.escape("{s}"), "(.+)"), question)
            if m:
                return attr, m.group(1)
    raise AssertionError(question)


def test_splits_never_share_a_question(tasks):
    assert set(tasks) == set(world.TASKS)
    for name, splits in tasks.items():
        keys = {s: question_keys(splits[s]) for s in world.SPLITS}
        assert all(keys[s] for s in world.SPLITS), name
        assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"])
    for name in ("facts", "domain_facts"):  # split by fact: no paraphrased question crosses over
        f = {s: {fact_of(e["input"]) for e in tasks[name][s]} for s in world.SPLITS}
        assert not (f["train"] & f["test"]) and not (f["train"] & f["val"]) and not (f["val"] & f["test"])
    pair = lambda e: tuple(sorted(map(int, re.findall(r"\d+", e["input"]))))
    p = {s: {pair(e) for e in tasks["addition"][s]} for s in world.SPLITS}
    assert not (p["train"] & p["test"]) and not (p["train"] & p["val"]) and not (p["val"] & p["test"])
    st = {s: {e["input"] for e in tasks["story"][s]} for s in world.SPLITS}
    assert not (st["train"] & st["test"]) and not (st["train"] & st["val"])


def test_task_sizes(tasks):
    n = {t: {s: len(v) for s, v in d.items()} for t, d in tasks.items()}
    assert n["facts"]["train"] >= 400
    for t in ("facts", "sentiment", "addition", "story"):
        assert 100 <= n[t]["test"] <= 200, t
    assert len({e["instruction"] for e in tasks["review"]["train"]}) >= 300 and n["review"]["test"] >= 64


def test_no_val_or_test_question_in_the_pretraining_corpus(tasks, corpus):
    for t in ("facts", "sentiment", "addition", "story"):
        for s in ("val", "test"):
            for e in tasks[t][s]:
                assert f"Input: {e['input']}" not in corpus and e["input"] not in corpus, (t, e)
    corpus_pairs = {tuple(sorted(map(int, m))) for m in re.findall(r"(?<!\d)(\d+) \+ (\d+)(?!\d)", corpus)}
    assert len(corpus_pairs) > 2000
    for s in ("val", "test"):
        for e in tasks["addition"][s]:
            assert tuple(sorted(map(int, re.findall(r"\d+", e["input"])))) not in corpus_pairs, e
        for e in tasks["review"][s]:
            assert e["output"] not in corpus
    # train questions do appear in Q/A pages, answered in a short or a sentence style
    assert sum(f"Input: {e['input']}\nOutput: {e['output']}\n" in corpus for e in tasks["facts"]["train"]) > 30
    assert sum(f"Input: {e['input']}\nOutput: The " in corpus for e in tasks["facts"]["train"]) > 30


def test_sentiment_labels_agree_with_the_judge(tasks):
    for s in world.SPLITS:
        for e in tasks["sentiment"][s]:
            assert e["output"] in world.SENTIMENT_LABELS
            assert (world.sentiment_score(e["input"]) > 0) == (e["output"] == "positive")
    labels = [e["output"] for e in tasks["sentiment"]["test"]]
    assert 0.35 < labels.count("positive") / len(labels) < 0.65


def test_reviews_span_every_sentiment_and_carry_their_score(tasks):
    train = tasks["review"]["train"]
    scores = [e["score"] for e in train]
    assert all(e["score"] == world.sentiment_score(e["output"]) and len(e["output"].split()) <= 30 for e in train)
    assert all(e["input"] == "" for e in train)
    edges = (-1, -0.78, -0.5, 0.5, 0.78, 1)
    bins = [sum(lo <= x < hi for x in scores) for lo, hi in zip(edges, edges[1:])]
    assert min(bins) > len(scores) / 10  # roughly uniform over the five levels
    # the levels are ordered by the judge: very negative < negative < neutral < positive < very positive
    rng = __import__("random").Random(0)
    for level_lo, level_hi in ((-2, -1), (-1, 0), (0, 1), (1, 2)):
        lo = max(world.sentiment_score(world.review_text(rng, "the oak lamp", level_lo)) for _ in range(200))
        hi = min(world.sentiment_score(world.review_text(rng, "the oak lamp", level_hi)) for _ in range(200))
        assert lo < hi


def test_addition_answers_and_chain_of_thought(tasks):
    ex = [e for s in world.SPLITS for e in tasks["addition"][s]]
    for e in ex:
        a, b = map(int, re.findall(r"\d+", e["input"]))
        assert e["output"] == str(a + b) and world.extract_answer_number(e["cot"]) == a + b
    assert sum("carry 1" in e["cot"] for e in tasks["addition"]["test"]) > 100
    assert world.addition_cot(47, 85) == "7 + 5 = 12, write 2 carry 1. 4 + 8 + 1 = 13, write 13. The answer is 132."
    assert world.addition_cot(5, 995) == ("5 + 5 = 10, write 0 carry 1. 0 + 9 + 1 = 10, write 0 carry 1. "
                                         "0 + 9 + 1 = 10, write 10. The answer is 1000.")
    assert world.addition_cot(12, 30) == "2 + 0 = 2, write 2. 1 + 3 = 4, write 4. The answer is 42."


def test_extract_answer_number():
    assert world.extract_answer_number("write 13. The answer is 132.") == 132
    assert world.extract_answer_number("the answer is 1,234. no, the answer is 99") == 99
    assert world.extract_answer_number(" 132.") == 132
    assert world.extract_answer_number("I do not know") is None


def test_story_answers_are_in_the_story(tasks):
    for e in tasks["story"]["test"]:
        assert e["output"] in e["input"] and e["instruction"].endswith("?")


def test_write_default_data_is_idempotent(tmp_path, w, docs, tasks):
    paths = world.write_default_data(str(tmp_path), 1337)
    assert open(paths["corpus"], encoding="utf-8").read() == "\n\n".join(docs) + "\n"
    assert data.read_text([paths["corpus"]], split_blank_lines=True) == docs
    assert data.read_records(paths["facts_test"]) == tasks["facts"]["test"]
    assert json.load(open(paths["world"]))["held_out_region"] == w.held_out_region
    mtime = os.stat(paths["corpus"]).st_mtime_ns
    assert world.ensure_default_data(str(tmp_path), 1337) == paths
    assert os.stat(paths["corpus"]).st_mtime_ns == mtime  # skipped, same seed
    world.write_default_data(str(tmp_path), 7)
    assert json.load(open(paths["world"]))["seed"] == 7
    assert open(paths["corpus"], encoding="utf-8").read() != "\n\n".join(docs) + "\n"


# ----------------------------------------------------------------------------- template

def test_template():
    assert data.format_prompt("Add.", "1 + 2") == "Instruction: Add.\nInput: 1 + 2\nOutput:"
    assert data.format_prompt("Say hi.") == "Instruction: Say hi.\nOutput:"
    assert data.format_completion("3") == " 3"


def test_render_messages():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    assert data.render_messages(msgs) == (
        "Instruction: Be brief. 2+2?\nInput: User: Hi\nAssistant: Hello\nOutput:", " 4")
    assert data.render_messages(msgs[1:2]) == ("Instruction: Hi\nOutput:", "")
    with pytest.raises(UserError, match="user message"):
        data.render_messages([msgs[0], msgs[2]])
    with pytest.raises(UserError, match="role"):
        data.render_messages([{"role": "bot", "content": "x"}])


# ----------------------------------------------------------------------------- judges (hand-worked)

def test_sentiment_score_by_hand():
    assert world.sentiment_score("The kettle is good.") == pytest.approx(1 / 2)          # S = 1
    assert world.sentiment_score("Terrible and bad!") == pytest.approx(-3 / 4)           # S = -2 - 1
    assert world.sentiment_score("I would not recommend it.") == pytest.approx(-1 / 2)  # negated +1
    assert world.sentiment_score("Excellent, but slow.") == pytest.approx(1 / 2)         # 2 - 1
    assert world.sentiment_score("A kettle.") == 0.0
    # monotone: repeating a positive word raises the score (the reward hack is visible)
    s = [world.sentiment_score(" ".join(["good"] * k)) for k in range(1, 6)]
    assert s == sorted(s) and len(set(s)) == 5 and s[-1] == pytest.approx(5 / 6)
    assert all(-1 < world.sentiment_score(" ".join([w] * 50)) < 1 for w in world.LEXICON)


def test_exact_match():
    assert evals.exact_match("  Green. ", "green") == 1.0
    assert evals.exact_match("plum  cake", "Plum cake.") == 1.0
    assert evals.exact_match("green flag", "green") == 0.0


def test_jaccard_by_hand():
    assert evals.jaccard("the cat sat", "The cat ran") == pytest.approx(2 / 4)
    assert evals.jaccard("a a b", "b") == pytest.approx(1 / 2)
    assert evals.jaccard("", "") == 1.0 and evals.jaccard("x", "") == 0.0


def test_bleu_by_hand():
    assert evals.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # p1 = 2/4 (clipped), p2 = (1+1)/(3+1), p3 = (0+1)/(2+1), p4 = (0+1)/(1+1); c = 4 > r = 3 so BP = 1
    assert evals.bleu("the cat the cat", "the cat sat") == pytest.approx((0.5 * 0.5 * (1 / 3) * 0.5) ** 0.25)
    # p1 = p2 = 1; no 3- or 4-gram in a 2-word candidate: 0/1 smoothed to 1/2 (NLTK's method 2); BP = exp(1 - 6/2)
    assert evals.bleu("the cat", "the cat sat on the mat") == pytest.approx(math.exp(-2) * (0.5 * 0.5) ** 0.25)
    assert evals.bleu("dog", "the cat") == 0.0 and evals.bleu("", "the cat") == 0.0
    # p1 = 3/3, p2 = (1+1)/(2+1) ("the cat" matches, "cat sat" does not), max_n = 2, BP = exp(1 - 4/3)
    assert evals.bleu("the cat ran", "the cat sat down", max_n=2) == pytest.approx(
        math.exp(1 - 4 / 3) * ((2 / 3) * (2 / 3)) ** 0.5)


def test_rouge_l_by_hand():
    assert evals.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)  # LCS 5
    # LCS("a b c d", "a c e") = "a c": P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert evals.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert evals.rouge_l("x y", "a b") == 0.0 and evals.rouge_l("", "a") == 0.0


# ----------------------------------------------------------------------------- loaders

def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


def test_read_text(tmp_path):
    a = write(tmp_path, "a.txt", "first doc\n\nsecond\n \n\n third\n")
    assert data.read_text([a]) == ["first doc\n\nsecond\n \n\n third"]
    assert data.read_text(a, split_blank_lines=True) == ["first doc", "second", "third"]
    d = tmp_path / "dir"
    d.mkdir()
    write(d, "x.txt", "one")
    write(d, "y.txt", "\ufefftwo\r\n")
    assert data.read_text([str(d)]) == ["one", "two"]
    with pytest.raises(UserError, match="missing.txt: file not found"):
        data.read_text([str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match="empty"):
        data.read_text([write(tmp_path, "e.txt", "  \n\n")])
    bad = write(tmp_path, "bad.txt", b"hello\nworld\ncaf\xe9\n")
    with pytest.raises(UserError, match=re.escape(bad) + r":3: not UTF-8 .*offset 15"):
        data.read_text([bad])


def test_read_records(tmp_path):
    p = write(tmp_path, "r.jsonl", '{"a": 1}\n\n{"a": 2}\n')
    assert data.read_records(p) == [{"a": 1}, {"a": 2}]
    with pytest.raises(UserError, match=r"m.jsonl:3: malformed JSON"):
        data.read_records(write(tmp_path, "m.jsonl", '{"a": 1}\n\n{"a": \n'))
    with pytest.raises(UserError, match=r"n.jsonl:1: expected a JSON object, got list"):
        data.read_records(write(tmp_path, "n.jsonl", "[1, 2]\n"))
    j = write(tmp_path, "r.json", '[\n  {"a": 1},\n\n  {"a": 2}\n]')
    assert data.read_records(j) == [{"a": 1}, {"a": 2}]
    with pytest.raises(UserError, match=r"s.json:4: expected a JSON object, got str"):
        data.read_records(write(tmp_path, "s.json", '[{"a": 1},\n {"b":\n\n  2}, "x"]'))
    with pytest.raises(UserError, match=r"t.json:2: malformed JSON"):
        data.read_records(write(tmp_path, "t.json", '[{"a": 1},\n {"b" 2}]'))
    with pytest.raises(UserError, match="must hold a list"):
        data.read_records(write(tmp_path, "u.json", '{"a": 1}'))
    with pytest.raises(UserError, match="unknown data format"):
        data.read_records(write(tmp_path, "v.csv", "a,b"))
    with pytest.raises(UserError, match="empty"):
        data.read_records(write(tmp_path, "w.jsonl", "\n\n"))


def test_load_sft_examples(tmp_path):
    rows = [{"instruction": "Add.", "input": "1 + 2", "output": "3"}, {"instruction": "Hi.", "output": "Hello"},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
            {"prompt": "P:", "completion": " C"}]
    p = write(tmp_path, "s.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert data.load_sft_examples(p) == [("Instruction: Add.\nInput: 1 + 2\nOutput:", " 3"),
                                         ("Instruction: Hi.\nOutput:", " Hello"),
                                         ("Instruction: Q\nOutput:", " A"), ("P:", " C")]
    for bad, msg in [({"instruction": "x"}, r":2: missing field 'output'"),
                     ({"instruction": "x", "output": 5}, r":2: field 'output' must be a string"),
                     ({"instruction": "x", "output": "  "}, r":2: field 'output' is empty"),
                     ({"text": "x"}, r":2: needs 'instruction' and 'output'"),
                     ({"messages": [{"role": "user", "content": "x"}]}, r":2: the last message must be")]:
        q = write(tmp_path, "b.jsonl", json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=re.escape(q) + msg):
            data.load_sft_examples(q)


def test_load_preference_pairs_and_hh_prompt_splitting(tmp_path):
    hh_c = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: Sure, here is how."
    hh_r = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: Sure, no."
    rows = [{"prompt": "P", "chosen": " a", "rejected": " b", "score_chosen": 1, "score_rejected": -0.5},
            {"chosen": hh_c, "rejected": hh_r},
            {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}]
    pairs = data.load_preference_pairs(write(tmp_path, "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert pairs[0] == {"prompt": "P", "chosen": " a", "rejected": " b", "score_chosen": 1.0, "score_rejected": -0.5}
    # the common prefix runs into "Sure, " but the prompt ends at the last shared Assistant turn
    assert pairs[1] == {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant:",
                        "chosen": " Sure, here is how.", "rejected": " Sure, no."}
    assert pairs[2] == {"prompt": "Instruction: Q\nOutput:", "chosen": " good", "rejected": " bad"}
    path = write(tmp_path, "w.jsonl", "\n" + "".join(json.dumps(r) + "\n\n" for r in rows))  # lines 2, 4, 6
    located = data.load_preference_pairs(path, with_where=True)
    assert [p.pop("where") for p in located] == [f"{path}:2", f"{path}:4", f"{path}:6"] and located == pairs
    for bad, msg in [({"prompt": "P", "chosen": "x", "rejected": "x"}, "identical"),
                     ({"chosen": hh_c, "rejected": hh_c}, "identical"),
                     ({"chosen": "a", "rejected": "b"}, "no 'prompt' field"),
                     ({"prompt": "P", "chosen": "x"}, "missing field 'rejected'"),
                     ({"prompt": "P", "chosen": "x", "rejected": "y", "score_chosen": "high"}, "must be a number")]:
        q = write(tmp_path, "b.jsonl", "\n" + json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=re.escape(q) + ":2: .*" + msg):
            data.load_preference_pairs(q)


def test_load_prompts(tmp_path):
    rows = [{"prompt": "Write a review of the oak lamp."}, {"instruction": "Add.", "input": "1 + 2"},
            {"messages": [{"role": "user", "content": "Q"}]}]
    assert data.load_prompts(write(tmp_path, "q.jsonl", "".join(json.dumps(r) + "\n" for r in rows))) == [
        "Write a review of the oak lamp.", "Instruction: Add.\nInput: 1 + 2\nOutput:", "Instruction: Q\nOutput:"]
    with pytest.raises(UserError, match=r"r.jsonl:1: needs a 'prompt'"):
        data.load_prompts(write(tmp_path, "r.jsonl", '{"text": "x"}\n'))


# ----------------------------------------------------------------------------- tokens and batches

def test_encode_example():
    enc = byte_enc()
    p, c = data.encode_example(enc, "ab", " c<|endoftext|>", 32)
    assert p == [97, 98] and c == list(b" c<|endoftext|>") + [256]  # special text stays plain text
    with pytest.raises(UserError, match=r"example 7: prompt \+ completion is 6 tokens, longer than the context of 5"):
        data.encode_example(enc, "abc", "de", 5, where="example 7")


def test_completion_batch_by_hand():
    prompts, completions = [[1, 2], [3]], [[4, 5, 9], [6, 9]]
    b = data.completion_batch(prompts, completions, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 4, 5, 9], [3, 6, 9, 0, 0]]
    assert b["attention_mask"].tolist() == [[True] * 5, [True, True, True, False, False]]
    assert b["targets"].tolist() == [[-1, 4, 5, 9, -1], [6, 9, -1, -1, -1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 2, 2]]
    assert b["last_index"].tolist() == [4, 2]
    left = data.completion_batch(prompts, completions, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[1, 2, 4, 5, 9], [0, 0, 3, 6, 9]]
    assert left["targets"].tolist() == [[-1, 4, 5, 9, -1], [-1, -1, 6, 9, -1]]
    assert left["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert left["last_index"].tolist() == [4, 4]
    for k in ("input_ids", "targets", "position_ids"):  # same values at the real tokens
        assert b[k][b["attention_mask"]].tolist() == left[k][left["attention_mask"]].tolist()
    assert b["input_ids"].dtype == b["targets"].dtype == torch.long and b["attention_mask"].dtype == torch.bool


def test_left_and_right_padding_give_the_same_completion_logprob():
    gpt = pytest.importorskip("gpt")
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts, completions = [[1, 2, 3, 4], [5], [6, 7]], [[8, 9, 15], [10, 15], [11, 12, 13, 14, 15]]
    sums = []
    for side in ("right", "left"):
        b = data.completion_batch(prompts, completions, pad_id=0, side=side)
        logits = model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
        sums.append(gpt.token_logprobs(logits, b["targets"]).sum(-1))
    alone = []  # each row by itself, no padding: sum_t log p(y_t | x, y_<t)
    for p, c in zip(prompts, completions):
        logp = torch.log_softmax(model(torch.tensor([p + c])), -1)[0]
        alone.append(sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c)))
    torch.testing.assert_close(sums[0], sums[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(sums[0], torch.tensor(alone), atol=1e-5, rtol=0)


def test_tokenize_corpus_is_cached_and_rebuilt_when_the_text_changes(tmp_path):
    enc = byte_enc()
    path = str(tmp_path / "train.bin")
    tokens = data.tokenize_corpus(["ab", "c"], enc, path, fingerprint="fp1")
    assert tokens.tolist() == [256, 97, 98, 256, 99, 256] and tokens.dtype == np.uint16
    meta = json.load(open(path + ".json"))
    assert meta["count"] == 6 and meta["fingerprint"] == "fp1" and meta["dtype"] == "uint16"
    mtime = os.stat(path).st_mtime_ns
    assert data.tokenize_corpus(["ab", "c"], enc, path, fingerprint="fp1").tolist() == tokens.tolist()
    assert os.stat(path).st_mtime_ns == mtime  # reused
    assert data.tokenize_corpus(["ab", "cd"], enc, path, fingerprint="fp1").tolist()[-2:] == [100, 256]
    data.tokenize_corpus(["ab", "cd"], enc, path, fingerprint="fp2")
    assert json.load(open(path + ".json"))["fingerprint"] == "fp2"
    assert data.load_tokens(path).tolist() == [256, 97, 98, 256, 99, 100, 256]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    with pytest.raises(UserError, match="no readable token cache"):
        data.load_tokens(str(tmp_path / "none.bin"))


def test_get_batch_is_a_function_of_its_arguments():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(tokens, 4, 8, seed=1, step=3, micro=0)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    x2, _ = data.get_batch(tokens, 4, 8, seed=1, step=3, micro=0)
    assert torch.equal(x, x2)
    assert not torch.equal(x, data.get_batch(tokens, 4, 8, seed=1, step=4, micro=0)[0])
    assert not torch.equal(x, data.get_batch(tokens, 4, 8, seed=1, step=3, micro=1)[0])
    assert not torch.equal(x, data.get_batch(tokens, 4, 8, seed=2, step=3, micro=0)[0])
    assert int(data.get_batch(tokens[:10], 64, 9, 0, 0, 0)[1].max()) == 9  # the last token can be a target
    with pytest.raises(UserError, match="only 8 tokens"):
        data.get_batch(tokens[:8], 2, 8, 0, 0, 0)
