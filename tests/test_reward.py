import json
import math
import random

import pytest
import torch

import data
import reward
from common import UserError, read_safetensors
from gpt import GPT, GPTConfig, load_checkpoint, save_checkpoint
from reward import (RewardModel, bradley_terry_loss, kendall_tau, load_reward_model, pairwise_accuracy, reward_scores,
                    set_trainable)
from tokenizer import pad_id, train_tokenizer
from training import rank_slice
from conftest import torchrun

PROMPTS = ["Instruction: Review the kettle.\nOutput:", "Instruction: Review the inn.\nOutput:",
           "Instruction: Review the pie.\nOutput:", "Instruction: What is the flag of belmora?\nOutput:"]
GOOD = [" a good kettle , an excellent pie .", " the inn is good .", " an excellent pie", " green , a good flag ."]
BAD = [" a bad inn .", " the inn is bad , a bad kettle .", " a bad pie", " the river of tosk is wide ."]


def tiny_rm_config(enc, dropout=0.0):
    return GPTConfig(vocab_size=enc.n_vocab, block_size=96, n_layer=2, n_head=2, n_embd=32, dropout=dropout)


@pytest.fixture
def ckpt(tmp_path, small_enc):
    torch.manual_seed(0)
    path = tmp_path / "init"
    save_checkpoint(str(path), GPT(tiny_rm_config(small_enc)), small_enc, {"stage": "sft", "args": {}, "metrics": {}})
    return str(path)


@pytest.fixture
def pairs_dir(tmp_path):
    d = tmp_path / "prefs"
    d.mkdir()
    train = [{"prompt": PROMPTS[i % 4], "chosen": GOOD[i % 4], "rejected": BAD[(i + i // 4) % 4],
              "score_chosen": 1.0, "score_rejected": 0.0} for i in range(12)]
    val = [{"prompt": PROMPTS[i], "chosen": GOOD[i], "rejected": BAD[i]} for i in range(4)]
    groups = [{"prompt": PROMPTS[i], "completions": [GOOD[i], BAD[i], BAD[(i + 1) % 4]], "scores": [1.0, 0.0, -0.5]}
              for i in range(4)]
    for name, rows in (("train", train), ("val", val), ("val_groups", groups)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run(ckpt, pairs_dir, out, *extra):
    return reward.main(["--init", ckpt, "--data", str(pairs_dir / "train.jsonl"), "--out", str(out), "--device", "cpu",
                        "--batch-size", "4", "--max-iters", "6", "--warmup", "2", "--log-interval", "3", *extra])


# ----------------------------------------------------------------------------- the loss

def test_bradley_terry_by_hand():
    one = lambda w, l: bradley_terry_loss(torch.tensor([w]), torch.tensor([l])).item()
    assert one(1.0, 0.0) == pytest.approx(0.3132616875, abs=1e-7)  # -log sigma(1) = log(1 + e^-1)
    assert one(0.0, 0.0) == pytest.approx(math.log(2))
    both = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])).item()
    assert both == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2, rel=1e-6)
    assert math.isfinite(one(0.0, 200.0)) and one(0.0, 200.0) == pytest.approx(200.0)


def test_bradley_terry_against_loop_and_shift():
    g = torch.Generator().manual_seed(0)
    r_w, r_l = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    slow = -sum(math.log(1 / (1 + math.exp(-(w - l)))) for w, l in zip(r_w.tolist(), r_l.tolist())) / 50
    assert bradley_terry_loss(r_w, r_l).item() == pytest.approx(slow, rel=1e-6)
    for c in (-3.0, 0.5, 10.0):
        assert bradley_terry_loss(r_w + c, r_l + c).item() == pytest.approx(bradley_terry_loss(r_w, r_l).item(), abs=1e-6)


def test_margin_term_by_hand():
    # Llama 2: -mean log sigma(r_w - r_l - m). Pair 1: 2 - 1 - 0.5 = 0.5 -> log(1 + e^-0.5) = 0.4740769842;
    # pair 2: 0 - 1 - 1 = -2 -> log(1 + e^2) = 2.1269280110; mean 1.3005024976
    r_w, r_l, m = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0])
    assert bradley_terry_loss(r_w, r_l, m).item() == pytest.approx(1.3005024976, abs=1e-6)
    assert bradley_terry_loss(r_w, r_l, torch.zeros(2)).item() == bradley_terry_loss(r_w, r_l).item()
    # the margin comes from the pair's score gap, times --margin; 0 for a pair without scores
    pairs = [{"score_chosen": 0.75, "score_rejected": -0.25}, {"score_chosen": 0.5, "score_rejected": 0.25}, {}]
    assert reward.pair_margins(pairs, 2.0).tolist() == [2.0, 0.5, 0.0]


def test_centering_term_by_hand():
    # Eisenstein et al.: + eta * mean (r_w + r_l)^2. (2 + 1)^2 = 9, (0 + 1)^2 = 1: mean 5, eta 0.1 -> + 0.5
    r_w, r_l = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    plain = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert bradley_terry_loss(r_w, r_l, center_coef=0.1).item() == pytest.approx(plain + 0.5, abs=1e-6)
    # unlike plain Bradley-Terry, it is no longer blind to a shift of every reward: it prefers them centred
    assert bradley_terry_loss(r_w + 5, r_l + 5, center_coef=0.1) > bradley_terry_loss(r_w, r_l, center_coef=0.1)
    # the gradient of the term: d/dr_w eta * (r_w + r_l)^2 / N = 2 * eta * (r_w + r_l) / N
    w = r_w.clone().requires_grad_()
    (bradley_terry_loss(w, r_l, center_coef=0.1) - bradley_terry_loss(w, r_l)).backward()
    assert torch.allclose(w.grad, 2 * 0.1 * (r_w + r_l) / 2)


def test_margin_and_center_flags_train_and_bad_values_are_refused(ckpt, pairs_dir, tmp_path):
    m = run(ckpt, pairs_dir, tmp_path / "mc", "--margin", "1", "--center-coef", "0.01")
    plain = run(ckpt, pairs_dir, tmp_path / "plain")
    assert math.isfinite(m["train_loss"]) and m["train_loss"] > plain["train_loss"]  # a margin of 1 costs more
    with pytest.raises(SystemExit) as e:   # one line `error: --margin must be a number >= 0, not -1`
        reward.parse_args(["--margin", "-1"])
    assert e.value.code == 2


def test_swapping_chosen_and_rejected_gives_one_minus_accuracy():
    g = torch.Generator().manual_seed(1)
    r_w, r_l = torch.randn(101, generator=g), torch.randn(101, generator=g)
    assert pairwise_accuracy(r_l, r_w) == pytest.approx(1 - pairwise_accuracy(r_w, r_l))
    assert pairwise_accuracy(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == 0.0  # a tie is a miss


# ----------------------------------------------------------------------------- Kendall's tau

def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # C = 5, D = 1, n choose 2 = 6
    # ties (tau-b): a ties items 0 and 1; C = 2, D = 0, n0 = 3, n1 = 1, n2 = 0 -> 2 / sqrt(2 * 3)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3])) and math.isnan(kendall_tau([5], [2]))


def brute_tau_b(a, b):
    C = D = ta = tb = 0
    n = len(a)
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            ta += da == 0
            tb += db == 0
            if da * db > 0:
                C += 1
            elif da * db < 0:
                D += 1
    n0 = n * (n - 1) / 2
    return (C - D) / math.sqrt((n0 - ta) * (n0 - tb))


def test_kendall_tau_against_brute_force():
    rng = random.Random(0)
    for trial in range(40):
        n = rng.randint(2, 9)
        a = [rng.randint(0, 3) if trial % 2 else rng.random() for _ in range(n)]
        b = [rng.randint(0, 3) for _ in range(n)]
        if len(set(a)) == 1 or len(set(b)) == 1:
            continue
        assert kendall_tau(a, b) == pytest.approx(brute_tau_b(a, b), abs=1e-12)


# ----------------------------------------------------------------------------- scoring

def rows(enc):
    return [enc.encode_ordinary(p) for p in PROMPTS], [enc.encode_ordinary(c) + [enc.eot_token] for c in GOOD]


def test_score_ignores_padding_and_other_rows(small_enc):
    torch.manual_seed(0)
    rm = RewardModel(GPT(tiny_rm_config(small_enc))).eval()
    P, Y = rows(small_enc)
    alone = torch.cat([reward_scores(rm, small_enc, [p], [y]) for p, y in zip(P, Y)])
    together = reward_scores(rm, small_enc, P, Y)
    assert torch.allclose(alone, together, atol=1e-5)
    assert torch.allclose(reward_scores(rm, small_enc, P[::-1], Y[::-1]), together.flip(0), atol=1e-5)
    with torch.no_grad():  # left padding, and a row padded far past its end by a long neighbour
        left = rm(data.completion_batch(P, Y, pad_id(small_enc), side="left"))
        long = rm(data.completion_batch([P[0], P[1]], [Y[0], Y[1] * 3], pad_id(small_enc)))
    assert torch.allclose(left, together, atol=1e-5) and abs(long[0] - together[0]) < 1e-5
    # the score is read at the last real token: changing the EOS changes it, padding after it does not
    assert abs(reward_scores(rm, small_enc, P[:1], [Y[0][:-1]])[0] - together[0]) > 1e-6


def test_scoring_is_deterministic_with_dropout(small_enc):
    torch.manual_seed(0)
    rm = RewardModel(GPT(tiny_rm_config(small_enc, dropout=0.3))).train()
    P, Y = rows(small_enc)
    a, b = reward_scores(rm, small_enc, P, Y), reward_scores(rm, small_enc, P, Y)
    assert torch.equal(a, b) and rm.training  # eval inside, training mode given back
    batch = data.completion_batch(P, Y, pad_id(small_enc))
    assert not torch.equal(rm(batch), rm(batch))  # (dropout is really on in training mode)


def test_train_head_changes_only_head(small_enc):
    torch.manual_seed(0)
    rm = set_trainable(RewardModel(GPT(tiny_rm_config(small_enc))), "head")
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    P, Y = rows(small_enc)
    Z = [small_enc.encode_ordinary(c) + [small_enc.eot_token] for c in BAD]
    for _ in range(3):
        r = rm(data.completion_batch(P + P, Y + Z, pad_id(small_enc)))
        bradley_terry_loss(r[:4], r[4:]).backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in rm.state_dict().items() if not torch.equal(v, before[k])}
    # the trunk never moves; the biases may not either: a constant added to every reward leaves the
    # Bradley-Terry loss unchanged, so their gradient is 0 up to rounding (which Adam may amplify)
    assert changed <= {"ln.weight", "ln.bias", "head.weight", "head.bias"}
    assert {"ln.weight", "head.weight"} <= changed


# ----------------------------------------------------------------------------- the stage

def test_train_head_run_keeps_trunk_and_loads_back(ckpt, pairs_dir, tmp_path):
    m = run(ckpt, pairs_dir, tmp_path / "rm", "--train", "head")
    assert 0 <= m["pairwise_accuracy"] <= 1 and -1 <= m["kendall_tau"] <= 1 and m["time_s"] >= 0
    init = read_safetensors(f"{ckpt}/model.safetensors")
    saved = read_safetensors(str(tmp_path / "rm" / "model.safetensors"))
    assert init.keys() == saved.keys() and all(torch.equal(init[k], saved[k]) for k in init)
    rm, enc, config = load_reward_model(str(tmp_path / "rm"))
    assert config["stage"] == "reward" and "pairwise_accuracy" in config["metrics"] and not rm.training
    load_checkpoint(str(tmp_path / "rm"))  # the trunk alone is an ordinary GPT checkpoint
    pairs = data.load_preference_pairs(str(pairs_dir / "val.jsonl"))
    P = [enc.encode_ordinary(p["prompt"]) for p in pairs]
    r_w = reward_scores(rm, enc, P, [enc.encode_ordinary(p["chosen"]) + [enc.eot_token] for p in pairs])
    r_l = reward_scores(rm, enc, P, [enc.encode_ordinary(p["rejected"]) + [enc.eot_token] for p in pairs])
    assert pairwise_accuracy(r_w, r_l) == pytest.approx(m["pairwise_accuracy"])


def test_lora_run_saves_a_merged_trunk(ckpt, pairs_dir, tmp_path):
    run(ckpt, pairs_dir, tmp_path / "rm", "--train", "lora", "2", "--lr", "1e-2")
    init = read_safetensors(f"{ckpt}/model.safetensors")
    saved = read_safetensors(str(tmp_path / "rm" / "model.safetensors"))
    assert init.keys() == saved.keys()
    assert not torch.equal(init["transformer.h.0.attn.c_attn.weight"], saved["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(init["transformer.wte.weight"], saved["transformer.wte.weight"])
    load_reward_model(str(tmp_path / "rm"))


@pytest.mark.parametrize("mode", [["all"], ["head"], ["lora", "2"]])
def test_resume_is_exact(ckpt, pairs_dir, tmp_path, mode):
    full = run(ckpt, pairs_dir, tmp_path / "a", "--train", *mode)
    run(ckpt, pairs_dir, tmp_path / "b", "--train", *mode, "--stop-at", "3")
    resumed = run(ckpt, pairs_dir, tmp_path / "b", "--train", *mode, "--resume")
    assert resumed["train_loss"] == full["train_loss"]
    assert resumed["pairwise_accuracy"] == full["pairwise_accuracy"]
    a, b = (read_safetensors(str(tmp_path / d / "reward_head.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_line(ckpt, pairs_dir, tmp_path, small_enc):
    with pytest.raises(UserError, match="--train"):
        run(ckpt, pairs_dir, tmp_path / "x", "--train", "lora")
    with pytest.raises(UserError, match="not a reward model"):
        load_reward_model(ckpt)
    run(ckpt, pairs_dir, tmp_path / "rm", "--train", "head", "--max-iters", "1")
    other = train_tokenizer("completely different text " * 50, 270)
    with pytest.raises(UserError, match="different tokenizers"):
        load_reward_model(str(tmp_path / "rm"), policy_enc=other)
    reward.check_same_tokenizer(small_enc, load_reward_model(str(tmp_path / "rm"))[1], "rm", "policy")


# ----------------------------------------------------------------------------- torchrun

def reward_argv(ckpt, pairs_dir, out, *extra):
    return ["--init", ckpt, "--data", str(pairs_dir / "train.jsonl"), "--out", str(out), "--device", "cpu",
            "--batch-size", "4", "--max-iters", "6", "--warmup", "2", "--log-interval", "3", *extra]


def assert_same_files(a, b, atol):
    """Same weights, except ln.bias and head.bias: they add one constant to every reward, which leaves the
    Bradley-Terry loss unchanged, so their gradient is 0 up to rounding, and Adam turns rounding into steps."""
    for name in ("model.safetensors", "reward_head.safetensors"):
        wa, wb = read_safetensors(str(a / name)), read_safetensors(str(b / name))
        assert wa.keys() == wb.keys()
        for k in set(wa) - {"ln.bias", "head.bias"}:
            assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), (name, k)


def test_rank_slices_cover_in_order_and_a_step_share_divides_the_batch():
    from types import SimpleNamespace
    for n, world in ((10, 3), (8, 2), (1, 4), (0, 2)):
        ctxs = [SimpleNamespace(ddp=True, rank=r, world=world) for r in range(world)]
        cover = [i for c in ctxs for i in range(*rank_slice(n, c))]
        assert cover == list(range(n))
    with pytest.raises(UserError, match="multiple of the 3 processes"):
        reward.check_shares(12, 4, SimpleNamespace(world=3))
    reward.check_shares(2, 4, SimpleNamespace(world=2))  # fewer pairs than the batch: the batch is all of them


def test_two_process_torchrun_matches_one_process_and_resumes(ckpt, pairs_dir, tmp_path):
    """2 gloo processes, 2 pairs each per step, DDP-averaged = 1 process, 4 pairs a step: same losses,
    same held-out accuracy and Kendall's tau, same weights; a torchrun stopped at step 3 resumes exactly."""
    one = reward.main(reward_argv(ckpt, pairs_dir, tmp_path / "one", "--eval-interval", "3"))
    torchrun("reward.py", reward_argv(ckpt, pairs_dir, tmp_path / "two", "--eval-interval", "3"), tmp_path)
    two = json.load(open(tmp_path / "two" / "config.json"))["metrics"]
    for k in ("train_loss", "val_loss", "margin", "kendall_tau"):
        assert two[k] == pytest.approx(one[k], abs=1e-5), k
    assert two["pairwise_accuracy"] == one["pairwise_accuracy"] and two["kendall_groups"] == one["kendall_groups"]
    assert_same_files(tmp_path / "one", tmp_path / "two", atol=1e-5)
    log1, log2 = ([json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two"))
    assert [r["step"] for r in log1] == [r["step"] for r in log2]  # one log, written by the first process only
    for r1, r2 in zip(log1, log2):
        for k in ("loss", "acc", "margin", "val_loss", "val_accuracy"):
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], abs=1e-5), k
    torchrun("reward.py", reward_argv(ckpt, pairs_dir, tmp_path / "half", "--eval-interval", "3", "--stop-at", "3"), tmp_path)
    torchrun("reward.py", reward_argv(ckpt, pairs_dir, tmp_path / "half", "--eval-interval", "3", "--resume"), tmp_path)
    resumed = json.load(open(tmp_path / "half" / "config.json"))["metrics"]
    assert resumed["train_loss"] == pytest.approx(two["train_loss"], abs=1e-6)
    assert_same_files(tmp_path / "two", tmp_path / "half", atol=1e-6)


def test_two_process_frozen_trunk_matches_one_process(ckpt, pairs_dir, tmp_path):
    one = reward.main(reward_argv(ckpt, pairs_dir, tmp_path / "one", "--train", "head"))
    torchrun("reward.py", reward_argv(ckpt, pairs_dir, tmp_path / "two", "--train", "head"), tmp_path)
    two = json.load(open(tmp_path / "two" / "config.json"))["metrics"]
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
    assert two["kendall_tau"] == pytest.approx(one["kendall_tau"], abs=1e-5)
    assert_same_files(tmp_path / "one", tmp_path / "two", atol=1e-5)
