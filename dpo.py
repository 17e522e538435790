"""Stage 6, DPO (Direct Preference Optimization): train the policy straight on preference pairs
(prompt x, chosen y_w, rejected y_l) against a frozen reference model; no reward model, no sampling.

    python dpo.py                          # policy = reference = out/sft, pairs out/preferences/train.jsonl, RPO alpha 1
    python dpo.py --beta 0.5 --out out/dpo_beta0.5
    python dpo.py --rpo-alpha 0 --out out/dpo_plain    # plain DPO, without RPO's NLL of the chosen answers
    python dpo.py --init out/pretrain --out out/dpo_from_base   # pre-trained model -> DPO, no SFT (ref = init)
    python dpo.py --data world             # pairs from the world's review train split (no preferences.py)
    python dpo.py --data pairs.jsonl --eval-prompts none   # your prompt/chosen/rejected JSONL or Anthropic HH
    python dpo.py --toy                    # exact check: DPO on a tabular policy reaches pi_ref * exp(r / beta)
    torchrun --nproc_per_node=4 dpo.py --grad-accum 4   # DistributedDataParallel, the same run as one process

log pi(y|x) is the sum of the completion tokens' log-probs (prompt and padding masked out); chosen
and rejected rows go through the model in one padded batch. Every log interval prints the loss and
the implicit rewards beta * log(pi / pi_ref) of chosen and rejected answers, their accuracy and
margin, and the drift of log pi(y_w|x) and log pi(y_l|x) from the reference (DPO alone lets both
fall: likelihood displacement; --rpo-alpha holds the chosen one up); held-out pairs are scored every
--eval-interval steps. At the end the policy and the reference each answer the held-out review prompts (sampled at temperature 1) and the gold judge
(world.sentiment_score) scores them: mean gold reward, win rate against the reference, and the
sequence KL(pi || pi_ref) the policy paid, all in OUT/config.json.

Under torchrun a step's --batch-size x --grad-accum pairs are split into contiguous shares, one per process
(--grad-accum counts micro-batches summed over the processes, so it must be a multiple of N), DDP averages the
gradients, and the logged loss and statistics are those of the whole batch (the log-probs are gathered): the
run is the one-process run with the same options. The reference log-probs and the held-out pairs are split
across the processes and gathered; the final evaluation samples each process's share of the prompts. Only
the first process writes files.
"""

import argparse
import contextlib
import os
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import data
import world
from align import (add_policy_args, add_run_args, eval_prompts, heldout_eval, kl_regularised_optimum,
                   load_policy_and_reference, print_final, print_toy_table, toy_problem, toy_token_logps)
from common import (ArgumentParser, Rule, UserError, check_input_files, check_out_is_not_an_input, check_rules,
                    fraction, fraction0, no_effect, nonneg_float, nonneg_int, positive_float, positive_int, run_cli)
from gpt import completion_logprobs, save_checkpoint
from tokenizer import pad_id
from training import (MetricsLog, StopFlag, add_optimizer_args, check_finite, check_policy, check_prompts_fit,
                      final_evaluation, gather_rows, load_train_state, lr_at, make_optimizer, mark_finished, micro_steps,
                      optimizer_step, rank_slice, save_train_state, set_lr, setup, wrap_model)


DEFAULT_PAIRS = "out/preferences/train.jsonl"


def build_parser():
    p = ArgumentParser(description=__doc__)
    add_policy_args(p)
    p.add_argument("--data", default=DEFAULT_PAIRS,
                   help="preference pairs (.jsonl/.json: prompt/chosen/rejected or Anthropic HH), or 'world' "
                        "for the default world's review pairs")
    p.add_argument("--val-data", default=None, help="held-out pairs (default: val.jsonl beside a train.jsonl "
                   "--data, else the last --val-fraction of the pairs)")
    p.add_argument("--val-fraction", type=fraction, default=0.05)
    p.add_argument("--beta", type=positive_float, default=0.1, help="strength of the KL constraint to the reference")
    p.add_argument("--label-smoothing", type=fraction0, default=0.0,
                   help="assumed share of flipped labels (conservative DPO), in [0, 0.5)")
    p.add_argument("--loss-type", choices=("sigmoid", "ipo"), default="sigmoid")
    p.add_argument("--rpo-alpha", type=nonneg_float, default=1.0,
                   help="weight of the negative log-likelihood of the chosen answers added to the loss (RPO, "
                        "Pang et al. 2024); 0 = plain DPO. 1 by default: over 3 seeds it kept 95%% of the reviews on "
                        "topic at KL 1.6, where plain DPO drifted to KL 50 and 52%% (docs/alignment.md)")
    p.add_argument("--precompute-ref", action=argparse.BooleanOptionalAction, default=True,
                   help="compute the reference log-probs of every pair once, before training")
    p.add_argument("--batch-size", type=positive_int, default=16, help="pairs per micro-batch per process")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step, summed over all processes")
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--max-iters", type=nonneg_int, default=0, help="optimizer steps (0 = --epochs over the pairs)")
    add_optimizer_args(p, lr=1.5e-4, min_lr=1e-5, warmup=10)
    p.add_argument("--eval-interval", type=nonneg_int, default=0,
                   help="score the held-out pairs (and save) every N steps; 0 = only at the end")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="length of the evaluation's sampled reviews")
    return add_run_args(p, "out/dpo", "final evaluation prompts: 'review' (the world's "
                        "review test prompts, judged by world.sentiment_score), a prompts .jsonl, or 'none'")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.ref = args.ref or args.init
    return args


# what check_args refuses before any work, each rule with a command line that breaks it
RULES = [
    Rule(lambda a: a.label_smoothing >= 0.5, "--label-smoothing must be in [0, 0.5), not {a.label_smoothing}",
         ("--label-smoothing", "0.6")),
    no_effect("--val-fraction", lambda a: a.val_data, "with --val-data: nothing is split off",
              ("--val-data", "v.jsonl", "--val-fraction", "0.1")),
]


def check_args(args):
    """Before any work: RULES, the input files, and --init and --ref (under --resume the run's own options, checked
    when it started): language models, not reward models, neither of them --out."""
    check_rules(args, RULES)
    if args.resume:
        return
    check_input_files("--data", [] if args.data == "world" else args.data)
    check_input_files("--val-data", args.val_data)
    check_input_files("--eval-prompts", [] if args.eval_prompts in ("review", "none") else args.eval_prompts)
    check_policy(args.init, "--init", hint="python sft.py")
    check_policy(args.ref, "--ref", hint="python sft.py")
    check_out_is_not_an_input(args.out, {"--init": args.init, "--ref": args.ref})


# ----------------------------------------------------------------------------- data

def load_pairs(args):
    """-> (train pairs, held-out pairs, where the held-out pairs come from)."""
    if args.data == "world":
        pairs = world.review_pairs(world.make_world(args.world_seed))
    elif not os.path.exists(args.data) and args.data == DEFAULT_PAIRS:
        raise UserError(f"no preference pairs at {args.data}; make them with `python preferences.py`, "
                             f"or train on the world's review pairs with --data world")
    else:
        pairs = data.load_preference_pairs(args.data, with_where=True)
    val_path = args.val_data
    if val_path is None and args.data.endswith("train.jsonl"):
        sibling = args.data[:-len("train.jsonl")] + "val.jsonl"
        val_path = sibling if os.path.exists(sibling) else None
    if val_path:
        return pairs, data.load_preference_pairs(val_path, with_where=True), val_path
    n_val = int(len(pairs) * args.val_fraction)
    return pairs[:len(pairs) - n_val], pairs[len(pairs) - n_val:], args.data


def tokenize_pairs(pairs, enc, block_size, source):
    """Prompt and answers are encoded separately and joined as ids: (x, y_w + [EOS], y_l + [EOS])."""
    out = []
    for i, pair in enumerate(pairs):
        where = pair.get("where", f"{source}: pair {i + 1}")   # path:line, or the world's pair number
        x, y_w = data.encode_example(enc, pair["prompt"], pair["chosen"], block_size, where)
        _, y_l = data.encode_example(enc, pair["prompt"], pair["rejected"], block_size, where)
        out.append((x, y_w, y_l))
    return out


def pair_batch(pairs, pad):
    """One padded batch: rows 0..B-1 are x + y_w, rows B..2B-1 are x + y_l (data.completion_batch)."""
    prompts = [x for x, _, _ in pairs] * 2
    return data.completion_batch(prompts, [y for _, y, _ in pairs] + [y for _, _, y in pairs], pad)


# ----------------------------------------------------------------------------- policy and reference

def pair_logps(model, batch):
    """(log pi(y_w|x), log pi(y_l|x)), each the sum over the answer's tokens of log p(y_t | x, y_<t):
    the log of the guide's product pi(y|x) = p(y1|x) * p(y2|x,y<2) * ... * p(yn|x,y<n)."""
    logps = completion_logprobs(model, batch).sum(-1)
    return logps.chunk(2)


@torch.no_grad()
def reference_logps(ref, pairs, pad, batch_size, ctx):
    """(N, 2) table of log pi_ref(y_w|x), log pi_ref(y_l|x), computed once before training; under torchrun each
    process computes its contiguous share of the pairs (training.rank_slice) and every process gets the table."""
    lo, hi = rank_slice(len(pairs), ctx)
    rows = [torch.zeros(0, 2, device=ctx.device)]
    for i in range(lo, hi, batch_size):
        batch = {k: v.to(ctx.device) for k, v in pair_batch(pairs[i:min(i + batch_size, hi)], pad).items()}
        with ctx.autocast():
            rows.append(torch.stack(pair_logps(ref, batch), -1).float())
    return gather_rows(torch.cat(rows), len(pairs), ctx)


# ----------------------------------------------------------------------------- the loss

def dpo_loss(*, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing=0.0,
             loss_type="sigmoid"):
    """DPO: L = -mean log sigmoid(beta * log(pi(y_w|x) / pi_ref(y_w|x)) - beta * log(pi(y_l|x) / pi_ref(y_l|x))).

    With h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)):
      sigmoid: L = -mean[(1 - eps) * log sigmoid(beta * h) + eps * log sigmoid(-beta * h)]
               (eps = label_smoothing, the share of labels assumed flipped: conservative DPO; eps = 0 is DPO)
      ipo:     L = mean[(1 - eps) * (h - 1 / (2 * beta))^2 + eps * (h + 1 / (2 * beta))^2]
    dL/dlog pi(y_w|x) = -beta * sigmoid(-beta * h) for eps = 0: the push is strong while the policy
    still prefers y_l more than the reference does, and fades as it learns.
    Returns (L, rewards_chosen, rewards_rejected), the implicit rewards beta * log(pi(y|x) / pi_ref(y|x)).
    Keyword arguments only: four sequence log-probs of one shape, which a positional call could swap unseen."""
    rewards_chosen = beta * (chosen_logps - ref_chosen_logps)
    rewards_rejected = beta * (rejected_logps - ref_rejected_logps)
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (1 - eps) * (h - 1 / (2 * beta)) ** 2 + eps * (h + 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses.mean(), rewards_chosen.detach(), rewards_rejected.detach()


def rpo_loss(dpo_loss_value, chosen_logps, chosen_tokens, alpha):
    """RPO (Pang et al. 2024): DPO plus the negative log-likelihood of the chosen answers,
        L_RPO = L_DPO + alpha * NLL,   NLL = -sum_i log pi(y_w_i|x_i) / sum_i |y_w_i|
    normalised as TRL's rpo_alpha: the chosen answers' summed log-probs over the batch's total number of
    chosen tokens (a per-token mean over the batch; the paper divides each log pi(y_w|x) by its own length
    before the mean over pairs). The batch is the optimizer step's, over all its micro-batches and processes
    (train_step). The NLL keeps pushing log pi(y_w|x) up, where DPO alone only pushes the
    margin and lets both log-probs fall (likelihood displacement). alpha = 0 is DPO.
    Returns (L_RPO, NLL)."""
    nll = -chosen_logps.sum() / chosen_tokens.clamp(min=1)
    return dpo_loss_value + alpha * nll, nll.detach()


def preference_stats(rewards_chosen, rewards_rejected, chosen_logps, rejected_logps, ref_chosen_logps=None,
                     ref_rejected_logps=None):
    """What DPO runs log: mean implicit rewards, how often chosen out-rewards rejected, the margin, log-probs,
    and (given the reference's) their drift from the reference, mean log pi(y|x) - log pi_ref(y|x) over the
    batch for chosen and rejected answers (both fall under likelihood displacement)."""
    out = {"rewards/chosen": rewards_chosen.mean().item(), "rewards/rejected": rewards_rejected.mean().item(),
           "rewards/accuracies": (rewards_chosen > rewards_rejected).float().mean().item(),
           "rewards/margins": (rewards_chosen - rewards_rejected).mean().item(),
           "logps/chosen": chosen_logps.detach().mean().item(), "logps/rejected": rejected_logps.detach().mean().item()}
    if ref_chosen_logps is not None:
        out["drift/chosen"] = (chosen_logps.detach() - ref_chosen_logps).mean().item()
        out["drift/rejected"] = (rejected_logps.detach() - ref_rejected_logps).mean().item()
    return out


# ----------------------------------------------------------------------------- the exact check

def toy_exact_check(beta=0.5, n_pairs=0, steps=3000, seed=0):
    """DPO on the tabular problem of align.py, whose optimum is known. Reward r of the four answers is known;
    pairs (i, j) are drawn uniformly and labelled by Bradley-Terry, P(y_i preferred to y_j) = sigmoid(r_i - r_j).
    n_pairs = 0 minimises the expected (population) loss, mean over pairs i < j of
    p_ij * l(i > j) + (1 - p_ij) * l(j > i) with p_ij = sigmoid(r_i - r_j): label smoothing eps = 1 - p_ij.
    Its minimiser is beta * h_ij = r_i - r_j for every pair, i.e. pi* = pi_ref * exp(r / beta) / Z exactly
    (no noise); with n_pairs sampled hard labels the optimum is close to it.
    Returns (pi_ref, r, pi*, pi_dpo) as float64 tensors."""
    g = torch.Generator().manual_seed(seed)
    theta1_ref, theta2_ref, r = toy_problem(g)
    ref_logps = toy_token_logps(theta1_ref, theta2_ref).sum(-1)
    pi_star = kl_regularised_optimum(ref_logps, r, beta)
    i, j = torch.triu_indices(4, 4, 1)
    if n_pairs:  # sampled preferences: chosen = i with probability sigmoid(r_i - r_j)
        k = torch.randint(len(i), (n_pairs,), generator=g)
        flip = torch.rand(n_pairs, generator=g, dtype=torch.float64) > torch.sigmoid(r[i[k]] - r[j[k]])
        chosen, rejected, eps = torch.where(flip, j[k], i[k]), torch.where(flip, i[k], j[k]), 0.0
    else:
        chosen, rejected, eps = i, j, 1 - torch.sigmoid(r[i] - r[j])
    theta1, theta2 = theta1_ref.clone().requires_grad_(), theta2_ref.clone().requires_grad_()
    opt = torch.optim.LBFGS([theta1, theta2], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    opt.step(lambda: toy_loss_and_grad(opt, theta1, theta2, ref_logps, chosen, rejected, beta, eps))
    with torch.no_grad():
        return ref_logps.exp(), r, pi_star, toy_token_logps(theta1, theta2).sum(-1).exp()


def toy_loss_and_grad(opt, theta1, theta2, ref_logps, chosen, rejected, beta, eps):
    """The closure L-BFGS calls: the DPO loss of the tabular policy over the given pairs, and its gradient."""
    opt.zero_grad()
    logps = toy_token_logps(theta1, theta2).sum(-1)
    loss = dpo_loss(chosen_logps=logps[chosen], rejected_logps=logps[rejected], ref_chosen_logps=ref_logps[chosen],
                    ref_rejected_logps=ref_logps[rejected], beta=beta, label_smoothing=eps)[0]
    loss.backward()
    return loss


def toy_report():
    print("DPO on a tabular policy over the answers aa ab ba bb; preferences from Bradley-Terry with reward r;\n"
          "closed form pi* = pi_ref * exp(r / beta) / Z")
    out = {}
    for beta in (1.0, 0.5):
        for n_pairs in (0, 20000):
            pi_ref, r, pi_star, pi = toy_exact_check(beta, n_pairs)
            tv = 0.5 * (pi - pi_star).abs().sum().item()
            name = "expected data" if n_pairs == 0 else f"{n_pairs} sampled pairs"
            print(f"\nbeta {beta}, {name}: total variation |pi_DPO - pi*| = {tv:.2e}")
            print_toy_table(pi_ref, r, pi_star, pi, "DPO")
            out[f"tv_beta{beta}_{'expected' if n_pairs == 0 else n_pairs}"] = tv
    return out


# ----------------------------------------------------------------------------- one step, evaluation, saving

def logp_table(model, ref, pairs, ref_rows, pad, ctx):
    """(B, 4) float32 table of some pairs' log pi(y_w|x), log pi(y_l|x), log pi_ref(y_w|x), log pi_ref(y_l|x):
    chosen and rejected in one forward of the model. ref_rows: their precomputed reference log-probs, or None to
    run the reference now."""
    batch = {k: v.to(ctx.device) for k, v in pair_batch(pairs, pad).items()}
    with ctx.autocast():
        chosen_logps, rejected_logps = pair_logps(model, batch)
        if ref_rows is not None:
            ref_chosen_logps, ref_rejected_logps = ref_rows.unbind(-1)
        else:
            with torch.no_grad():
                ref_chosen_logps, ref_rejected_logps = pair_logps(ref, batch)
    return torch.stack([chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps], -1).float()


def batch_loss(table, chosen_tokens, args):
    """The loss of a batch from its logp_table: L_DPO (mean over the table's pairs) + alpha * NLL, with the NLL's
    sum over the table's chosen answers divided by chosen_tokens; -> (L, NLL, rewards_chosen, rewards_rejected)."""
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = table.unbind(-1)
    loss, rewards_chosen, rewards_rejected = dpo_loss(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, beta=args.beta, label_smoothing=args.label_smoothing,
        loss_type=args.loss_type)
    loss, nll = rpo_loss(loss, chosen_logps, chosen_tokens, args.rpo_alpha)
    return loss, nll, rewards_chosen, rewards_rejected


def batch_stats(table, chosen_tokens, args):
    """The loss and every logged statistic of a whole batch, from the (n, 4) logp_table of all its pairs (every
    process's rows gathered), as the equations define them over the batch; -> (loss, stats)."""
    loss, nll, rewards_chosen, rewards_rejected = batch_loss(table.detach(), chosen_tokens, args)
    stats = preference_stats(rewards_chosen, rewards_rejected, *table.detach().unbind(-1))
    return loss, {"loss": loss.item(), **stats, "nll/chosen": nll.item()}


def chosen_tokens_of(rows):
    """Sum over the pairs (x, y_w, y_l) of |y_w|: the tokens whose log-probs make log pi(y_w|x), EOS included."""
    return torch.tensor(float(sum(len(y_w) for _, y_w, _ in rows)))


def train_step(train_model, ref, pairs, idx, accum, pad, args, ctx):
    """Forward and backward of one optimizer step's pairs idx: this process's contiguous share of them
    (training.rank_slice) in `accum` micro-batches; -> (loss, stats) of the whole step's batch (every process's
    log-probs gathered, batch_stats). The optimizer step itself is the caller's.
    DDP averages the N processes' gradients and each process divides its micro-batches' losses by accum, so the
    gradient is the mean over the step's G = --grad-accum micro-batches; RPO's NLL of each micro-batch is divided
    by T / G (T: chosen tokens of the whole step), so that mean is L_DPO + alpha * (-sum log pi(y_w|x) / T) of
    the whole batch, whatever N and G."""
    mine = idx[slice(*rank_slice(len(idx), ctx))]
    chosen_tokens = chosen_tokens_of([pairs.train[i] for i in idx])
    rows = []
    for micro in range(accum):
        part = mine[micro * args.batch_size:(micro + 1) * args.batch_size]
        sync = ctx.ddp and micro < accum - 1
        with train_model.no_sync() if sync else contextlib.nullcontext():
            table = logp_table(train_model, ref, [pairs.train[i] for i in part],
                               None if pairs.ref_train is None else pairs.ref_train[torch.as_tensor(part)], pad, ctx)
            loss = batch_loss(table, chosen_tokens / args.grad_accum, args)[0]
            (loss / accum).backward()
        rows.append(table.detach())
    return batch_stats(gather_rows(torch.cat(rows), len(idx), ctx), chosen_tokens, args)


@torch.no_grad()
def evaluate_pairs(policy, ref, pairs, pad, args, ctx):
    """Loss, reward accuracy, margin and the drift of log pi(y_w|x), log pi(y_l|x) from the reference over all the
    held-out pairs; under torchrun each process scores its contiguous share and the log-probs are gathered."""
    if not pairs.val:
        return {}
    policy.eval()
    lo, hi = rank_slice(len(pairs.val), ctx)
    rows = [torch.zeros(0, 4, device=ctx.device)]
    for i in range(lo, hi, 2 * args.batch_size):
        idx = list(range(i, min(i + 2 * args.batch_size, hi)))
        rows.append(logp_table(policy, ref, [pairs.val[j] for j in idx],
                               None if pairs.ref_val is None else pairs.ref_val[torch.as_tensor(idx)], pad, ctx))
    policy.train()
    _, stats = batch_stats(gather_rows(torch.cat(rows), len(pairs.val), ctx), chosen_tokens_of(pairs.val), args)
    return {"eval_loss": stats["loss"], "eval_accuracy": stats["rewards/accuracies"],
            "eval_margin": stats["rewards/margins"], "eval_drift_chosen": stats["drift/chosen"],
            "eval_drift_rejected": stats["drift/rejected"]}


def prepare_pairs(args, enc, policy, ref, ctx):
    """Tokenized train and held-out pairs, with the reference's log-probs of both when precomputed;
    -> (pairs, the number of optimizer steps)."""
    train_pairs, val_pairs, val_source = load_pairs(args)
    block, pad = policy.config.block_size, pad_id(enc)
    pairs = SimpleNamespace(train=tokenize_pairs(train_pairs, enc, block, args.data),
                            val=tokenize_pairs(val_pairs, enc, block, val_source), ref_train=None, ref_val=None)
    per_step = args.batch_size * args.grad_accum
    if len(pairs.train) < per_step:
        raise UserError(f"{args.data}: {len(pairs.train)} training pairs, fewer than one step of {per_step} "
                        f"(--batch-size x --grad-accum); add pairs or lower --batch-size")
    max_iters = args.max_iters or args.epochs * (len(pairs.train) // per_step)
    if ctx.master:
        scored = [p for p in train_pairs if "score_chosen" in p]
        gap = sum(p["score_chosen"] - p["score_rejected"] for p in scored) / max(1, len(scored))
        print(f"pairs: {len(pairs.train)} train / {len(pairs.val)} held-out" +
              (f", mean score gap {gap:.3f}" if scored else "") +
              f"; {max_iters} steps of {per_step} pairs; model {policy.num_params() / 1e6:.2f}M parameters "
              "without the position embeddings")
    if args.precompute_ref:
        pairs.ref_train = reference_logps(ref, pairs.train, pad, 2 * args.batch_size, ctx)
        pairs.ref_val = reference_logps(ref, pairs.val, pad, 2 * args.batch_size, ctx)
    return pairs, max_iters


def save(args, policy, optimizer, enc, step, metrics):
    """The resumable state (with the metrics so far) and the model; config.json says "finished": false until
    mark_finished, after the final evaluation (run.sh skips only finished runs)."""
    save_train_state(args.out, policy, optimizer, step, extra={"metrics": metrics}, args=args)
    save_checkpoint(args.out, policy, enc, {"stage": "dpo", "args": vars(args), "step": step, "metrics": metrics,
                                            "samples": [], "finished": False})


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.toy:
        return toy_report()
    check_args(args)
    t0 = time.time()
    ctx = setup(args)
    accum = micro_steps(args.grad_accum, ctx)
    os.makedirs(args.out, exist_ok=True)
    policy, ref, enc = load_policy_and_reference(args.init, args.ref, ctx.device)   # pi_theta, frozen pi_ref
    prompts = eval_prompts(args.eval_prompts, args.world_seed, args.eval_limit)
    check_prompts_fit("--eval-prompts", prompts, enc, policy.config.block_size)
    pad = pad_id(enc)
    pairs, max_iters = prepare_pairs(args, enc, policy, ref, ctx)
    per_step = args.batch_size * args.grad_accum

    optimizer = make_optimizer(policy, args.lr, args.weight_decay, ctx=ctx)
    start, saved = load_train_state(args.out, policy, optimizer) if args.resume else (0, {})
    train_model = wrap_model(policy, ctx)
    policy.train()
    stop = StopFlag()
    log = MetricsLog(args.out, max_iters, ctx.master, resume=args.resume)
    sums, n_logged, t_last, loss = {}, 0, time.time(), None
    for step in range(start, max_iters):
        lr = lr_at(step, args.lr, args.warmup, max_iters, args.min_lr)
        set_lr(optimizer, lr)
        idx = data.step_indices(len(pairs.train), per_step, args.seed, step)
        loss, stats = train_step(train_model, ref, pairs, idx, accum, pad, args, ctx)
        check_finite(loss, step)
        grad_norm = optimizer_step(policy, optimizer, args.grad_clip)
        for key, v in stats.items():
            sums[key] = sums.get(key, 0.0) + v
        done, n_logged = step + 1, n_logged + 1
        if done % args.log_interval == 0 or done == max_iters:
            dt, t_last = time.time() - t_last, time.time()   # stats are the whole batch's: the same on every process
            log.log(done, **{k: v / n_logged for k, v in sums.items()}, grad_norm=grad_norm.item(), lr=lr,
                    pairs_per_s=round(per_step * n_logged / max(dt, 1e-9), 1))
            sums, n_logged = {}, 0
        if pairs.val and args.eval_interval and done % args.eval_interval == 0 and done < max_iters:
            ev = evaluate_pairs(policy, ref, pairs, pad, args, ctx)
            log.log(done, **ev)
            if ctx.master:
                save(args, policy, optimizer, enc, done, ev)
        if stop.requested_anywhere(ctx) or done == args.stop_at:
            if ctx.master:
                save(args, policy, optimizer, enc, done, {})
                print(f"stopped at step {done}; continue with: python dpo.py --resume --out {args.out}")
            return

    # the trained model first, then the final evaluation on every process: held-out pairs, then the gold judge on
    # held-out prompts, policy vs reference; an error there never costs the model (a --resume at the last step,
    # after such an error, runs the evaluation alone)
    metrics = {"train_loss": loss.item()} if loss is not None else dict(saved.get("metrics", {}))
    if ctx.master:
        save(args, policy, optimizer, enc, max_iters, metrics)
    with final_evaluation(args.out, "python dpo.py"):
        metrics.update(evaluate_pairs(policy, ref, pairs, pad, args, ctx))
        heldout, samples = heldout_eval(policy, ref, enc, prompts, args.max_new_tokens, args.seed, ctx.autocast,
                                        ctx=ctx)
    metrics.update(heldout)
    metrics["time_s"] = round(time.time() - t0, 1)
    if ctx.master:
        mark_finished(args.out, metrics, samples=list(samples))
        print_final(metrics, samples)
    return metrics


if __name__ == "__main__":
    run_cli(main)
