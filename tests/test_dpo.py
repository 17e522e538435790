"""DPO: the loss against hand values and its gradient formula, masking of prompt and padding, the frozen
reference, the exact tabular optimum pi_ref * exp(r / beta), the CLI end to end, and exact resume."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import align
import dpo
from common import UserError, read_safetensors
from conftest import torchrun
from gpt import GPT, GPTConfig, save_checkpoint
from tokenizer import pad_id


PROMPTS = ["Instruction: Write a review of the kettle.\nOutput:", "Instruction: Write a review of the pie.\nOutput:",
           "Instruction: Write a review of the inn.\nOutput:", "Instruction: Describe the river.\nOutput:"]
GOOD = [" a good kettle , an excellent pie .", " an excellent inn .", " the pie is good .", " a good river ."]
BAD = [" a bad kettle .", " a bad inn , a bad pie .", " the inn is bad .", " the river is bad and wide ."]


def tiny_pairs(n=24):
    return [{"prompt": PROMPTS[i % 4], "chosen": GOOD[i % 4] + " seven" * (i % 3),
             "rejected": BAD[(i + 1) % 4] + " tosk" * (i % 2), "score_chosen": 0.5, "score_rejected": -0.5}
            for i in range(n)]


@pytest.fixture
def tiny_setup(tmp_path, small_enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "sft", model, small_enc, {"stage": "sft", "args": {}, "metrics": {}})
    for name, rows in (("train.jsonl", tiny_pairs(24)), ("val.jsonl", tiny_pairs(8)[::-1])):
        (tmp_path / "prefs").mkdir(exist_ok=True)
        (tmp_path / "prefs" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tmp_path, model, small_enc


def cli(tmp, out="dpo", **over):
    args = {"--init": str(tmp / "sft"), "--data": str(tmp / "prefs" / "train.jsonl"), "--out": str(tmp / out),
            "--batch-size": "4", "--epochs": "2", "--lr": "3e-3", "--warmup": "2", "--log-interval": "2",
            "--eval-interval": "4", "--eval-prompts": str(tmp / "prompts.jsonl"), "--max-new-tokens": "8",
            "--device": "cpu", "--rpo-alpha": "0"}   # plain DPO unless a test asks for RPO
    args.update(over)
    argv = []
    for k, v in args.items():
        if v is not None:
            argv += [k] if v == "" else [k, v]
    return argv


# ----------------------------------------------------------------------------- the loss

def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, **kw):
    """dpo.dpo_loss, whose four log-prob tensors are keyword arguments only."""
    return dpo.dpo_loss(chosen_logps=chosen, rejected_logps=rejected, ref_chosen_logps=ref_chosen,
                        ref_rejected_logps=ref_rejected, beta=beta, **kw)


def test_dpo_loss_takes_its_log_probs_by_name_only():
    t = torch.tensor([-1.0])
    with pytest.raises(TypeError):
        dpo.dpo_loss(t, t, t, t, 0.1)

def test_hand_computed_loss():
    # h = (-12 + 11) - (-10 + 11) = -2;  L = -log sigmoid(0.1 * -2) = log(1 + e^0.2)
    t = lambda x: torch.tensor([x], dtype=torch.float64)
    loss, rc, rr = dpo_loss(t(-12.0), t(-10.0), t(-11.0), t(-11.0), beta=0.1)
    assert loss.item() == pytest.approx(0.7981388694, abs=1e-10)
    assert rc.item() == pytest.approx(-0.1) and rr.item() == pytest.approx(0.1)
    stats = dpo.preference_stats(rc, rr, t(-12.0), t(-10.0))
    assert stats["rewards/accuracies"] == 0.0 and stats["rewards/margins"] == pytest.approx(-0.2)
    assert stats["logps/chosen"] == -12.0 and stats["logps/rejected"] == -10.0


def test_rpo_adds_alpha_times_the_per_token_nll_of_the_chosen_answers():
    # log pi(y_w|x) = -12 and -4 over 4 + 2 chosen tokens: NLL = 16 / 6 (TRL's normalisation: one mean over
    # the batch's chosen tokens; the per-answer mean of the paper would be (12/4 + 4/2) / 2 = 2.5)
    lc = torch.tensor([-12.0, -4.0], dtype=torch.float64, requires_grad=True)
    base = torch.tensor(0.75, dtype=torch.float64)
    loss, nll = dpo.rpo_loss(base, lc, torch.tensor(6), alpha=0.5)
    assert nll.item() == pytest.approx(16 / 6) and loss.item() == pytest.approx(0.75 + 0.5 * 16 / 6)
    loss.backward()
    assert torch.allclose(lc.grad, torch.full((2,), -0.5 / 6, dtype=torch.float64))  # pushes log pi(y_w|x) up
    assert dpo.rpo_loss(base, lc, torch.tensor(6), alpha=0.0)[0].item() == 0.75     # alpha 0 is DPO


def test_drift_from_the_reference_by_hand():
    t = lambda *x: torch.tensor(x, dtype=torch.float64)
    lc, lr, ref_c, ref_r = t(-12.0, -20.0), t(-30.0, -14.0), t(-11.0, -10.0), t(-12.0, -12.0)
    _, rc, rr = dpo_loss(lc, lr, ref_c, ref_r, beta=0.1)
    stats = dpo.preference_stats(rc, rr, lc, lr, ref_c, ref_r)
    assert stats["drift/chosen"] == pytest.approx((-1 - 10) / 2)      # mean of log pi - log pi_ref
    assert stats["drift/rejected"] == pytest.approx((-18 - 2) / 2)
    assert stats["rewards/chosen"] == pytest.approx(0.1 * stats["drift/chosen"])


def test_gradient_is_minus_plus_beta_sigmoid_minus_beta_h():
    torch.manual_seed(0)
    beta = 0.3
    lc, lr = (torch.randn(5, dtype=torch.float64) * 3).requires_grad_(), (torch.randn(5, dtype=torch.float64) * 3).requires_grad_()
    rc, rr = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    dpo_loss(lc, lr, rc, rr, beta)[0].backward()
    h = (lc - rc) - (lr - rr)
    expected = beta * torch.sigmoid(-beta * h.detach()) / 5  # the loss is a mean over 5 pairs
    assert torch.allclose(lc.grad, -expected, atol=1e-12)
    assert torch.allclose(lr.grad, expected, atol=1e-12)


def test_label_smoothing_zero_is_plain_dpo_and_positive_mixes_both_directions():
    torch.manual_seed(1)
    lc, lr, rc, rr = torch.randn(4, 6, dtype=torch.float64)
    h = (lc - rc) - (lr - rr)
    plain = -F.logsigmoid(0.5 * h).mean()
    assert dpo_loss(lc, lr, rc, rr, 0.5, label_smoothing=0.0)[0].item() == plain.item()
    smoothed = dpo_loss(lc, lr, rc, rr, 0.5, label_smoothing=0.2)[0]
    assert smoothed.item() == pytest.approx((-0.8 * F.logsigmoid(0.5 * h) - 0.2 * F.logsigmoid(-0.5 * h)).mean().item())


def test_ipo_hand_value():
    # h = -2, beta = 0.1: (h - 1 / (2 beta))^2 = (-2 - 5)^2 = 49
    t = lambda x: torch.tensor([x], dtype=torch.float64)
    assert dpo_loss(t(-12.0), t(-10.0), t(-11.0), t(-11.0), 0.1, loss_type="ipo")[0].item() == pytest.approx(49.0)
    # at h = 1 / (2 beta) the IPO loss is zero
    assert dpo_loss(t(5.0), t(0.0), t(0.0), t(0.0), 0.1, loss_type="ipo")[0].item() == pytest.approx(0.0)


# ----------------------------------------------------------------------------- log pi(y|x) on the GPT

def tokenized(enc, n=6):
    return dpo.tokenize_pairs(tiny_pairs(n), enc, 64, "test")


def test_at_the_start_loss_is_ln2_and_rewards_are_zero(tiny_setup):
    _, model, enc = tiny_setup
    ref = align.frozen_copy(model)
    batch = dpo.pair_batch(tokenized(enc), pad_id(enc))
    lc, lr = dpo.pair_logps(model, batch)
    rc, rr = dpo.pair_logps(ref, batch)
    loss, rew_c, rew_r = dpo_loss(lc, lr, rc, rr, 0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert rew_c.abs().max().item() < 1e-6 and rew_r.abs().max().item() < 1e-6
    assert abs(dpo.preference_stats(rew_c, rew_r, lc, lr)["rewards/margins"]) < 1e-6


def test_prompt_and_padding_never_change_log_pi(tiny_setup):
    _, model, enc = tiny_setup
    pairs = tokenized(enc)
    pad = pad_id(enc)
    alone = [torch.stack(dpo.pair_logps(model, dpo.pair_batch([p], pad))).squeeze(-1) for p in pairs]
    together = torch.stack(dpo.pair_logps(model, dpo.pair_batch(pairs, pad)), -1)
    other_pad = torch.stack(dpo.pair_logps(model, dpo.pair_batch(pairs, enc.eot_token)), -1)
    for i in range(len(pairs)):
        assert torch.allclose(alone[i], together[i], atol=1e-5)
    assert torch.allclose(together, other_pad, atol=1e-5)
    # log pi(y|x) is the sum of exactly the completion tokens' log-probs, by hand
    x, y_w, _ = pairs[0]
    logp = F.log_softmax(model(torch.tensor([x + y_w])), -1)[0]
    by_hand = sum(logp[len(x) - 1 + t, y_w[t]] for t in range(len(y_w)))
    assert together[0, 0].item() == pytest.approx(by_hand.item(), abs=1e-5)
    # and the loss sends no gradient into the logits of prompt or padding positions
    batch = dpo.pair_batch(pairs, pad)
    logits = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).detach().requires_grad_()
    from gpt import token_logprobs
    s = token_logprobs(logits, batch["targets"]).sum(-1)
    lc, lr = s.chunk(2)
    dpo_loss(lc, lr, lc.detach() + 0.3, lr.detach(), 0.1)[0].backward()
    off = batch["targets"] == -1
    assert logits.grad[off].abs().max().item() == 0.0
    assert logits.grad[~off].abs().max().item() > 0.0


def test_reference_is_frozen_and_bit_identical_after_a_step(tiny_setup):
    _, model, enc = tiny_setup
    ref = align.frozen_copy(model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(p.dtype == q.dtype for p, q in zip(ref.parameters(), model.parameters()))
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = dpo.pair_batch(tokenized(enc), pad_id(enc))
    for _ in range(2):
        lc, lr = dpo.pair_logps(model, batch)
        with torch.no_grad():
            rc, rr = dpo.pair_logps(ref, batch)
        dpo_loss(lc, lr, rc, rr, 0.1)[0].backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    lc2, lr2 = dpo.pair_logps(model, batch)
    assert (lc2 - lr2 - (rc - rr)).mean().item() > 0  # the policy moved toward the chosen answers


# ----------------------------------------------------------------------------- the exact check

@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_toy_dpo_reaches_the_closed_form_optimum(beta):
    pi_ref, r, pi_star, pi = dpo.toy_exact_check(beta)
    assert torch.allclose(pi_star, pi_ref * torch.exp(r / beta) / (pi_ref * torch.exp(r / beta)).sum())
    assert torch.allclose(pi, pi_star, atol=1e-6)
    assert not torch.allclose(pi_ref, pi_star, atol=1e-2)  # the check is not trivial


# ----------------------------------------------------------------------------- the CLI

def test_cli_end_to_end_on_a_tiny_checkpoint(tiny_setup):
    tmp, _, _ = tiny_setup
    metrics = dpo.main(cli(tmp, **{"--log-interval": "1"}))
    for k in ("gold_reward", "gold_reward_ci95", "ref_gold_reward", "ref_gold_reward_ci95", "win_rate", "kl", "eval_loss",
              "eval_accuracy", "time_s"):
        assert k in metrics, k
    cfg = json.load(open(tmp / "dpo" / "config.json"))
    assert cfg["stage"] == "dpo" and cfg["metrics"]["win_rate"] == metrics["win_rate"]
    rows = [json.loads(l) for l in open(tmp / "dpo" / "metrics.jsonl")]
    logged = [r for r in rows if "loss" in r]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected"):
        assert k in logged[0], k
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy = reference
    assert logged[-1]["loss"] < logged[0]["loss"] and logged[-1]["rewards/margins"] > 0
    # precomputed reference log-probs and the reference run in the loop give the same training
    live = dpo.main(cli(tmp, out="live", **{"--no-precompute-ref": "", "--eval-prompts": "none", "--log-interval": "1"}))
    assert live["train_loss"] == pytest.approx(metrics["train_loss"], abs=1e-5)


def test_dropout_checkpoint_starts_at_ln2_and_rpo_adds_its_nll(tiny_setup, small_enc):
    tmp, _, _ = tiny_setup
    torch.manual_seed(0)  # a checkpoint trained with dropout 0.1: the policy must train without it
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.1))
    save_checkpoint(tmp / "sft", model, small_enc, {"stage": "sft", "args": {}, "metrics": {}})
    one = {"--max-iters": "1", "--log-interval": "1", "--eval-prompts": "none", "--eval-interval": "0"}
    dpo.main(cli(tmp, out="drop", **one))
    row = json.loads(open(tmp / "drop" / "metrics.jsonl").readline())
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)          # policy = reference at step 1
    assert row["drift/chosen"] == pytest.approx(0, abs=1e-5) and row["drift/rejected"] == pytest.approx(0, abs=1e-5)
    dpo.main(cli(tmp, out="rpo", **one, **{"--rpo-alpha": "0.5"}))
    row = json.loads(open(tmp / "rpo" / "metrics.jsonl").readline())
    assert row["nll/chosen"] > 0 and row["loss"] == pytest.approx(math.log(2) + 0.5 * row["nll/chosen"], abs=1e-5)


def test_resume_is_exact(tiny_setup):
    tmp, _, _ = tiny_setup
    none = {"--eval-prompts": "none"}
    full = dpo.main(cli(tmp, out="full", **none))
    dpo.main(cli(tmp, out="half", **none, **{"--stop-at": "5"}))
    resumed = dpo.main(cli(tmp, out="half", **none, **{"--resume": ""}))
    assert resumed["train_loss"] == full["train_loss"]
    assert resumed["eval_loss"] == full["eval_loss"]


def test_bad_input_is_one_clear_error(tiny_setup, monkeypatch):
    tmp, _, _ = tiny_setup
    monkeypatch.chdir(tmp)  # no out/preferences here
    with pytest.raises(UserError, match="sft.py"):
        dpo.main(cli(tmp, **{"--init": str(tmp / "nothing")}))
    with pytest.raises(UserError, match="preferences.py"):
        dpo.main(cli(tmp, **{"--data": dpo.DEFAULT_PAIRS}))
    with pytest.raises(SystemExit, match="2"):  # argparse: --beta must be > 0
        dpo.main(cli(tmp, **{"--beta": "0"}))
    long = dict(tiny_pairs(1)[0], chosen=" good" * 80)   # the file's line 3, after a good pair and a blank line
    (tmp / "long.jsonl").write_text(json.dumps(tiny_pairs(1)[0]) + "\n\n" + json.dumps(long) + "\n")
    with pytest.raises(UserError, match="long.jsonl:3: .*longer than the context"):
        dpo.main(cli(tmp, **{"--data": str(tmp / "long.jsonl")}))


# ----------------------------------------------------------------------------- one step's batch, however it is split

def logged(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def assert_same_runs(a, b, atol):
    """Same metrics.jsonl (every logged figure but time and speed) and the same final weights."""
    rows_a, rows_b = logged(a), logged(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for k in set(ra) - {"step", "elapsed", "pairs_per_s"}:
            assert rb[k] == pytest.approx(ra[k], abs=atol), (ra["step"], k)
    wa, wb = read_safetensors(str(a / "model.safetensors")), read_safetensors(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=atol, rtol=0) for k in wa)


def test_micro_batches_make_the_step_of_their_whole_batch(tiny_setup):
    """4 pairs a step as one micro-batch or as 2 x 2: the same losses and weights, the RPO term included (its
    NLL is normalised by the chosen tokens of the whole step, whose answers differ in length)."""
    tmp, _, _ = tiny_setup
    run = {"--max-iters": "4", "--log-interval": "1", "--eval-interval": "2", "--eval-prompts": "none", "--rpo-alpha": "1"}
    one = dpo.main(cli(tmp, out="b4", **run))
    two = dpo.main(cli(tmp, out="b2x2", **run, **{"--batch-size": "2", "--grad-accum": "2"}))
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
    assert_same_runs(tmp / "b4", tmp / "b2x2", atol=1e-5)
    assert logged(tmp / "b4")[0]["nll/chosen"] > 0


def test_two_process_torchrun_stopped_and_resumed_equals_one_process(tiny_setup):
    """2 gloo processes, each 2 micro-batches of 1 pair a step (--batch-size 1 --grad-accum 4), stopped at step 3
    and resumed, against 1 process with the 4 pairs in one micro-batch: the same logged losses and statistics
    (each the whole batch's), held-out figures, final weights and sampled evaluation (80 prompts: 2 chunks, one
    per process)."""
    tmp, _, _ = tiny_setup
    (tmp / "many.jsonl").write_text("".join(json.dumps({"prompt": PROMPTS[i % 4]}) + "\n" for i in range(80)))
    run = {"--max-iters": "6", "--log-interval": "1", "--eval-interval": "2", "--rpo-alpha": "0.5",
           "--eval-prompts": str(tmp / "many.jsonl")}
    one = dpo.main(cli(tmp, out="one", **run))
    split = {**run, "--batch-size": "1", "--grad-accum": "4"}
    r = torchrun("dpo.py", cli(tmp, out="two", **split, **{"--stop-at": "3"}), tmp)
    assert r.stdout.count("stopped at step 3") == 1                    # the first process alone prints and writes
    torchrun("dpo.py", cli(tmp, out="two", **split, **{"--resume": ""}), tmp)
    assert_same_runs(tmp / "one", tmp / "two", atol=1e-5)
    two = json.load(open(tmp / "two" / "config.json"))["metrics"]
    assert set(two) == set(one)
    for k, v in one.items():
        if k != "time_s":
            assert two[k] == pytest.approx(v, abs=1e-5), k
