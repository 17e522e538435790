"""Stage 4a', a larger LLM as judge: fine-tune a GPT of this project to say which of two answers is better, on
comparisons labelled by the gold judge, then label preference pairs with it (RLAIF at a scale where the truth
is known).

    python judge.py                                   # out/pretrain grown to 6 layers -> out/judge
    python judge.py --init out/pretrain_6x384 --grow-layers 0   # a judge pre-trained at its own size
    python preferences.py --judge llm:out/judge       # label sampled completions with it
    python preferences.py --judge llm:path/to/gpt2 --judge-template "Q: {instruction}\\nA: {a}\\nB: {b}\\nBetter:"

The judge is larger than the policy: by default the pre-trained model (4 layers, 256 wide) with --grow-layers 2
more blocks appended. A new block starts as the identity (its two output projections are zero, so the residual
stream passes through unchanged): the grown model computes exactly what the pre-trained one did, and fine-tuning
gives the new blocks their work. (`python pretrain.py --n-layer 6 --n-embd 384 --out out/pretrain_6x384` makes a
judge pre-trained at its own size instead, at about 3x the cost of the default pre-training.)

Its training comparisons are disjoint from every pair it later labels: the answers are reviews the world
writes (world.review_text at random sentiment levels, sometimes of another item, a quarter cut short) and, for
--other-text of them, windows of pre-training text, never a policy's samples, for the prompts of the world's
review train split; the held-out comparisons use the validation split's prompts. (A judge trained on whole
reviews only agreed with gold on 94% of held-out reviews but on 53% of a pre-trained model's samples, which are
mostly not reviews: docs/judges.md.)
Each is labelled by the gold lexicon judge (world.sentiment_score), as JudgeLM and Prometheus are trained on
the labels of a stronger judge.

One step: a batch of comparisons, each shown in both orders (the answer in slot A, then in slot B), so that
the data has no position to prefer; the prompt (evals.JUDGE_TEMPLATE) ends before the verdict, and the loss is
the cross-entropy of the verdict token " A" or " B" over the whole vocabulary: -log P(verdict | prompt).
At the end: agreement with the gold judge on the held-out comparisons (both orders combined) and position
consistency, the share whose verdict survives the swap. Written: OUT/model.safetensors, config.json (with the
template and the metrics), tokenizer.json, metrics.jsonl.
"""

import random
import time

import torch

import world
from common import ArgumentParser, nonneg_int, positive_int, prob, run_cli
from evals import (JUDGE_TEMPLATE, VERDICT_TOKENS, asked_item, judge_pairs, judge_prompt, last_token_logits,
                   verdict_token_ids)
from gpt import GPT, GPTConfig, cross_entropy_loss, load_checkpoint, save_checkpoint
from tokenizer import pad_id
from training import (MetricsLog, add_optimizer_args, add_threads_arg, check_finite, lr_at, make_optimizer,
                      optimizer_step, set_lr, setup)


# ----------------------------------------------------------------------------- the loss

def verdict_loss(last_logits, verdict_ids):
    """L = -1/B sum_b log P(v_b | prompt_b): the next-token cross-entropy of the verdict token, over the whole
    vocabulary, at each prompt's last position."""
    return cross_entropy_loss(last_logits[:, None, :], verdict_ids[:, None])


# ----------------------------------------------------------------------------- data

def answer(rng, w, item, docs, other):
    """One answer to compare: a review the world writes at a random sentiment level, of the asked item (of another
    one in 1 of 5), cut after a random word in 1 of 4; or, with probability `other`, a window of 5-60 words of a
    pre-training document (stories, facts, sums, reviews), the kind of text a policy that is not yet a good
    reviewer writes."""
    if rng.random() < other:
        doc = rng.choice(docs).split(" ")
        start = rng.randrange(len(doc))
        return " ".join(doc[start:start + rng.randint(5, 60)])
    text = world.review_text(rng, item if rng.random() < 0.8 else rng.choice(w.items), rng.choice(world.LEVELS))
    if rng.random() < 0.25:
        text = " ".join(text.split(" ")[:rng.randint(2, len(text.split(" ")))])
    return text


def comparisons(w, split, n, seed, docs, other=0.0):
    """n comparisons (instruction, a, b, gold label: 0 if a is better, 1 if b) on the review prompts of `split`,
    two answers (`answer`) kept when the gold lexicon scores differ."""
    rng = random.Random(f"{seed}/judge/{split}")
    prompts = sorted({e["instruction"] for e in world.task_sets(w)["review"][split]})
    out = []
    while len(out) < n:
        instruction = rng.choice(prompts)
        item = asked_item(instruction, w.items)
        a, b = (answer(rng, w, item, docs, other) for _ in range(2))
        sa, sb = world.sentiment_score(a), world.sentiment_score(b)
        if sa != sb:
            out.append((instruction, " " + a, " " + b, 0 if sa > sb else 1))
    return out


def both_orders(batch, verdict_ids):
    """Each (instruction, a, b, label) as shown (a in slot A) and swapped -> [(instruction, A, B)], [verdict id]."""
    triples, targets = [], []
    for instruction, a, b, label in batch:
        triples += [(instruction, a, b), (instruction, b, a)]
        targets += [verdict_ids[label], verdict_ids[1 - label]]
    return triples, targets


# ----------------------------------------------------------------------------- model

def grow(model, n_new):
    """A copy of `model` with n_new blocks appended, each the identity at first: attn.c_proj and mlp.c_proj are
    zero, so x + attn(ln(x)) = x and x + mlp(ln(x)) = x, and the grown model's logits equal the original's."""
    if n_new == 0:
        return model
    config = GPTConfig(**{**vars(model.config), "n_layer": model.config.n_layer + n_new})
    grown = GPT(config).to(next(model.parameters()).device)
    grown.load_state_dict(model.state_dict(), strict=False)  # the new blocks keep their fresh weights
    with torch.no_grad():
        for block in grown.transformer.h[model.config.n_layer:]:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
    return grown


def evaluate(model, enc, held_out, verdict_ids, batch):
    """Agreement with the gold label (both orders combined, v > 0 means a) and position consistency."""
    model.eval()
    v, consistent = judge_pairs(model, enc, JUDGE_TEMPLATE, [t[:3] for t in held_out], verdict_ids, batch)
    gold_a = torch.tensor([t[3] == 0 for t in held_out])
    model.train()
    return {"agreement": ((v > 0) == gold_a).float().mean().item() if len(v) else 0.0,
            "ties": (v == 0).float().mean().item(), "position_consistency": consistent.float().mean().item()}


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--init", default="out/pretrain", help="pre-trained checkpoint the judge starts from")
    p.add_argument("--grow-layers", type=nonneg_int, default=2, help="blocks appended to --init, each the identity "
                   "at first (0 = the judge keeps --init's size)")
    p.add_argument("--world-seed", type=int, default=1337, help="seed of the default world")
    p.add_argument("--train-pairs", type=positive_int, default=4000, help="training comparisons (train prompts)")
    p.add_argument("--val-pairs", type=positive_int, default=300, help="held-out comparisons (validation prompts)")
    p.add_argument("--other-text", type=prob, default=0.3, help="share of answers that are windows of pre-training "
                   "text rather than reviews (0 = reviews only)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="comparisons per step (2x rows: both orders)")
    p.add_argument("--max-iters", type=positive_int, default=200, help="optimizer steps")
    add_optimizer_args(p, lr=3e-4, min_lr=3e-5, warmup=20, weight_decay=0.0)
    p.add_argument("--eval-batch", type=positive_int, default=32)
    p.add_argument("--out", default="out/judge", help="output checkpoint directory")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | mps")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--log-interval", type=positive_int, default=10, help="steps between log lines")
    add_threads_arg(p)
    p.set_defaults(compile=False)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    ctx = setup(args)
    base, enc, base_config = load_checkpoint(args.init, ctx.device, hint="python pretrain.py")
    model = grow(base, args.grow_layers)
    model.train()
    verdict_ids = verdict_token_ids(enc, args.init)
    w = world.make_world(args.world_seed)
    docs = world.pretrain_docs(w)
    train = comparisons(w, "train", args.train_pairs, args.seed, docs, args.other_text)
    held_out = comparisons(w, "val", args.val_pairs, args.seed, docs, args.other_text)
    n_params = model.num_params()
    print(f"judge: {model.config.n_layer} layers x {model.config.n_embd} wide, {n_params / 1e6:.2f}M parameters "
          f"(--init {args.init}: {base.config.n_layer} layers) | {len(train)} train, {len(held_out)} held-out "
          f"comparisons | example prompt:\n{judge_prompt(JUDGE_TEMPLATE, *train[0][:3])}")
    before = evaluate(model, enc, held_out, verdict_ids, args.eval_batch)
    print(f"before: agreement {before['agreement']:.3f} | position consistency {before['position_consistency']:.3f}")
    optimizer = make_optimizer(model, args.lr, args.weight_decay, ctx=ctx)
    log = MetricsLog(args.out, args.max_iters)
    rng = random.Random(args.seed)
    for step in range(args.max_iters):
        lr = lr_at(step, args.lr, args.warmup, args.max_iters, args.min_lr)
        set_lr(optimizer, lr)
        triples, targets = both_orders(rng.sample(train, args.batch_size), verdict_ids)
        rows = [enc.encode_ordinary(judge_prompt(JUDGE_TEMPLATE, *t)) for t in triples]
        with ctx.autocast():
            logits = last_token_logits(model, rows, pad_id(enc))
        loss = verdict_loss(logits, torch.tensor(targets, device=ctx.device))
        loss.backward()
        check_finite(loss, step)
        grad_norm = optimizer_step(model, optimizer, args.grad_clip)
        if (step + 1) % args.log_interval == 0 or step + 1 == args.max_iters:
            log.log(step + 1, loss=loss.item(), grad_norm=grad_norm.item(), lr=lr)
    metrics = {**evaluate(model, enc, held_out, verdict_ids, args.eval_batch), "before": before,
               "params": n_params, "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
               "time_s": round(time.time() - t0, 1)}
    save_checkpoint(args.out, model, enc, {"stage": "judge", "args": vars(args), "init": args.init,
                                           "init_stage": base_config.get("stage"), "metrics": metrics,
                                           "judge": {"template": JUDGE_TEMPLATE, "verdicts": list(VERDICT_TOKENS)}})
    print(f"final: held-out agreement with gold {metrics['agreement']:.3f} | position consistency "
          f"{metrics['position_consistency']:.3f} | {metrics['time_s']:.0f}s | wrote {args.out}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
