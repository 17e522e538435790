"""Stage 4a, preference data: sample several completions per prompt from a policy, rank them with a
judge, and write (prompt, chosen, rejected) pairs for the reward model and DPO.

    python preferences.py                               # out/sft, the world's review prompts, sentiment judge
    python preferences.py --judge rougeL                # the world's fact questions, judged against their answers
    python preferences.py --prompts my.jsonl --judge bleu   # your prompts (+ reference outputs for bleu)
    python preferences.py --labels pairs.jsonl          # preferences made elsewhere (people, a larger LLM)
    python preferences.py --pairs best-worst --n 8 --temperature 1.2
    torchrun --nproc_per_node=4 -- preferences.py --n 8 # sampling split across 4 processes, the same files

For each prompt the policy samples --n completions (temperature, top-k, top-p; batched with a KV
cache). The rows (prompt x sample) go in batches of --batch-size, batch k with its own generator seeded
from (--seed, split, k); under torchrun batch k is sampled by process k mod N and the completions are
gathered in order, so any number of processes writes the very same files as one. ("--" ends torchrun's own
options, which would otherwise take --n for an abbreviation of its --nnodes/--nproc_per_node.)
A judge scores each one: `sentiment` (the lexicon score of world.sentiment_score, the default
world's alignment objective) needs no reference; `exact`, `jaccard`, `bleu`, `rougeL` compare with the
prompt's reference output. Exact duplicates, completions cut off at --max-new-tokens (no EOS) and pairs
with equal scores are dropped and counted. `--pairs all` keeps every pair of distinct scores,
`--pairs best-worst` the best against the worst of each prompt.

Written to OUT: train.jsonl and val.jsonl, one pair a line
    {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
(completions as they follow the prompt: leading space, no EOS); val_groups.jsonl, every kept scored
completion of each validation prompt {"prompt", "completions", "scores"} (reward.py ranks them for
Kendall's tau); meta.json with the counts and time_s. Train and validation never share a prompt.
"""

import itertools
import json
import os
import random
import time

import torch

import data
import world
from common import (ArgumentParser, UserError, atomic_write, atomic_write_json, check_input_files,
                    check_out_is_not_an_input, fraction0, nonneg_int, positive_float, positive_int, positive_prob,
                    run_cli)
from evals import bleu, exact_match, jaccard, rouge_l, strip_eos
from gpt import generate, load_checkpoint
from tokenizer import eos_id, pad_id
from training import add_threads_arg, check_policy, chunk_seed, gather_chunks, my_chunks, setup

JUDGES = {"sentiment": None, "exact": exact_match, "jaccard": jaccard, "bleu": bleu, "rougeL": rouge_l}


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--init", default="out/sft", help="policy that samples the completions")
    p.add_argument("--judge", choices=list(JUDGES), default="sentiment",
                   help="sentiment: lexicon score; exact/jaccard/bleu/rougeL: similarity to the reference output")
    p.add_argument("--task", choices=("auto", "review", "facts"), default="auto",
                   help="default-world prompts: review (sentiment judge) or facts (reference judges); auto picks")
    p.add_argument("--prompts", default=None, help="your prompts (.jsonl/.json: prompt, Alpaca or messages; "
                   "reference judges need Alpaca 'output' or 'completion'); split by prompt with --val-fraction")
    p.add_argument("--labels", default=None, help="preference pairs made elsewhere (prompt/chosen/rejected JSONL, "
                   "Anthropic HH); split by prompt with --val-fraction and written the same way; no sampling")
    p.add_argument("--val-fraction", type=fraction0, default=0.15, help="share of prompts held out (--prompts/--labels)")
    p.add_argument("--world-seed", type=int, default=1337, help="seed of the default world")
    p.add_argument("--limit", type=nonneg_int, default=0, help="use only the first N train prompts (0 = all)")
    p.add_argument("--n", type=positive_int, default=4, help="completions sampled per prompt")
    p.add_argument("--pairs", choices=("all", "best-worst"), default="all")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--top-k", type=nonneg_int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=positive_prob, default=1.0, help="nucleus sampling mass (1.0 = all)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--keep-truncated", action="store_true",
                   help="keep completions that hit --max-new-tokens without EOS (dropped by default)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="sequences sampled together")
    p.add_argument("--out", default="out/preferences", help="output directory")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | mps")
    p.add_argument("--seed", type=int, default=1337)
    add_threads_arg(p)
    p.set_defaults(compile=False)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.n < 2 and not args.labels:
        raise UserError(f"--n must be at least 2 to make pairs, not {args.n}")
    if args.task == "auto":
        args.task = "review" if args.judge == "sentiment" else "facts"
    check_input_files("--prompts", args.prompts)
    check_input_files("--labels", args.labels)
    if not args.labels:  # the policy that samples: a language model, not a reward model, and not --out
        check_policy(args.init, hint="python sft.py")
        check_out_is_not_an_input(args.out, {"--init": args.init})
    return args


# ----------------------------------------------------------------------------- prompts

def split_by_prompt(items, key, val_fraction, seed):
    """-> (train, val): the distinct prompts are shuffled with `seed` and the last val_fraction of them
    (at least one when val_fraction > 0) go to validation, with every item that has such a prompt."""
    prompts = sorted({key(x) for x in items})
    random.Random(seed).shuffle(prompts)
    n_val = max(1, round(len(prompts) * val_fraction)) if val_fraction > 0 and len(prompts) > 1 else 0
    val = set(prompts[len(prompts) - n_val:])
    return [x for x in items if key(x) not in val], [x for x in items if key(x) in val]


def load_prompt_sets(args):
    """-> (train, val): lists of (prompt string, reference completion or None), distinct prompts."""
    if args.prompts:
        if args.judge == "sentiment":
            items = [(p, None) for p in data.load_prompts(args.prompts)]
        else:
            items = data.load_sft_examples(args.prompts)
        first = {}
        for p, ref in items:  # distinct prompts, the first reference wins
            first.setdefault(p, ref)
        items = list(first.items())
        train, val = split_by_prompt(items, lambda x: x[0], args.val_fraction, args.seed)
    else:
        tasks = world.task_sets(world.make_world(args.world_seed))[args.task]
        ref = (lambda e: None) if args.judge == "sentiment" else (lambda e: data.format_completion(e["output"]))
        train, val = ({data.format_prompt(e["instruction"], e["input"]): ref(e) for e in tasks[s]} for s in ("train", "val"))
        train, val = list(train.items()), list(val.items())
    if args.limit:
        train = train[:args.limit]
    if not train:
        raise UserError(f"{args.prompts or 'the world'}: no prompts to sample from")
    return train, val


# ----------------------------------------------------------------------------- judging and pairs

def make_judge(name):
    """-> judge(completion text, reference or None) -> float; the text is scored without its leading space."""
    if name == "sentiment":
        return lambda text, ref: world.sentiment_score(text.strip())
    fn = JUDGES[name]
    return lambda text, ref: fn(text.strip(), ref.strip())


def make_pairs(prompt, completions, scores, policy="all"):
    """Pairs of one prompt's scored completions -> ([pair dicts], ties dropped). Completions must be distinct.
    all: every pair (i, j) whose scores differ, the higher-scored one chosen; best-worst: the highest
    against the lowest. Equal scores say nothing about preference, so such pairs are dropped (counted)."""
    if policy == "best-worst":
        if len(completions) < 2:
            return [], 0
        hi, lo = max(range(len(scores)), key=scores.__getitem__), min(range(len(scores)), key=scores.__getitem__)
        candidates = [(hi, lo)]
    else:
        candidates = list(itertools.combinations(range(len(completions)), 2))
    pairs, ties = [], 0
    for i, j in candidates:
        if scores[i] == scores[j]:
            ties += 1
            continue
        w, l = (i, j) if scores[i] > scores[j] else (j, i)
        pairs.append({"prompt": prompt, "chosen": completions[w], "rejected": completions[l],
                      "score_chosen": scores[w], "score_rejected": scores[l]})
    return pairs, ties


def sample_rows(model, enc, rows, args, split, ctx):
    """Completion token ids of every row (prompt, reference): batch k of --batch-size rows sampled by process
    k mod N with generator chunk_seed(seed, k, split), then gathered back in row order."""
    mine = {}
    for k, lo, hi in my_chunks(len(rows), args.batch_size, ctx):
        gen = torch.Generator(device=ctx.device).manual_seed(chunk_seed(args.seed, k, split))
        mine[k] = generate(model, [enc.encode_ordinary(p) for p, _ in rows[lo:hi]], args.max_new_tokens,
                           eos_id=eos_id(enc), pad_id=pad_id(enc), temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, generator=gen)
        if ctx.master:
            print(f"  sampled {hi}/{len(rows)}", end="\r", flush=True)
    return gather_chunks(mine, ctx)


def sample_and_score(model, enc, items, judge, args, split, ctx, counts):
    """Sample args.n completions per prompt, drop duplicates and truncated ones, score the rest.
    -> [(prompt, [completion texts], [scores])]; counts gets sampled/eos/duplicates/truncated/empty."""
    rows = [(p, ref) for p, ref in items for _ in range(args.n)]
    outs = sample_rows(model, enc, rows, args, split, ctx)
    groups = []
    for k, (prompt, ref) in enumerate(items):
        texts, seen = [], set()
        for ids in outs[k * args.n:(k + 1) * args.n]:
            counts["sampled"] += 1
            ended = bool(ids) and ids[-1] == eos_id(enc)
            counts["eos"] += ended
            text = enc.decode(strip_eos(ids, enc))
            if not ended and not args.keep_truncated:
                counts["truncated"] += 1
            elif not text.strip():
                counts["empty"] += 1
            elif text in seen:
                counts["duplicates"] += 1
            else:
                seen.add(text)
                texts.append(text)
        groups.append((prompt, texts, [judge(t, ref) for t in texts]))
    return groups


def label_pairs(args):
    """Pairs from --labels, split by prompt; pairs without scores get 1 (chosen) and 0 (rejected)."""
    pairs = data.load_preference_pairs(args.labels)
    for p in pairs:
        p.setdefault("score_chosen", 1.0)
        p.setdefault("score_rejected", 0.0)
    return split_by_prompt(pairs, lambda x: x["prompt"], args.val_fraction, args.seed)


def write_jsonl(path, rows):
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    counts = {k: 0 for k in ("sampled", "eos", "truncated", "empty", "duplicates", "ties")}
    groups_path = os.path.join(args.out, "val_groups.jsonl")
    meta = {"args": vars(args)}
    ctx = setup(args)
    say = print if ctx.master else (lambda *a, **k: None)
    if args.labels:
        train, val = label_pairs(args)
        if ctx.master and os.path.exists(groups_path):  # no scored groups come with outside labels
            os.remove(groups_path)
    else:
        model, enc, config = load_checkpoint(args.init, ctx.device, hint="python sft.py")
        model.eval()
        meta["init"] = {"path": args.init, "stage": config.get("stage"), "tokenizer": config.get("tokenizer")}
        train_items, val_items = load_prompt_sets(args)
        judge = make_judge(args.judge)
        split_pairs = {}
        for k, (split, items) in enumerate((("train", train_items), ("val", val_items))):
            say(f"{split}: {len(items)} prompts x {args.n} samples from {args.init}, judge {args.judge}")
            groups = sample_and_score(model, enc, items, judge, args, k, ctx, counts)
            split_pairs[split] = []
            for prompt, texts, scores in groups:
                pairs, ties = make_pairs(prompt, texts, scores, args.pairs)
                split_pairs[split] += pairs
                counts["ties"] += ties
            if split == "val" and ctx.master:
                write_jsonl(groups_path, [{"prompt": p, "completions": t, "scores": s} for p, t, s in groups if len(t) > 1])
            all_scores = [s for _, _, ss in groups for s in ss]
            meta[f"{split}_mean_score"] = sum(all_scores) / max(1, len(all_scores))
        train, val = split_pairs["train"], split_pairs["val"]
        counts["eos_rate"] = counts["eos"] / max(1, counts["sampled"])
    if not train:
        raise UserError("no training pairs were made (every pair tied or was dropped); raise --n or "
                             "--temperature, or use another --judge")
    overlap = {p["prompt"] for p in train} & {p["prompt"] for p in val}
    assert not overlap, f"prompts in both splits: {sorted(overlap)[:3]}"
    if ctx.master:
        write_jsonl(os.path.join(args.out, "train.jsonl"), train)
        write_jsonl(os.path.join(args.out, "val.jsonl"), val)

    gap = lambda ps: sum(p["score_chosen"] - p["score_rejected"] for p in ps) / max(1, len(ps))
    meta.update({"train_pairs": len(train), "val_pairs": len(val), "counts": counts,
                 "train_mean_gap": gap(train), "val_mean_gap": gap(val),
                 "train_prompts": len({p["prompt"] for p in train}), "val_prompts": len({p["prompt"] for p in val}),
                 "time_s": round(time.time() - t0, 2)})
    if ctx.master:
        atomic_write_json(meta, os.path.join(args.out, "meta.json"))
    say(f"pairs: {len(train)} train ({meta['train_prompts']} prompts), {len(val)} val ({meta['val_prompts']} prompts) "
          f"| mean score gap {meta['train_mean_gap']:.3f} train, {meta['val_mean_gap']:.3f} val")
    if not args.labels:
        say(f"dropped: {counts['ties']} tied pairs, {counts['duplicates']} duplicate, {counts['truncated']} "
              f"truncated (no EOS), {counts['empty']} empty completions of {counts['sampled']} sampled "
              f"| EOS rate {counts['eos_rate']:.3f} | mean judge score {meta['train_mean_score']:.3f} train")
    say(f"wrote {args.out}/train.jsonl, val.jsonl" + ("" if args.labels else ", val_groups.jsonl") +
          f", meta.json in {meta['time_s']:.1f}s")
    return meta


if __name__ == "__main__":
    run_cli(main)
