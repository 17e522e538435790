"""Stage 4b, the reward model: a scalar score r(x, y) of a completion y to a prompt x, trained on
preference pairs (x, y_w, y_l) with the Bradley-Terry loss.

    python reward.py                       # out/sft trunk, out/preferences/{train,val}.jsonl, --train all
    python reward.py --train head          # trunk frozen, only LayerNorm + head train (parameter-efficient)
    python reward.py --train lora 8        # LoRA adapters of rank 8 on the trunk + the head
    python reward.py --data pairs.jsonl --val-data held_out.jsonl   # your prompt/chosen/rejected JSONL
    torchrun --nproc_per_node=4 reward.py  # DistributedDataParallel: each process a quarter of each batch
    python reward.py --margin 1 --center-coef 0.01   # Llama 2's margin from the score gap; reward centering

Under torchrun each process scores its contiguous share of each step's --batch-size pairs (the batch is the same
as with one process) and DDP averages the gradients, so the step is the one-process step; the logged loss,
accuracy and margin, and the held-out accuracy and Kendall's tau, are computed over all the pairs (scores are
gathered). Under --train head every process runs the (cheap) head step on the whole batch; the trunk's features
are computed once, split across the processes. Only the first process writes files.

Architecture: the SFT model's transformer (a gpt.GPT, language-model head unused) is the trunk;
gpt.GPT.hidden_states ends in the trunk's final LayerNorm ln_f, and on top of it sit two new modules,
a LayerNorm and a Linear(n_embd, 1) head:

    r(x, y) = head(LayerNorm(h_last)),   h_last = hidden state at the last real token of concat(x, y)

The last real token is the EOS that ends the completion, so the score has read the whole answer.
Chosen and rejected rows go through the model in one padded batch; padding never changes a score.

Evaluation on held-out pairs: pairwise accuracy 1/N sum 1[r_w > r_l], and, where preferences.py kept
every scored completion of each held-out prompt (val_groups.jsonl), the mean Kendall's tau between the
reward model's ranking and the gold judge's ranking of those completions.

Saved to OUT: model.safetensors (the trunk, GPT keys only: LoRA adapters are merged in), config.json
({"stage": "reward", "model": ..., "metrics": {pairwise_accuracy, kendall_tau, time_s, ...}}),
tokenizer.json, and reward_head.safetensors (ln.weight, ln.bias, head.weight, head.bias).
ppo.py and report.py use load_reward_model and reward_scores.
"""

import argparse
import copy
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import world
from common import (ArgumentParser, Rule, UserError, atomic_save_safetensors, check_input_files,
                    check_out_is_not_an_input, check_rules, no_effect, nonneg_float, nonneg_int, positive_float,
                    positive_int, prob, read_safetensors, run_cli)
from evals import word_guard
from gpt import check_same_tokenizer, load_checkpoint, load_tensors_strict, read_config, save_checkpoint
from lora import check_rank, inject_lora, merge_lora
from tokenizer import pad_id
from training import (MetricsLog, StopFlag, add_common_args, check_finite, final_evaluation, gather_rows,
                      init_model, load_train_state, lr_at, make_optimizer, mark_finished, optimizer_step, rank_slice,
                      save_train_state, set_lr, setup, wrap_model)

HEAD_FILE = "reward_head.safetensors"
DEFAULT_PAIRS = "out/preferences/train.jsonl"
DEFAULT_LR = {"all": 1e-4, "lora": 1e-3, "head": 1e-2}
DEFAULT_EPOCHS = {"all": 2, "lora": 2, "head": 50}  # a frozen trunk's features are computed once: epochs are cheap
__all__ = ["RewardModel", "bradley_terry_loss", "kendall_tau", "load_reward_model", "reward_scores",
           "check_same_tokenizer"]


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--init", default="out/sft", help="checkpoint whose transformer becomes the trunk")
    p.add_argument("--data", default=DEFAULT_PAIRS, help="training pairs (prompt/chosen/rejected JSONL, Anthropic HH)")
    p.add_argument("--val-data", default=None, help="held-out pairs (default: val.jsonl beside --data)")
    p.add_argument("--val-groups", default=None, help="held-out prompts with all their scored completions, for "
                   "Kendall's tau (default: val_groups.jsonl beside --data; skipped when absent)")
    p.add_argument("--train", nargs="+", default=["all"], metavar="MODE",
                   help="what trains: 'all' (trunk + head), 'head' (trunk frozen), or 'lora R' (rank-R adapters + head)")
    p.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA alpha (default 2R)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="pairs per step (2x rows: chosen and rejected)")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the pairs (default: "
                   + ", ".join(f"{v} with --train {k}" for k, v in DEFAULT_EPOCHS.items()) + ")")
    p.add_argument("--max-iters", type=nonneg_int, default=0, help="optimizer steps (0 = --epochs over the pairs)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: "
                   + ", ".join(f"{v:g} with --train {k}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--min-lr-ratio", type=prob, default=0.1, help="final lr = this x --lr (cosine decay)")
    p.add_argument("--warmup", type=nonneg_int, default=10)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    p.add_argument("--grad-clip", type=positive_float, default=1.0)
    p.add_argument("--margin", type=nonneg_float, default=0.0, help="margin term (Llama 2): m = this x the pair's gold "
                   "score gap (score_chosen - score_rejected, when the pairs have them); 0 = off")
    p.add_argument("--center-coef", type=nonneg_float, default=0.0, help="centering term (Eisenstein et al. 2023): "
                   "+ this x mean (r_w + r_l)^2; 0 = off (the paper uses 0.01)")
    p.add_argument("--eval-interval", type=positive_int, default=100)
    p.add_argument("--eval-batch", type=positive_int, default=32)
    p.add_argument("--stop-at", type=nonneg_int, default=0, help="save a resumable state and stop after this step")
    add_common_args(p, out="out/reward")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    mode = args.train[0]
    if mode not in ("all", "head", "lora") or (mode == "lora") != (len(args.train) == 2) or len(args.train) > 2:
        raise UserError(f"--train {' '.join(args.train)}: use 'all', 'head' or 'lora R' (R a positive integer)")
    args.lora_r = 0
    if mode == "lora":
        if not args.train[1].isdigit() or int(args.train[1]) < 1:
            raise UserError(f"--train lora {args.train[1]}: the rank R must be a positive integer")
        args.lora_r = int(args.train[1])
    args.mode = mode
    if args.margin < 0 or args.center_coef < 0:
        raise UserError(f"--margin and --center-coef must be >= 0, not {args.margin} and {args.center_coef}")
    args.lr = DEFAULT_LR[mode] if args.lr is None else args.lr
    args.epochs = DEFAULT_EPOCHS[mode] if args.epochs is None else args.epochs
    base = os.path.dirname(args.data)
    for attr, name in (("val_data", "val.jsonl"), ("val_groups", "val_groups.jsonl")):
        if getattr(args, attr) is None and os.path.basename(args.data) == "train.jsonl":
            sibling = os.path.join(base, name)
            setattr(args, attr, sibling if os.path.exists(sibling) else None)
    return args


# what check_args refuses before any work, each rule with a command line that breaks it
RULES = [
    no_effect("--lora-alpha", lambda a: a.mode != "lora", "without --train lora R", ("--lora-alpha", "4")),
    no_effect("--epochs", lambda a: a.max_iters, "with --max-iters {a.max_iters}, which sets the steps",
              ("--max-iters", "5", "--epochs", "2")),
]


def check_args(args):
    """Before any work: RULES, the input files, and --init (under --resume the run's own options, checked when it
    started): a checkpoint whose trunk the reward model takes, not --out, wide enough for the LoRA rank."""
    check_rules(args, RULES)
    if args.resume:
        return
    for option, path in (("--data", args.data), ("--val-data", args.val_data), ("--val-groups", args.val_groups)):
        check_input_files(option, path)
    model, _ = init_model(args.init, hint="python sft.py")
    check_out_is_not_an_input(args.out, {"--init": args.init})
    if args.lora_r:
        check_rank("--train lora", args.lora_r, model["n_embd"])


# ----------------------------------------------------------------------------- data

def encode_pairs(pairs, enc, block_size, where):
    """-> (prompt ids, chosen ids + EOS, rejected ids + EOS) lists."""
    P, W, L = [], [], []
    for i, p in enumerate(pairs):
        at = p.get("where", f"{where}: pair {i + 1}")   # path:line of the record
        x, yw = data.encode_example(enc, p["prompt"], p["chosen"], block_size, at)
        _, yl = data.encode_example(enc, p["prompt"], p["rejected"], block_size, at)
        P.append(x), W.append(yw), L.append(yl)
    return P, W, L


def load_groups(path):
    """val_groups.jsonl -> [(prompt, [completion texts], [gold scores])]."""
    out = []
    for where, r in data.records_with_lines(path):
        comps, scores = r.get("completions"), r.get("scores")
        if not isinstance(comps, list) or not isinstance(scores, list) or len(comps) != len(scores):
            raise UserError(f"{where}: needs 'completions' and 'scores', two lists of equal length")
        out.append((data.field(r, "prompt", where), comps, [float(s) for s in scores]))
    return out


def pair_rows(P, W, L, idx):
    """Pairs idx -> one batch of 2B rows: the chosen completions, then the rejected ones."""
    return [P[i] for i in idx] * 2, [W[i] for i in idx] + [L[i] for i in idx]


# ----------------------------------------------------------------------------- the model

class RewardModel(nn.Module):
    """trunk (gpt.GPT) -> hidden state at the last real token -> LayerNorm -> Linear(n_embd, 1) -> r."""

    def __init__(self, trunk):
        super().__init__()
        C = trunk.config.n_embd
        self.trunk = trunk
        self.ln = nn.LayerNorm(C, bias=trunk.config.bias)
        self.head = nn.Linear(C, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.config = trunk.config

    def features(self, batch):
        """h_last (B, C): the trunk's hidden state (after its ln_f) at each row's last real token."""
        h = self.trunk.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        return h[torch.arange(h.size(0), device=h.device), batch["last_index"]]

    def score(self, h_last):
        """r = head(LayerNorm(h_last)), (B, C) -> (B,)."""
        return self.head(self.ln(h_last)).squeeze(-1).float()

    def forward(self, batch):
        """A data.completion_batch (with last_index) -> rewards (B,)."""
        return self.score(self.features(batch))


def head_state(rm):
    return {f"ln.{k}": v for k, v in rm.ln.state_dict().items()} | {f"head.{k}": v for k, v in rm.head.state_dict().items()}


def load_reward_model(path, device="cpu", policy_enc=None):
    """-> (rm, enc, config) from a directory reward.py wrote; rm in eval mode. With policy_enc, refuse a reward
    model whose tokenizer differs from the policy's (its scores of the policy's token ids would be meaningless)."""
    config = read_config(path, hint="python reward.py")
    if config.get("stage") != "reward":
        raise UserError(f"{path} is a {config.get('stage')!r} checkpoint, not a reward model; make one with "
                             f"`python reward.py`")
    trunk, enc, config = load_checkpoint(path, device, hint="python reward.py")
    rm = RewardModel(trunk)
    head_path = os.path.join(path, HEAD_FILE)
    tensors = read_safetensors(head_path)
    for name, module in (("ln.", rm.ln), ("head.", rm.head)):
        load_tensors_strict(module, {k[len(name):]: v for k, v in tensors.items() if k.startswith(name)}, head_path)
    if policy_enc is not None:
        check_same_tokenizer(enc, policy_enc, f"the reward model {path}", "the policy")
    return rm.to(device).eval(), enc, config


@torch.no_grad()
def reward_scores(rm, enc, prompt_ids, completion_ids, batch=32):
    """r(x, y) for lists of token ids -> FloatTensor (B,) on the CPU. completion_ids end with EOS when the
    completion ended; the score is read at the last real token. Eval mode (no dropout), no gradients:
    the same input always gets the same score, whatever else is in the batch."""
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    out = torch.zeros(len(prompt_ids))
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))  # less padding
    for k in range(0, len(order), batch):
        idx = order[k:k + batch]
        b = data.completion_batch([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx], pad_id(enc))
        out[idx] = rm({key: v.to(device) for key, v in b.items()}).float().cpu()
    rm.train(was_training)
    return out


def guard_spec(text):
    """--guard of sample.py and evaluate.py: words or rm:DIR."""
    if text == "words" or (text.startswith("rm:") and len(text) > 3):
        return text
    raise argparse.ArgumentTypeError(f"unknown guard {text!r}; choose words or rm:DIR (a reward model)")


guard_spec.bad_values = ["nope", "rm:"]


def make_guard(spec, enc, device="cpu", world_seed=1337, threshold=0.0):
    """The guardrail's classifier of --guard SPEC -> flag(prompts, answers, threshold=threshold) -> [bool], or None
    without one: words (evals.word_guard, knowing every door code of the world of world_seed; no threshold) or
    rm:DIR (rm_guard; the reward model is read once, whatever thresholds it is asked at)."""
    if spec is None:
        return None
    if spec == "words":
        secrets = [p.code for p in world.make_world(world_seed).people]
        return lambda prompts, texts, threshold=None: [word_guard(t, secrets) for t in texts]
    rm = load_reward_model(spec[3:], device, policy_enc=enc)[0]
    return lambda prompts, texts, threshold=threshold: rm_guard(rm, enc, prompts, texts, threshold)


def rm_guard(rm, enc, prompts, answers, threshold=0.0):
    """The guardrail's reward-model classifier: flag each answer whose score r(x, y) is below the threshold
    (the answer as it was written, with the EOS that ended it) -> [bool]."""
    prompt_ids = [enc.encode_ordinary(p) for p in prompts]
    answer_ids = [enc.encode_ordinary(data.format_completion(a)) + [enc.eot_token] for a in answers]
    return (reward_scores(rm, enc, prompt_ids, answer_ids) < threshold).tolist()


def unique_scores(rm, enc, prompt_ids, completion_ids, batch=32, ctx=None):
    """reward_scores, computing each distinct (prompt, completion) once (a completion sits in several pairs);
    under torchrun each process scores its share of the distinct rows and every process gets all the scores."""
    keys = [(tuple(p), tuple(c)) for p, c in zip(prompt_ids, completion_ids)]
    distinct = list(dict.fromkeys(keys))
    lo, hi = rank_slice(len(distinct), ctx)
    mine = reward_scores(rm, enc, [list(p) for p, _ in distinct[lo:hi]], [list(c) for _, c in distinct[lo:hi]], batch)
    scores = gather_rows(mine, len(distinct), ctx)
    at = {k: i for i, k in enumerate(distinct)}
    return scores[[at[k] for k in keys]] if keys else scores


def set_trainable(rm, mode, lora_r=0, lora_alpha=None):
    """all: every parameter; head: only ln + head (trunk frozen); lora: adapters on the trunk + ln + head."""
    if mode == "lora":
        inject_lora(rm.trunk, lora_r, lora_alpha)
    else:
        rm.trunk.requires_grad_(mode == "all")
    rm.ln.requires_grad_(True)
    rm.head.requires_grad_(True)
    return rm


# ----------------------------------------------------------------------------- the loss and the metrics

def bradley_terry_loss(r_chosen, r_rejected, margin=None, center_coef=0.0):
    """Bradley-Terry negative log-likelihood of the preferences:
        L = -1/N * sum_i log sigma(r(x_i, y_w_i) - r(x_i, y_l_i)) = -mean log sigma(delta),  delta = r_w - r_l
    (P(y_w preferred to y_l) = sigma(r_w - r_l)). logsigmoid keeps it finite for any delta; adding the
    same constant to every reward changes nothing. Two optional terms:
      margin m_i (Llama 2):  -mean log sigma(r_w - r_l - m_i), a pair labelled as far apart must be
                             separated by at least m_i before its loss fades (m_i = 0: plain Bradley-Terry);
      centering (Eisenstein et al. 2023):  + center_coef * mean (r_w + r_l)^2, which pins the free
                             constant so that rewards stay near zero mean (center_coef = 0: none)."""
    delta = r_chosen.float() - r_rejected.float()
    if margin is not None:
        delta = delta - margin.to(delta)
    loss = -F.logsigmoid(delta).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen.float() + r_rejected.float()) ** 2).mean()
    return loss


def pair_margins(pairs, scale):
    """m_i = scale * (score_chosen - score_rejected) of each pair, the gap the labeller's scores put between the
    two answers (preferences.py writes them); 0 for a pair without scores. -> FloatTensor (N,)."""
    return torch.tensor([scale * (p["score_chosen"] - p["score_rejected"])
                         if "score_chosen" in p and "score_rejected" in p else 0.0 for p in pairs])


def pairwise_accuracy(r_chosen, r_rejected):
    """1/N * sum_i 1[r_w_i > r_l_i]; a tie counts as a miss."""
    return (r_chosen > r_rejected).float().mean().item()


def kendall_tau(a, b):
    """Kendall's tau-b between two scorings of the same n items (rank correlation, ties handled):
        tau_b = (C - D) / sqrt((n0 - n1) * (n0 - n2)),   n0 = n (n - 1) / 2
    C (D) = pairs i < j ordered the same (opposite) way by a and b, n1 (n2) = pairs tied in a (b); a pair
    tied in either counts in neither C nor D. Without ties it is the guide's tau-a, (C - D) / (n choose 2).
    NaN when a or b is constant (every pair tied: no ranking to compare)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"kendall_tau needs two 1-D scorings of equal length, got {a.shape} and {b.shape}")
    n = len(a)
    i, j = np.triu_indices(n, k=1)
    sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    n0 = n * (n - 1) / 2
    n1, n2 = float((sa == 0).sum()), float((sb == 0).sum())
    if n0 - n1 == 0 or n0 - n2 == 0:
        return float("nan")
    return float((sa * sb).sum() / math.sqrt((n0 - n1) * (n0 - n2)))


# ----------------------------------------------------------------------------- evaluation

def evaluate(rm, enc, val, groups, batch, ctx=None):
    """Held-out loss, pairwise accuracy, mean margin r_w - r_l, and mean Kendall's tau over the groups
    (under torchrun the scoring is split across processes; every process gets the metrics of the whole set)."""
    P, W, L = val or ([], [], [])
    gp = [enc.encode_ordinary(p) for p, cs, _ in groups for _ in cs]
    gc = [enc.encode_ordinary(c) + [enc.eot_token] for _, cs, _ in groups for c in cs]
    r = unique_scores(rm, enc, P + P + gp, W + L + gc, batch, ctx)  # a completion is scored once, however often it recurs
    out = {}
    if P:
        r_w, r_l = r[:len(P)], r[len(P):2 * len(P)]
        out.update(val_loss=bradley_terry_loss(r_w, r_l).item(), pairwise_accuracy=pairwise_accuracy(r_w, r_l),
                   margin=(r_w - r_l).mean().item())
    if groups:
        taus, k = [], 2 * len(P)
        for _, cs, gold in groups:
            taus.append(kendall_tau(r[k:k + len(cs)].tolist(), gold))
            k += len(cs)
        valid = [t for t in taus if not math.isnan(t)]
        out.update(kendall_tau=sum(valid) / max(1, len(valid)), kendall_groups=len(valid),
                   kendall_skipped=len(taus) - len(valid))
    return out


# ----------------------------------------------------------------------------- sharding the step (torchrun)

def check_shares(n_pairs, batch_size, ctx):
    """Equal shares of every batch, so that DDP's average of the per-process means is the batch mean."""
    if min(n_pairs, batch_size) % ctx.world:
        raise UserError(f"--batch-size {min(n_pairs, batch_size)} pairs must be a multiple of the {ctx.world} processes")


def batch_stats(r_w, r_l, margin, center_coef, n, ctx):
    """The loss as trained (with its --margin and --center-coef terms), pairwise accuracy and mean reward margin
    of the whole step's n pairs (shares gathered)."""
    r_w, r_l = (gather_rows(r.detach().float(), n, ctx) for r in (r_w, r_l))
    margin = None if margin is None else gather_rows(margin.float().to(r_w.device), n, ctx)
    delta = r_w - r_l
    return bradley_terry_loss(r_w, r_l, margin, center_coef).item(), (delta > 0).float().mean().item(), delta.mean().item()


@torch.no_grad()
def frozen_features(rm, enc, P, W, L, batch, ctx):
    """--train head: the frozen trunk's h_last of every row (chosen rows 0..n-1, rejected n..2n-1), each distinct
    row computed once, the distinct rows split across the processes and gathered."""
    rm.trunk.eval()
    keys = [(tuple(x), tuple(y)) for x, y in zip(P + P, W + L)]
    distinct = list(dict.fromkeys(keys))
    lo, hi = rank_slice(len(distinct), ctx)
    feats = [torch.zeros(0, rm.config.n_embd, device=ctx.device)]
    for i in range(lo, hi, batch):
        chunk = distinct[i:min(i + batch, hi)]
        b = data.completion_batch([x for x, _ in chunk], [y for _, y in chunk], pad_id(enc))
        feats.append(rm.features({k: v.to(ctx.device) for k, v in b.items()}).float())
    at = {k: i for i, k in enumerate(distinct)}
    return gather_rows(torch.cat(feats), len(distinct), ctx)[[at[k] for k in keys]], len(distinct)


# ----------------------------------------------------------------------------- one step and saving

def load_data(args, enc, block):
    """Train pairs as (prompt, chosen, rejected) token lists with their --margin terms (or None), held-out pairs
    (or None) and held-out groups."""
    if not os.path.exists(args.data) and args.data == DEFAULT_PAIRS:
        raise UserError(f"no preference pairs at {args.data}; make them with `python preferences.py`")
    train_pairs = data.load_preference_pairs(args.data, with_where=True)
    P, W, L = encode_pairs(train_pairs, enc, block, args.data)
    margins = pair_margins(train_pairs, args.margin) if args.margin else None
    val = encode_pairs(data.load_preference_pairs(args.val_data, with_where=True), enc, block, args.val_data) \
        if args.val_data else None
    if val is None:
        print("note: no held-out pairs (--val-data, or val.jsonl beside --data): no held-out accuracy is measured")
    groups = load_groups(args.val_groups) if args.val_groups else []
    return SimpleNamespace(P=P, W=W, L=L, margins=margins, val=val, groups=groups)


def step_scores(rm, train_rm, features, d, idx, enc, ctx):
    """-> (the pairs scored, r(x, y_w), r(x, y_l)) for the step's pairs: all of them from the cached trunk
    features under --train head, else a forward of this process's share (DDP averages the gradients)."""
    if features is not None:
        return idx, rm.score(features[idx]), rm.score(features[[i + len(d.P) for i in idx]])
    mine = idx[slice(*rank_slice(len(idx), ctx))]
    b = data.completion_batch(*pair_rows(d.P, d.W, d.L, mine), pad_id(enc))
    with ctx.autocast():
        r = train_rm({k: v.to(ctx.device) for k, v in b.items()})
    return mine, r[:len(mine)], r[len(mine):]


def train_mode(rm, features):
    """Dropout and LayerNorm as in training; a trunk whose features are cached stays in eval mode."""
    rm.train()
    if features is not None:
        rm.trunk.eval()


def save(args, rm, optimizer, enc, step, metrics):
    """Resumable state (with the metrics so far), the head, and the trunk as a GPT checkpoint (under --train lora
    a merged copy, so the files hold GPT keys only); "finished": false until mark_finished, after the final
    evaluation."""
    save_train_state(args.out, rm, optimizer, step, extra={"metrics": metrics}, args=args)
    atomic_save_safetensors(head_state(rm), os.path.join(args.out, HEAD_FILE))
    trunk_out = merge_lora(copy.deepcopy(rm.trunk)) if args.mode == "lora" else rm.trunk
    save_checkpoint(args.out, trunk_out, enc, {"stage": "reward", "args": vars(args), "step": step,
                                               "init": args.init, "metrics": metrics, "finished": False})


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    t0 = time.time()
    ctx = setup(args)
    os.makedirs(args.out, exist_ok=True)
    trunk, enc, _ = load_checkpoint(args.init, hint="python sft.py")   # the SFT trunk + a new LayerNorm and head
    rm = set_trainable(RewardModel(trunk), args.mode, args.lora_r, args.lora_alpha).to(ctx.device)
    n_train = sum(p.numel() for p in rm.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in rm.parameters())
    d = load_data(args, enc, trunk.config.block_size)
    total = args.max_iters or args.epochs * max(1, len(d.P) // args.batch_size)
    check_shares(len(d.P), args.batch_size, ctx)
    if ctx.master:
        print(f"pairs: {len(d.P)} train, {len(d.val[0]) if d.val else 0} val, {len(d.groups)} val groups | trunk "
              f"{args.init} | --train {' '.join(args.train)}: {n_train:,} of {n_all:,} parameters train | {total} steps")
    features = None   # the trunk is frozen under --train head: its features are computed once
    if args.mode == "head":
        features, n_distinct = frozen_features(rm, enc, d.P, d.W, d.L, args.eval_batch, ctx)
        if ctx.master:
            print(f"trunk frozen: features of the {n_distinct} distinct rows computed once")

    optimizer = make_optimizer(rm, args.lr, args.weight_decay, ctx=ctx)
    start, saved = load_train_state(args.out, rm, optimizer) if args.resume else (0, {})
    train_rm = wrap_model(rm, ctx) if features is None else rm
    init_metrics = evaluate(rm, enc, d.val, [], args.eval_batch, ctx) if start == 0 else {}
    if init_metrics and ctx.master:
        print(f"before training: val pairwise accuracy {init_metrics['pairwise_accuracy']:.3f}")
    stop = StopFlag()
    log = MetricsLog(args.out, total, ctx.master, resume=args.resume)
    train_mode(rm, features)
    stats, t_last = (0.0, 0.0, 0.0), time.time()   # the last step's loss, accuracy and margin over its whole batch
    for step in range(start, total):
        lr = lr_at(step, args.lr, args.warmup, total, args.lr * args.min_lr_ratio)
        set_lr(optimizer, lr)
        idx = data.step_indices(len(d.P), args.batch_size, args.seed, step)
        rows, r_w, r_l = step_scores(rm, train_rm, features, d, idx, enc, ctx)
        margin = None if d.margins is None else d.margins[rows]
        loss = bradley_terry_loss(r_w, r_l, margin, args.center_coef)
        loss.backward()
        check_finite(loss, step)
        stats = batch_stats(r_w, r_l, margin, args.center_coef, len(idx), ctx if features is None else None)
        grad_norm = optimizer_step(rm, optimizer, args.grad_clip)
        done = step + 1
        if done % args.log_interval == 0 or done == total:
            dt, t_last = time.time() - t_last, time.time()
            log.log(done, loss=stats[0], acc=stats[1], margin=stats[2], grad_norm=grad_norm.item(), lr=lr,
                    pairs_per_s=round(len(idx) * args.log_interval / max(dt, 1e-9), 1))
        if d.val and done % args.eval_interval == 0 and done < total:
            m = evaluate(rm, enc, d.val, [], args.eval_batch, ctx)
            log.log(done, val_loss=m["val_loss"], val_accuracy=m["pairwise_accuracy"])
            train_mode(rm, features)
        if stop.requested_anywhere(ctx) or done == args.stop_at:
            if ctx.master:
                save(args, rm, optimizer, enc, done, {})
                print(f"stopped at step {done}; continue with: python reward.py --resume --out {args.out} "
                      f"(and the same options)")
            return {"train_loss": stats[0], "step": done}

    # the trained model first, then the final evaluation: an error there never costs the model (a --resume at
    # the last step, after such an error, runs the evaluation alone)
    metrics = {"train_loss": stats[0], "init_pairwise_accuracy": init_metrics.get("pairwise_accuracy"),
               "train_pairs": len(d.P), "trainable_params": n_train, "train_mode": " ".join(args.train)} \
        if start < total else dict(saved.get("metrics", {}))
    if ctx.master:
        save(args, rm, optimizer, enc, total, metrics)
    with final_evaluation(args.out, "python reward.py"):
        metrics.update(evaluate(rm, enc, d.val, d.groups, args.eval_batch, ctx))
    metrics["time_s"] = round(time.time() - t0, 2)
    if ctx.master:
        mark_finished(args.out, metrics)
        print("final: " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    run_cli(main)
