"""PPO: GAE, whitening, reward shaping, the clipped losses (hand cases and a slow float64 loop), padding,
the first ratio and KL, frozen reference and reward models, the exact tabular check, and exact resume."""
import contextlib
import json
import math

import numpy as np
import pytest
import torch

import align
import ppo
import rollout
from common import UserError, read_safetensors
from gpt import GPT, GPTConfig, load_checkpoint, save_checkpoint
from tokenizer import eos_id, pad_id
from conftest import torchrun


# ----------------------------------------------------------------------------- the equations

def test_gae_hand_case():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = ppo.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=0.95)
    assert torch.allclose(adv, torch.tensor([[0.45125, 0.475, 0.5]]), atol=1e-7)
    assert torch.allclose(ret, adv + v)


def slow_gae(r, v, lengths, gamma, lam):
    """A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_T = 0; float64 loops."""
    B, T = len(r), len(r[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        for t in range(n):
            total = 0.0
            for l in range(n - t):
                nxt = v[b][t + l + 1] if t + l + 1 < n else 0.0
                total += (gamma * lam) ** l * (r[b][t + l] + gamma * nxt - v[b][t + l])
            out[b][t] = total
    return out


def test_gae_matches_slow_loop_with_masks():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    r, v = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [9, 1, 4, 7, 3]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (0.99, 1.0)):
        adv, ret = ppo.gae(r, v, mask, gamma, lam)
        want = torch.tensor(slow_gae(r.tolist(), v.tolist(), lengths, gamma, lam), dtype=torch.float64)
        assert torch.allclose(adv, want, atol=1e-12)
        assert torch.equal(adv * (1 - mask), torch.zeros_like(adv)) and torch.equal(ret * (1 - mask), torch.zeros_like(ret))
        assert torch.allclose(ret, (adv + v) * mask)


def test_policy_loss_hand_cases():
    # ratios 1.5 (A = 1: clipped to 1.2), 0.5 (A = -1: clipped to 0.8), 1.1 (A = 2: inside), padding
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), 5.0]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = rollout.token_weights(mask)                                   # a token mean: 1/3 on each real token
    loss = ppo.ppo_policy_loss(logp, old, adv, w, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-6)
    clipfrac, _ = rollout.ratio_stats(logp, old, adv, w, 0.2)
    assert clipfrac.item() == pytest.approx(2 / 3)
    # A < 0 and ratio > 1 + eps: the unclipped term is the max, the gradient still flows
    loss2 = ppo.ppo_policy_loss(torch.tensor([[math.log(2.0)]]), torch.zeros(1, 1), torch.tensor([[-1.0]]),
                                torch.ones(1, 1), 0.2)
    assert loss2.item() == pytest.approx(2.0, abs=1e-6)


def test_value_loss_hand_cases():
    v = torch.tensor([[1.5, 0.5, 1.1, 9.0]])
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    ret = torch.tensor([[2.0, 0.0, 1.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = ppo.ppo_value_loss(v, old, ret, mask / 3, 0.2)
    # V_clip = 1.2 -> (1.2-2)^2 = .64 > .25; V_clip = 0.8 -> .64 > .25; 1.1 inside -> 0
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.64 + 0.0) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)


def test_whiten_has_mean_0_std_1_over_real_tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g) * 3 + 7
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 2, 5, 3])[:, None]).float()
    w = ppo.whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().abs().item() < 1e-5 and abs(real.std().item() - 1) < 1e-4
    assert torch.equal(w[~mask.bool()], torch.zeros_like(w[~mask.bool()]))


def test_reward_shapes_and_kl_penalty_hand_case():
    score, mask = torch.tensor([2.0]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(ppo.shape_reward(score, mask, "terminal"), torch.tensor([[0.0, 0.0, 2.0, 0.0]]))
    # r_t = r_T * gamma^(T - t), T = the last real token
    assert torch.allclose(ppo.shape_reward(score, mask, "discounted", 0.5), torch.tensor([[0.5, 1.0, 2.0, 0.0]]))
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5, -9.0]]), torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    r, kl = ppo.kl_penalty_rewards(score, logp, ref, mask, beta=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0]]))
    assert torch.allclose(r, torch.tensor([[-0.05, 0.1, 2.0, 0.0]]))
    # R_total = RM - beta * (log pi(y|x) - log pi_ref(y|x))
    assert r.sum().item() == pytest.approx(2.0 - 0.1 * (-3.5 - -3.0))
    k3 = rollout.kl_per_token(logp, ref, "k3")
    assert (k3 >= 0).all() and rollout.kl_per_token(logp, logp, "k3").abs().max() == 0


def test_adaptive_kl_controller():
    assert ppo.adaptive_kl_coef(0.1, 12.0, 6.0, 100, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # clipped at +0.2
    assert ppo.adaptive_kl_coef(0.1, 5.4, 6.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert ppo.adaptive_kl_coef(0.1, 0.0, 6.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


def test_toy_ppo_reaches_the_kl_regularised_optimum():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pi_ref, r, pi_star, pi = ppo.toy_exact_check(beta=0.5, iters=120)
    finally:
        torch.set_num_threads(threads)
    assert (pi_star - pi_ref).abs().max() > 0.1            # the optimum is far from the start
    assert (pi - pi_star).abs().max().item() < 1e-3


# ----------------------------------------------------------------------------- on a tiny GPT

@pytest.fixture
def tiny(small_enc):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=small_enc.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32)
    return GPT(cfg), small_enc


def tiny_args(**over):
    args = ppo.parse_args(["--max-new-tokens", "6", "--rollout-batch", "4", "--minibatch", "2", "--reward", "gold",
                           "--init", "unused"])
    for k, v in over.items():
        setattr(args, k, v)
    return args


def likes_eos(model, enc, logit=4.0):
    """Make EOS likely (logit about +4) so that some completions end early and padding follows them."""
    with torch.no_grad():
        v = torch.full((model.config.n_embd,), 0.5)
        model.transformer.ln_f.bias.copy_(v)
        model.transformer.wte.weight[eos_id(enc)] = v * logit / (v @ v)
    return model


def tiny_rollout(model, enc, args, beta=0.05, reward=None):
    policy = ppo.ActorCritic(model)
    ref = GPT(model.config)
    ref.load_state_dict(model.state_dict())
    ref = align.frozen(ref)
    prompts = [enc.encode_ordinary(p) for p in ("the kettle", "a good", "an excellent pie .", "bad")]
    return policy, ref, ppo.make_rollout(policy, ref, reward, enc, prompts, args, 3, beta)


def test_logprobs_and_values_do_not_depend_on_left_padding(tiny):
    model, enc = tiny
    policy = ppo.ActorCritic(model).eval()
    torch.nn.init.normal_(policy.v_head.weight)
    xs = [enc.encode_ordinary(p) for p in ("the", "the flag of belmora is", "a bad inn")]
    ys = [enc.encode_ordinary(c) + [eos_id(enc)] for c in (" green .", " wide", " an excellent pie , a good kettle")]
    batch, start, n = rollout.rollout_batch(xs, ys, pad_id(enc))
    logp, values = policy(batch, start, n)
    for b in range(3):
        one, s1, n1 = rollout.rollout_batch(xs[b:b + 1], ys[b:b + 1], pad_id(enc))
        lp1, v1 = policy(one, s1, n1)
        k = len(ys[b])
        assert torch.allclose(logp[b, :k], lp1[0, :k], atol=1e-5) and torch.allclose(values[b, :k], v1[0, :k], atol=1e-5)
        assert torch.equal(logp[b, k:], torch.zeros_like(logp[b, k:])) and torch.equal(values[b, k:], torch.zeros_like(values[b, k:]))


def test_kl_zero_at_start_ratio_one_on_first_minibatch_padding_ignored(tiny):
    model, enc = tiny
    args = tiny_args(ppo_epochs=1)
    policy, ref, ro = tiny_rollout(likes_eos(model, enc), enc, args)
    assert ro["kl"].abs().max().item() < 1e-6                        # policy = reference
    mask = ro["mask"]
    assert (mask == 0).any(), "some completion must end early for this test"
    # a completion that never emits EOS pays --no-eos-penalty
    assert 0 < ro["ended"].sum() < len(ro["ended"])
    assert torch.allclose(ro["score"], ro["gold"] - args.no_eos_penalty * (1 - ro["ended"]))
    pad = ~mask.bool()
    for k in ("advantages", "returns", "old_values"):
        assert torch.equal(ro[k][pad], torch.zeros_like(ro[k][pad])), k
    # the per-token rewards: nothing on padding
    r, _ = ppo.kl_penalty_rewards(ro["score"], ro["old_per_token_logps"], ro["ref_per_token_logps"], mask, 0.05)
    assert torch.equal(r[pad], torch.zeros_like(r[pad]))
    # padding gets no loss: garbage there changes neither loss nor gradient
    logp = ro["old_per_token_logps"].clone().requires_grad_()
    junk = torch.where(pad, torch.full_like(mask, 50.0), 0.0)
    w = rollout.token_weights(mask)
    l1 = ppo.ppo_policy_loss(logp, ro["old_per_token_logps"], ro["advantages"], w)
    l2 = ppo.ppo_policy_loss(logp + junk, ro["old_per_token_logps"] - junk, ro["advantages"] + junk, w)
    assert l1.item() == pytest.approx(l2.item(), abs=1e-7)
    l2.backward()
    assert torch.equal(logp.grad[pad], torch.zeros_like(logp.grad[pad]))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    stats = ppo.ppo_update(policy, opt, ro, args, np.random.default_rng(0))
    assert stats["ratio_first"] < 1e-5


def fake_reward_model(model):
    reward = pytest.importorskip("reward")
    torch.manual_seed(5)
    trunk = GPT(model.config)
    return align.frozen(reward.RewardModel(trunk))


def test_reference_and_reward_model_unchanged_by_an_update(tiny):
    model, enc = tiny
    rm = fake_reward_model(model)
    args = tiny_args()
    policy, ref, ro = tiny_rollout(model, enc, args, reward=rm)
    before_ref = {k: v.clone() for k, v in ref.state_dict().items()}
    before_rm = {k: v.clone() for k, v in rm.state_dict().items()}
    before_pol = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    ppo.ppo_update(policy, opt, ro, args, np.random.default_rng(0))
    assert all(torch.equal(before_ref[k], v) for k, v in ref.state_dict().items())
    assert all(torch.equal(before_rm[k], v) for k, v in rm.state_dict().items())
    assert any(not torch.equal(before_pol[k], v) for k, v in policy.state_dict().items())
    # critic-init reward: V(h) = head(LayerNorm affine(h)), the normalisation dropped
    v = torch.nn.Linear(model.config.n_embd, 1)
    with torch.no_grad():
        rm.ln.weight.uniform_(0.5, 2), rm.ln.bias.uniform_(-1, 1)
    ppo.value_head_from_reward(v, rm)
    h = torch.randn(3, model.config.n_embd)
    assert torch.allclose(v(h), rm.head(h * rm.ln.weight + rm.ln.bias), atol=1e-5)


# ----------------------------------------------------------------------------- the stage, end to end

@pytest.fixture
def ckpt(tmp_path, tiny):
    model, enc = tiny
    save_checkpoint(str(tmp_path / "sft"), model, enc, {"stage": "sft"})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ("the kettle is", "a good inn", "the pie", "belmora is", "an excellent", "tosk")))
    return tmp_path


def run_args(tmp, out, *extra):
    return ["--init", str(tmp / "sft"), "--reward", "gold", "--prompts", str(tmp / "prompts.jsonl"), "--out",
            str(tmp / out), "--iters", "4", "--rollout-batch", "4", "--minibatch", "2", "--max-new-tokens", "6",
            "--eval-limit", "3", "--lr", "1e-3", "--log-interval", "1", "--device", "cpu", *extra]


def test_resume_is_exact_and_checkpoint_is_a_plain_gpt(ckpt):
    full = ppo.main(run_args(ckpt, "full", "--target-kl", "0.5", "--horizon", "20"))
    stopped = ppo.main(run_args(ckpt, "half", "--target-kl", "0.5", "--horizon", "20", "--stop-at", "2"))
    assert stopped["stopped_at"] == 2
    resumed = ppo.main(run_args(ckpt, "half", "--target-kl", "0.5", "--horizon", "20", "--resume"))
    for k in ("train_pg_loss", "train_vf_loss", "train_score", "kl_coef_final", "gold_reward", "kl"):
        assert resumed[k] == full[k], k
    a, b = read_safetensors(str(ckpt / "full" / "model.safetensors")), read_safetensors(str(ckpt / "half" / "model.safetensors"))
    assert set(a) == set(GPT(GPTConfig(**json.load(open(ckpt / "full" / "config.json"))["model"])).state_dict()) - {"lm_head.weight"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    vh = read_safetensors(str(ckpt / "full" / "value_head.safetensors"))
    assert set(vh) == {"weight", "bias"} and vh["weight"].abs().sum() > 0
    vh_resumed = read_safetensors(str(ckpt / "half" / "value_head.safetensors"))  # the critic resumed too
    assert all(torch.equal(vh[k], vh_resumed[k]) for k in vh)
    cfg = json.load(open(ckpt / "full" / "config.json"))
    assert cfg["stage"] == "ppo" and "time_s" in cfg["metrics"] and "win_rate" in cfg["metrics"]


def run_with_a_failing_final_eval(stage, argv, out, monkeypatch):
    """stage.main(argv) with its final evaluation raising: one line naming the error and how to evaluate again
    -> OUT's config.json: the model was saved before, not marked finished."""
    def broken(*_):
        raise RuntimeError("the evaluation failed")
    monkeypatch.setattr(stage, "final_eval", broken)
    with pytest.raises(UserError, match=r"final evaluation failed \(RuntimeError: the evaluation failed") as e:
        stage.main(argv)
    assert "\n" not in str(e.value) and f"{stage.__name__}.py --resume --out {out}" in str(e.value)
    assert (out / "model.safetensors").exists() and "broken" in (out / "eval_error.txt").read_text()
    load_checkpoint(str(out))
    cfg = json.load(open(out / "config.json"))
    assert cfg["finished"] is False
    return cfg


def test_an_error_in_the_final_evaluation_keeps_the_trained_model(ckpt, monkeypatch):
    cfg = run_with_a_failing_final_eval(ppo, run_args(ckpt, "kept", "--iters", "1"), ckpt / "kept", monkeypatch)
    assert cfg["step"] == 1 and "train_pg_loss" in cfg["metrics"] and (ckpt / "kept" / "value_head.safetensors").exists()
    monkeypatch.undo()
    m = ppo.main(["--resume", "--out", str(ckpt / "kept")])   # no iteration runs: the evaluation alone
    cfg = json.load(open(ckpt / "kept" / "config.json"))
    assert cfg["finished"] is True and m["train_pg_loss"] == cfg["metrics"]["train_pg_loss"] and "win_rate" in m


def test_dropout_checkpoint_ratio_is_one_on_the_first_minibatch(ckpt, tiny):
    _, enc = tiny
    torch.manual_seed(0)  # a checkpoint trained with dropout 0.1: rollout (eval) and update (train) must agree
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32, dropout=0.1))
    save_checkpoint(str(ckpt / "sft"), model, enc, {"stage": "sft"})
    ppo.main(run_args(ckpt, "drop", "--eval-prompts", "none", "--iters", "2"))
    rows = [json.loads(l) for l in open(ckpt / "drop" / "metrics.jsonl")]
    assert len(rows) == 2 and all(r["ratio_first"] < 1e-5 for r in rows)   # max |ratio - 1|, first minibatch


def test_refuses_a_reward_model_with_another_tokenizer(ckpt, tiny):
    reward = pytest.importorskip("reward")
    from tokenizer import train_tokenizer
    model, enc = tiny
    other = train_tokenizer("zzz yyy xxx www " * 50, 270)
    trunk = GPT(GPTConfig(vocab_size=other.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32))
    rm = reward.RewardModel(trunk)
    save_checkpoint(str(ckpt / "rm"), trunk, other, {"stage": "reward"})
    from common import atomic_save_safetensors
    atomic_save_safetensors(reward.head_state(rm), str(ckpt / "rm" / reward.HEAD_FILE))
    args = run_args(ckpt, "x")
    args[args.index("--reward") + 1] = str(ckpt / "rm")
    with pytest.raises(UserError, match="different tokenizers"):
        ppo.main(args)


def save_reward_model(path, model, enc):
    """A random reward model (reward.py's layout) on the tiny GPT's shape: a trunk checkpoint and its head."""
    reward = pytest.importorskip("reward")
    from common import atomic_save_safetensors
    torch.manual_seed(7)
    trunk = GPT(model.config)
    rm = reward.RewardModel(trunk)
    save_checkpoint(str(path), trunk, enc, {"stage": "reward"})
    atomic_save_safetensors(reward.head_state(rm), str(path / reward.HEAD_FILE))
    return str(path)


def test_runs_with_a_reward_model_and_critic_from_its_head(ckpt, tiny):
    model, enc = tiny
    save_reward_model(ckpt / "rm", model, enc)
    args = run_args(ckpt, "with_rm", "--critic-init", "reward", "--kl-estimator", "k3", "--reward-shape", "discounted")
    args[args.index("--reward") + 1] = str(ckpt / "rm")
    args[args.index("--iters") + 1] = "1"
    out = ppo.main(args)
    assert math.isfinite(out["rm_reward"]) and math.isfinite(out["gold_reward"])


# ----------------------------------------------------------------------------- torchrun

def assert_same_runs(a, b, keys, files, atol=1e-5):
    """Runs in directories a and b: the same metrics.jsonl steps with each of keys within atol, the same tensors in
    files within atol."""
    log_a, log_b = ([json.loads(line) for line in open(d / "metrics.jsonl")] for d in (a, b))
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    for ra, rb in zip(log_a, log_b):
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], abs=atol), (ra["step"], k)
    for name in files:
        wa, wb = read_safetensors(str(a / name)), read_safetensors(str(b / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), (name, k)


def test_two_process_torchrun_equals_one_process_and_resumes(ckpt, tiny):
    """2 gloo processes = 1 process with the same options: each process samples one chunk of 2 prompts, scores
    its rows with the reward model, takes 1 row of each minibatch of 2 and normalises by the whole minibatch's
    token count (completions of different lengths: EOS is likely), so metrics.jsonl (losses, clip fractions, the
    adaptive KL coefficient) and the final weights and value head agree; stopped at iteration 2 and resumed
    under torchrun, and only the first process prints."""
    model, enc = tiny
    save_checkpoint(str(ckpt / "sft"), likes_eos(model, enc), enc, {"stage": "sft"})
    rm = save_reward_model(ckpt / "rm", model, enc)

    def argv(out, *extra):
        args = run_args(ckpt, out, "--sample-batch", "2", "--target-kl", "0.5", "--horizon", "20", *extra)
        args[args.index("--reward") + 1] = rm
        return args

    one = ppo.main(argv("one"))
    r = torchrun("ppo.py", argv("two", "--stop-at", "2"), ckpt)
    assert r.stdout.count("step 1/4") == 1 and "stopped at iteration 2" in r.stdout
    torchrun("ppo.py", argv("two", "--resume"), ckpt)
    keys = ("score", "kl", "beta", "eos", "len", "pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac",
            "grad_norm", "ratio_first")
    assert_same_runs(ckpt / "one", ckpt / "two", keys, ("model.safetensors", "value_head.safetensors"))
    assert any(0 < json.loads(line)["eos"] < 1 for line in open(ckpt / "one" / "metrics.jsonl"))  # lengths differ
    two = json.load(open(ckpt / "two" / "config.json"))["metrics"]
    for k in ("train_pg_loss", "kl_coef_final", "gold_reward", "rm_reward", "kl", "win_rate"):
        assert two[k] == pytest.approx(one[k], abs=1e-5), k


class PrecisionProbe:
    """An autocast stand-in that records where it is active: forward passes (a forward hook), gradients (a hook on
    a parameter's gradient, run by backward) and optimizer steps."""

    def __init__(self, model, optimizer):
        self.active, self.uses, self.seen = False, 0, {"forward": [], "backward": [], "step": []}
        model.register_forward_hook(lambda *_: self.seen["forward"].append(self.active))
        next(model.parameters()).register_hook(lambda g: self.seen["backward"].append(self.active))
        step = optimizer.step
        optimizer.step = lambda *a, **k: (self.seen["step"].append(self.active), step(*a, **k))[1]

    @contextlib.contextmanager
    def __call__(self):
        self.active, self.uses = True, self.uses + 1
        try:
            yield
        finally:
            self.active = False

    def check(self, steps):
        assert self.uses == steps and self.seen["forward"] == [True] * steps
        assert self.seen["backward"] == [False] * steps and self.seen["step"] == [False] * steps


def test_autocast_wraps_the_forward_pass_only(tiny):
    model, enc = tiny
    args = tiny_args(ppo_epochs=2)
    policy, ref, ro = tiny_rollout(model, enc, args)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    probe = PrecisionProbe(policy, opt)
    ppo.ppo_update(policy, opt, ro, args, np.random.default_rng(0), autocast=probe)
    probe.check(steps=2 * 4 // 2)                                   # 2 epochs of 4 rows in minibatches of 2
