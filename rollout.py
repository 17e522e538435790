"""The RL core that ppo.py and grpo.py share, written once: one iteration's prompts, the rollout (chunked
sampling, the row layout, per-token log-probs of the policy, the old policy and the reference, on shares of
the rows under torchrun) and the minibatches of the update, so that each stage file holds only its method.

  prompts        the world's review train prompts or a prompts file; iteration it takes a slice of a
                 permutation of them that is a pure function of (--seed, it), so --resume samples the same
  sampling       --sample-batch rows at a time, chunk k of iteration it sampled with the generator seeded
                 training.chunk_seed(--seed, k, it), by process k mod N under torchrun, gathered in order:
                 the samples depend on --sample-batch, never on the number of processes
  the layout     prompts left-padded to P, completions right-padded to T: completion token t of every row
                 sits in column P + t and is predicted by column P - 1 + t (rollout_batch)
  log-probs      log pi(a_t|s_t) of every completion token at the sampling temperature; under torchrun each
                 process computes its share of the rows and every process gets them all (forward_rows)
  minibatches    --epochs passes over shuffled minibatches; every process draws the same ones and takes its
                 share of the rows, with per-token weights that already hold the factor N, so each loss is
                 the plain weighted sum L = sum_bt w_bt l_bt and DistributedDataParallel's average of the N
                 processes' gradients is the gradient of the whole minibatch (minibatches)

Nothing here knows about advantages, values or the KL's place: those are the stages' equations.
"""

import math
import time

import numpy as np
import torch
import torch.nn as nn

import data
import world
from align import frozen, load_policy_and_reference
from common import (UserError, check_input_files, check_out_is_not_an_input, nonneg_float, positive_float,
                    positive_int)
from evals import strip_eos
from gpt import check_same_tokenizer, generate, token_logprobs
from reward import load_reward_model, reward_scores
from tokenizer import eos_id, pad_id
from training import (add_optimizer_args, all_reduce_max, check_divisible, check_policy, chunk_seed, gather_chunks,
                      gather_rows, init_model, my_chunks, rank_slice, setup)


# ----------------------------------------------------------------------------- the options both stages take

def add_rollout_args(p, rollout_batch, rows):
    """Iterations, rollout size, minibatches, sampling, the optimizer, beta, the clip range and the no-EOS penalty,
    with this stage's default --rollout-batch; rows: what a sampled row is ("prompts", "completions")."""
    p.add_argument("--iters", type=positive_int, default=40, help="iterations (rollout + update)")
    p.add_argument("--rollout-batch", type=positive_int, default=rollout_batch, help="prompts sampled per iteration")
    p.add_argument("--minibatch", type=positive_int, default=8, help="completions per optimizer step (all processes "
                   "together; a multiple of their number)")
    p.add_argument("--sample-batch", type=positive_int, default=32, help=f"{rows} sampled together: the rollout's "
                   "chunks, which torchrun's processes share (lower it to give each process one); the samples "
                   "depend on it, not on the process count")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature, also used in every log-prob")
    add_optimizer_args(p, lr=5e-5, min_lr=5e-5, warmup=0)
    p.add_argument("--kl-coef", type=nonneg_float, default=0.1, help="beta of the KL to the reference "
                   "(PPO: the initial value if adaptive)")
    p.add_argument("--cliprange", type=positive_float, default=0.2, help="policy ratio clip epsilon")
    p.add_argument("--no-eos-penalty", type=nonneg_float, default=1.0, help="subtracted from the score of a completion "
                   "that never emits EOS (0 = none)")
    return p


def check_rl_inputs(args, judges):
    """The inputs of a run, before any work (a stage's check_args, not under --resume): the prompt files are
    files, --init and --ref are language models, --reward (unless one of the judges) is a reward model, and
    --out is none of them; one line `error: ...` each."""
    check_input_files("--prompts", args.prompts)
    check_input_files("--eval-prompts", [] if args.eval_prompts in ("review", "none") else args.eval_prompts)
    check_policy(args.init, "--init", hint="python sft.py")
    check_policy(args.ref, "--ref", hint="python sft.py")
    inputs = {"--init": args.init, "--ref": args.ref}
    if args.reward not in judges:
        stage = init_model(args.reward, "--reward", hint="python reward.py")[1]
        if stage != "reward":
            raise UserError(f"--reward {args.reward} is a {stage!r} checkpoint, not a reward model; make one with "
                            f"`python reward.py`, or pass {' or '.join(judges)}")
        inputs["--reward"] = args.reward
    check_out_is_not_an_input(args.out, inputs)


def load_rl_models(args, device, judges):
    """-> (policy GPT in eval mode, frozen reference, frozen reward model or None for one of the judges, enc); the
    reward model must share the policy's tokenizer."""
    policy, ref, enc = load_policy_and_reference(args.init, args.ref, device)
    policy.eval()
    if args.reward in judges:
        return policy, ref, None, enc
    rm, rm_enc, _ = load_reward_model(args.reward, device)
    check_same_tokenizer(enc, rm_enc, f"the reward model {args.reward}", f"the policy {args.init}")
    return policy, ref, frozen(rm), enc


# ----------------------------------------------------------------------------- the KL estimators

def kl_per_token(per_token_logps, ref_per_token_logps, estimator="k1"):
    """Per-token estimate of KL(pi_theta || pi_ref) on tokens sampled from pi_theta:
    k1 = log pi(a_t|s_t) - log pi_ref(a_t|s_t)  (unbiased, can be negative);
    k3 = (rho - 1) - log rho with rho = pi_ref(a_t|s_t) / pi(a_t|s_t)  (unbiased, always >= 0)."""
    if estimator == "k1":
        return per_token_logps - ref_per_token_logps
    log_rho = ref_per_token_logps - per_token_logps
    return torch.expm1(log_rho) - log_rho


# ----------------------------------------------------------------------------- prompts

def training_prompts(args, enc, block_size):
    """-> prompt strings and token ids: --prompts FILE, or the world's review train prompts (deduplicated)."""
    if args.prompts:
        prompts, source = data.load_prompts(args.prompts), args.prompts
    else:
        tasks = world.task_sets(world.make_world(args.world_seed))["review"]["train"]
        prompts, source = list(dict.fromkeys(data.format_prompt(e["instruction"], e["input"]) for e in tasks)), "review"
    return prompts, checked_prompt_ids([enc.encode_ordinary(p) for p in prompts], source, block_size, args.rollout_batch)


def checked_prompt_ids(ids, source, block_size, rollout_batch):
    """Every prompt leaves room for an answer, and there is at least one rollout of prompts."""
    for i, x in enumerate(ids):
        if not x or len(x) >= block_size:
            raise UserError(f"{source}: prompt {i + 1} has {len(x)} tokens; it needs 1 to {block_size - 1} "
                            f"(the model's context) to leave room for an answer")
    if len(ids) < rollout_batch:
        raise UserError(f"{source}: {len(ids)} prompts, fewer than one rollout of {rollout_batch}; "
                        f"add prompts or lower --rollout-batch")
    return ids


def prompt_indices(n, per_iter, seed, it):
    """The prompts of iteration `it`: a slice of epoch it // (n // per_iter)'s permutation, a pure function of
    (seed, it), so --resume samples the very same prompts."""
    epoch, k = divmod(it, n // per_iter)
    return np.random.default_rng([seed, epoch]).permutation(n)[k * per_iter:(k + 1) * per_iter]


def sampling_note(rows, args, ctx):
    """Under torchrun, the start line's word on how many processes sample the rollout's chunks."""
    chunks = -(-rows // args.sample_batch)
    if not ctx.ddp:
        return ""
    note = f"; {ctx.world} processes, {min(chunks, ctx.world)} of them sampling ({chunks} chunks of --sample-batch)"
    return note + (": lower --sample-batch to share the sampling" if chunks < ctx.world else "")


# ----------------------------------------------------------------------------- the rollout

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


@torch.no_grad()
def sample_rollout(gpt, enc, rows, args, it, ctx=None):
    """Sample the completion of every prompt row and lay the rows out (rollout_batch) on gpt's device: chunk k of
    --sample-batch rows is sampled by process k mod N with the generator seeded training.chunk_seed(--seed, k, it),
    and the chunks are gathered in order, so the samples do not depend on N; an empty completion becomes [EOS].
    -> {"completions", "texts", "ended", "batch", "start", "n", "mask", "length"}, the whole rollout on every
    process."""
    device, mine = next(gpt.parameters()).device, {}
    for k, lo, hi in my_chunks(len(rows), args.sample_batch, ctx):
        gen = torch.Generator(device=device).manual_seed(chunk_seed(args.seed, k, it))
        mine[k] = generate(gpt, rows[lo:hi], args.max_new_tokens, eos_id=eos_id(enc), pad_id=pad_id(enc),
                           temperature=args.temperature, generator=gen)
    completions = [c if c else [eos_id(enc)] for c in gather_chunks(mine, ctx)]
    batch, start, n = rollout_batch(rows, completions, pad_id(enc))
    batch = {k: v.to(device) for k, v in batch.items()}
    return {"completions": completions, "texts": [enc.decode(strip_eos(c, enc)).strip() for c in completions],
            "ended": torch.tensor([c[-1] == eos_id(enc) for c in completions]), "batch": batch, "start": start,
            "n": n, "mask": batch["mask"], "length": batch["mask"].sum(-1)}


def sequence_scores(reward, enc, prompts, completions, texts, ctx=None):
    """Reward of each whole completion: the reward model's score at its last real token (each process scores
    its share of the rows; all scores gathered), or the gold judge."""
    if reward is None:
        return torch.tensor([world.sentiment_score(t) for t in texts], dtype=torch.float32)
    lo, hi = rank_slice(len(prompts), ctx)
    return gather_rows(reward_scores(reward, enc, prompts[lo:hi], completions[lo:hi]).float(), len(prompts), ctx).cpu()


class PolicyLogps(nn.Module):
    """A GPT as a module whose forward is log pi(a_t|s_t) of every completion token of a rollout_batch (columns
    start..start+n-1 predict them): the policy as DistributedDataParallel wraps it (DDP sees the call and averages
    the gradients), or the reference. Its parameters are the GPT's, under the GPT's names after .gpt."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, batch, start, n, temperature=1.0):
        h = self.gpt.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        return token_logprobs(self.gpt.lm_head(h[:, start:start + n]), batch["actions"], temperature)


@torch.no_grad()
def forward_rows(model, ro, temperature, ctx=None):
    """model(rows, start, n, temperature) on this process's share of the rollout's rows (training.rank_slice),
    each output gathered: -> a tuple of (B, T) tensors of every row, on every process."""
    B = ro["mask"].size(0)
    lo, hi = rank_slice(B, ctx)
    out = model({k: v[lo:hi] for k, v in ro["batch"].items()}, ro["start"], ro["n"], temperature)
    return tuple(gather_rows(x, B, ctx) for x in (out if isinstance(out, tuple) else (out,)))


# ----------------------------------------------------------------------------- the update's minibatches

def token_weights(mask, agg="token-mean", max_len=None):
    """Weights w_bt of each token's loss l_bt, L = sum_bt w_bt l_bt, for a minibatch of B completions with
    n_b real tokens each (m = mask, 0 on padding):
    seq-mean-token-mean  w = m / (B n_b)          mean over each completion's tokens, then over completions (GRPO)
    token-mean           w = m / sum_b n_b        every token alike (PPO, DAPO)
    token-sum-norm       w = m / (B L)            token sum over a constant, L = max_len (Dr. GRPO)"""
    B = mask.size(0)
    if agg == "seq-mean-token-mean":
        return mask / (B * mask.sum(-1, keepdim=True).clamp(min=1))
    if agg == "token-mean":
        return mask / mask.sum().clamp(min=1)
    return mask / (B * (max_len or mask.size(-1)))


def minibatches(mask, size, epochs, rng, agg="token-mean", max_len=None, ctx=None):
    """`epochs` passes over the rollout's B rows, each in a fresh rng.permutation cut into minibatches of `size`;
    yields (rows, weights, mean_weights) for this process: rows = its share of the minibatch's row indices
    (training.rank_slice; every process draws the same minibatches), weights = token_weights(agg) of the whole
    minibatch at those rows times N, mean_weights the same for token-mean (for the logged means). So
    sum_bt w_bt l_bt on each process, averaged over the N processes (DDP's gradient average), is the loss of
    the whole minibatch."""
    B, n_proc = mask.size(0), ctx.world if ctx is not None and ctx.ddp else 1
    lo, hi = rank_slice(size, ctx)
    for _ in range(epochs):
        order = rng.permutation(B)
        for i in range(0, B, size):
            whole = torch.as_tensor(order[i:i + size], device=mask.device)
            w, w_mean = token_weights(mask[whole], agg, max_len), token_weights(mask[whole])
            yield whole[lo:hi], w[lo:hi] * n_proc, w_mean[lo:hi] * n_proc


def ratio_stats(per_token_logps, old_per_token_logps, advantages, weights, cliprange=0.2):
    """What the logs say of the ratio rho_t = pi / pi_old, weighted sums over tokens (weights: token means):
    clipfrac, the share of tokens where the clipped term clip(rho_t) A_t is the smaller one (so the loss uses it),
    and approx KL(pi_old || pi) = sum_t w_t 0.5 (log rho_t)^2."""
    log_ratio = torch.where(weights > 0, per_token_logps - old_per_token_logps, 0.0).detach()
    ratio = torch.exp(log_ratio)
    clipped = (-advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) > -advantages * ratio).float()
    return (clipped * weights).sum(), (0.5 * log_ratio ** 2 * weights).sum()


class UpdateStats:
    """The figures of an update: record() each optimizer step's (the all-reduced means of `names`, the gradient
    norm) and, of the first, max |ratio - 1| = exp(max_t |log pi - log pi_old|) - 1 over every process's tokens,
    which is 0 when rollout and update see the same policy (dropout off, one temperature); result() -> the means
    over the steps, and that gap."""

    def __init__(self, names):
        self.names, self.values, self.ratio_first = names + ("grad_norm",), {}, None

    def record(self, means, grad_norm, per_token_logps, old_per_token_logps, ctx=None):
        for k, v in zip(self.names, (*means.tolist(), grad_norm.item())):
            self.values.setdefault(k, []).append(v)
        if self.ratio_first is None:
            gap = (per_token_logps - old_per_token_logps).abs().max().detach()
            self.ratio_first = math.exp(all_reduce_max(gap, ctx).item()) - 1

    def result(self):
        return {**{k: sum(v) / len(v) for k, v in self.values.items()}, "ratio_first": self.ratio_first}


# ----------------------------------------------------------------------------- the log

class LogWindow:
    """The figures of the iterations since the last log line: add() takes each iteration's and, every
    --log-interval iterations and at the last, writes their means with the throughput (training.MetricsLog) and
    prints one sampled completion of the last rollout (the first process alone); .means: the last line's."""

    def __init__(self, log, args, master):
        self.log, self.interval, self.iters, self.master = log, args.log_interval, args.iters, master
        self.sums, self.count, self.means, self.t_last = {}, 0, {}, time.time()

    def add(self, step, row, lr, ro, judge):
        """row: iteration `step`'s figures; judge: the figure of ro shown beside the sample."""
        for k, v in row.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if step % self.interval and step != self.iters:
            return
        dt, self.t_last = time.time() - self.t_last, time.time()
        self.means = {k: v / self.count for k, v in self.sums.items()}
        self.log.log(step, **self.means, lr=lr, samples_per_s=round(len(ro["texts"]) * self.count / max(dt, 1e-9), 1))
        if self.master:
            print(f"  sample ({judge} {ro[judge][0].item():+.2f}): {ro['texts'][0][:120]}")
        self.sums, self.count = {}, 0


def setup_rl(args):
    """training.setup, then the share check: every process takes an equal share of each --minibatch."""
    ctx = setup(args)
    check_divisible(args.minibatch, "--minibatch", ctx)
    return ctx
