"""GRPO and RLOO: each advantage by hand, the KL in the reward, token averaging, the loss, the verifiable
reward, both fixed points of the exact tabular check, padding, ratio 1 with dropout in the checkpoint,
and exact resume."""
import json
import math

import numpy as np
import pytest
import torch

import align
import grpo
import ppo
import rollout
from common import UserError, read_safetensors
from gpt import GPT, GPTConfig, save_checkpoint
from conftest import torchrun
from tests.test_ppo import PrecisionProbe, assert_same_runs, likes_eos, run_with_a_failing_final_eval


# ----------------------------------------------------------------------------- the equations

def test_grpo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    std = math.sqrt(1 / 3)                                    # unbiased: sum (r - 0.5)^2 / (4 - 1) = 1/3
    want = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4])
    assert torch.allclose(grpo.grpo_advantages(r, "group"), want / torch.tensor([[std + 1e-4], [1e-4]]))
    assert torch.allclose(grpo.grpo_advantages(r, "none"), want)          # Dr. GRPO: no std division
    assert torch.equal(grpo.grpo_advantages(r)[1], torch.zeros(4))       # an all-equal group teaches nothing
    # with weights (the exact check): the mean and population std under them
    w = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    a = grpo.grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), "group", eps=0.0, weights=w)
    assert torch.allclose(a, torch.tensor([[1.0, -1.0, -1.0, 1.0]]))   # mean 0.5, sigma 0.5


def test_rloo_advantages_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    want = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3]])  # r_i - mean of the other three
    assert torch.allclose(grpo.rloo_advantages(r), want)
    assert grpo.rloo_advantages(r).sum().abs().item() < 1e-6
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert torch.allclose(grpo.rloo_advantages(r, w), r - (0.1 + 0.4 + 0.9 + 2.4))


def test_kl_in_reward_and_token_advantages_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # r' = r - beta * sum_t (log pi - log pi_ref) = 1 - 0.1 * (0.5 - 1.0)
    assert grpo.kl_in_reward(torch.tensor([1.0]), logp, ref, mask, 0.1).item() == pytest.approx(1.05)
    a = grpo.token_advantages(torch.tensor([2.0, -1.0]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(a, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))   # padding: no advantage


def test_token_weights_by_hand():
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    seq = rollout.token_weights(m, "seq-mean-token-mean")
    assert torch.allclose(seq, torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0]]))
    assert torch.allclose(rollout.token_weights(m, "token-mean"), m / 4)
    assert torch.allclose(rollout.token_weights(m, "token-sum-norm", 10), m / 20)    # B * L = 2 * 10


def test_grpo_loss_by_hand():
    # ratios 1.5 (A = 1: clipped to 1.2) and 0.5 (A = -1: clipped to 0.8), weights 1/2 each, pi_ref = 1
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])
    adv, w = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 0.5]])
    loss, pg, k3 = grpo.grpo_loss(logp, torch.zeros(1, 2), torch.zeros(1, 2), adv, w, beta=0.1)
    clipfrac, _ = rollout.ratio_stats(logp, torch.zeros(1, 2), adv, w, 0.2)
    k3_want = 0.5 * ((1 / 1.5 - 1 - math.log(1 / 1.5)) + (2 - 1 - math.log(2)))   # rho - 1 - log rho, rho = pi_ref/pi
    assert pg.item() == pytest.approx(0.5 * -1.2 + 0.5 * 0.8, abs=1e-6)
    assert k3.item() == pytest.approx(k3_want, abs=1e-6)
    assert loss.item() == pytest.approx(pg.item() + 0.1 * k3_want, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1.0)


def test_the_clipped_surrogate_of_grpo_is_ppos():
    """Written out in each file: the same loss and the same gradient, on clipped and unclipped tokens of both signs
    of A, with padding (weight 0) carrying garbage."""
    g = torch.Generator().manual_seed(3)
    logp, old = torch.randn(5, 7, generator=g) * 0.3 - 2, torch.randn(5, 7, generator=g) * 0.3 - 2
    adv = torch.randn(5, 7, generator=g)
    mask = (torch.arange(7)[None, :] < torch.tensor([7, 1, 4, 6, 3])[:, None]).float()
    logp = torch.where(mask > 0, logp, 40.0)
    w = rollout.token_weights(mask, "seq-mean-token-mean")
    a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    la, lb = ppo.ppo_policy_loss(a, old, adv, w, 0.2), grpo.clipped_surrogate(b, old, adv, w, 0.2)
    la.backward(), lb.backward()
    ratio = (logp - old).exp()[mask > 0]
    assert ((ratio - 1).abs() > 0.2).any() and ((ratio - 1).abs() < 0.2).any()    # both regimes are exercised
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)


def test_exact_reward():
    assert grpo.exact_reward("Green.", "green") == 1.0
    assert grpo.exact_reward("blue", "green") == 0.0
    assert grpo.exact_reward("the flag is green", "green") == 0.0     # the answer, not a sentence around it
    assert grpo.exact_reward("The answer is 1,234.", "1234") == 1.0
    assert grpo.exact_reward("1233", "1234") == 0.0 and grpo.exact_reward("many", "45600") == 0.0


# ----------------------------------------------------------------------------- the exact check

def test_bandit_fixed_point_zeroes_the_expected_gradient_for_any_beta():
    pi_ref, adv = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    for beta in (2.0, 0.3, 0.01):
        pi = align.k3_bandit_fixed_point(pi_ref, adv, beta)
        grad = pi * (adv - (pi * adv).sum()) - beta * (pi - pi_ref)
        assert (pi > 0).all() and pi.sum().item() == pytest.approx(1.0, abs=1e-12)   # interior, even at beta 0.01
        assert grad.abs().max().item() < 1e-12


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_toy_k1_in_reward_reaches_pi_star_and_k3_in_loss_its_own_fixed_point(one_thread):
    beta = 0.5
    pi_ref, r, pi_rloo, ref_logp = grpo.toy_run(beta, "rloo", "none", "reward", iters=300)
    pi_grpo = grpo.toy_run(beta, "grpo", "none", "loss", iters=300)[2]
    pi_grpo_s = grpo.toy_run(beta, "grpo", "group", "loss", iters=300)[2]
    pi_star = torch.softmax(ref_logp.sum(-1) + r / beta, 0)
    k3, k3_s = align.k3_toy_fixed_point(ref_logp, r, beta), align.k3_toy_fixed_point(ref_logp, r, beta, "group")
    assert (pi_star - pi_ref).abs().max() > 0.1                  # the optimum is far from the start
    assert (pi_rloo - pi_star).abs().max().item() < 1e-5
    assert (pi_grpo - k3).abs().max().item() < 1e-6
    assert (pi_grpo_s - k3_s).abs().max().item() < 1e-6
    assert (k3 - pi_star).abs().max().item() > 0.1             # k3 in the loss does not reach pi_ref exp(r/beta)/Z


# ----------------------------------------------------------------------------- on a tiny GPT

@pytest.fixture
def tiny(small_enc):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=small_enc.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32)
    return GPT(cfg), small_enc


def tiny_args(*extra):
    return grpo.parse_args(["--max-new-tokens", "6", "--rollout-batch", "2", "--group-size", "4", "--minibatch", "4",
                            "--reward", "gold", "--init", "unused", "--epochs", "1", *extra])


def tiny_rollout(model, enc, args):
    ref = GPT(model.config)
    ref.load_state_dict(model.state_dict())
    prompts = [enc.encode_ordinary(p) for p in ("the kettle", "an excellent pie .")]
    return grpo.make_rollout(model.eval(), align.frozen(ref), None, enc, prompts, None, args, 3)


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_padding_gets_no_advantage_and_no_loss(tiny, advantage):
    model, enc = tiny
    args = tiny_args("--advantage", advantage, "--no-eos-penalty", "0.5")
    ro = tiny_rollout(likes_eos(model, enc), enc, args)
    mask, pad = ro["mask"], ~ro["mask"].bool()
    assert pad.any() and 0 < ro["ended"].sum() < len(ro["ended"]), "some completions must end early"
    assert torch.equal(ro["advantages"][pad], torch.zeros_like(ro["advantages"][pad]))
    seq_adv = ro["advantages"][:, 0].view(2, 4)                  # every completion has a first token
    assert torch.allclose(seq_adv.sum(-1), torch.zeros(2), atol=1e-5)      # a baseline per group
    assert torch.equal(ro["advantages"], seq_adv.flatten()[:, None] * mask)  # one A_i per completion
    # garbage on padding changes neither loss nor gradient, whatever the averaging
    for agg in grpo.LOSS_AGGS:
        w = rollout.token_weights(mask, agg, 6)
        logp = ro["old_per_token_logps"].clone().requires_grad_()
        junk = torch.where(pad, torch.full_like(mask, 50.0), 0.0)
        l1 = grpo.grpo_loss(logp, ro["old_per_token_logps"], ro["ref_per_token_logps"], ro["advantages"], w, 0.1)[0]
        l2 = grpo.grpo_loss(logp + junk, ro["old_per_token_logps"] - junk, ro["ref_per_token_logps"] + junk, ro["advantages"] + junk, w, 0.1)[0]
        assert l1.item() == pytest.approx(l2.item(), abs=1e-6)
        l2.backward()
        assert torch.equal(logp.grad[pad], torch.zeros_like(logp.grad[pad]))


def test_ratio_is_one_on_the_first_minibatch_with_dropout_in_the_checkpoint(tiny):
    model, enc = tiny
    drop = GPT(GPTConfig(**{**model.config.__dict__, "dropout": 0.1}))
    drop.load_state_dict(model.state_dict())
    args = tiny_args()
    ro = tiny_rollout(drop, enc, args)
    assert ro["kl"].abs().max().item() < 1e-6                      # policy = reference at the start
    stats = grpo.grpo_update(rollout.PolicyLogps(drop), torch.optim.AdamW(drop.parameters(), lr=1e-3), ro, args,
                             np.random.default_rng(0))
    assert stats["ratio_first"] < 1e-6
    # the same forward in train mode (dropout on) would not reproduce log pi_old
    drop.train()
    lp = rollout.PolicyLogps(drop)(ro["batch"], ro["start"], ro["n"])
    assert (lp - ro["old_per_token_logps"]).abs().max().item() > 1e-2


def test_autocast_wraps_the_forward_pass_only(tiny):
    model, enc = tiny
    args = tiny_args("--epochs", "2", "--minibatch", "2")
    ro = tiny_rollout(model, enc, args)
    policy = rollout.PolicyLogps(model)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    probe = PrecisionProbe(policy, opt)
    grpo.grpo_update(policy, opt, ro, args, np.random.default_rng(0), autocast=probe)
    probe.check(steps=2 * 8 // 2)                                   # 2 epochs of 2 x 4 rows in minibatches of 2


# ----------------------------------------------------------------------------- the stage, end to end

@pytest.fixture
def ckpt(tmp_path, tiny):
    model, enc = tiny
    save_checkpoint(str(tmp_path / "sft"), model, enc, {"stage": "sft"})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                                    ("the kettle is", "a good inn", "the pie", "belmora is")))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in
                                               (("flag of belmora", "green"), ("seven plus five", "12"),
                                                ("the river of tosk", "wide"))))
    return tmp_path


def run_args(tmp, out, *extra):
    return ["--init", str(tmp / "sft"), "--reward", "gold", "--prompts", str(tmp / "prompts.jsonl"), "--out",
            str(tmp / out), "--iters", "4", "--rollout-batch", "2", "--group-size", "3", "--minibatch", "3",
            "--max-new-tokens", "6", "--eval-limit", "3", "--lr", "1e-3", "--log-interval", "1", "--device", "cpu",
            *extra]


def test_resume_is_exact_and_checkpoint_is_a_plain_gpt(ckpt, tiny):
    model, enc = tiny
    save_checkpoint(str(ckpt / "sft"), likes_eos(model, enc), enc, {"stage": "sft"})   # scores that differ: A != 0
    full = grpo.main(run_args(ckpt, "full"))
    assert grpo.main(run_args(ckpt, "half", "--stop-at", "2"))["stopped_at"] == 2
    resumed = grpo.main(run_args(ckpt, "half", "--resume"))
    for k in ("train_loss", "train_pg_loss", "train_score", "train_kl", "gold_reward", "kl"):
        assert resumed[k] == full[k], k
    a, b = read_safetensors(str(ckpt / "full" / "model.safetensors")), read_safetensors(str(ckpt / "half" / "model.safetensors"))
    assert set(a) == set(GPT(GPTConfig(**json.load(open(ckpt / "full" / "config.json"))["model"])).state_dict()) - {"lm_head.weight"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], read_safetensors(str(ckpt / "sft" / "model.safetensors"))[k]) for k in a)
    cfg = json.load(open(ckpt / "full" / "config.json"))
    assert cfg["stage"] == "grpo" and cfg["algorithm"] == "grpo" and "win_rate" in cfg["metrics"]
    lines = (ckpt / "full" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "k3" in json.loads(lines[0])


def test_an_error_in_the_final_evaluation_keeps_the_trained_model(ckpt, monkeypatch):
    cfg = run_with_a_failing_final_eval(grpo, run_args(ckpt, "kept", "--iters", "1"), ckpt / "kept", monkeypatch)
    assert cfg["step"] == 1 and "train_loss" in cfg["metrics"]
    monkeypatch.undo()
    m = grpo.main(["--resume", "--out", str(ckpt / "kept")])   # no iteration runs: the evaluation alone
    cfg = json.load(open(ckpt / "kept" / "config.json"))
    assert cfg["finished"] is True and m["train_loss"] == cfg["metrics"]["train_loss"] and "win_rate" in m


def test_rloo_with_exact_reward_on_a_questions_file(ckpt):
    qa = str(ckpt / "qa.jsonl")
    m = grpo.main(run_args(ckpt, "rloo", "--advantage", "rloo", "--reward", "exact", "--prompts", qa,
                           "--eval-prompts", qa, "--iters", "2"))
    assert 0.0 <= m["train_gold"] <= 1.0 and 0.0 <= m["eval_acc"] <= 1.0 and "ref_eval_acc" in m
    assert json.load(open(ckpt / "rloo" / "config.json"))["args"]["kl_in"] == "reward"


def test_the_steps_reward_reads_the_addition_each_rollout_prompt_asks(ckpt, monkeypatch):
    """make_rollout hands reasoning_rewards the decoded prompt of every row: the sum it asks reaches world.steps_right,
    and the score is the exact reward plus w * the share of right steps (here a stand-in share of 0.5)."""
    qa = ckpt / "sums.jsonl"
    qa.write_text(json.dumps({"instruction": "Add the digits column by column.", "input": "What is 47 + 85?",
                              "output": "132"}) + "\n")
    asked = set()
    monkeypatch.setattr(grpo.world, "steps_right", lambda text, a, b: asked.add((a, b)) or 0.5)
    m = grpo.main(run_args(ckpt, "steps", "--reward", "exact", "--prompts", str(qa), "--eval-prompts", "none",
                           "--steps-reward", "0.4", "--rollout-batch", "1", "--iters", "1", "--no-eos-penalty", "0"))
    assert asked == {(47, 85)} and m["train_score"] == pytest.approx(m["train_gold"] + 0.2)


def test_two_process_torchrun_equals_one_process_and_resumes(ckpt, tiny):
    """2 gloo processes = 1 process: 3 sampling chunks of 2 rows (process 0 samples chunks 0 and 2), every group
    of 3 scored whole, minibatches of 2 split 1 + 1 with --loss-agg token-mean weights of the whole minibatch
    (completions of different lengths: EOS is likely); the same metrics.jsonl and final weights, stopped at
    iteration 2 and resumed under torchrun."""
    model, enc = tiny
    save_checkpoint(str(ckpt / "sft"), likes_eos(model, enc), enc, {"stage": "sft"})
    argv = ["--minibatch", "2", "--sample-batch", "2", "--loss-agg", "token-mean"]
    one = grpo.main(run_args(ckpt, "one", *argv))
    torchrun("grpo.py", run_args(ckpt, "two", *argv, "--stop-at", "2"), ckpt)
    torchrun("grpo.py", run_args(ckpt, "two", *argv, "--resume"), ckpt)
    keys = ("score", "kl", "eos", "len", "zero_std_groups", "loss", "pg_loss", "k3", "clipfrac", "approx_kl",
            "grad_norm")
    assert_same_runs(ckpt / "one", ckpt / "two", keys, ("model.safetensors",))
    assert any(0 < json.loads(line)["eos"] < 1 for line in open(ckpt / "one" / "metrics.jsonl"))  # lengths differ
    two = json.load(open(ckpt / "two" / "config.json"))["metrics"]
    for k in ("train_loss", "gold_reward", "kl", "win_rate"):
        assert two[k] == pytest.approx(one[k], abs=1e-5), k


@pytest.mark.parametrize("argv, words", [
    (["--group-size", "1"], "at least 2"),
    (["--advantage", "rloo", "--scale-rewards", "group"], "RLOO"),
    (["--rollout-batch", "3", "--group-size", "3", "--minibatch", "2"], "multiple of --minibatch"),
])
def test_bad_options_are_one_line_errors(argv, words):
    with pytest.raises(UserError, match=words):
        grpo.check_args(grpo.parse_args(argv))
