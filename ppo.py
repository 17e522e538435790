"""Stage 7, RLHF with PPO (Proximal Policy Optimization): the policy samples answers to prompts, a frozen
reward model scores them, a per-token KL penalty keeps the policy near the frozen reference, and the
clipped surrogate objective moves it towards higher reward; a value head on the same trunk is the critic.

    python ppo.py                               # policy = reference = out/sft, reward model out/reward
    python ppo.py --kl-coef 0.2 --out out/ppo_kl0.2
    python ppo.py --target-kl 3 --horizon 1000  # adaptive KL coefficient (Ziegler et al. 2019)
    python ppo.py --reward gold                 # PPO against the gold judge (world.sentiment_score) itself
    python ppo.py --prompts my_prompts.jsonl    # your prompts ('prompt', Alpaca fields or 'messages')
    python ppo.py --toy                         # exact check: a tabular policy reaches pi_ref * exp(r / beta)
    torchrun --nproc_per_node=4 ppo.py --sample-batch 8   # 4 processes sampling, the results of one

One iteration: sample a completion for each of --rollout-batch prompts with the KV cache (left-padded
prompts, so every completion starts in the same column), --sample-batch prompts at a time, chunk k with its
own generator seeded from (--seed, iteration, k); score it (reward model, or the gold judge);
compute log pi_old, log pi_ref and V_old for every completion token in one forward each; build the
per-token rewards r_t = -beta * KL_t, plus the score at the last token (or spread as r_T * gamma^(T-t));
advantages by GAE, whitened; then --ppo-epochs passes over shuffled minibatches with the clipped
policy loss + vf_coef * the clipped value loss. Padding after EOS gets no reward, advantage or loss.

Under torchrun (gloo on CPU, NCCL on CUDA) chunk k is sampled by process k mod N and the completions are
gathered in order, so every process holds the whole rollout; scores, log-probs and values are computed on each
process's share of the rows and gathered; whitening and the KL controller see the whole rollout. Every process
draws the same minibatches and runs the forward of its share of each (--minibatch must be a multiple of N),
normalised by the token count of the whole minibatch, so DistributedDataParallel's average is the gradient of
one process. The samples depend on --sample-batch, never on the number of processes: N processes give one
process's results to float rounding. The default --sample-batch makes the default rollout one chunk, whose
generator is seeded from (--seed, iteration) alone: lower it (e.g. to --rollout-batch / N) so that every
process samples. Only the first process writes OUT and prints; every process runs its share of the final
held-out evaluation (align.heldout_eval).

State s_t = prompt x + y_1..y_t, action a_t = the next token, reward from the frozen reward model for the
whole completion. At the end the policy and the reference each answer held-out prompts (temperature 1)
and the gold judge scores them: mean gold reward +- 95% interval, win rate, sequence KL, EOS rate.
"""

import math
import os
import time

import numpy as np
import torch
import torch.nn as nn

import data
import world
from align import (TOY_Y1, add_policy_args, add_run_args, eval_prompts, frozen, heldout_eval, kl_regularised_optimum,
                   load_policy_and_reference, print_final, print_toy_table, toy_problem, toy_token_logps)
from common import (ArgumentParser, UserError, atomic_save_safetensors, nonneg_float, positive_float, positive_int,
                    prob, run_cli)
from evals import strip_eos
from gpt import check_same_tokenizer, generate, save_checkpoint, token_logprobs
from reward import load_reward_model, reward_scores
from tokenizer import eos_id, pad_id
from training import (MetricsLog, StopFlag, add_optimizer_args, all_reduce_max, all_reduce_mean, check_divisible,
                      check_finite, gather_chunks, gather_rows, load_train_state, lr_at, make_optimizer, my_chunks,
                      optimizer_step, rank_slice, save_train_state, set_lr, setup, wrap_model)


def build_parser():
    p = ArgumentParser(description=__doc__)
    add_policy_args(p)
    p.add_argument("--reward", default="out/reward", help="frozen reward model (reward.py), or 'gold': "
                   "PPO against the gold judge world.sentiment_score of the decoded text")
    p.add_argument("--critic-init", choices=("zero", "reward"), default=None,
                   help="value head: zeros, or a copy of the reward model's scalar head (default: reward, or "
                        "zero with --reward gold); starting from the reward head halves the KL for the same reward")
    p.add_argument("--prompts", default=None, help="training prompts file (default: the world's review train prompts)")
    p.add_argument("--iters", type=positive_int, default=40, help="PPO iterations (rollout + update)")
    p.add_argument("--rollout-batch", type=positive_int, default=32, help="prompts sampled per iteration")
    p.add_argument("--minibatch", type=positive_int, default=8, help="completions per optimizer step (all processes "
                   "together; a multiple of their number)")
    p.add_argument("--sample-batch", type=positive_int, default=32, help="prompts sampled together: the rollout's "
                   "chunks, which torchrun's processes share (lower it to give each process one); the samples "
                   "depend on it, not on the process count")
    p.add_argument("--ppo-epochs", type=positive_int, default=2, help="passes over each rollout")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature, also used in every log-prob")
    add_optimizer_args(p, lr=5e-5, min_lr=5e-5, warmup=0)
    p.add_argument("--kl-coef", type=nonneg_float, default=0.1, help="beta of the KL penalty (initial value if adaptive)")
    p.add_argument("--kl-estimator", choices=("k1", "k3"), default="k1",
                   help="per-token KL: k1 = log pi - log pi_ref; k3 = (ratio - 1) - log ratio, ratio = pi_ref / pi")
    p.add_argument("--target-kl", type=nonneg_float, default=0.0, help="adaptive beta aiming at this sequence KL (0 = fixed beta)")
    p.add_argument("--horizon", type=positive_int, default=10000, help="adaptive KL controller horizon, in samples")
    p.add_argument("--reward-shape", choices=("terminal", "discounted"), default="terminal",
                   help="score at the last token, or spread as r_t = r_T * gamma^(T - t) over all tokens")
    p.add_argument("--shape-gamma", type=prob, default=0.9, help="gamma of the discounted reward shape")
    p.add_argument("--no-eos-penalty", type=nonneg_float, default=1.0, help="subtracted from the score of a completion "
                   "that never emits EOS (0 = none)")
    p.add_argument("--gamma", type=prob, default=1.0, help="GAE discount")
    p.add_argument("--lam", type=prob, default=0.95, help="GAE lambda")
    p.add_argument("--cliprange", type=positive_float, default=0.2, help="policy ratio clip epsilon")
    p.add_argument("--cliprange-value", type=positive_float, default=0.2, help="value clip around the old values")
    p.add_argument("--vf-coef", type=nonneg_float, default=0.1, help="weight of the value loss")
    return add_run_args(p, "out/ppo", "final evaluation prompts: 'review' (the world's review "
                        "test prompts, judged by world.sentiment_score), a prompts file, or 'none'")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.ref = args.ref or args.init
    if args.rollout_batch % args.minibatch:
        raise UserError(f"--rollout-batch {args.rollout_batch} must be a multiple of --minibatch {args.minibatch}")
    if args.critic_init is None:
        args.critic_init = "zero" if args.reward == "gold" else "reward"
    if args.critic_init == "reward" and args.reward == "gold":
        raise UserError("--critic-init reward needs a reward model, not --reward gold")
    return args


# ----------------------------------------------------------------------------- the equations

def masked_mean(x, mask, denom=None):
    """Mean of x over real tokens: sum_t x_t * m_t / sum_t m_t (m may also be float weights). denom replaces
    sum_t m_t when x holds one process's share of the rows: the whole minibatch's sum_t m_t / N, so that the
    mean of the N processes' values (DDP averages their gradients) is the mean over the whole minibatch."""
    return (x * mask).sum() / (mask.sum() if denom is None else denom).clamp(min=1e-8)


def whiten(x, mask, shift_mean=True):
    """Whitening over real tokens: (x - mean) / sqrt(var + 1e-8), mean and (unbiased) var over mask = 1;
    padding stays 0."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_per_token(logp, ref_logp, estimator="k1"):
    """Per-token estimate of KL(pi_theta || pi_ref) on tokens sampled from pi_theta:
    k1 = log pi(a_t|s_t) - log pi_ref(a_t|s_t)  (unbiased, can be negative);
    k3 = (rho - 1) - log rho with rho = pi_ref(a_t|s_t) / pi(a_t|s_t)  (unbiased, always >= 0)."""
    if estimator == "k1":
        return logp - ref_logp
    log_rho = ref_logp - logp
    return torch.expm1(log_rho) - log_rho


def shape_reward(score, mask, shape="terminal", gamma=1.0):
    """Puts the sequence score r_T on the completion tokens (B, T), T = the last real token:
    terminal:   r_T at t = T, 0 elsewhere;
    discounted: r_t = r_T * gamma^(T - t) for every real t (the guide's spread of the reward)."""
    last = (mask.sum(-1).long() - 1).clamp(min=0)                     # completions are a prefix of the row
    t = torch.arange(mask.size(-1), device=mask.device)[None, :]
    if shape == "terminal":
        out = (t == last[:, None]).to(score.dtype) * score[:, None]
    else:
        out = score[:, None] * gamma ** (last[:, None] - t).clamp(min=0).to(score.dtype)
    return out * mask


def kl_penalty_rewards(score, logp, ref_logp, mask, beta, estimator="k1", shape="terminal", gamma=1.0):
    """R_total = RM(x, y) - beta * KL(pi_theta(.|x) || pi_ref(.|x)), per token:
    r_t = shaped score_t - beta * KL_t, with KL_t = kl_per_token(log pi, log pi_ref), so that
    sum_t r_t = RM(x, y) - beta * (log pi(y|x) - log pi_ref(y|x)) for the terminal shape and k1.
    Returns (r, KL_t); both 0 on padding."""
    kl = kl_per_token(logp, ref_logp, estimator) * mask
    return shape_reward(score, mask, shape, gamma) - beta * kl, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized Advantage Estimation of A_t = Q(s_t, a_t) - V(s_t):
    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)   (V = 0 after the last real token),
    A_t = delta_t + gamma * lam * A_{t+1}  =  sum_l (gamma * lam)^l * delta_{t+l};
    returns R_t = A_t + V(s_t), the value targets. rewards, values, mask: (B, T); 0 on padding."""
    rewards, values = rewards * mask, values * mask
    T = rewards.size(-1)
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = next_adv
        next_value = values[:, t]
    return adv, (adv + values) * mask


def ppo_policy_loss(logp, old_logp, advantages, mask, cliprange=0.2, denom=None):
    """Clipped surrogate objective, as a loss to minimise, averaged over real tokens:
    ratio_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t) = exp(log pi - log pi_old),
    L = -mean_t min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t).
    Returns (L, share of tokens clipped, approx KL(pi_old || pi) = mean 0.5 * (log ratio)^2); every mean is
    masked_mean's, with its denom for one process's share of a minibatch."""
    log_ratio = torch.where(mask > 0, logp - old_logp, 0.0)          # padding: ratio 1, weight 0
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(loss1, loss2), mask, denom)
    clipfrac = masked_mean((loss2 > loss1).float(), mask, denom)
    return loss, clipfrac.detach(), masked_mean(0.5 * log_ratio ** 2, mask, denom).detach()


def ppo_value_loss(values, old_values, returns, mask, cliprange_value=0.2, denom=None):
    """Clipped value loss: V_clip = V_old + clip(V - V_old, -eps_v, eps_v),
    L_V = 0.5 * mean_t max((V - R_t)^2, (V_clip - R_t)^2). Returns (L_V, share clipped: the clipped term is the
    larger and |V - V_old| > eps_v, since inside the range V_clip is V only up to rounding); means as masked_mean."""
    v_clip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1, l2 = (values - returns) ** 2, (v_clip - returns) ** 2
    clipped = ((values - old_values).abs() > cliprange_value) & (l2 > l1)
    return 0.5 * masked_mean(torch.max(l1, l2), mask, denom), masked_mean(clipped.float(), mask, denom).detach()


def adaptive_kl_coef(beta, kl, target, n_samples, horizon):
    """Adaptive KL controller (Ziegler et al. 2019): e = clip(KL / KL_target - 1, -0.2, 0.2),
    beta <- beta * (1 + e * n_samples / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_samples / horizon)


# ----------------------------------------------------------------------------- actor-critic

class ActorCritic(nn.Module):
    """The policy pi_theta (the GPT and its LM head) and the value function V_phi (a scalar head on the
    same final hidden states): one shared trunk, two heads."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.v_head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.v_head.weight), nn.init.zeros_(self.v_head.bias)

    def forward(self, batch, start, n, temperature=1.0):
        """Per completion token t (columns start..start+n-1 predict it): (log pi(a_t|s_t), V(s_t))."""
        h = self.gpt.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        h = h[:, start:start + n]
        logp = token_logprobs(self.gpt.lm_head(h), batch["actions"], temperature)
        return logp, self.v_head(h).squeeze(-1).float() * batch["mask"]


def rollout_batch(prompts, completions, pad):
    """Prompts left-padded to P, completions right-padded to T: row = [pad.. x | y pad..], so completion
    token t sits in column P + t for every row and is predicted by column P - 1 + t.
    actions = the completion tokens (-1 on padding), mask = 1 on real completion tokens."""
    B, P, T = len(prompts), max(map(len, prompts)), max(1, max(map(len, completions)))
    ids = torch.full((B, P + T), pad, dtype=torch.long)
    real = torch.zeros(B, P + T, dtype=torch.bool)
    for b, (x, y) in enumerate(zip(prompts, completions)):
        ids[b, P - len(x):P + len(y)] = torch.tensor(list(x) + list(y))
        real[b, P - len(x):P + len(y)] = True
    mask = real[:, P:].float()
    return {"input_ids": ids, "attention_mask": real, "position_ids": (real.long().cumsum(1) - 1).clamp(min=0),
            "actions": torch.where(real[:, P:], ids[:, P:], -1), "mask": mask}, P - 1, T


def token_logps(model, batch, start, n, temperature=1.0):
    """log pi(a_t|s_t) of every completion token of a rollout_batch (columns start..start+n-1 predict them)."""
    h = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])[:, start:start + n]
    return token_logprobs(model.lm_head(h), batch["actions"], temperature)


def chunk_seed(seed, it, k):
    """The generator seed of chunk k of iteration it's rollout: a pure function of (seed, it, k), so a chunk's
    samples do not depend on which process draws it; chunk 0 has the seed of a rollout sampled in one piece."""
    return (seed * 1_000_003 + it + k * 1_000_000_007) % 2 ** 63


def sampling_note(rows, args, ctx):
    """Under torchrun, the start line's word on how many processes sample the rollout's chunks."""
    chunks = -(-rows // args.sample_batch)
    if not ctx.ddp:
        return ""
    note = f"; {ctx.world} processes, {min(chunks, ctx.world)} of them sampling ({chunks} chunks of --sample-batch)"
    return note + (": lower --sample-batch to share the sampling" if chunks < ctx.world else "")


def sample_completions(gpt, prompts, args, it, enc, ctx=None):
    """The completion of every prompt row, on every process: chunk k of --sample-batch rows is sampled by
    process k mod N with generator chunk_seed(--seed, it, k), and the chunks are gathered in order, so the
    samples do not depend on N. An empty completion becomes [EOS]."""
    device, mine = next(gpt.parameters()).device, {}
    for k, lo, hi in my_chunks(len(prompts), args.sample_batch, ctx):
        gen = torch.Generator(device=device).manual_seed(chunk_seed(args.seed, it, k))
        mine[k] = generate(gpt, prompts[lo:hi], args.max_new_tokens, eos_id=eos_id(enc), pad_id=pad_id(enc),
                           temperature=args.temperature, generator=gen)
    return [c if c else [eos_id(enc)] for c in gather_chunks(mine, ctx)]


def sequence_scores(reward, enc, prompts, completions, texts, ctx=None):
    """Reward of each whole completion: the reward model's score at its last real token (each process scores
    its share of the rows; all scores gathered), or the gold judge."""
    if reward is None:
        return torch.tensor([world.sentiment_score(t) for t in texts], dtype=torch.float32)
    lo, hi = rank_slice(len(prompts), ctx)
    return gather_rows(reward_scores(reward, enc, prompts[lo:hi], completions[lo:hi]).float(), len(prompts), ctx).cpu()


@torch.no_grad()
def make_rollout(policy, ref, reward, enc, prompts, args, it, beta, ctx=None):
    """Sample, score and evaluate the iteration's batch of completions; everything PPO needs, as tensors,
    the whole rollout on every process (log pi_old, V_old and log pi_ref computed on shares, gathered)."""
    policy.eval()
    completions = sample_completions(policy.gpt, prompts, args, it, enc, ctx)
    texts = [enc.decode(strip_eos(c, enc)).strip() for c in completions]
    ended = torch.tensor([c[-1] == eos_id(enc) for c in completions])
    score = sequence_scores(reward, enc, prompts, completions, texts, ctx)
    score = score - args.no_eos_penalty * (~ended).float()
    device = next(policy.parameters()).device
    batch, start, n = rollout_batch(prompts, completions, pad_id(enc))
    batch = {k: v.to(device) for k, v in batch.items()}
    lo, hi = rank_slice(len(prompts), ctx)
    mine = {k: v[lo:hi] for k, v in batch.items()}
    old_logp, old_values = policy(mine, start, n, args.temperature)
    ref_logp = token_logps(ref, mine, start, n, args.temperature)
    old_logp, old_values, ref_logp = (gather_rows(x, len(prompts), ctx) for x in (old_logp, old_values, ref_logp))
    mask = batch["mask"]
    rewards, kl = kl_penalty_rewards(score.to(device), old_logp, ref_logp, mask, beta, args.kl_estimator,
                                     args.reward_shape, args.shape_gamma)
    adv, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
    policy.train()
    return {"batch": batch, "start": start, "n": n, "old_logp": old_logp, "old_values": old_values,
            "ref_logp": ref_logp, "advantages": whiten(adv, mask), "returns": returns, "mask": mask,
            "score": score, "kl": kl.sum(-1), "ended": ended.float(), "texts": texts,
            "gold": torch.tensor([world.sentiment_score(t) for t in texts]), "length": mask.sum(-1)}


def ratio_gap(logp, old_logp, ctx=None):
    """max |ratio - 1| = exp(max_t |log pi - log pi_old|) - 1 over every process's tokens: on the first minibatch
    of a rollout it is 0 when rollout and update see the same policy (dropout off, one temperature)."""
    return math.exp(all_reduce_max((logp - old_logp).abs().max().detach(), ctx).item()) - 1


def ppo_update(model, optimizer, ro, args, rng, it=0, ctx=None):
    """--ppo-epochs passes over the rollout in shuffled minibatches of the clipped losses; mean stats.
    model: the policy, or its DDP wrapper under torchrun; every process draws the same minibatches and runs
    its share of the rows of each."""
    stats, B, world = {}, ro["mask"].size(0), ctx.world if ctx is not None else 1
    lo, hi = rank_slice(args.minibatch, ctx)
    names = ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac")
    for _ in range(args.ppo_epochs):
        order = rng.permutation(B)
        for i in range(0, B, args.minibatch):
            whole = torch.as_tensor(order[i:i + args.minibatch], device=ro["mask"].device)
            denom = ro["mask"][whole].sum() / world   # see masked_mean: DDP's average = the whole minibatch's mean
            idx = whole[lo:hi]
            mb = {k: v[idx] for k, v in ro["batch"].items()}
            logp, values = model(mb, ro["start"], ro["n"], args.temperature)
            mask = ro["mask"][idx]
            pg_loss, clipfrac, approx_kl = ppo_policy_loss(logp, ro["old_logp"][idx], ro["advantages"][idx], mask,
                                                           args.cliprange, denom)
            vf_loss, vf_clipfrac = ppo_value_loss(values, ro["old_values"][idx], ro["returns"][idx], mask,
                                                  args.cliprange_value, denom)
            loss = pg_loss + args.vf_coef * vf_loss
            loss.backward()
            means = all_reduce_mean(torch.stack([pg_loss, vf_loss, clipfrac, approx_kl, vf_clipfrac]).detach(), ctx)
            check_finite(means[0] + args.vf_coef * means[1], it)  # NaN/inf anywhere stops every process before the step
            grad_norm = optimizer_step(model, optimizer, args.grad_clip)
            for k, v in zip(names + ("grad_norm",), (*means.tolist(), grad_norm.item())):
                stats.setdefault(k, []).append(v)
            if "ratio_first" not in stats:
                stats["ratio_first"] = [ratio_gap(logp, ro["old_logp"][idx], ctx)]
    return {k: (v[0] if k == "ratio_first" else sum(v) / len(v)) for k, v in stats.items()}


# ----------------------------------------------------------------------------- the exact check

def toy_exact_check(beta=0.5, iters=300, epochs=4, lr=2.0, seed=0):
    """PPO with the per-token KL penalty on align.py's tabular problem, small enough to enumerate: every
    expectation over answers is the exact sum weighted by pi_old(y) (no sampling noise). The KL-regularised
    objective E_pi[r] - beta * KL(pi || pi_ref) has its maximum at pi* = pi_ref * exp(r / beta) / Z; PPO's fixed
    point (GAE with gamma = lambda = 1, clipped losses, a tabular critic) must be that pi*.
    Returns (pi_ref, r, pi*, pi_ppo) as float64 tensors over aa, ab, ba, bb."""
    t1_ref, t2_ref, r = toy_problem(torch.Generator().manual_seed(seed))
    ref_logp = toy_token_logps(t1_ref, t2_ref)
    pi_star = kl_regularised_optimum(ref_logp.sum(-1), r, beta)
    theta1, theta2 = t1_ref.clone().requires_grad_(), t2_ref.clone().requires_grad_()
    v0, v1 = torch.zeros(1, dtype=torch.float64, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta1, theta2, v0, v1], lr=lr)
    ones = torch.ones(4, 2, dtype=torch.float64)
    for _ in range(iters):
        with torch.no_grad():  # the "rollout": all four answers, weighted by pi_old
            old_logp, old_values = toy_token_logps(theta1, theta2), toy_values(v0, v1)
            weight = old_logp.sum(-1).exp()[:, None] * ones
            rewards, _ = kl_penalty_rewards(r, old_logp, ref_logp, ones, beta)
            adv, returns = gae(rewards, old_values, ones, gamma=1.0, lam=1.0)
        for _ in range(epochs):
            pg, _, _ = ppo_policy_loss(toy_token_logps(theta1, theta2), old_logp, adv, weight, 0.2)
            vf, _ = ppo_value_loss(toy_values(v0, v1), old_values, returns, weight, 0.2)
            opt.zero_grad()
            (pg + vf).backward()
            opt.step()
    with torch.no_grad():
        return ref_logp.sum(-1).exp(), r, pi_star, toy_token_logps(theta1, theta2).sum(-1).exp()


def toy_values(v0, v1):
    """The tabular critic: V(s_0 = x) for the first token, V(s_1 = x + y1) for the second; (4, 2)."""
    return torch.stack([v0.expand(4), v1[TOY_Y1]], -1)


def toy_report():
    print("PPO with a per-token KL penalty on a tabular policy over the answers aa ab ba bb (exact expectations);\n"
          "closed form of the KL-regularised optimum: pi* = pi_ref * exp(r / beta) / Z")
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    for beta in (1.0, 0.5, 0.2):
        pi_ref, r, pi_star, pi = toy_exact_check(beta)
        err, kl = (pi - pi_star).abs().max().item(), (pi * (pi / pi_star).log()).sum().item()
        print(f"\nbeta {beta}: max |pi_PPO - pi*| = {err:.2e}, KL(pi_PPO || pi*) = {kl:.2e}")
        print_toy_table(pi_ref, r, pi_star, pi, "PPO")
        out[f"max_err_beta{beta}"], out[f"kl_beta{beta}"] = err, kl
    torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------- inputs and outputs

def value_head_from_reward(v_head, rm):
    """--critic-init reward: V starts as the reward model's head, r = w . LayerNorm(h) + b, with the
    LayerNorm's gain and shift folded into the linear layer (w' = w * g, b' = b + w . s); its normalisation is
    dropped, as the policy's hidden states already come out of ln_f."""
    with torch.no_grad():
        w, g = rm.head.weight, rm.ln.weight
        s = rm.ln.bias if rm.ln.bias is not None else torch.zeros_like(g)
        v_head.weight.copy_(w * g)
        v_head.bias.copy_(rm.head.bias + (w * s).sum(-1))


def training_prompts(args, enc, block_size):
    """-> prompt strings and token ids: --prompts FILE, or the world's review train prompts (deduplicated)."""
    if args.prompts:
        prompts, source = data.load_prompts(args.prompts), args.prompts
    else:
        tasks = world.task_sets(world.make_world(args.world_seed))["review"]["train"]
        prompts, source = list(dict.fromkeys(data.format_prompt(e["instruction"], e["input"]) for e in tasks)), "review"
    ids = [enc.encode_ordinary(p) for p in prompts]
    for i, x in enumerate(ids):
        if not x or len(x) >= block_size:
            raise UserError(f"{source}: prompt {i + 1} has {len(x)} tokens; it needs 1 to {block_size - 1} "
                                 f"(the model's context) to leave room for an answer")
    if len(ids) < args.rollout_batch:
        raise UserError(f"{source}: {len(ids)} prompts, fewer than one rollout of {args.rollout_batch}; "
                             f"add prompts or lower --rollout-batch")
    return prompts, ids


def prompt_indices(n, per_iter, seed, it):
    """The prompts of iteration `it`: a slice of epoch it // (n // per_iter)'s permutation, a pure function of
    (seed, it), so --resume samples the very same prompts."""
    epoch, k = divmod(it, n // per_iter)
    return np.random.default_rng([seed, epoch]).permutation(n)[k * per_iter:(k + 1) * per_iter]


def save_value_head(out_dir, v_head):
    atomic_save_safetensors({"weight": v_head.weight, "bias": v_head.bias}, os.path.join(out_dir, "value_head.safetensors"))


def load_models(args, ctx):
    """-> (policy: ActorCritic, ref, reward model or None for the gold judge, enc). The policy and value
    head train; the reference and the reward model are frozen."""
    gpt, ref, enc = load_policy_and_reference(args.init, args.ref, ctx.device)
    rm = None
    if args.reward != "gold":
        rm, rm_enc, _ = load_reward_model(args.reward, ctx.device)
        check_same_tokenizer(enc, rm_enc, f"the reward model {args.reward}", f"the policy {args.init}")
        rm = frozen(rm)
    policy = ActorCritic(gpt)
    if args.critic_init == "reward":
        value_head_from_reward(policy.v_head, rm)
    return policy.to(ctx.device).train(), ref, rm, enc


def iteration(policy, model, ref, rm, enc, optimizer, prompt_ids, it, beta, args, ctx):
    """One PPO iteration: sample a rollout for this iteration's prompts, then the clipped updates of model (the
    policy, or its DDP wrapper); -> (the rollout, its figures for the log, over the whole rollout)."""
    idx = prompt_indices(len(prompt_ids), args.rollout_batch, args.seed, it)
    with ctx.autocast():
        ro = make_rollout(policy, ref, rm, enc, [prompt_ids[i] for i in idx], args, it, beta, ctx)
        stats = ppo_update(model, optimizer, ro, args, np.random.default_rng([args.seed, it]), it, ctx)
    # stats["ratio_first"]: max |ratio - 1| on the first minibatch, 0 when rollout and update see the same policy
    # the gold judge knows the world's review prompts only: on --prompts of your own it means nothing
    gold = {} if args.prompts else {"gold": ro["gold"].mean().item()}
    return ro, {"score": ro["score"].mean().item(), **gold, "kl": ro["kl"].mean().item(), "beta": beta,
                "eos": ro["ended"].mean().item(), "len": ro["length"].mean().item(), **stats}


def final_eval(policy, ref, rm, enc, args, ctx):
    """The gold judge on held-out prompts, policy against the reference (the SFT model); under torchrun every
    process samples its share of the prompts and all get the same figures (align.heldout_eval)."""
    prompts = eval_prompts(args.eval_prompts, args.world_seed, args.eval_limit)
    return heldout_eval(policy.gpt, ref, enc, prompts, args.max_new_tokens, args.seed, ctx.autocast, rm=rm, ctx=ctx)


def save(args, policy, optimizer, enc, it, beta, metrics, samples=()):
    save_train_state(args.out, policy, optimizer, it, extra={"kl_coef": beta}, args=args)
    save_checkpoint(args.out, policy.gpt, enc, {"stage": "ppo", "args": vars(args), "step": it,
                                                "metrics": metrics, "samples": list(samples),
                                                "finished": it == args.iters})
    save_value_head(args.out, policy.v_head)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.toy:
        return toy_report()
    t0 = time.time()
    ctx = setup(args)
    check_divisible(args.minibatch, "--minibatch", ctx)
    policy, ref, rm, enc = load_models(args, ctx)
    prompts, prompt_ids = training_prompts(args, enc, policy.gpt.config.block_size)
    if ctx.master:
        print(f"prompts: {len(prompts)}; {args.iters} iterations of {args.rollout_batch} rollouts, reward "
              f"{'gold judge' if rm is None else args.reward}; model {policy.gpt.num_params() / 1e6:.2f}M parameters "
              "without the position embeddings" + sampling_note(args.rollout_batch, args, ctx))

    optimizer = make_optimizer(policy, args.lr, args.weight_decay, ctx=ctx)
    start, beta = 0, args.kl_coef
    if args.resume:
        start, extra = load_train_state(args.out, policy, optimizer)
        beta = extra["kl_coef"]
    model = wrap_model(policy, ctx, compile=False)   # DDP under torchrun: it averages the gradients
    stop = StopFlag()
    log = MetricsLog(args.out, args.iters, ctx.master, resume=args.resume)
    t_last, sums, n_logged, window = time.time(), {}, 0, {}
    for it in range(start, args.iters):
        lr = lr_at(it, args.lr, args.warmup, args.iters, args.min_lr)
        set_lr(optimizer, lr)
        ro, row = iteration(policy, model, ref, rm, enc, optimizer, prompt_ids, it, beta, args, ctx)
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v
        n_logged += 1
        if args.target_kl:   # the KL of the whole rollout, the same on every process
            beta = adaptive_kl_coef(beta, row["kl"], args.target_kl, args.rollout_batch, args.horizon)
        done = it + 1
        if done % args.log_interval == 0 or done == args.iters:
            dt, t_last = time.time() - t_last, time.time()
            window = {k: v / n_logged for k, v in sums.items()}   # the means of the last log interval
            log.log(done, **window, lr=lr,
                    samples_per_s=round(args.rollout_batch * n_logged / max(dt, 1e-9), 1))
            judge = "score" if args.prompts else "gold"
            if ctx.master:
                print(f"  sample ({judge} {ro[judge][0].item():+.2f}): {ro['texts'][0][:120]}")
            sums, n_logged = {}, 0
        if stop.requested_anywhere(ctx) or done == args.stop_at:
            if ctx.master:
                save(args, policy, optimizer, enc, done, beta, {})
                print(f"stopped at iteration {done}; continue with: python ppo.py --resume --out {args.out}")
            return {"stopped_at": done, **row}

    metrics = {**{f"train_{k}": v for k, v in window.items()}, "kl_coef_final": beta}
    heldout, samples = final_eval(policy, ref, rm, enc, args, ctx)
    metrics.update(heldout)
    metrics["time_s"] = round(time.time() - t0, 1)
    if ctx.master:
        save(args, policy, optimizer, enc, args.iters, beta, metrics, samples)
        print_final(metrics, samples)
    return metrics


if __name__ == "__main__":
    run_cli(main)
