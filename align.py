"""What the alignment stages share (dpo.py, ppo.py, grpo.py), written once:

  the policy and its frozen reference   pi_theta starts as a copy of the --init checkpoint; pi_ref is the
                                        same weights (or --ref), in eval mode, without gradients, never updated
  the held-out evaluation               policy and reference answer the same held-out prompts at temperature 1;
                                        the gold judge scores both: mean gold reward, its 95% interval, the win
                                        rate, the sequence KL(pi || pi_ref) the policy paid, EOS rate and length;
                                        under torchrun every process samples its share of the prompts and all
                                        get the figures of the whole set, the same for any number of processes
  the tabular exact check               a policy over two-token answers {aa, ab, ba, bb} with known rewards,
                                        small enough that every expectation is an exact sum, so each method's
                                        fixed point can be compared with its closed form: pi_ref exp(r/beta)/Z,
                                        or GRPO's with k3 in the loss (docs/rl-derivations.md)

Dropout. Log-probabilities that are compared with stored ones or with the reference's must come from
the same function: `disable_dropout` turns dropout off in the policy (as TRL does), since a checkpoint
trained with --dropout would otherwise make the first PPO ratio differ from 1 and DPO's first loss
differ from ln 2.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import world
from common import UserError, nonneg_int
from evals import alignment_eval, mean_ci95, sample_completions, strip_eos
from gpt import GPT, check_same_tokenizer, load_checkpoint
from reward import reward_scores
from training import add_common_args, gather_chunks, my_chunks


# ----------------------------------------------------------------------------- command-line options they share

def add_policy_args(p):
    p.add_argument("--init", default="out/sft", help="checkpoint the policy starts from")
    p.add_argument("--ref", default=None, help="frozen reference checkpoint (default: the same as --init)")
    p.add_argument("--world-seed", type=int, default=1337, help="seed of the default world")
    return p


def add_run_args(p, out, eval_help):
    """The final evaluation's prompts, stopping early, the exact check, then every stage's common options."""
    p.add_argument("--eval-prompts", default="review", help=eval_help)
    p.add_argument("--eval-limit", type=nonneg_int, default=0, help="use only the first N evaluation prompts (0 = all)")
    p.add_argument("--stop-at", type=nonneg_int, default=0, help="save a resumable state and stop after this step")
    p.add_argument("--toy", action="store_true", help="run the exact tabular check and exit")
    return add_common_args(p, out=out)


# ----------------------------------------------------------------------------- the policy and its reference

def frozen(model):
    """pi_ref (or a reward model): eval mode, no gradient, never updated."""
    return model.eval().requires_grad_(False)


def frozen_copy(model):
    """The reference pi_ref made from the policy: the same weights, device and dtype, frozen."""
    ref = GPT(model.config).to(next(model.parameters()).device, next(model.parameters()).dtype)
    ref.load_state_dict(model.state_dict())
    return frozen(ref)


def disable_dropout(model):
    """Dropout off everywhere in the model: every nn.Dropout to p = 0, and attention's dropout probability
    (a float the attention passes to scaled_dot_product_attention) to 0. The config is left as it was."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    return model


def load_policy_and_reference(init, ref_path, device, hint="python sft.py"):
    """-> (policy, ref, enc): the policy from --init with dropout off, and the frozen reference: a copy of
    the same weights, or the --ref checkpoint (which must share the policy's tokenizer)."""
    policy, enc, _ = load_checkpoint(init, hint=hint)
    disable_dropout(policy)
    if ref_path is None or os.path.abspath(ref_path) == os.path.abspath(init):
        ref = frozen_copy(policy)
    else:
        ref, ref_enc, _ = load_checkpoint(ref_path, hint=hint)
        check_same_tokenizer(enc, ref_enc, f"--init {init}", f"--ref {ref_path}")
    return policy.to(device), frozen(ref.to(device)), enc


# ----------------------------------------------------------------------------- held-out evaluation

def eval_prompts(spec, world_seed, limit=0):
    """'review': the world's held-out review prompts; 'none': no evaluation; else a prompts file."""
    if spec == "none":
        return []
    if spec == "review":
        tests = world.task_sets(world.make_world(world_seed))["review"]["test"]
        prompts = [data.format_prompt(e["instruction"], e["input"]) for e in tests]
    else:
        prompts = data.load_prompts(spec)
    if not prompts:
        raise UserError(f"{spec}: no evaluation prompts")
    return prompts[:limit] if limit else prompts


@torch.no_grad()
def heldout_eval(policy, ref, enc, prompts, max_new_tokens, seed, autocast, judge=world.sentiment_score, rm=None,
                 ctx=None):
    """-> (metrics, samples): the gold judge on the policy's and the reference's answers to the same
    prompts (evals.alignment_eval), the reference's interval, and the reward model's mean score when given.
    Under torchrun (ctx) every process calls it: each samples and scores its chunks of the prompts (chunk k by
    process k mod N, generator seeded from (seed, k)), the results are gathered in prompt order, and every
    process returns the same figures, those of one process."""
    if not prompts:
        return {}, []
    policy.eval()
    prompt_ids = [enc.encode_ordinary(p) for p in prompts]
    with autocast():
        ref_out = sample_completions(ref, enc, prompt_ids, max_new_tokens, seed, ctx=ctx)
        metrics = alignment_eval(policy, ref, enc, prompts, judge, max_new_tokens, seed=seed,
                                 ref_completions=ref_out, return_completions=True, ctx=ctx)
        completions = metrics.pop("completions")
        if rm is not None:  # the reward model's view of the same samples
            metrics["rm_reward"] = torch.tensor(chunked_reward_scores(rm, enc, prompt_ids, completions, ctx)).mean().item()
    metrics["ref_gold_reward_ci95"] = mean_ci95([judge(enc.decode(strip_eos(c, enc)).strip()) for c in ref_out])[1]
    return metrics, metrics.pop("samples")


def chunked_reward_scores(rm, enc, prompt_ids, completions, ctx=None, chunk=64):
    """reward.reward_scores of every (prompt, completion), as a list in order on every process; under torchrun
    each process scores its chunks (training.my_chunks) and they are gathered."""
    mine = {k: reward_scores(rm, enc, prompt_ids[lo:hi], completions[lo:hi]).tolist()
            for k, lo, hi in my_chunks(len(prompt_ids), chunk, ctx)}
    return gather_chunks(mine, ctx)


def print_final(metrics, samples):
    for s in samples[:3]:
        print(f"sample ({s['score']:+.2f}): {s['completion']}")
    print("final: " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


# ----------------------------------------------------------------------------- the tabular exact check

TOY_ANSWERS = ("aa", "ab", "ba", "bb")
TOY_Y1, TOY_Y2 = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
TOY_REWARD = (1.0, 0.2, -0.5, 0.4)


def toy_token_logps(theta1, theta2):
    """A tabular autoregressive policy over answers y = (y1, y2) in {a, b}^2: per-token
    log pi(y1) = log softmax(theta1)[y1], log pi(y2|y1) = log softmax(theta2[y1])[y2]; (4, 2). Their sum over
    the last axis is log pi(y), a sum of token log-probs as for the GPT."""
    return torch.stack([F.log_softmax(theta1, -1)[TOY_Y1], F.log_softmax(theta2, -1)[TOY_Y1, TOY_Y2]], -1)


def toy_problem(generator):
    """-> (theta1_ref, theta2_ref, r): a random reference policy (float64) and the answers' known rewards."""
    theta1 = torch.randn(2, generator=generator, dtype=torch.float64)
    theta2 = torch.randn(2, 2, generator=generator, dtype=torch.float64)
    return theta1, theta2, torch.tensor(TOY_REWARD, dtype=torch.float64)


def kl_regularised_optimum(ref_logp, r, beta):
    """argmax_pi E_pi[r] - beta * KL(pi || pi_ref) = pi_ref * exp(r / beta) / Z (ref_logp: log pi_ref(y))."""
    return torch.softmax(ref_logp + r / beta, 0)


def k3_bandit_fixed_point(pi_ref, adv, beta):
    """The zero of pi_a (A_a - sum_b pi_b A_b) - beta (pi_a - pi_ref,a) over the simplex: pi_a = beta pi_ref,a /
    (lam - A_a) with lam = A_bar + beta the root of sum_a beta pi_ref,a / (lam - A_a) = 1 on (max A, max A + beta]
    (decreasing from +inf to <= 1 there: one root, found by bisection in float64)."""
    lo, hi = adv.max().item(), adv.max().item() + beta
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (beta * pi_ref / (mid - adv)).sum() > 1 else (lo, mid)
    return beta * pi_ref / (hi - adv)


def k3_toy_fixed_point(ref_per_token_logps, r, beta, scale="none", eps=1e-4):
    """The fixed point of GRPO with k3 in the loss on the two-token policy (docs/rl-derivations.md), state by state: the second token
    after y1 is a bandit on the advantages s r(y1, .), the first a bandit on s E[r | y1] (s = 1, or 1/(sigma + eps)
    with the group scaling, sigma the std of r under the fixed point itself: found by bisection on sigma)."""
    ref1, ref2 = ref_per_token_logps[[0, 2], 0].exp(), ref_per_token_logps[:, 1].exp().view(2, 2)
    R = r.view(2, 2)

    def policy(s):
        pi2 = torch.stack([k3_bandit_fixed_point(ref2[a], s * R[a], beta) for a in range(2)])
        pi1 = k3_bandit_fixed_point(ref1, s * (pi2 * R).sum(-1), beta)
        return (pi1[:, None] * pi2).flatten()

    if scale == "none":
        return policy(1.0)
    lo, hi = 1e-9, (r.max() - r.min()).item()           # std(r under pi(1/(sigma+eps))) - sigma changes sign here
    for _ in range(200):
        sigma = (lo + hi) / 2
        pi = policy(1.0 / (sigma + eps))
        std = (pi * (r - (pi * r).sum()) ** 2).sum().sqrt().item()
        lo, hi = (sigma, hi) if std > sigma else (lo, sigma)
    return policy(1.0 / (hi + eps))


def print_toy_table(pi_ref, r, pi_star, pi, method):
    print(f"answer   r      pi_ref   pi*      pi_{method}")
    for k, y in enumerate(TOY_ANSWERS):
        print(f"{y:6s} {r[k]:5.2f}   {pi_ref[k]:.4f}   {pi_star[k]:.4f}   {pi[k]:.4f}")
