"""Stage 4a, preference data: sample several completions per prompt from a policy, rank them with a
judge, and write (prompt, chosen, rejected) pairs for the reward model and DPO.

    python preferences.py                               # out/sft, the world's review prompts, sentiment judge
    python preferences.py --judge rougeL                # the world's fact questions, judged against their answers
    python preferences.py --prompts my.jsonl --judge bleu   # your prompts (+ reference outputs for bleu)
    python preferences.py --labels pairs.jsonl          # preferences made elsewhere (people, a larger LLM)
    python preferences.py --judge llm:out/judge         # a larger LLM as judge (judge.py), both orders
    python preferences.py --task review --judge bertscore   # review prompts, against a positive reference review
    python preferences.py --labels pairs.jsonl --judge llm:out/judge   # relabel pairs made elsewhere
    python preferences.py --task hh --out out/preferences_hh   # + the requests to refuse and their look-alikes
    python preferences.py --pairs best-worst --n 8 --temperature 1.2
    torchrun --nproc_per_node=4 -- preferences.py --n 8 # sampling split across 4 processes, the same files

For each prompt the policy samples --n completions (temperature, top-k, top-p; batched with a KV
cache). The rows (prompt x sample) go in batches of --batch-size, batch k with its own generator seeded
from (--seed, split, k); under torchrun batch k is sampled by process k mod N and the completions are
gathered in order, so any number of processes writes the very same files as one. ("--" ends torchrun's own
options, which would otherwise take --n for an abbreviation of its --nnodes/--nproc_per_node.)
A judge scores each one: `sentiment` (the lexicon score of world.sentiment_score, the default
world's alignment objective) needs no reference; `exact`, `jaccard`, `bleu`, `rouge1`, `rouge2`, `rougeL` and
`bertscore` (evals.bertscore: F1 of greedy cosine matching of the hidden states of --judge-layer of the
--judge-model checkpoint, idf weights from the train references with --idf) compare with the prompt's
reference output: the fact's answer, or for `--task review` a very positive review of the asked item that the
world writes. `llm:DIR` is a pairwise judge (judge.py, or a Hugging Face GPT-2 directory with --judge-template):
each pair of a prompt's completions is judged in both orders (evals.judge_pairs), and a completion's score is
its mean probability of winning, sigmoid(v), against the prompt's other completions. Exact duplicates,
completions cut off at --max-new-tokens (no EOS) and pairs with equal scores are dropped and counted.
`--pairs all` keeps every pair of distinct scores, `--pairs best-worst` the best against the worst of each prompt.
`--task harmless` samples the world's requests for a door code or an insult and their benign look-alikes
(world.harmless_sets, split by person) and scores them with the harmlessness judge (evals.harmless_score: a
refusal is preferred on a harmful request, a correct answer to a refusal on a benign one); the world's own refusal
and answer join the samples, so every prompt has a pair. `--task hh` adds the review prompts, judged by the
lexicon: the combined helpful-and-harmless preference set, for reward.py and dpo.py.

Written to OUT: train.jsonl and val.jsonl, one pair a line
    {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
(completions as they follow the prompt: leading space, no EOS); val_groups.jsonl, every kept scored
completion of each validation prompt {"prompt", "completions", "scores"} (reward.py ranks them for
Kendall's tau); meta.json with the counts and time_s. Train and validation never share a prompt.
On the default world's review prompts, meta.json also has the labels' agreement with the gold lexicon judge
(gold_agreement: the share of the pairs it does not tie whose chosen answer it scores higher; gold_ties: the
share it ties),
and val_gold.jsonl holds the validation groups' pairs as the gold judge labels them (for reward.py --val-data).
With --labels and an explicit --judge, the given pairs are relabelled by that judge (a reference-based judge
needs a 'reference' field in each record); pairs it ties are dropped.
"""

import argparse
import functools
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
from evals import (asked_item, bertscore, bleu, check_judge_template, exact_match, harmless_score, idf_weights,
                   jaccard, judge_instruction, judge_pairs, layer_embeddings, rouge_l, rouge_n, strip_eos,
                   verdict_token_ids)
from gpt import check_same_tokenizer, generate, load_checkpoint
from tokenizer import eos_id, pad_id
from training import add_threads_arg, check_policy, chunk_seed, gather_chunks, my_chunks, setup

JUDGES = {"sentiment": None, "exact": exact_match, "jaccard": jaccard, "bleu": bleu, "rougeL": rouge_l,
          "rouge1": lambda c, r: rouge_n(c, r, 1), "rouge2": lambda c, r: rouge_n(c, r, 2), "bertscore": None}


def judge_spec(text):
    """--judge: a name of JUDGES or llm:DIR."""
    if text in JUDGES or (text.startswith("llm:") and len(text) > 4):
        return text
    raise argparse.ArgumentTypeError(f"unknown judge {text!r}; choose one of {', '.join(JUDGES)} or llm:DIR")


judge_spec.bad_values = ["nope", "llm:"]


HARMLESS_TASKS = ("harmless", "hh")


def needs_reference(judge):
    return judge not in ("sentiment", None) and not judge.startswith("llm:")


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--init", default="out/sft", help="policy that samples the completions")
    p.add_argument("--judge", type=judge_spec, default=None,
                   help="sentiment (the default): lexicon score; exact/jaccard/bleu/rouge1/rouge2/rougeL/bertscore: "
                   "similarity to the reference output; llm:DIR: a judge made by judge.py (or a Hugging Face GPT-2 "
                   "directory with --judge-template) picks the better of each pair, in both orders")
    p.add_argument("--judge-template", default=None, help="prompt of an llm: judge that is not made by judge.py, "
                   "with {instruction}, {a} and {b}, ending where the verdict ' A' or ' B' follows")
    p.add_argument("--judge-model", default=None, help="checkpoint whose hidden states bertscore compares "
                   "(default: --init)")
    p.add_argument("--judge-layer", type=nonneg_int, default=None, help="bertscore's hidden layer, 0 = the "
                   "embeddings (default: the middle block, n_layer // 2)")
    p.add_argument("--idf", action="store_true", help="bertscore: weight tokens by idf over the train references")
    p.add_argument("--task", choices=("auto", "review", "facts", "harmless", "hh"), default="auto",
                   help="default-world prompts: review (sentiment judge) or facts (reference judges); auto picks; "
                   "harmless: the requests to refuse and their look-alikes (harmlessness judge); hh: review and "
                   "harmless prompts together, the combined helpful-and-harmless preference set")
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
    args.relabel = bool(args.labels and args.judge)
    args.judge = args.judge or "sentiment"
    if args.task == "auto":
        args.task = "facts" if needs_reference(args.judge) else "review"
    if args.task in HARMLESS_TASKS and (args.judge != "sentiment" or args.prompts or args.labels):
        raise UserError(f"--task {args.task} takes the world's prompts and its own judges (the harmlessness judge, "
                        f"and the lexicon for reviews); leave out --judge, --prompts and --labels")
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
        if not needs_reference(args.judge):
            items = [(p, None) for p in data.load_prompts(args.prompts)]
        else:
            items = data.load_sft_examples(args.prompts)
        first = {}
        for p, ref in items:  # distinct prompts, the first reference wins
            first.setdefault(p, ref)
        items = list(first.items())
        train, val = split_by_prompt(items, lambda x: x[0], args.val_fraction, args.seed)
    elif args.task in HARMLESS_TASKS:
        train, val = harmless_prompt_sets(args)
    else:
        w = world.make_world(args.world_seed)
        tasks = world.task_sets(w)[args.task]
        if not needs_reference(args.judge):
            ref = lambda e: None
        elif args.task == "review":
            ref = lambda e: review_reference(w, e["instruction"])
        else:
            ref = lambda e: data.format_completion(e["output"])
        train, val = ({data.format_prompt(e["instruction"], e["input"]): ref(e) for e in tasks[s]} for s in ("train", "val"))
        train, val = list(train.items()), list(val.items())
    if args.limit:
        train = train[:args.limit]
    if not train:
        raise UserError(f"{args.prompts or 'the world'}: no prompts to sample from")
    return train, val


def harmless_prompt_sets(args):
    """-> (train, val) for --task harmless / hh: each harmless_sets prompt with its example as the 'reference' (the
    harmlessness judge reads its kind, secret and answer), and for hh the review prompts too (reference None)."""
    w = world.make_world(args.world_seed)
    sets, reviews = world.harmless_sets(w), world.task_sets(w)["review"]
    out = []
    for split in ("train", "val"):
        items = {data.format_prompt(e["instruction"], e["input"]): {**e, "off_task": off_task_answer(e, w.items)}
                 for e in sets[split]}
        if args.task == "hh":
            items.update({data.format_prompt(e["instruction"], e["input"]): None for e in reviews[split]})
        out.append(list(items.items()))
    return out


def off_task_answer(example, items):
    """A glowing review (level +2) of the item a negative-review request names, or of another item for the other
    requests: the answer a policy writes when it games a reward model that has only seen reviews get praised. The
    harmlessness judge scores it 0 (it neither refuses nor answers), so it sits between the refusal and the harmful
    answer, and below the right answer, and the reward model learns that praise is not an answer to a request."""
    rng = random.Random(f"off-task/{example['instruction']}/{example['input']}")
    while True:
        text = world.review_text(rng, example.get("item") or rng.choice(items), 2)
        if harmless_score(example, text) == 0:   # a review that happens to name the asked town is drawn again
            return text


def world_answers(example):
    """The world's answers to a harmless prompt, which join the policy's samples so that every prompt has a pair
    whatever the policy does: the refusal and the harmful answer (a harmful request), or the right answer and the
    refusal a model over-refusing would give (a look-alike: the door-code refusal for a public fact, the insult
    refusal for a negative review); then the example's off-task answer (off_task_answer), when it has one.
    Written as completions are: a leading space, no EOS."""
    if example["kind"] in world.HARMFUL:
        texts = (world.REFUSALS[example["kind"]], example["unsafe"])
    else:
        texts = (example["output"], world.REFUSALS["secret" if example["kind"] == "public" else "insult"])
    return [data.format_completion(t) for t in texts + ((example["off_task"],) if "off_task" in example else ())]


def review_reference(w, instruction):
    """The reference answer of a review prompt for the reference-based judges: a very positive review (level +2)
    of the item it asks about, written by the world with a generator seeded by (world seed, prompt)."""
    rng = random.Random(f"{w.seed}/reference/{instruction}")
    return data.format_completion(world.review_text(rng, asked_item(instruction, w.items) or rng.choice(w.items), 2))


# ----------------------------------------------------------------------------- judging and pairs
# A judge scores the distinct completions of one prompt together: score(prompt, texts, reference) -> [floats].
# The texts are scored without their leading space.

def pointwise_scores(fn, prompt, texts, ref):
    return [fn(t.strip(), ref.strip()) for t in texts]


def sentiment_scores(prompt, texts, ref):
    return [world.sentiment_score(t.strip()) for t in texts]


def hh_scores(prompt, texts, ref):
    """--task harmless / hh: the harmlessness judge (evals.harmless_score) on a harmless prompt (its reference is the
    world's example), the lexicon on a review prompt (reference None)."""
    if ref is None:
        return sentiment_scores(prompt, texts, ref)
    return [harmless_score(ref, t.strip()) for t in texts]


def bertscore_scores(encoder, idf, prompt, texts, ref):
    """F1 of evals.bertscore of each text against the reference, on the encoder's (model, enc, layer) states."""
    model, enc, layer = encoder
    ref_ids, ref_emb = layer_embeddings(model, enc, ref.strip(), layer)
    out = []
    for t in texts:
        ids, emb = layer_embeddings(model, enc, t.strip(), layer)
        weights = ([idf(i) for i in ids], [idf(i) for i in ref_ids]) if idf else (None, None)
        out.append(bertscore(emb, ref_emb, *weights)[2])
    return out


def llm_scores(judge, counts, prompt, texts, ref):
    """Every pair (i, j) of the texts judged in both orders (evals.judge_pairs, verdict v_ij); the score of text
    i is its mean win probability against the others, mean_j sigmoid(v_ij), with sigmoid(v_ji) = 1 - sigmoid(v_ij).
    counts gets the pairs judged and those whose verdict survived the swap (position consistency)."""
    model, enc, template, verdict_ids = judge
    pairs = list(itertools.combinations(range(len(texts)), 2))
    if not pairs:
        return [0.5] * len(texts)
    instruction = judge_instruction(prompt)
    v, consistent = judge_pairs(model, enc, template, [(instruction, texts[i], texts[j]) for i, j in pairs], verdict_ids)
    wins = [[] for _ in texts]
    for (i, j), p in zip(pairs, torch.sigmoid(v).tolist()):
        wins[i].append(p)
        wins[j].append(1 - p)
    counts["judged_pairs"] += len(pairs)
    counts["position_consistent"] += int(consistent.sum())
    return [sum(w) / len(w) for w in wins]


def load_llm_judge(path, template, policy_enc, device):
    """(model, enc, template, verdict ids) of --judge llm:PATH: a judge made by judge.py (its template, and the
    policy's tokenizer, since it read the same world), or any checkpoint or Hugging Face GPT-2 with --judge-template."""
    model, enc, config = load_checkpoint(path, device, hint="python judge.py")
    model.eval()
    if config.get("stage") == "judge":
        if policy_enc is not None:
            check_same_tokenizer(enc, policy_enc, f"the judge {path}", "the policy")
        template = template or config["judge"]["template"]
    elif template is None:
        raise UserError(f"{path} is not a judge made by judge.py; train one with `python judge.py`, or give the "
                        f"prompt of this model with --judge-template")
    check_judge_template(template, "--judge-template" if template != config.get("judge", {}).get("template") else path)
    return model, enc, template, verdict_token_ids(enc, path)


def make_judge(args, policy_enc, device, refs, counts):
    """-> score(prompt, texts, reference or None) -> [floats] for --judge; refs: the train references (for
    bertscore's idf)."""
    if args.task in HARMLESS_TASKS:
        return hh_scores
    if args.judge == "sentiment":
        return sentiment_scores
    if args.judge.startswith("llm:"):
        judge = load_llm_judge(args.judge[4:], args.judge_template, policy_enc, device)
        return functools.partial(llm_scores, judge, counts)
    if args.judge == "bertscore":
        model, enc, _ = load_checkpoint(args.judge_model or args.init, device, hint="python pretrain.py")
        layer = model.config.n_layer // 2 if args.judge_layer is None else args.judge_layer
        if layer > model.config.n_layer:
            raise UserError(f"--judge-layer {layer}: {args.judge_model or args.init} has blocks 1..{model.config.n_layer}"
                            f" (0 = the embeddings)")
        idf = idf_weights([enc.encode_ordinary(r.strip()) for r in refs]) if args.idf else None
        return functools.partial(bertscore_scores, (model.eval(), enc, layer), idf)
    return functools.partial(pointwise_scores, JUDGES[args.judge])


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
        if isinstance(ref, dict):   # a harmless prompt: the world's refusal and answer join the samples
            extra = [t for t in world_answers(ref) if t not in seen]
            counts["world_answers"] += len(extra)
            texts += extra
        groups.append((prompt, texts, judge(prompt, texts, ref) if texts else []))
    return groups


def pair_references(args, pairs):
    """The 'reference' of each --labels record, for a reference-based judge; one line when one is missing."""
    records = dict(data.records_with_lines(args.labels))
    refs = []
    for p in pairs:
        ref = records[p["where"]].get("reference")
        if not isinstance(ref, str) or not ref.strip():
            raise UserError(f"{p['where']}: no 'reference' answer, which --judge {args.judge} compares each answer "
                            f"with; add a 'reference' field to every record, or use a judge without one "
                            f"(sentiment, llm:DIR)")
        refs.append(ref)
    return refs


def label_pairs(args, enc, device, counts):
    """Pairs from --labels, split by prompt; pairs without scores get 1 (chosen) and 0 (rejected). With an
    explicit --judge each pair is relabelled: the answer the judge scores higher is chosen, ties are dropped."""
    pairs = data.load_preference_pairs(args.labels, with_where=True)
    if args.relabel:
        refs = pair_references(args, pairs) if needs_reference(args.judge) else [None] * len(pairs)
        judge = make_judge(args, enc, device, [r for r in refs if r], counts)
        kept = []
        for p, ref in zip(pairs, refs):
            sc, sr = judge(p["prompt"], [p["chosen"], p["rejected"]], ref)
            counts["ties"] += sc == sr
            if sc != sr:
                w, l = ("chosen", "rejected") if sc > sr else ("rejected", "chosen")
                kept.append({**p, "chosen": p[w], "rejected": p[l], "score_chosen": max(sc, sr),
                             "score_rejected": min(sc, sr)})
        pairs = kept
    for p in pairs:
        p.pop("where")
        p.setdefault("score_chosen", 1.0)
        p.setdefault("score_rejected", 0.0)
    return split_by_prompt(pairs, lambda x: x["prompt"], args.val_fraction, args.seed)


def gold_agreement(pairs):
    """-> (agreement, ties): the share of the pairs the gold lexicon judge does not tie whose chosen answer it
    scores higher, and the share of pairs it ties (on which a label can be neither right nor wrong)."""
    gold = [(world.sentiment_score(p["chosen"]), world.sentiment_score(p["rejected"])) for p in pairs]
    decided = [c > r for c, r in gold if c != r]
    return sum(decided) / max(1, len(decided)), 1 - len(decided) / max(1, len(gold))


def write_gold_check(args, val_groups, split_pairs, meta):
    """On the default world's review prompts: meta gets the labels' agreement with the gold judge on the train and
    validation pairs (1 for the lexicon judge itself), and OUT/val_gold.jsonl the validation groups' pairs as the
    gold judge labels them, the held-out set on which a reward model trained on any judge's labels is measured."""
    gold_path = os.path.join(args.out, "val_gold.jsonl")
    if args.task != "review" or args.prompts:
        if os.path.exists(gold_path):
            os.remove(gold_path)
        return
    agreement = {split: gold_agreement(pairs) for split, pairs in split_pairs.items()}
    meta["gold_agreement"] = {split: a for split, (a, _) in agreement.items()}
    meta["gold_ties"] = {split: t for split, (_, t) in agreement.items()}
    gold_pairs = [pair for p, t, _ in val_groups
                  for pair in make_pairs(p, t, sentiment_scores(p, t, None), args.pairs)[0]]
    write_jsonl(gold_path, gold_pairs)


def judge_summary(meta):
    parts = []
    if "gold_agreement" in meta:
        parts.append(f"agreement with gold {meta['gold_agreement']['train']:.3f} train, "
                     f"{meta['gold_agreement']['val']:.3f} val")
    if "position_consistency" in meta:
        parts.append(f"position consistency {meta['position_consistency']:.3f}")
    return " | ".join(parts)


def write_jsonl(path, rows):
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    counts = {k: 0 for k in ("sampled", "eos", "truncated", "empty", "duplicates", "ties", "judged_pairs",
                             "position_consistent", "world_answers")}
    groups_path = os.path.join(args.out, "val_groups.jsonl")
    meta = {"args": vars(args)}
    ctx = setup(args)
    say = print if ctx.master else (lambda *a, **k: None)
    if args.labels:
        train, val = label_pairs(args, None, ctx.device, counts)
        if ctx.master and os.path.exists(groups_path):  # no scored groups come with outside labels
            os.remove(groups_path)
    else:
        model, enc, config = load_checkpoint(args.init, ctx.device, hint="python sft.py")
        model.eval()
        meta["init"] = {"path": args.init, "stage": config.get("stage"), "tokenizer": config.get("tokenizer")}
        train_items, val_items = load_prompt_sets(args)
        judge = make_judge(args, enc, ctx.device, [r for _, r in train_items if r], counts)
        split_pairs = {}
        for k, (split, items) in enumerate((("train", train_items), ("val", val_items))):
            judged = "harmlessness (and lexicon for reviews)" if args.task in HARMLESS_TASKS else args.judge
            say(f"{split}: {len(items)} prompts x {args.n} samples from {args.init}, judge {judged}")
            groups = sample_and_score(model, enc, items, judge, args, k, ctx, counts)
            split_pairs[split] = []
            for prompt, texts, scores in groups:
                pairs, ties = make_pairs(prompt, texts, scores, args.pairs)
                split_pairs[split] += pairs
                counts["ties"] += ties
            if split == "val" and ctx.master:
                write_jsonl(groups_path, [{"prompt": p, "completions": t, "scores": s} for p, t, s in groups if len(t) > 1])
                write_gold_check(args, groups, split_pairs, meta)
            all_scores = [s for _, _, ss in groups for s in ss]
            meta[f"{split}_mean_score"] = sum(all_scores) / max(1, len(all_scores))
        train, val = split_pairs["train"], split_pairs["val"]
        counts["eos_rate"] = counts["eos"] / max(1, counts["sampled"])
    if counts["judged_pairs"]:
        meta["position_consistency"] = counts["position_consistent"] / counts["judged_pairs"]
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
    if judge_summary(meta):
        say(f"judge {args.judge}: {judge_summary(meta)}")
    say(f"wrote {args.out}/train.jsonl, val.jsonl" + ("" if args.labels else ", val_groups.jsonl") +
          f", meta.json in {meta['time_s']:.1f}s")
    return meta


if __name__ == "__main__":
    run_cli(main)
