"""The LLM judge: the verdict is log P(" A") against log P(" B") at the prompt's last token, combined over both
orders so that it is antisymmetric under the swap; position consistency; the identity blocks of a grown judge;
the verdict loss by hand; a tiny judge.py run; a judge in preferences.py and its bad input."""

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import data
import evals
import judge
import preferences
import report
import world
from common import UserError
from gpt import GPT, GPTConfig, load_checkpoint, save_checkpoint
from hf import export_hf
from tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ab_enc(small_text):
    """A tokenizer in which " A" and " B" are single tokens, as in the default world's."""
    return train_tokenizer(small_text + "\n\n" + " ".join(["Answer A: x", "Answer B: y", "Better: A", "Better: B"] * 50), 320)


class RuleJudge(torch.nn.Module):
    """A hand-built judge: after a prompt, logit(" A") = 2 if answer A contains "good" (+ 0.5 for being in slot A,
    a position bias) and logit(" B") = 2 if answer B does; every other token has logit 0."""

    def __init__(self, enc):
        super().__init__()
        self.enc, self.dummy = enc, torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(block_size=1024)
        self.a_id, self.b_id = evals.verdict_token_ids(enc, "test")

    def logits_of(self, text):
        a = text.split("Answer A:")[1].split("\nAnswer B:")[0] if "\nAnswer B:" in text else ""
        b = text.split("Answer B:")[1].split("\nWhich")[0] if "\nWhich" in text else ""
        out = torch.zeros(self.enc.n_vocab)
        out[self.a_id], out[self.b_id] = 2.0 * ("good" in a) + 0.5, 2.0 * ("good" in b)
        return out

    def hidden_states(self, idx):  # the "hidden state" at t is already the logit vector after tokens 0..t
        return torch.stack([torch.stack([self.logits_of(self.enc.decode(row[:t + 1].tolist())) for t in range(len(row))])
                            for row in idx])

    def lm_head(self, h):
        return h


def test_verdict_is_log_p_a_against_log_p_b_by_hand():
    logits = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    la, lb = evals.verdict_logprobs(logits, 1, 2)
    z0, z1 = math.log(math.e + math.e ** 3 + 1), math.log(2 + math.e ** 2)
    assert la.tolist() == pytest.approx([3 - z0, 0 - z1]) and lb.tolist() == pytest.approx([0 - z0, 2 - z1])
    d_ab, d_ba = torch.tensor([2.0, 1.0, 0.5, -1.0]), torch.tensor([-1.0, 1.0, -0.5, 2.0])
    assert evals.combine_orders(d_ab, d_ba).tolist() == [1.5, 0.0, 0.5, -1.5]
    assert evals.position_consistent(d_ab, d_ba).tolist() == [True, False, True, True]


def test_judge_pairs_on_a_hand_built_judge(ab_enc):
    model = RuleJudge(ab_enc)
    triples = [("Review the pie.", " a good pie", " a bad pie"), ("Review the pie.", " a bad pie", " a good pie"),
               ("Review the pie.", " good", " good too"), ("Review the pie.", " bad", " bad too")]
    v, consistent = evals.judge_pairs(model, ab_enc, evals.JUDGE_TEMPLATE, triples, (model.a_id, model.b_id), batch=3)
    # (good, bad): d_ab = 2.5 - 0 and d_ba = 0.5 - 2, so v = (2.5 + 1.5) / 2 = 2; swapped: v = -2.
    # Both good or both bad: only the slot bias is left, d_ab = d_ba = 0.5, v = 0, and the verdict flips with the swap.
    assert v.tolist() == pytest.approx([2.0, -2.0, 0.0, 0.0])
    assert consistent.tolist() == [True, True, False, False]
    swapped, _ = evals.judge_pairs(model, ab_enc, evals.JUDGE_TEMPLATE, [(i, b, a) for i, a, b in triples],
                                   (model.a_id, model.b_id))
    assert swapped.tolist() == pytest.approx((-v).tolist())


def test_judge_margins_of_a_gpt_do_not_depend_on_padding(ab_enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=ab_enc.n_vocab, block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    ids = evals.verdict_token_ids(ab_enc, "test")
    triples = [("the pie", " a good pie", " bad"), ("the inn", " no", " an excellent pie , a good kettle")]
    batched = evals.judge_order_margins(model, ab_enc, evals.JUDGE_TEMPLATE, triples, ids, batch=2)
    for t, d in zip(triples, batched):
        row = torch.tensor([ab_enc.encode_ordinary(evals.judge_prompt(evals.JUDGE_TEMPLATE, *t))])
        logp = torch.log_softmax(model(row)[0, -1], -1)
        assert d == pytest.approx((logp[ids[0]] - logp[ids[1]]).item(), abs=1e-5)


def test_verdict_loss_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    want = -(torch.log_softmax(logits[0], -1)[2] + torch.log_softmax(logits[1], -1)[0]) / 2
    assert judge.verdict_loss(logits, torch.tensor([2, 0])).item() == pytest.approx(want.item())


def test_grown_judge_computes_what_its_init_did(ab_enc):
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=ab_enc.n_vocab, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    grown = judge.grow(base, 2).eval()
    assert grown.config.n_layer == 4 and grown.num_params() > base.num_params()
    x = torch.randint(0, ab_enc.n_vocab, (2, 9))
    assert torch.allclose(grown(x), base(x), atol=1e-6)


def test_comparisons_are_labelled_by_gold_and_splits_share_no_prompt():
    w = world.make_world(1337)
    docs = ["one two three four five six seven", "the kettle is great . I loved it"]
    train, val = judge.comparisons(w, "train", 60, 0, docs, 0.3), judge.comparisons(w, "val", 30, 0, docs, 0.3)
    assert any(a.strip() in docs[0] or a.strip() in docs[1] for _, a, _, _ in train)  # windows of the documents
    for _, a, b, label in train + val:
        sa, sb = world.sentiment_score(a), world.sentiment_score(b)
        assert (sa > sb) == (label == 0) and sa != sb
    assert not {t[0] for t in train} & {t[0] for t in val}
    triples, targets = judge.both_orders(train[:2], (7, 9))
    assert triples[1] == (train[0][0], train[0][2], train[0][1]) and targets[:2] == [[7, 9][train[0][3]], [7, 9][1 - train[0][3]]]


def test_judge_main_tiny(tmp_path, ab_enc):
    torch.manual_seed(0)
    init = tmp_path / "pre"
    save_checkpoint(str(init), GPT(GPTConfig(vocab_size=ab_enc.n_vocab, block_size=512, n_layer=1, n_head=2, n_embd=32)),
                    ab_enc, {"stage": "pretrain", "args": {}, "metrics": {}})
    m = judge.main(["--init", str(init), "--out", str(tmp_path / "judge"), "--max-iters", "2", "--train-pairs", "8",
                    "--val-pairs", "6", "--batch-size", "2", "--eval-batch", "4", "--device", "cpu", "--threads", "1"])
    cfg = json.load(open(tmp_path / "judge" / "config.json"))
    assert cfg["stage"] == "judge" and cfg["model"]["n_layer"] == 3 and cfg["judge"]["template"] == evals.JUDGE_TEMPLATE
    assert 0 <= m["agreement"] <= 1 and 0 <= m["position_consistency"] <= 1


def test_verdict_tokens_must_be_single_tokens(small_enc):
    with pytest.raises(UserError, match="not two distinct single tokens"):
        evals.verdict_token_ids(small_enc, "the judge")
    with pytest.raises(UserError, match="needs"):
        evals.check_judge_template("Q: {instruction} A: {a}", "--judge-template")
    with pytest.raises(UserError, match="bad judge template"):
        evals.check_judge_template("Q: {instruction} {a} {b} {c}", "--judge-template")


# ----------------------------------------------------------------------------- preferences.py with the judges


def run_preferences(*argv):
    r = subprocess.run([sys.executable, "preferences.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr.strip()


def tiny_ckpt(path, enc, stage, n_layer=1, **meta):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=256, n_layer=n_layer, n_head=2, n_embd=32))
    save_checkpoint(str(path), model, enc, {"stage": stage, "args": {}, "metrics": {}, **meta})
    return str(path)


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"instruction": f"Describe {w}.", "output": f"the {w} is green , a good {w}"}
            for w in ("kettle", "inn", "pie", "flag", "river", "belmora", "tosk", "cat")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "p.jsonl")


def test_preferences_with_an_llm_judge(tmp_path, ab_enc, prompts_file):
    policy = tiny_ckpt(tmp_path / "sft", ab_enc, "sft")
    judge_dir = tiny_ckpt(tmp_path / "judge", ab_enc, "judge", n_layer=2,
                          judge={"template": evals.JUDGE_TEMPLATE, "verdicts": list(evals.VERDICT_TOKENS)})
    meta = preferences.main(["--init", policy, "--prompts", prompts_file, "--judge", f"llm:{judge_dir}",
                             "--keep-truncated", "--max-new-tokens", "8", "--n", "3", "--val-fraction", "0.25",
                             "--out", str(tmp_path / "prefs"), "--device", "cpu"])
    c = meta["counts"]
    assert c["judged_pairs"] > 0 and 0 <= meta["position_consistency"] <= 1
    for g in map(json.loads, open(tmp_path / "prefs" / "val_groups.jsonl")):
        # mean win probabilities: over a prompt's k completions they sum to k / 2
        assert sum(g["scores"]) == pytest.approx(len(g["scores"]) / 2)


def test_a_hugging_face_gpt2_directory_judges_with_a_template(tmp_path, ab_enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=ab_enc.n_vocab, block_size=256, n_layer=1, n_head=2, n_embd=32)).eval()
    export_hf(model, str(tmp_path / "hf"), ab_enc)
    template = "Q: {instruction}\nA: {a}\nB: {b}\nBetter:"
    judge_model, enc, used, ids = preferences.load_llm_judge(str(tmp_path / "hf"), template, None, "cpu")
    assert used == template and ids == evals.verdict_token_ids(ab_enc, "x")
    scores = preferences.llm_scores((judge_model, enc, used, ids), {"judged_pairs": 0, "position_consistent": 0},
                                    "Instruction: Review the pie.\nOutput:", [" good", " bad", " fine"], None)
    row = torch.tensor([enc.encode_ordinary("Q: Review the pie.\nA: good\nB: bad\nBetter:")])
    logp = torch.log_softmax(model(row)[0, -1], -1)
    d_ab = (logp[ids[0]] - logp[ids[1]]).item()
    row = torch.tensor([enc.encode_ordinary("Q: Review the pie.\nA: bad\nB: good\nBetter:")])
    logp = torch.log_softmax(model(row)[0, -1], -1)
    d_ba = (logp[ids[0]] - logp[ids[1]]).item()
    v = torch.tensor([(d_ab - d_ba) / 2])
    assert len(scores) == 3 and sum(scores) == pytest.approx(1.5)
    # two completions: the first one's score is sigmoid(v) of their one pair, judged on the template's prompt with
    # the instruction taken out of the policy's prompt (judge_instruction)
    others = preferences.llm_scores((judge_model, enc, used, ids), {"judged_pairs": 0, "position_consistent": 0},
                                    "Instruction: Review the pie.\nOutput:", [" good", " bad"], None)
    assert others[0] == pytest.approx(torch.sigmoid(v).item(), abs=1e-5)


def test_preferences_relabels_pairs_with_a_measure(tmp_path):
    rows = [{"prompt": f"Instruction: q{i}\nOutput:", "chosen": " a b c", "rejected": " a b c d e f",
             "reference": "a b c d e"} for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = preferences.main(["--labels", str(tmp_path / "pairs.jsonl"), "--judge", "rouge1", "--val-fraction", "0.2",
                             "--out", str(tmp_path / "out"), "--device", "cpu"])
    pairs = [json.loads(line) for f in ("train.jsonl", "val.jsonl") for line in open(tmp_path / "out" / f)]
    # ROUGE-1 against "a b c d e": " a b c" has F = 2 * 1 * .6 / 1.6 = .75, " a b c d e f" F = 2 * (5/6) * 1 / (11/6) = 10/11
    assert meta["train_pairs"] + meta["val_pairs"] == 6
    assert all(p["chosen"] == " a b c d e f" and p["score_chosen"] == pytest.approx(10 / 11) for p in pairs)


def test_judge_bad_input_is_one_line(tmp_path, ab_enc, small_enc, prompts_file):
    code, err = run_preferences("--judge", "gpt5")
    assert code == 2 and err.splitlines()[-1].startswith("error:") and "unknown judge 'gpt5'" in err
    assert "Traceback" not in err
    # the rest raise UserError, which run_cli prints as one line `error: ...` with exit code 2
    policy = tiny_ckpt(tmp_path / "sft", ab_enc, "sft")
    other = tiny_ckpt(tmp_path / "judge", small_enc, "judge", judge={"template": evals.JUDGE_TEMPLATE})
    common = ["--init", policy, "--prompts", prompts_file, "--n", "2", "--device", "cpu", "--out", str(tmp_path / "o")]
    with pytest.raises(UserError, match="different tokenizers"):  # a judge trained on another tokenizer
        preferences.main(common + ["--judge", f"llm:{other}"])
    with pytest.raises(UserError, match="not a judge made by judge.py"):  # no judge, no template
        preferences.main(common + ["--judge", f"llm:{policy}"])
    with pytest.raises(UserError, match="--judge-layer 3: .* has blocks 1..1"):
        preferences.main(common + ["--judge", "bertscore", "--judge-layer", "3"])
    with pytest.raises(UserError, match="needs {instruction}, {a} and {b}"):
        preferences.main(common + ["--judge", f"llm:{policy}", "--judge-template", "Q: {instruction}"])
    # a pair file without references, relabelled by a reference-based measure
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "Instruction: q\nOutput:", "chosen": " a",
                                                      "rejected": " b"}) + "\n")
    with pytest.raises(UserError, match=r"pairs.jsonl:1: no 'reference' answer, which --judge bleu compares"):
        preferences.main(["--labels", str(tmp_path / "pairs.jsonl"), "--judge", "bleu", "--out", str(tmp_path / "o3")])


def test_preferences_bertscore_is_evals_bertscore(tmp_path, ab_enc, prompts_file):
    policy = tiny_ckpt(tmp_path / "sft", ab_enc, "sft", n_layer=2)
    preferences.main(["--init", policy, "--prompts", prompts_file, "--judge", "bertscore", "--judge-layer", "1",
                      "--keep-truncated", "--max-new-tokens", "6", "--n", "3", "--val-fraction", "0.25",
                      "--out", str(tmp_path / "prefs"), "--device", "cpu"])
    model = load_checkpoint(policy)[0].eval()
    refs = dict(data.load_sft_examples(prompts_file))
    for g in map(json.loads, open(tmp_path / "prefs" / "val_groups.jsonl")):
        _, ref = evals.layer_embeddings(model, ab_enc, refs[g["prompt"]].strip(), 1)
        for text, score in zip(g["completions"], g["scores"]):
            _, emb = evals.layer_embeddings(model, ab_enc, text.strip(), 1)
            assert score == pytest.approx(evals.bertscore(emb, ref)[2])


def test_review_reference_is_a_positive_review_of_the_asked_item():
    w = world.make_world(1337)
    for e in world.task_sets(w)["review"]["val"][:10]:
        ref = preferences.review_reference(w, e["instruction"])
        assert world.sentiment_score(ref) > 0.75
        assert evals.names_the_item(e["instruction"], ref, w.items) == 1.0
        assert ref == preferences.review_reference(w, e["instruction"])  # a pure function of (world, prompt)


def test_gold_agreement_leaves_out_the_pairs_gold_ties():
    pairs = [{"chosen": "great", "rejected": "awful"}, {"chosen": "awful", "rejected": "great"},
             {"chosen": "great", "rejected": "bad"}, {"chosen": "a kettle", "rejected": "an inn"}]
    assert world.sentiment_score("a kettle") == world.sentiment_score("an inn") == 0
    assert preferences.gold_agreement(pairs) == (pytest.approx(2 / 3), 0.25)


def test_report_shows_judges_and_label_sources(tmp_path):

    os.makedirs(tmp_path / "judge")
    json.dump({"stage": "judge", "model": {}, "metrics": {"agreement": 0.95, "position_consistency": 0.9, "params": 5.5e6,
                                                          "n_layer": 6, "n_embd": 256, "time_s": 600}},
              open(tmp_path / "judge" / "config.json", "w"))
    os.makedirs(tmp_path / "preferences_llm")
    json.dump({"args": {"judge": "llm:out/judge"}, "gold_agreement": {"train": 0.8, "val": 0.75},
               "position_consistency": 0.92, "train_pairs": 100}, open(tmp_path / "preferences_llm" / "meta.json", "w"))
    text = "\n".join(report.label_source_lines(str(tmp_path)))
    assert "| judge | 6 x 256 | 5.50M | 95.0% | 90.0% | 10.0 min |" in text
    assert "| preferences_llm | llm:out/judge | 75.0% | 80.0% | — | 92.0% | 100 |" in text
