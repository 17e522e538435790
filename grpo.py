"""Stage 7b, critic-free RL: GRPO (Group Relative Policy Optimization, Shao et al. 2024) and RLOO
(REINFORCE Leave-One-Out, Ahmadian et al. 2024). No value head: each prompt gets a group of G sampled
completions, and the other completions of the same prompt are the baseline of each one.

    python grpo.py                                   # GRPO: policy = reference = out/sft, reward model out/reward
    python grpo.py --advantage rloo --out out/rloo   # RLOO: leave-one-out baseline, k1 KL inside the reward
    python grpo.py --scale-rewards none              # Dr. GRPO: no division by the group's standard deviation
    python grpo.py --kl-coef 0.2 --out out/grpo_kl0.2
    python grpo.py --reward gold                     # against the gold judge (world.sentiment_score) itself
    python grpo.py --reward exact --init out/domain_sft_replay --task domain_facts --iters 100 --max-new-tokens 16 \\
                   --out out/domain_grpo             # verifiable reward: 1 if the answer is the world's answer
    python grpo.py --reward exact --prompts qa.jsonl # your questions: Alpaca records whose 'output' is the answer
    python grpo.py --toy                             # exact check of both fixed points on a tabular policy
    torchrun --nproc_per_node=4 grpo.py --sample-batch 8   # 4 processes sampling, the results of one

One iteration: take --rollout-batch prompts, sample --group-size completions of each with the KV cache
(rollout.py, as for PPO: left-padded prompts, one --temperature for sampling and for every log-prob;
--sample-batch rows at a time, chunk k with its own generator seeded from (--seed, k, iteration)); score each
whole completion r_i (reward model, gold judge, or exact answer; minus --no-eos-penalty if it never ends);
compute log pi_old and log pi_ref of every completion token; turn the G scores of each prompt into one
advantage per completion (grpo_advantages or rloo_advantages), given to each of its tokens and to no padding;
then --epochs passes over shuffled minibatches of the clipped surrogate (clipped_surrogate, PPO's). The KL to
the frozen reference enters either the loss (--kl-in loss, GRPO: beta * k3 per token, with the current policy)
or the reward before the advantages (--kl-in reward, RLOO/PPO style: r_i - beta * sum_t k1_t, with pi_old).

The policy stays in eval mode throughout (dropout off) so that its log-probs in the update match the
stored log pi_old: ratio = 1 on the first minibatch, and clipping measures only the policy's own change.
Saved to OUT: the policy as a plain GPT checkpoint (config.json stage "grpo", "algorithm" grpo|rloo, the final
metrics), metrics.jsonl, resume/.

Under torchrun, as for PPO (rollout.py): every process holds the whole rollout, so each group of G is seen whole,
and the samples depend on --sample-batch, not on the number of processes (lower it so that every process samples).
Only the first process writes OUT and prints; the model is saved before the final evaluation (align.heldout_eval,
every process its share; the greedy accuracies of --reward exact on the first).

Token averaging (--loss-agg, rollout.token_weights): seq-mean-token-mean (the GRPO paper: short completions'
tokens weigh more), token-mean (DAPO) or token-sum-norm (default, Dr. GRPO: a constant B * --max-new-tokens, no
length bias); why: docs/rl-derivations.md#token-averaging-grpopy---loss-agg.

The exact check (--toy), on align.py's tabular two-token policy (answers aa ab ba bb, exact expectations):
  KL in the reward (k1, RLOO): the fixed point is pi*(y) = pi_ref(y) exp(r(y) / beta) / Z, the maximum of
      E_pi[r] - beta KL(pi || pi_ref).
  KL in the loss (k3, GRPO): the expected gradient of k3 is that of KL(pi_ref || pi), the other direction, so the
      fixed point is not pi* but, state by state, pi_a = beta pi_ref,a / (beta - (A_a - A_bar)), A_bar = sum_a pi_a
      A_a (align.k3_toy_fixed_point). The derivations: docs/rl-derivations.md.
"""

import contextlib
import re
import time

import numpy as np
import torch

import data
import world
from align import (TOY_ANSWERS, add_policy_args, add_run_args, eval_prompts, heldout_eval, k3_toy_fixed_point,
                   kl_regularised_optimum, print_final, toy_problem, toy_token_logps)
from common import ArgumentParser, Rule, check_rules, no_effect, nonneg_float, positive_int, run_cli
from evals import exact_match, task_accuracy
from gpt import save_checkpoint
from rollout import (LogWindow, PolicyLogps, UpdateStats, add_rollout_args, check_rl_inputs, checked_prompt_ids,
                     forward_rows, kl_per_token, load_rl_models, minibatches, prompt_indices, ratio_stats,
                     sample_rollout, sampling_note, sequence_scores, setup_rl, token_weights, training_prompts)
from training import (MetricsLog, StopFlag, all_reduce_mean, check_finite, check_prompts_fit, final_evaluation,
                      load_train_state, lr_at, make_optimizer, mark_finished, optimizer_step, save_train_state, set_lr,
                      wrap_model)

LOSS_AGGS = ("token-sum-norm", "seq-mean-token-mean", "token-mean")
EXACT_TASKS = ("domain_facts", "facts", "addition")
FORGETTING_TASKS = ("facts", "domain_facts", "addition", "sentiment")


def build_parser():
    p = ArgumentParser(description=__doc__)
    add_policy_args(p)
    p.add_argument("--reward", default="out/reward", help="a reward model (reward.py), 'gold' (the lexicon judge "
                   "world.sentiment_score) or 'exact' (1 if the answer equals the known answer, else 0)")
    p.add_argument("--task", choices=EXACT_TASKS, default="domain_facts", help="with --reward exact: the world's "
                   "questions to train on (train split) and to test on (test split)")
    p.add_argument("--format-reward", type=nonneg_float, default=0.0, metavar="W", help="with --reward exact: + W "
                   "for a completion in the worked column steps' form (reasoning_rewards)")
    p.add_argument("--steps-reward", type=nonneg_float, default=0.0, metavar="W", help="with --reward exact, on "
                   "additions: + W times the share of the column steps written right (reasoning_rewards, a process "
                   "reward)")
    p.add_argument("--prompts", default=None, help="training prompts file (default: the world's review train "
                   "prompts; with --reward exact, Alpaca/prompt-completion records whose output is the answer)")
    p.add_argument("--advantage", choices=("grpo", "rloo"), default="grpo",
                   help="grpo: (r - group mean) / group std; rloo: r - mean of the other G-1")
    p.add_argument("--scale-rewards", choices=("group", "none"), default=None,
                   help="GRPO: divide by the group's std ('group', default) or not ('none': Dr. GRPO)")
    p.add_argument("--kl-in", choices=("loss", "reward"), default=None,
                   help="loss: beta * k3 per token in the loss (default with grpo); reward: r - beta * sum_t k1 "
                        "before the advantages (default with rloo)")
    p.add_argument("--loss-agg", choices=LOSS_AGGS, default="token-sum-norm",
                   help="token averaging of the loss (see the docstring; default token-sum-norm)")
    add_rollout_args(p, rollout_batch=8, rows="completions")
    p.add_argument("--group-size", type=positive_int, default=4, help="completions sampled per prompt (G)")
    p.add_argument("--epochs", type=positive_int, default=2, help="passes over each rollout")
    return add_run_args(p, "out/grpo", "final evaluation prompts: 'review' (the world's review "
                        "test prompts, judged by world.sentiment_score), a prompts file, or 'none'; with --reward "
                        "exact: the task's test split and the forgetting check, or a file of questions with answers")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.ref = args.ref or args.init
    args.scale_rewards = args.scale_rewards or ("group" if args.advantage == "grpo" else "none")
    args.kl_in = args.kl_in or ("loss" if args.advantage == "grpo" else "reward")
    return args


# what check_args refuses before any work, each rule with a command line that breaks it
RULES = [
    Rule(lambda a: a.advantage == "rloo" and a.scale_rewards == "group", "--scale-rewards group is GRPO's; RLOO's "
         "advantage r_i - mean of the others is not scaled", ("--advantage", "rloo", "--scale-rewards", "group")),
    Rule(lambda a: a.group_size < 2, "--group-size {a.group_size}: a group needs at least 2 completions to be its "
         "own baseline", ("--group-size", "1")),
    Rule(lambda a: (a.rollout_batch * a.group_size) % a.minibatch, "--rollout-batch {a.rollout_batch} x --group-size "
         "{a.group_size} completions must be a multiple of --minibatch {a.minibatch}",
         ("--rollout-batch", "3", "--group-size", "3", "--minibatch", "4")),
    no_effect("--task", lambda a: a.reward != "exact" or a.prompts, "without --reward exact, nor with --prompts",
              ("--reward", "gold", "--task", "facts")),
    no_effect("--format-reward", lambda a: a.reward != "exact", "without --reward exact", ("--format-reward", "1")),
    no_effect("--steps-reward", lambda a: a.reward != "exact", "without --reward exact", ("--steps-reward", "1")),
]


def check_args(args):
    """Before any work: RULES, the prompt files, --init and --ref (language models, not reward models) and
    --reward (a reward model, unless gold or exact), none of them --out; under --resume the run's own options."""
    check_rules(args, RULES)
    if not args.resume:
        check_rl_inputs(args, judges=("gold", "exact"))


# ----------------------------------------------------------------------------- the equations

def group_mean_std(rewards, weights=None):
    """Per group (row) of rewards (N, G): mean and standard deviation. Unweighted: the sample mean and the
    unbiased std (torch.std, as GRPO implementations use). With weights w (the exact check's probabilities):
    r_bar = sum_j w_j r_j / sum_j w_j and sigma = sqrt(sum_j w_j (r_j - r_bar)^2 / sum_j w_j)."""
    if weights is None:
        return rewards.mean(-1, keepdim=True), rewards.std(-1, keepdim=True)
    w = weights / weights.sum(-1, keepdim=True)
    mean = (w * rewards).sum(-1, keepdim=True)
    return mean, ((w * (rewards - mean) ** 2).sum(-1, keepdim=True)).sqrt()


def grpo_advantages(rewards, scale="group", eps=1e-4, weights=None):
    """GRPO's group-relative advantage of completion i among the G of its prompt, rewards (N, G):
    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)     (--scale-rewards group)
    A_i =  r_i - mean_j r_j                          (--scale-rewards none: Dr. GRPO)
    A group whose rewards are all equal gets A = 0 everywhere: it teaches nothing."""
    mean, std = group_mean_std(rewards, weights)
    adv = rewards - mean
    return adv / (std + eps) if scale == "group" else adv


def rloo_advantages(rewards, weights=None):
    """RLOO's leave-one-out baseline, rewards (N, G), G >= 2:
    A_i = r_i - 1/(G-1) sum_{j != i} r_j  =  G/(G-1) (r_i - mean_j r_j).
    The baseline of sample i does not depend on y_i, so E[A_i grad log pi(y_i)] = E[r_i grad log pi(y_i)] for
    any G: with weights (the exact check's probabilities) that expectation is returned, as r_i - E_w[r]."""
    if weights is not None:
        return rewards - group_mean_std(rewards, weights)[0]
    G = rewards.size(-1)
    return (G * rewards - rewards.sum(-1, keepdim=True)) / (G - 1)


def kl_in_reward(scores, old_per_token_logps, ref_per_token_logps, mask, beta):
    """--kl-in reward (RLOO, PPO): the KL enters the sequence reward before the advantages,
    r'_i = r_i - beta * sum_t k1_t,  k1_t = log pi_old(y_t|s_t) - log pi_ref(y_t|s_t)  (rollout.kl_per_token),
    i.e. r' = r - beta * log(pi_old(y|x) / pi_ref(y|x)), a constant of the update (no gradient through it)."""
    return scores - beta * (kl_per_token(old_per_token_logps, ref_per_token_logps, "k1") * mask).sum(-1)


def token_advantages(adv, mask):
    """Every real token of completion i gets its sequence advantage A_i; padding gets 0: A_it = A_i * m_it."""
    return adv[:, None] * mask


def clipped_surrogate(per_token_logps, old_per_token_logps, advantages, weights, cliprange=0.2):
    """PPO's clipped surrogate as a loss, summed over tokens with weights w (rollout.token_weights):
    L = -sum_bt w_bt min(rho_bt A_bt, clip(rho_bt, 1 - eps, 1 + eps) A_bt),  rho = pi / pi_old = exp(log pi - log pi_old).
    Padding (w = 0) gets rho = 1. The same function as ppo.ppo_policy_loss (a test checks that they agree)."""
    rho = torch.exp(torch.where(weights > 0, per_token_logps - old_per_token_logps, 0.0))
    surrogate = torch.minimum(rho * advantages, rho.clamp(1.0 - cliprange, 1.0 + cliprange) * advantages)
    return -(weights * surrogate).sum()


def grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, weights, beta=0.0, cliprange=0.2):
    """The minimised loss, summed over tokens with weights w (rollout.token_weights):
    L = sum_bt w_bt [ -min(rho_bt A_bt, clip(rho_bt, 1 - eps, 1 + eps) A_bt) + beta * k3_bt ],
    rho = pi / pi_old (clipped_surrogate), k3_bt = pi_ref/pi - 1 - log(pi_ref/pi) of the current policy
    (rollout.kl_per_token "k3", the GRPO paper's estimator); beta = 0 when the KL is in the reward.
    Returns (L, policy term, k3 term)."""
    pg = clipped_surrogate(per_token_logps, old_per_token_logps, advantages, weights, cliprange)
    kl = (kl_per_token(per_token_logps, ref_per_token_logps, "k3") * weights).sum()
    return pg + beta * kl, pg, kl


def exact_reward(text, answer):
    """Verifiable reward: 1.0 if the completion's answer is the known answer, else 0.0. A numeric answer
    (addition, a population) is read with world.extract_answer_number ("The answer is 132." counts as 132);
    any other answer must match as evals.exact_match does (case, spaces and a final period ignored)."""
    if re.fullmatch(r"-?\d[\d,]*", answer.strip()):
        got = world.extract_answer_number(text)
        return float(got is not None and got == int(answer.strip().replace(",", "")))
    return exact_match(text, answer)


def reasoning_rewards(prompts, texts, format_w=0.0, steps_w=0.0):
    """The optional rewards of reasoning RL on additions, added to the exact reward:
        format_w * 1[worked column steps, then "The answer is N."]   (world.steps_well_formed: the form, not the truth)
        + steps_w * the share of the column steps written right     (world.steps_right: a process reward)
    for the sum "A + B" each prompt asks (no steps reward for a prompt without one). The steps reward is dense where
    the exact reward is 0 or 1: a completion with one wrong column still earns the columns it got right."""
    sums = [re.findall(r"(\d+) \+ (\d+)", p) if steps_w else [] for p in prompts]
    return torch.tensor([format_w * world.steps_well_formed(t) + (steps_w * world.steps_right(t, *map(int, s[-1]))
                                                                  if s else 0.0) for s, t in zip(sums, texts)],
                        dtype=torch.float32)


# ----------------------------------------------------------------------------- the exact check

def toy_run(beta, advantage="grpo", scale="none", kl_in="loss", iters=400, epochs=4, lr=1.0, seed=0,
            loss_agg="token-sum-norm"):
    """The estimator of this file on the tabular policy with exact expectations: the 'group' is all four answers
    weighted by pi_old, so the advantages are the expectations above; grpo_loss with token_weights times pi_old(y);
    SGD on the logits. Returns (pi_ref, r, pi after training, per-token log pi_ref) over aa, ab, ba, bb, float64."""
    t1_ref, t2_ref, r = toy_problem(torch.Generator().manual_seed(seed))
    ref_per_token_logps = toy_token_logps(t1_ref, t2_ref)
    theta1, theta2 = t1_ref.clone().requires_grad_(), t2_ref.clone().requires_grad_()
    opt = torch.optim.SGD([theta1, theta2], lr=lr)
    ones = torch.ones(4, 2, dtype=torch.float64)
    for _ in range(iters):
        with torch.no_grad():  # the "rollout": all four answers, weighted by pi_old
            old_per_token_logps = toy_token_logps(theta1, theta2)
            p_old = old_per_token_logps.sum(-1).exp()
            score = kl_in_reward(r, old_per_token_logps, ref_per_token_logps, ones, beta) if kl_in == "reward" else r
            adv = (grpo_advantages(score[None], scale, weights=p_old[None]) if advantage == "grpo"
                   else rloo_advantages(score[None], weights=p_old[None]))[0]
            weights = token_weights(ones, loss_agg, 2) * 4 * p_old[:, None]
        for _ in range(epochs):
            loss = grpo_loss(toy_token_logps(theta1, theta2), old_per_token_logps, ref_per_token_logps, token_advantages(adv, ones),
                             weights, beta if kl_in == "loss" else 0.0)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return ref_per_token_logps.sum(-1).exp(), r, toy_token_logps(theta1, theta2).sum(-1).exp(), ref_per_token_logps


def toy_report():
    print("GRPO/RLOO on a tabular two-token policy over the answers aa ab ba bb (exact expectations).\n"
          "pi* = pi_ref exp(r/beta)/Z (the optimum of E r - beta KL(pi||pi_ref)); pi_k3 = the derived fixed point of\n"
          "k3 in the loss, state by state pi_a = beta pi_ref,a / (beta - (A_a - A_bar)); /s = A scaled by 1/sigma.")
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    for beta in (1.0, 0.5, 0.2):
        pi_ref, r, pi_rloo, ref_per_token_logps = toy_run(beta, "rloo", "none", "reward")
        pi_grpo, pi_grpo_s = toy_run(beta, "grpo", "none", "loss")[2], toy_run(beta, "grpo", "group", "loss")[2]
        pi_star = kl_regularised_optimum(ref_per_token_logps.sum(-1), r, beta)
        k3, k3_s = k3_toy_fixed_point(ref_per_token_logps, r, beta), k3_toy_fixed_point(ref_per_token_logps, r, beta, "group")
        errs = {"rloo_k1_vs_pi_star": (pi_rloo - pi_star).abs().max().item(),
                "grpo_k3_vs_pi_k3": (pi_grpo - k3).abs().max().item(),
                "grpo_k3_scaled_vs_pi_k3_s": (pi_grpo_s - k3_s).abs().max().item(),
                "pi_k3_vs_pi_star": (k3 - pi_star).abs().max().item()}
        print(f"\nbeta {beta}: " + ", ".join(f"max|{k}| {v:.1e}" for k, v in errs.items()))
        print("answer   r      pi_ref   pi*      RLOO-k1  pi_k3    GRPO-k3  pi_k3/s  GRPO-k3/s")
        for k, y in enumerate(TOY_ANSWERS):
            print(f"{y:6s} {r[k]:5.2f}   " + "   ".join(f"{t[k]:.4f}" for t in
                                                     (pi_ref, pi_star, pi_rloo, k3, pi_grpo, k3_s, pi_grpo_s)))
        out.update({f"{k}_beta{beta}": v for k, v in errs.items()})
    for beta in (0.05, 0.01):  # small beta: both fixed points interior, pi_k3 keeps order-beta mass off the best
        pi_star, k3 = kl_regularised_optimum(ref_per_token_logps.sum(-1), r, beta), k3_toy_fixed_point(ref_per_token_logps, r, beta)
        print(f"\nbeta {beta} (derived, not trained): pi* = " + " ".join(f"{p:.2e}" for p in pi_star) +
              ", pi_k3 = " + " ".join(f"{p:.2e}" for p in k3))
        out[f"pi_k3_min_beta{beta}"] = k3.min().item()
    pi_clip = toy_run(1.0, "grpo", "group", "loss", lr=4.0)[2]
    out["clipped_big_step_vs_pi_k3_s"] = (pi_clip - k3_toy_fixed_point(ref_per_token_logps, r, 1.0, "group")).abs().max().item()
    print(f"\nbeta 1, A/sigma, lr 4: GRPO stops at {' '.join(f'{p:.4f}' for p in pi_clip)}, "
          f"{out['clipped_big_step_vs_pi_k3_s']:.2f} from pi_k3/s: big steps clip the policy term "
          "but never the k3 term, which then pulls back alone")
    torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------- data, rollout, update

def exact_prompts(args, enc, block_size):
    """-> (prompt strings, token ids, answers) for --reward exact: the world's --task train split, or --prompts
    records with an answer (Alpaca 'output', 'messages' ending in the answer, or prompt/completion)."""
    if args.prompts:
        pairs, source = [(p, c.strip()) for p, c in data.load_sft_examples(args.prompts)], args.prompts
    else:
        tasks, source = world.task_sets(world.make_world(args.world_seed))[args.task]["train"], args.task
        pairs = list(dict.fromkeys((data.format_prompt(e["instruction"], e["input"]), e["output"]) for e in tasks))
    ids = checked_prompt_ids([enc.encode_ordinary(p) for p, _ in pairs], source, block_size, args.rollout_batch)
    return [p for p, _ in pairs], ids, [a for _, a in pairs]


def score_completions(reward, enc, prompts, completions, texts, answers, ctx=None):
    """r_i of each whole completion: exact answer (answers given), reward model, or gold judge (reward None)."""
    if answers is not None:
        return torch.tensor([exact_reward(t, a) for t, a in zip(texts, answers)], dtype=torch.float32)
    return sequence_scores(reward, enc, prompts, completions, texts, ctx)


@torch.no_grad()
def make_rollout(policy, ref, reward, enc, prompts, answers, args, it, ctx=None):
    """G completions of each prompt (rows grouped: prompt k owns rows kG..kG+G-1; rollout.sample_rollout), their
    scores, log pi_old, log pi_ref and the per-token advantages: everything the update needs, as tensors, the whole
    rollout on every process (scores and log-probs computed on shares of the rows, gathered), so every group is
    seen whole."""
    G = args.group_size
    rows = [p for p in prompts for _ in range(G)]
    ro = sample_rollout(policy, enc, rows, args, it, ctx)
    raw = score_completions(reward, enc, rows, ro["completions"], ro["texts"],
                            None if answers is None else [a for a in answers for _ in range(G)], ctx)
    score = raw - args.no_eos_penalty * (~ro["ended"]).float() + reasoning_rewards(
        [enc.decode(p) for p in rows], ro["texts"], args.format_reward, args.steps_reward)
    old_per_token_logps, ref_per_token_logps = (forward_rows(PolicyLogps(m), ro, args.temperature, ctx)[0]
                                                for m in (policy, ref))
    mask = ro["mask"]
    r = score.to(mask.device)
    if args.kl_in == "reward":
        r = kl_in_reward(r, old_per_token_logps, ref_per_token_logps, mask, args.kl_coef)
    groups = r.view(-1, G)
    adv = grpo_advantages(groups, args.scale_rewards) if args.advantage == "grpo" else rloo_advantages(groups)
    gold = raw if answers is not None else torch.tensor([world.sentiment_score(t) for t in ro["texts"]])
    return {**ro, "old_per_token_logps": old_per_token_logps, "ref_per_token_logps": ref_per_token_logps,
            "advantages": token_advantages(adv.flatten(), mask), "score": score, "gold": gold,
            "kl": (kl_per_token(old_per_token_logps, ref_per_token_logps) * mask).sum(-1),
            "ended": ro["ended"].float(), "zero_std": (groups.std(-1) == 0).float().mean()}


def grpo_update(model, optimizer, ro, args, rng, it=0, ctx=None, autocast=contextlib.nullcontext):
    """--epochs passes over the rollout in shuffled minibatches of grpo_loss (rollout.minibatches: this process's
    rows and their --loss-agg weights); -> the mean of each figure. model: a rollout.PolicyLogps (DDP-wrapped under
    torchrun); autocast: the precision context of its forward pass (backward and step run outside it)."""
    stats = UpdateStats(("loss", "pg_loss", "k3", "clipfrac", "approx_kl"))
    beta = args.kl_coef if args.kl_in == "loss" else 0.0
    for rows, weights, mean_weights in minibatches(ro["mask"], args.minibatch, args.epochs, rng, args.loss_agg,
                                                   args.max_new_tokens, ctx):
        with autocast():
            per_token_logps = model({k: v[rows] for k, v in ro["batch"].items()}, ro["start"], ro["n"],
                                    args.temperature)
        old_per_token_logps, advantages = ro["old_per_token_logps"][rows], ro["advantages"][rows]
        loss, pg, k3 = grpo_loss(per_token_logps, old_per_token_logps, ro["ref_per_token_logps"][rows], advantages,
                                 weights, beta, args.cliprange)
        loss.backward()
        clipfrac, approx_kl = ratio_stats(per_token_logps, old_per_token_logps, advantages, mean_weights, args.cliprange)
        means = all_reduce_mean(torch.stack([loss, pg, k3, clipfrac, approx_kl]).detach(), ctx)
        check_finite(means[0], it)  # NaN/inf anywhere stops every process before the step
        stats.record(means, optimizer_step(model, optimizer, args.grad_clip), per_token_logps, old_per_token_logps, ctx)
    return stats.result()


# ----------------------------------------------------------------------------- inputs and outputs

def iteration(policy, model, ref, rm, enc, optimizer, prompt_ids, answers, it, args, ctx):
    """One iteration: sample the groups of this iteration's prompts, then the clipped updates of model (the
    PolicyLogps, DDP-wrapped under torchrun); -> (the rollout, its figures for the log, over the whole rollout)."""
    idx = prompt_indices(len(prompt_ids), args.rollout_batch, args.seed, it)
    with ctx.autocast():
        ro = make_rollout(policy, ref, rm, enc, [prompt_ids[i] for i in idx],
                          None if answers is None else [answers[i] for i in idx], args, it, ctx)
    stats = grpo_update(model, optimizer, ro, args, np.random.default_rng([args.seed, it]), it, ctx, ctx.autocast)
    stats.pop("ratio_first")  # |ratio - 1| on the first minibatch: 0 by construction (tested), not logged
    # gold: the exact answer's correctness, or the world's sentiment judge, which knows its review prompts only
    gold = {} if args.prompts and args.reward != "exact" else {"gold": ro["gold"].mean().item()}
    return ro, {"score": ro["score"].mean().item(), **gold, "kl": ro["kl"].mean().item(),
                "eos": ro["ended"].mean().item(), "len": ro["length"].mean().item(),
                "zero_std_groups": ro["zero_std"].item(), **stats}


def final_eval(policy, ref, rm, enc, held_out, args, ctx):
    """With --reward exact: greedy exact-match accuracy of policy and reference on the task's test split and,
    as the forgetting check, on the other tasks' test splits (with --prompts: on --eval-prompts FILE, if given).
    Otherwise as ppo.py: the gold judge on held-out review prompts (gold reward, win rate against the reference,
    sequence KL, EOS rate) and the RM's view, every process sampling its share. The greedy accuracies of
    --reward exact run on the first process alone; the others return no metrics."""
    lim = lambda xs: xs[:args.eval_limit] if args.eval_limit else xs  # noqa: E731
    metrics, samples = {}, []
    if args.eval_prompts == "none" or (args.reward == "exact" and not ctx.master):
        return metrics, samples
    if args.reward == "exact" and args.prompts:  # your questions: accuracy on --eval-prompts FILE (with answers)
        if args.eval_prompts == "review":
            return metrics, samples
        examples = lim([{"prompt": p, "output": c.strip()} for p, c in data.load_sft_examples(args.eval_prompts)])
        for name, model in (("", policy), ("ref_", ref)):
            metrics[f"{name}eval_acc"], metrics[f"{name}eval_format"], _ = task_accuracy(model, enc, examples, "custom")
        return metrics, samples
    if args.reward == "exact":
        tasks = world.task_sets(world.make_world(args.world_seed))
        for task in [args.task] + [t for t in FORGETTING_TASKS if t != args.task]:
            for name, model in (("", policy), ("ref_", ref)):
                acc, fmt, preds = task_accuracy(model, enc, lim(tasks[task]["test"]), task)
                metrics[f"{name}{task}_acc"], metrics[f"{name}{task}_format"] = acc, fmt
                if not name and task == args.task:
                    samples = [{"prompt": e["input"], "completion": p, "score": exact_reward(p, e["output"])}
                               for e, p in zip(tasks[task]["test"][:8], preds)]
        return metrics, samples
    return heldout_eval(policy, ref, enc, held_out, args.max_new_tokens, args.seed, ctx.autocast, rm=rm, ctx=ctx)


def held_out_prompts(args):
    """The final evaluation's prompts, checked against the context before any step: --eval-prompts (review or a
    file), or with --reward exact and --prompts the questions of --eval-prompts FILE; none for the world's tasks."""
    if args.reward != "exact":
        return eval_prompts(args.eval_prompts, args.world_seed, args.eval_limit)
    if not args.prompts or args.eval_prompts in ("review", "none"):
        return []
    return [p for p, _ in data.load_sft_examples(args.eval_prompts)][:args.eval_limit or None]


def save(args, policy, optimizer, enc, step, metrics):
    """The resumable state and the policy; config.json says "finished": false until mark_finished, after the final
    evaluation (run.sh skips only finished runs)."""
    save_train_state(args.out, policy, optimizer, step, extra={"metrics": metrics}, args=args)
    save_checkpoint(args.out, policy, enc, {"stage": "grpo", "algorithm": args.advantage, "args": vars(args),
                                            "step": step, "metrics": metrics, "samples": [], "finished": False})


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.toy:
        return toy_report()
    check_args(args)
    t0, ctx = time.time(), setup_rl(args)
    policy, ref, rm, enc = load_rl_models(args, ctx.device, judges=("gold", "exact"))
    held_out = held_out_prompts(args)
    check_prompts_fit("--eval-prompts", held_out, enc, policy.config.block_size)
    if args.reward == "exact":
        prompts, prompt_ids, answers = exact_prompts(args, enc, policy.config.block_size)
    else:
        (prompts, prompt_ids), answers = training_prompts(args, enc, policy.config.block_size), None
    if ctx.master:
        print(f"prompts: {len(prompts)}; {args.iters} iterations of {args.rollout_batch} prompts x {args.group_size} "
              f"completions; advantage {args.advantage} (scale {args.scale_rewards}), KL in the {args.kl_in}, loss "
              f"{args.loss_agg}; reward {args.reward}; model {policy.num_params() / 1e6:.2f}M parameters"
              + sampling_note(args.rollout_batch * args.group_size, args, ctx))

    optimizer = make_optimizer(policy, args.lr, args.weight_decay, ctx=ctx)
    start, extra = load_train_state(args.out, policy, optimizer) if args.resume else (0, {})
    model = wrap_model(PolicyLogps(policy), ctx, compile=False)   # DDP under torchrun: it averages the gradients
    stop, log = StopFlag(), MetricsLog(args.out, args.iters, ctx.master, resume=args.resume)
    window = LogWindow(log, args, ctx.master)
    for it in range(start, args.iters):
        set_lr(optimizer, lr_at(it, args.lr, args.warmup, args.iters, args.min_lr))
        ro, row = iteration(policy, model, ref, rm, enc, optimizer, prompt_ids, answers, it, args, ctx)
        window.add(it + 1, row, optimizer.param_groups[0]["lr"], ro, "gold" if "gold" in row else "score")
        if stop.requested_anywhere(ctx) or it + 1 == args.stop_at:
            if ctx.master:
                save(args, policy, optimizer, enc, it + 1, {})
                print(f"stopped at iteration {it + 1}; continue with: python grpo.py --resume --out {args.out}")
            return {"stopped_at": it + 1, **row}

    # the trained model first, then the final evaluation: an error there never costs the model (a --resume at the
    # last iteration, after such an error, runs the evaluation alone)
    metrics = {f"train_{k}": v for k, v in window.means.items()} or dict(extra.get("metrics", {}))
    if ctx.master:
        save(args, policy, optimizer, enc, args.iters, metrics)
    with final_evaluation(args.out, "python grpo.py"), ctx.autocast():   # a fresh autocast: heldout_eval enters its own
        evaluated, samples = final_eval(policy, ref, rm, enc, held_out, args, ctx)
    metrics.update(evaluated, time_s=round(time.time() - t0, 1))
    if ctx.master:
        mark_finished(args.out, metrics, samples=list(samples))
        print_final(metrics, samples)
    return metrics


if __name__ == "__main__":
    run_cli(main)
