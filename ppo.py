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

One iteration: sample a completion for each of --rollout-batch prompts with the KV cache (rollout.py: left-padded
prompts, so every completion starts in the same column; --sample-batch prompts at a time, chunk k with its
own generator seeded from (--seed, k, iteration)); score it (reward model, or the gold judge);
compute log pi_old, log pi_ref and V_old for every completion token in one forward each; build the
per-token rewards r_t = -beta * KL_t, plus the score at the last token (or spread as r_T * gamma^(T-t));
advantages by GAE, whitened; then --ppo-epochs passes over shuffled minibatches with the clipped
policy loss + vf_coef * the clipped value loss. Padding after EOS gets no reward, advantage or loss.

Under torchrun (gloo on CPU, NCCL on CUDA) chunk k is sampled by process k mod N and the completions are
gathered in order, so every process holds the whole rollout; scores, log-probs and values are computed on each
process's share of the rows and gathered; whitening and the KL controller see the whole rollout. Every process
draws the same minibatches and runs the forward of its share of each (--minibatch must be a multiple of N),
with per-token weights 1 / (the whole minibatch's token count) times N (rollout.minibatches), so every loss
is a plain weighted sum and DistributedDataParallel's average is the gradient of one process. The samples
depend on --sample-batch, never on the number of processes: N processes give one process's results to float
rounding. The default --sample-batch makes the default rollout one chunk: lower it (e.g. to --rollout-batch /
N) so that every process samples. Only the first process writes OUT and prints; every process runs its share
of the final held-out evaluation (align.heldout_eval). The model is saved before that evaluation.

State s_t = prompt x + y_1..y_t, action a_t = the next token, reward from the frozen reward model for the
whole completion. At the end the policy and the reference each answer held-out prompts (temperature 1)
and the gold judge scores them: mean gold reward +- 95% interval, win rate, sequence KL, EOS rate.
"""

import contextlib
import os
import time

import numpy as np
import torch
import torch.nn as nn

import world
from align import (TOY_Y1, add_policy_args, add_run_args, eval_prompts, heldout_eval, kl_regularised_optimum,
                   print_final, print_toy_table, toy_problem, toy_token_logps)
from common import (ArgumentParser, Rule, atomic_save_safetensors, check_rules, no_effect, nonneg_float,
                    positive_float, positive_int, prob, run_cli)
from gpt import save_checkpoint, token_logprobs
from rollout import (LogWindow, PolicyLogps, UpdateStats, add_rollout_args, check_rl_inputs, forward_rows,
                     kl_per_token, load_rl_models, minibatches, prompt_indices, ratio_stats, sample_rollout,
                     sampling_note, sequence_scores, setup_rl, training_prompts)
from training import (MetricsLog, StopFlag, all_reduce_mean, check_finite, check_prompts_fit, final_evaluation,
                      load_train_state, lr_at, make_optimizer, mark_finished, optimizer_step, save_train_state, set_lr,
                      wrap_model)


def build_parser():
    p = ArgumentParser(description=__doc__)
    add_policy_args(p)
    p.add_argument("--reward", default="out/reward", help="frozen reward model (reward.py), or 'gold': "
                   "PPO against the gold judge world.sentiment_score of the decoded text")
    p.add_argument("--critic-init", choices=("zero", "reward"), default=None,
                   help="value head: zeros, or a copy of the reward model's scalar head (default: reward, or "
                        "zero with --reward gold); starting from the reward head halves the KL for the same reward")
    p.add_argument("--prompts", default=None, help="training prompts file (default: the world's review train prompts)")
    add_rollout_args(p, rollout_batch=32, rows="prompts")
    p.add_argument("--ppo-epochs", type=positive_int, default=2, help="passes over each rollout")
    p.add_argument("--kl-estimator", choices=("k1", "k3"), default="k1",
                   help="per-token KL: k1 = log pi - log pi_ref; k3 = (ratio - 1) - log ratio, ratio = pi_ref / pi")
    p.add_argument("--target-kl", type=nonneg_float, default=0.0, help="adaptive beta aiming at this sequence KL (0 = fixed beta)")
    p.add_argument("--horizon", type=positive_int, default=10000, help="adaptive KL controller horizon, in samples")
    p.add_argument("--reward-shape", choices=("terminal", "discounted"), default="terminal",
                   help="score at the last token, or spread as r_t = r_T * gamma^(T - t) over all tokens")
    p.add_argument("--shape-gamma", type=prob, default=0.9, help="gamma of the discounted reward shape")
    p.add_argument("--gamma", type=prob, default=1.0, help="GAE discount")
    p.add_argument("--lam", type=prob, default=0.95, help="GAE lambda")
    p.add_argument("--cliprange-value", type=positive_float, default=0.2, help="value clip around the old values")
    p.add_argument("--vf-coef", type=nonneg_float, default=0.1, help="weight of the value loss")
    return add_run_args(p, "out/ppo", "final evaluation prompts: 'review' (the world's review "
                        "test prompts, judged by world.sentiment_score), a prompts file, or 'none'")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.ref = args.ref or args.init
    if args.critic_init is None:
        args.critic_init = "zero" if args.reward == "gold" else "reward"
    return args


# what check_args refuses before any work, each rule with a command line that breaks it
RULES = [
    Rule(lambda a: a.rollout_batch % a.minibatch, "--rollout-batch {a.rollout_batch} must be a multiple of "
         "--minibatch {a.minibatch}", ("--rollout-batch", "6", "--minibatch", "4")),
    Rule(lambda a: a.critic_init == "reward" and a.reward == "gold", "--critic-init reward needs a reward model, "
         "not --reward gold", ("--reward", "gold", "--critic-init", "reward")),
    no_effect("--shape-gamma", lambda a: a.reward_shape != "discounted", "without --reward-shape discounted",
              ("--shape-gamma", "0.5")),
    no_effect("--horizon", lambda a: not a.target_kl, "without --target-kl: beta is fixed", ("--horizon", "500")),
]


def check_args(args):
    """Before any work: RULES, the prompt files, --init and --ref (language models, not reward models) and
    --reward (a reward model), none of them --out; under --resume the run's own options, checked when it started."""
    check_rules(args, RULES)
    if args.resume:
        return
    check_rl_inputs(args, judges=("gold",))


# ----------------------------------------------------------------------------- the equations

def masked_mean(x, mask):
    """Mean of x over real tokens: sum_t x_t * m_t / sum_t m_t."""
    return (x * mask).sum() / mask.sum().clamp(min=1e-8)


def whiten(x, mask, shift_mean=True):
    """Whitening over real tokens: (x - mean) / sqrt(var + 1e-8), mean and (unbiased) var over mask = 1;
    padding stays 0."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


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


def kl_penalty_rewards(score, per_token_logps, ref_per_token_logps, mask, beta, estimator="k1", shape="terminal",
                       gamma=1.0):
    """R_total = RM(x, y) - beta * KL(pi_theta(.|x) || pi_ref(.|x)), per token:
    r_t = shaped score_t - beta * KL_t, with KL_t = rollout.kl_per_token(log pi, log pi_ref), so that
    sum_t r_t = RM(x, y) - beta * (log pi(y|x) - log pi_ref(y|x)) for the terminal shape and k1.
    Returns (r, KL_t); both 0 on padding."""
    kl = kl_per_token(per_token_logps, ref_per_token_logps, estimator) * mask
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


def ppo_policy_loss(per_token_logps, old_per_token_logps, advantages, weights, cliprange=0.2):
    """Clipped surrogate objective, as a loss to minimise, summed over tokens with weights w (token means,
    rollout.minibatches): ratio_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t) = exp(log pi - log pi_old),
    L = -sum_t w_t min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t)."""
    log_ratio = torch.where(weights > 0, per_token_logps - old_per_token_logps, 0.0)   # padding: ratio 1, weight 0
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return (torch.max(loss1, loss2) * weights).sum()


def ppo_value_loss(values, old_values, returns, weights, cliprange_value=0.2):
    """Clipped value loss: V_clip = V_old + clip(V - V_old, -eps_v, eps_v),
    L_V = 0.5 * sum_t w_t max((V - R_t)^2, (V_clip - R_t)^2). Returns (L_V, share clipped: the clipped term is the
    larger and |V - V_old| > eps_v, since inside the range V_clip is V only up to rounding), weighted alike."""
    v_clip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1, l2 = (values - returns) ** 2, (v_clip - returns) ** 2
    clipped = ((values - old_values).abs() > cliprange_value) & (l2 > l1)
    return 0.5 * (torch.max(l1, l2) * weights).sum(), (clipped.float() * weights).sum().detach()


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
        per_token_logps = token_logprobs(self.gpt.lm_head(h), batch["actions"], temperature)
        return per_token_logps, self.v_head(h).squeeze(-1).float() * batch["mask"]


# ----------------------------------------------------------------------------- rollout and update

@torch.no_grad()
def make_rollout(policy, ref, reward, enc, prompts, args, it, beta, ctx=None):
    """Sample, score and evaluate the iteration's batch of completions (rollout.sample_rollout); everything PPO
    needs, as tensors, the whole rollout on every process (log pi_old, V_old and log pi_ref computed on shares,
    gathered: rollout.forward_rows)."""
    policy.eval()
    ro = sample_rollout(policy.gpt, enc, prompts, args, it, ctx)
    score = sequence_scores(reward, enc, prompts, ro["completions"], ro["texts"], ctx)
    score = score - args.no_eos_penalty * (~ro["ended"]).float()
    old_per_token_logps, old_values = forward_rows(policy, ro, args.temperature, ctx)
    (ref_per_token_logps,) = forward_rows(PolicyLogps(ref), ro, args.temperature, ctx)
    mask = ro["mask"]
    rewards, kl = kl_penalty_rewards(score.to(mask.device), old_per_token_logps, ref_per_token_logps, mask, beta,
                                     args.kl_estimator, args.reward_shape, args.shape_gamma)
    adv, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
    policy.train()
    return {**ro, "old_per_token_logps": old_per_token_logps, "old_values": old_values,
            "ref_per_token_logps": ref_per_token_logps, "advantages": whiten(adv, mask), "returns": returns,
            "score": score, "kl": kl.sum(-1), "ended": ro["ended"].float(),
            "gold": torch.tensor([world.sentiment_score(t) for t in ro["texts"]])}


def ppo_update(model, optimizer, ro, args, rng, it=0, ctx=None, autocast=contextlib.nullcontext):
    """--ppo-epochs passes over the rollout in shuffled minibatches (rollout.minibatches: this process's rows and
    their token weights) of the clipped losses; -> the mean of each figure. model: the policy, or its DDP wrapper
    under torchrun; autocast: the precision context of its forward pass (backward and step run outside it)."""
    stats = UpdateStats(("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac"))
    for rows, weights, mean_weights in minibatches(ro["mask"], args.minibatch, args.ppo_epochs, rng, ctx=ctx):
        with autocast():
            per_token_logps, values = model({k: v[rows] for k, v in ro["batch"].items()}, ro["start"], ro["n"],
                                            args.temperature)
        old_per_token_logps, advantages = ro["old_per_token_logps"][rows], ro["advantages"][rows]
        pg_loss = ppo_policy_loss(per_token_logps, old_per_token_logps, advantages, weights, args.cliprange)
        vf_loss, vf_clipfrac = ppo_value_loss(values, ro["old_values"][rows], ro["returns"][rows], weights,
                                              args.cliprange_value)
        (pg_loss + args.vf_coef * vf_loss).backward()
        clipfrac, approx_kl = ratio_stats(per_token_logps, old_per_token_logps, advantages, mean_weights, args.cliprange)
        means = all_reduce_mean(torch.stack([pg_loss, vf_loss, clipfrac, approx_kl, vf_clipfrac]).detach(), ctx)
        check_finite(means[0] + args.vf_coef * means[1], it)  # NaN/inf anywhere stops every process before the step
        stats.record(means, optimizer_step(model, optimizer, args.grad_clip), per_token_logps, old_per_token_logps, ctx)
    return stats.result()


# ----------------------------------------------------------------------------- the exact check

def toy_exact_check(beta=0.5, iters=300, epochs=4, lr=2.0, seed=0):
    """PPO with the per-token KL penalty on align.py's tabular problem, small enough to enumerate: every
    expectation over answers is the exact sum weighted by pi_old(y) (no sampling noise). The KL-regularised
    objective E_pi[r] - beta * KL(pi || pi_ref) has its maximum at pi* = pi_ref * exp(r / beta) / Z; PPO's fixed
    point (GAE with gamma = lambda = 1, clipped losses, a tabular critic) must be that pi*
    (docs/rl-derivations.md). Returns (pi_ref, r, pi*, pi_ppo) as float64 tensors over aa, ab, ba, bb."""
    t1_ref, t2_ref, r = toy_problem(torch.Generator().manual_seed(seed))
    ref_per_token_logps = toy_token_logps(t1_ref, t2_ref)
    pi_star = kl_regularised_optimum(ref_per_token_logps.sum(-1), r, beta)
    theta1, theta2 = t1_ref.clone().requires_grad_(), t2_ref.clone().requires_grad_()
    v0, v1 = torch.zeros(1, dtype=torch.float64, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta1, theta2, v0, v1], lr=lr)
    ones = torch.ones(4, 2, dtype=torch.float64)
    for _ in range(iters):
        with torch.no_grad():  # the "rollout": all four answers, weighted by pi_old (a token mean: sum w = 1)
            old_per_token_logps, old_values = toy_token_logps(theta1, theta2), toy_values(v0, v1)
            weights = old_per_token_logps.sum(-1).exp()[:, None] * ones
            weights = weights / weights.sum()
            rewards, _ = kl_penalty_rewards(r, old_per_token_logps, ref_per_token_logps, ones, beta)
            adv, returns = gae(rewards, old_values, ones, gamma=1.0, lam=1.0)
        for _ in range(epochs):
            pg = ppo_policy_loss(toy_token_logps(theta1, theta2), old_per_token_logps, adv, weights, 0.2)
            vf, _ = ppo_value_loss(toy_values(v0, v1), old_values, returns, weights, 0.2)
            opt.zero_grad()
            (pg + vf).backward()
            opt.step()
    with torch.no_grad():
        return ref_per_token_logps.sum(-1).exp(), r, pi_star, toy_token_logps(theta1, theta2).sum(-1).exp()


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


def save_value_head(out_dir, v_head):
    atomic_save_safetensors({"weight": v_head.weight, "bias": v_head.bias}, os.path.join(out_dir, "value_head.safetensors"))


def load_models(args, ctx):
    """-> (policy: ActorCritic, ref, reward model or None for the gold judge, enc). The policy and value
    head train; the reference and the reward model are frozen."""
    gpt, ref, rm, enc = load_rl_models(args, ctx.device, judges=("gold",))
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
    stats = ppo_update(model, optimizer, ro, args, np.random.default_rng([args.seed, it]), it, ctx, ctx.autocast)
    # stats["ratio_first"]: max |ratio - 1| on the first minibatch, 0 when rollout and update see the same policy
    # the gold judge knows the world's review prompts only: on --prompts of your own it means nothing
    gold = {} if args.prompts else {"gold": ro["gold"].mean().item()}
    return ro, {"score": ro["score"].mean().item(), **gold, "kl": ro["kl"].mean().item(), "beta": beta,
                "eos": ro["ended"].mean().item(), "len": ro["length"].mean().item(), **stats}


def final_eval(policy, ref, rm, enc, prompts, args, ctx):
    """The gold judge on held-out prompts, policy against the reference (the SFT model); under torchrun every
    process samples its share of the prompts and all get the same figures (align.heldout_eval)."""
    return heldout_eval(policy.gpt, ref, enc, prompts, args.max_new_tokens, args.seed, ctx.autocast, rm=rm, ctx=ctx)


def save(args, policy, optimizer, enc, it, beta, metrics):
    """The resumable state, the model and its value head; config.json says "finished": false until
    mark_finished, after the final evaluation (run.sh skips only finished runs)."""
    save_train_state(args.out, policy, optimizer, it, extra={"kl_coef": beta, "metrics": metrics}, args=args)
    save_checkpoint(args.out, policy.gpt, enc, {"stage": "ppo", "args": vars(args), "step": it, "metrics": metrics,
                                                "samples": [], "finished": False})
    save_value_head(args.out, policy.v_head)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    if args.toy:
        return toy_report()
    check_args(args)
    ctx = setup_rl(args)
    policy, ref, rm, enc = load_models(args, ctx)
    held_out = eval_prompts(args.eval_prompts, args.world_seed, args.eval_limit)
    check_prompts_fit("--eval-prompts", held_out, enc, policy.gpt.config.block_size)
    prompts, prompt_ids = training_prompts(args, enc, policy.gpt.config.block_size)
    if ctx.master:
        print(f"prompts: {len(prompts)}; {args.iters} iterations of {args.rollout_batch} rollouts, reward "
              f"{'gold judge' if rm is None else args.reward}; model {policy.gpt.num_params() / 1e6:.2f}M parameters "
              "without the position embeddings" + sampling_note(args.rollout_batch, args, ctx))

    optimizer = make_optimizer(policy, args.lr, args.weight_decay, ctx=ctx)
    start, extra = load_train_state(args.out, policy, optimizer) if args.resume else (0, {})
    beta = extra.get("kl_coef", args.kl_coef)
    model = wrap_model(policy, ctx, compile=False)   # DDP under torchrun: it averages the gradients
    stop = StopFlag()
    window = LogWindow(MetricsLog(args.out, args.iters, ctx.master, resume=args.resume), args, ctx.master)
    for it in range(start, args.iters):
        lr = lr_at(it, args.lr, args.warmup, args.iters, args.min_lr)
        set_lr(optimizer, lr)
        ro, row = iteration(policy, model, ref, rm, enc, optimizer, prompt_ids, it, beta, args, ctx)
        done = it + 1
        window.add(done, row, lr, ro, "score" if args.prompts else "gold")
        if args.target_kl:   # the KL of the whole rollout, the same on every process
            beta = adaptive_kl_coef(beta, row["kl"], args.target_kl, args.rollout_batch, args.horizon)
        if stop.requested_anywhere(ctx) or done == args.stop_at:
            if ctx.master:
                save(args, policy, optimizer, enc, done, beta, {})
                print(f"stopped at iteration {done}; continue with: python ppo.py --resume --out {args.out}")
            return {"stopped_at": done, **row}

    # the trained model first, then the final evaluation: an error there never costs the model (a --resume at the
    # last iteration, after such an error, runs the evaluation alone)
    metrics = ({**{f"train_{k}": v for k, v in window.means.items()}, "kl_coef_final": beta} if window.means
               else dict(extra.get("metrics", {})))
    if ctx.master:
        save(args, policy, optimizer, enc, args.iters, beta, metrics)
    with final_evaluation(args.out, "python ppo.py"):
        heldout, samples = final_eval(policy, ref, rm, enc, held_out, args, ctx)
    metrics.update(heldout, time_s=round(time.time() - t0, 1))
    if ctx.master:
        mark_finished(args.out, metrics, samples=list(samples))
        print_final(metrics, samples)
    return metrics


if __name__ == "__main__":
    run_cli(main)
