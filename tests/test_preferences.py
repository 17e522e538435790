import json

import pytest
import torch

import data
import preferences
from common import UserError
from gpt import GPT, GPTConfig, save_checkpoint
from preferences import make_pairs, split_by_prompt
from conftest import torchrun


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture
def ckpt(tmp_path, small_enc):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=small_enc.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32)
    path = tmp_path / "init"
    save_checkpoint(str(path), GPT(config), small_enc, {"stage": "sft", "args": {}, "metrics": {}})
    return str(path)


def test_make_pairs_all_and_best_worst():
    texts, scores = [" a", " b", " c", " d"], [0.5, 0.1, 0.5, -0.2]
    pairs, ties = make_pairs("x", texts, scores, "all")
    assert ties == 1 and len(pairs) == 5  # 6 pairs, (a, c) tied
    assert all(p["score_chosen"] > p["score_rejected"] and p["chosen"] != p["rejected"] for p in pairs)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {(" a", " b"), (" a", " d"), (" b", " d"), (" c", " b"),
                                                             (" c", " d")}
    best, ties = make_pairs("x", texts, scores, "best-worst")
    assert ties == 0 and [(p["chosen"], p["rejected"]) for p in best] == [(" a", " d")]
    assert make_pairs("x", [" a", " b"], [0.3, 0.3], "best-worst") == ([], 1)


def test_split_by_prompt_never_shares_a_prompt():
    items = [(f"p{i % 17}", i) for i in range(100)]
    train, val = split_by_prompt(items, lambda x: x[0], 0.2, seed=3)
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert len({p for p, _ in val}) == round(17 * 0.2) and len(train) + len(val) == 100


def test_preferences_on_a_tiny_checkpoint(ckpt, tmp_path):
    rows = [{"instruction": f"Describe {w}.", "output": f"the {w} is green , a good {w}"}
            for w in ("kettle", "inn", "pie", "flag", "river", "belmora", "tosk", "cat", "mat", "market")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prefs"
    meta = preferences.main(["--init", ckpt, "--prompts", str(tmp_path / "p.jsonl"), "--judge", "jaccard",
                             "--keep-truncated", "--max-new-tokens", "12", "--n", "4", "--val-fraction", "0.3",
                             "--out", str(out), "--device", "cpu"])
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    assert train and meta["train_pairs"] == len(train) and meta["time_s"] >= 0
    for p in train + val:
        assert set(p) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
        assert p["chosen"] != p["rejected"] and p["score_chosen"] > p["score_rejected"]
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in val}
    assert data.load_preference_pairs(str(out / "train.jsonl"))  # the loaders of reward.py and dpo.py accept them
    for g in read_jsonl(out / "val_groups.jsonl"):
        assert len(g["completions"]) == len(set(g["completions"])) == len(g["scores"]) >= 2
        assert g["prompt"] in {data.format_prompt(r["instruction"]) for r in rows}
    c = meta["counts"]
    assert c["sampled"] == 10 * 4 and c["ties"] >= 0 and 0 <= c["eos_rate"] <= 1
    assert json.load(open(out / "meta.json"))["time_s"] == meta["time_s"]


def test_labels_are_split_and_written_the_same_way(tmp_path):
    pairs = [{"prompt": f"Instruction: q{i % 7}\nOutput:", "chosen": f" yes {i}", "rejected": f" no {i}"}
             for i in range(30)]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out = tmp_path / "prefs"
    (out).mkdir()
    (out / "val_groups.jsonl").write_text("stale\n")
    meta = preferences.main(["--labels", str(tmp_path / "labels.jsonl"), "--out", str(out)])
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    assert len(train) + len(val) == 30 and meta["val_prompts"] >= 1
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in val}
    assert all(p["score_chosen"] == 1.0 and p["score_rejected"] == 0.0 for p in train)
    assert not (out / "val_groups.jsonl").exists()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "chosen": " a", "rejected": " a"}) + "\n")
    with pytest.raises(UserError, match="identical"):
        preferences.main(["--labels", str(tmp_path / "bad.jsonl"), "--out", str(out)])


def test_two_process_torchrun_writes_the_same_files(ckpt, tmp_path):
    """Batch k is sampled by process k mod 2 with its own seeded generator and gathered in order: the files
    are those of one process. ("--" ends torchrun's options: it would take --n for an abbreviation of its own.)"""
    rows = [{"instruction": f"Describe {w}.", "output": f"the {w} is green"} for w in ("kettle", "inn", "pie", "flag",
                                                                                       "river", "tosk", "cat", "mat")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = lambda out: ["--init", ckpt, "--prompts", str(tmp_path / "p.jsonl"), "--judge", "jaccard", "--keep-truncated",
                        "--max-new-tokens", "8", "--n", "3", "--batch-size", "5", "--out", str(tmp_path / out),
                        "--device", "cpu"]
    preferences.main(argv("one"))
    torchrun("preferences.py", argv("two"), tmp_path, timeout=180)
    for name in ("train.jsonl", "val.jsonl", "val_groups.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    assert read_jsonl(tmp_path / "one" / "train.jsonl")
    assert json.load(open(tmp_path / "two" / "meta.json"))["counts"] == json.load(open(tmp_path / "one" / "meta.json"))["counts"]
