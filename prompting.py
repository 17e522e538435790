"""Post-training without parameter updates: zero-shot, few-shot and chain-of-thought prompts.

    python prompting.py                                  # the base model out/pretrain on the default world
    python prompting.py --init out/sft --n 50            # any checkpoint
    python prompting.py --task-file my_test.jsonl --examples-file my_train.jsonl --ks 0,2,4 --labels yes,no

The weights never change: only the prompt does. A prompt is built in the one template of the
project (data.format_prompt / format_completion), laid out like the question/answer pages the
base model read in pre-training, where one "Instruction:" line is followed by "Input:/Output:"
pairs separated by a newline:

    zero-shot          Instruction: I\\nInput: x\\nOutput:
    k-shot             Instruction: I\\nInput: x1\\nOutput: y1\\n ... Input: xk\\nOutput: yk\\nInput: x\\nOutput:
    chain of thought   the k-shot layout whose outputs show their worked steps ("... The answer is N.")

(The guide writes the test query as "Test query: x"; the pre-training pages, and hence the
model, only know "Input: x\\nOutput:", so the query keeps the examples' format.)
The answer is y* = argmax_y P(y | x, theta, Instruction, examples), found two ways: greedy
decoding (an approximation, for open answers), and, for a finite answer set, exact scoring of
every candidate. Every prompt starts after EOS, as every pre-training document did.

Reported, on --n test examples per task (shots always from the train split):
  accuracy for k in --ks (a fresh random draw of shots per test example, nested: k-shot uses the
  first k of the 8 drawn), chain of thought vs direct answers on additions with carries, the spread
  of accuracy over --orderings orderings of one fixed set of k examples, and example choice
  (random vs diverse vs simple-to-complex order). Written to OUT/results.json ("summary" = the table).
"""

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import statistics
import time

import torch

import data
import evals
import world
from common import ArgumentParser, UserError, atomic_write, nonneg_int, positive_int, run_cli
from gpt import completion_logprobs, generate, load_checkpoint
from tokenizer import eos_id, pad_id
from training import add_threads_arg, setup

TASKS = ("facts", "sentiment", "addition")


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--init", default="out/pretrain", help="checkpoint to prompt")
    p.add_argument("--out", default="out/prompting", help="where results.json goes")
    p.add_argument("--world-seed", type=int, default=1337, help="seed of the default world")
    p.add_argument("--tasks", default=",".join(TASKS), help="tasks of the default world to evaluate")
    p.add_argument("--n", type=positive_int, default=100, help="test examples per task")
    p.add_argument("--ks", default="0,1,2,4,8", help="numbers of examples in the prompt")
    p.add_argument("--cot-ks", default="0,1,2", help="k for chain of thought vs direct answers (additions with carries)")
    p.add_argument("--study-k", type=positive_int, default=4, help="k of the ordering and example-choice studies")
    p.add_argument("--orderings", type=positive_int, default=6, help="orderings of one fixed set of --study-k examples")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=0,
                   help="answer budget of greedy decoding (0 = longest example answer + 6 tokens)")
    p.add_argument("--no-doc-start", action="store_true", help="do not start prompts with EOS")
    p.add_argument("--batch", type=positive_int, default=50, help="prompts per forward pass")
    p.add_argument("--task-file", default=None, help="your own test examples (Alpaca/chat/prompt-completion JSONL)")
    p.add_argument("--examples-file", default=None, help="your own pool of shots for --task-file (never the test file)")
    p.add_argument("--labels", default=None, help="comma-separated finite answer set of --task-file: also "
                   "decode by exact argmax over these candidates")
    p.add_argument("--metric", default="exact", choices=("exact", "number"),
                   help="--task-file scoring: exact match, or the number in the answer")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | mps")
    p.add_argument("--seed", type=int, default=1337, help="seed of the shot draws")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    add_threads_arg(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def int_list(s, name):
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{name} must be comma-separated integers, e.g. 0,1,2,4,8; got {s!r}") from None


# ----------------------------------------------------------------------------- the prompts

def as_pair(e, output_key="output", instruction=None):
    """An Alpaca example -> (prompt, completion) in the one template."""
    return (data.format_prompt(instruction or e["instruction"], e["input"]),
            data.format_completion(e[output_key]))


def zero_shot_prompt(instruction, input=""):
    """P(y | x, theta, Instruction): "Instruction: I\\nInput: x\\nOutput:"."""
    return data.format_prompt(instruction, input)


def few_shot_prompt(shots, query):
    """P(y | x, theta, {(x1, y1) ... (xk, yk)}, Instruction): the k examples, then the test query.

    shots: [(prompt, completion)], query: a prompt, all in the one template. Blocks are joined by a
    newline, as on the pre-training Q/A pages. When every block starts with the same single-line
    "Instruction: ..." followed by an Input line, the instruction is written once (the guide's layout,
    also half of the pre-training pages); otherwise each block keeps its own (the other half)."""
    blocks = [p + c for p, c in shots] + [query]
    head = query.split("\n", 1)[0]
    if head.startswith("Instruction: ") and all(b.startswith(head + "\nInput: ") for b in blocks):
        blocks = blocks[:1] + [b[len(head) + 1:] for b in blocks[1:]]
    return "\n".join(blocks)


def worked_example(e):
    """An addition example whose output shows its column steps (the chain of thought)."""
    return {**e, "instruction": world.TASK_INSTRUCTIONS["addition_cot"], "output": e["cot"]}


def chain_of_thought_prompt(shots, query):
    """Chain of thought: the k-shot layout whose examples show their reasoning, e.g.
    "Output: 7 + 5 = 12, write 2 carry 1. ... The answer is 132.", under the instruction to work
    column by column. shots, query: addition examples (Alpaca dicts with their "cot")."""
    return few_shot_prompt([as_pair(worked_example(s)) for s in shots], as_pair(worked_example(query))[0])


def check_no_leak(shots, query, where="prompt"):
    """A test example must never be one of its own shots."""
    if any(p == query for p, _ in shots):
        raise UserError(f"{where}: the test query is also one of its examples; draw shots from another split")


# ----------------------------------------------------------------------------- choosing the examples

def addends(e):
    return [int(x) for x in e["input"].replace("?", "").split() if x.isdigit()]


def fact_attribute(question):
    for attr, qs in world.QUESTIONS.items():
        for q in qs:
            pre, post = q.split("{s}")
            if question.startswith(pre) and question.endswith(post):
                return attr
    return "?"


def kind(task, e):
    """What diverse examples differ in: the attribute asked, the label, the number of carries."""
    if task == "facts":
        return fact_attribute(e["input"])
    if task == "addition":
        return world.carries(*addends(e))
    return e["output"]


def difficulty(task, e):
    """Simple < complex: fewer carries and digits for additions; shorter examples otherwise."""
    if task == "addition":
        a, b = addends(e)
        return world.carries(a, b), len(str(a)) + len(str(b))
    return len(e["input"]) + len(e["output"])


def diverse_shots(pool, k, rng, key):
    """k examples that differ in key(e) as much as possible: one per group, groups in random order,
    round-robin when k exceeds the number of groups."""
    groups = {}
    for e in rng.sample(pool, len(pool)):
        groups.setdefault(key(e), []).append(e)
    order = list(groups.values())
    rng.shuffle(order)
    out = []
    for i in itertools.count():
        if len(out) == k or not any(order):
            return out
        g = order[i % len(order)]
        if g:
            out.append(g.pop())


# ----------------------------------------------------------------------------- the two decoders

def sort_batches(lengths, batch):
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def cut_answer(text, multiline=False):
    """The answer ends where the next example would begin: at a newline (or, for answers that span
    lines, at the next "Input:"/"Instruction:" line)."""
    if multiline:
        cuts = [i for i in (text.find("\nInput:"), text.find("\nInstruction:")) if i >= 0]
        return text[:min(cuts)].strip() if cuts else text.strip()
    return text.split("\n", 1)[0].strip()


@torch.no_grad()
def greedy_answers(model, enc, prompt_ids, max_new_tokens, batch=50, multiline=False, autocast=None):
    """y* ≈ argmax_y P(y | x, theta, Instruction, examples) one token at a time:
    y_t = argmax_v p(v | prompt, y_<t), until EOS or the end of the answer (see cut_answer).
    Prompts of similar length are batched together (left padding changes nothing)."""
    out = [None] * len(prompt_ids)
    for idx in sort_batches([len(p) for p in prompt_ids], batch):
        with (autocast or contextlib.nullcontext)():
            gen = generate(model, [prompt_ids[i] for i in idx], max_new_tokens, eos_id=eos_id(enc),
                           pad_id=pad_id(enc), greedy=True)
        for i, g in zip(idx, gen):
            out[i] = cut_answer(enc.decode([t for t in g if t != eos_id(enc)]), multiline)
    return out


@torch.no_grad()
def candidate_logprobs(model, enc, prompt_ids, candidates, batch=50, autocast=None):
    """(B, C) log P(y_c | prompt_b) = sum_t log p(y_t | prompt, y_<t) for every candidate completion
    (token ids); all candidates of a prompt go through the same forward pass (data.completion_batch)."""
    C = len(candidates)
    out = torch.empty(len(prompt_ids), C)
    per = max(1, batch // C)
    for idx in sort_batches([len(p) for p in prompt_ids], per):
        b = data.completion_batch([prompt_ids[i] for i in idx for _ in range(C)], [c for _ in idx for c in candidates],
                                  pad_id(enc))
        b = {k: v.to(next(model.parameters()).device) for k, v in b.items()}
        with (autocast or contextlib.nullcontext)():
            lp = completion_logprobs(model, b)
        out[idx] = lp.float().sum(-1).view(len(idx), C).cpu()
    return out


def argmax_candidates(model, enc, prompt_ids, candidates, batch=50, autocast=None):
    """y* = argmax_{y in candidates} P(y | x, theta, Instruction, examples), exactly, with
    P(y | ...) = prod_t p(y_t | ..., y_<t) (a sum of log-probs). Returns the index of y* per prompt."""
    return candidate_logprobs(model, enc, prompt_ids, candidates, batch, autocast).argmax(-1).tolist()


# ----------------------------------------------------------------------------- evaluation

def contains_answer(pred, ref):
    """The reference occurs in the answer as whole words ("The flag of X is grey." contains "grey"):
    knowledge without the format, reported beside exact match."""
    return float(re.search(r"(?<!\w)" + re.escape(evals.normalize(ref)) + r"(?!\w)", evals.normalize(pred)) is not None)


def correct(pred, ref, metric):
    return evals.number_match(pred, ref) if metric == "number" else evals.exact_match(pred, ref)


class Evaluator:
    """Turns prompts into token ids (after EOS), checks they fit the context, decodes and scores."""

    def __init__(self, model, enc, args, ctx):
        self.model, self.enc, self.args, self.ctx = model, enc, args, ctx
        self.block = model.config.block_size
        self.notes = []

    def ids(self, prompt):
        return ([] if self.args.no_doc_start else [eos_id(self.enc)]) + self.enc.encode_ordinary(prompt)

    def run(self, prompts, refs, metric, budget, labels=None, multiline=False, what="", greedy=True):
        """Accuracy of greedy answers and/or (when labels are given) of the candidate argmax, or a
        "skipped" record when a prompt plus its answer budget does not fit the context."""
        ids = [self.ids(p) for p in prompts]
        need = max(len(i) for i in ids) + budget
        if labels:
            cand = [self.enc.encode_ordinary(data.format_completion(y)) for y in labels]
            need = max(need, max(len(i) for i in ids) + max(map(len, cand)))
        res = {"n": len(prompts), "max_prompt_tokens": max(len(i) for i in ids)}
        if need > self.block:
            note = (f"{what}: skipped, a prompt of {res['max_prompt_tokens']} tokens + {budget} answer tokens "
                    f"exceeds the context of {self.block}; use fewer examples")
            self.notes.append(note)
            print("  note: " + note)
            return {**res, "skipped": note}
        if greedy or not labels:
            preds = greedy_answers(self.model, self.enc, ids, budget, self.args.batch, multiline, self.ctx.autocast)
            res["acc"] = sum(correct(p, r, metric) for p, r in zip(preds, refs)) / len(refs)
            res["preds"] = preds[:3]
            if metric == "exact" and not labels:
                res["acc_contains"] = sum(contains_answer(p, r) for p, r in zip(preds, refs)) / len(refs)
        if labels:
            best = argmax_candidates(self.model, self.enc, ids, [c for c in cand], self.args.batch, self.ctx.autocast)
            res["acc_argmax"] = sum(correct(labels[j], r, metric) for j, r in zip(best, refs)) / len(refs)
        return res


def draw_shots(pool, n_test, K, seed):
    """One random draw of K train examples per test example; k-shot uses the first k (paired across k)."""
    return [random.Random(f"{seed}/{i}").sample(pool, K) for i in range(n_test)]


def build_prompts(shot_lists, test, cot=False, what="prompt"):
    """The k-shot (or chain-of-thought) prompt of each test example; all are Alpaca dicts.
    Refuses a test example among its own shots."""
    prompts = []
    for shots, e in zip(shot_lists, test):
        check_no_leak([as_pair(s) for s in shots], as_pair(e)[0], what)
        prompts.append(chain_of_thought_prompt(shots, e) if cot else
                       few_shot_prompt([as_pair(s) for s in shots], as_pair(e)[0]))
    return prompts


def answer_budget(enc, outputs, args):
    """Greedy answer length: the longest example answer + 6 tokens (room for "The answer is ...")."""
    return args.max_new_tokens or max(len(enc.encode_ordinary(data.format_completion(o))) for o in outputs) + 6


def world_study(ev, args):
    """Every measurement on the default world's task sets."""
    tasks = world.task_sets(world.make_world(args.world_seed))
    ks, names = int_list(args.ks, "--ks"), [t for t in args.tasks.split(",") if t]
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise UserError(f"--tasks: unknown task {bad[0]!r}; choose from {', '.join(TASKS)}")
    K = max(ks + [args.study_k])
    res = {"accuracy": {}, "order": {}, "choice": {}}
    for task in names:
        pool, test = tasks[task]["train"], tasks[task]["test"][:args.n]
        metric = "number" if task == "addition" else "exact"
        labels = list(world.SENTIMENT_LABELS) if task == "sentiment" else None
        budget = answer_budget(ev.enc, [e["output"] for e in pool], args)
        test_prompts = {as_pair(e)[0] for e in test}
        assert not test_prompts & {as_pair(e)[0] for e in pool}, "train and test splits share a question"
        draws = draw_shots(pool, len(test), K, f"{args.seed}/{task}")
        refs = [e["output"] for e in test]

        def evaluate(shot_lists, what, greedy=False):  # the studies use the exact decoder where there is one
            return ev.run(build_prompts(shot_lists, test, what=what), refs, metric, budget, labels, what=what,
                          greedy=greedy)

        res["accuracy"][task] = {}
        for k in ks:
            t0 = time.time()
            r = res["accuracy"][task][str(k)] = evaluate([d[:k] for d in draws], f"{task} k={k}", greedy=True)
            print(f"  {task:<10} k={k}: " + ("skipped" if "skipped" in r else f"accuracy {r['acc']:.3f}" +
                  (f", argmax over labels {r['acc_argmax']:.3f}" if labels else "")) + f"  ({time.time() - t0:.0f}s)")
        k = args.study_k
        # order sensitivity: one fixed set of k examples, several orderings of it
        fixed = random.Random(f"{args.seed}/{task}/order").sample(pool, k)
        perms = list(itertools.permutations(range(k)))
        random.Random(f"{args.seed}/{task}/perms").shuffle(perms)
        accs = []
        for perm in [tuple(range(k))] + [p for p in perms if p != tuple(range(k))][:args.orderings - 1]:
            r = evaluate([[fixed[j] for j in perm]] * len(test), f"{task} order {perm}")
            if "skipped" not in r:
                accs.append(r["acc_argmax"] if labels else r["acc"])
        if accs:
            res["order"][task] = {"k": k, "orderings": len(accs), "accs": accs,
                                  "decoder": "argmax over labels" if labels else "greedy", "min": min(accs), "max": max(accs),
                                  "mean": statistics.mean(accs), "std": statistics.pstdev(accs)}
            print(f"  {task:<10} {len(accs)} orderings of {k} fixed examples: {min(accs):.3f} .. {max(accs):.3f}")
        # example choice: random vs diverse, and the random examples ordered simple -> complex (and back)
        diverse = [diverse_shots(pool, k, random.Random(f"{args.seed}/{task}/diverse/{i}"), lambda e: kind(task, e))
                   for i in range(len(test))]
        ch = {"random": res["accuracy"][task].get(str(k)) or evaluate([d[:k] for d in draws], f"{task} random")}
        ch["diverse"] = evaluate(diverse, f"{task} diverse")
        ch["simple_to_complex"] = evaluate([sorted(d[:k], key=lambda e: difficulty(task, e)) for d in draws],
                                           f"{task} simple-to-complex")
        ch["complex_to_simple"] = evaluate([sorted(d[:k], key=lambda e: difficulty(task, e))[::-1] for d in draws],
                                           f"{task} complex-to-simple")
        res["choice"][task] = {name: (r.get("acc_argmax", r.get("acc")) if "skipped" not in r else None)
                               for name, r in ch.items()}
        print(f"  {task:<10} k={k} choice: " + ", ".join(f"{n} {v:.3f}" for n, v in res["choice"][task].items()
                                                         if v is not None))
    if "addition" in names:
        res["cot"] = cot_study(ev, tasks["addition"], args)
    res["example_prompts"] = {t: few_shot_prompt([as_pair(s) for s in tasks[t]["train"][:2]],
                                                 as_pair(tasks[t]["test"][0])[0]) for t in names}
    return res


def cot_study(ev, addition, args):
    """Direct answers vs worked steps, same shots (same problems), on test additions with carries."""
    pool = addition["train"]
    test = [e for e in addition["test"] if world.carries(*addends(e))][:args.n]
    refs = [e["output"] for e in test]
    out = {"n": len(test), "direct": {}, "cot": {}}
    for k in int_list(args.cot_ks, "--cot-ks"):
        draws = draw_shots(pool, len(test), k, f"{args.seed}/cot")
        for mode in ("direct", "cot"):  # the same problems as shots, with and without their worked steps
            prompts = build_prompts(draws, test, cot=mode == "cot", what=f"cot {mode}")
            budget = answer_budget(ev.enc, [e["cot" if mode == "cot" else "output"] for e in pool], args)
            r = ev.run(prompts, refs, "number", budget, what=f"addition with carries, {mode} k={k}")
            out[mode][str(k)] = r
            if "skipped" not in r:
                print(f"  addition with carries, {mode:<6} k={k}: accuracy {r['acc']:.3f}")
    return out


def file_study(ev, args):
    """Accuracy of each k on --task-file, shots drawn from --examples-file."""
    queries = data.load_sft_examples(args.task_file)[:args.n]
    pool = data.load_sft_examples(args.examples_file) if args.examples_file else []
    ks = int_list(args.ks, "--ks")
    if not pool and any(ks):
        print("  note: no --examples-file, so only zero-shot is measured")
        ks = [0]
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    refs = [c.strip() for _, c in queries]
    multiline = any("\n" in c.strip() for _, c in pool + queries)
    budget = args.max_new_tokens or max(len(ev.enc.encode_ordinary(c)) for _, c in pool + queries) + 6
    for i, (p, _) in enumerate(queries):
        if len(ev.ids(p)) + budget > ev.block:
            raise UserError(f"{args.task_file}: example {i + 1}: prompt of {len(ev.ids(p))} tokens + {budget} "
                                 f"answer tokens exceeds the context of {ev.block}; shorten it or lower --max-new-tokens")
    res = {}
    for k in ks:
        prompts = []
        for i, (q, _) in enumerate(queries):
            candidates = [s for s in pool if s[0] != q]  # a test example is never its own shot
            if len(candidates) < k:
                raise UserError(f"{args.examples_file}: {len(candidates)} usable examples, fewer than k={k}")
            shots = random.Random(f"{args.seed}/file/{i}").sample(candidates, k)
            check_no_leak(shots, q, args.task_file)
            prompts.append(few_shot_prompt(shots, q))
        r = res[str(k)] = ev.run(prompts, refs, args.metric, budget, labels, multiline, what=f"k={k}")
        if "skipped" not in r:
            print(f"  k={k}: accuracy {r['acc']:.3f}" + (f", argmax over labels {r['acc_argmax']:.3f}" if labels else ""))
    return {"accuracy": {os.path.basename(args.task_file): res}}


# ----------------------------------------------------------------------------- the table

def acc_of(r, key="acc"):
    return None if r is None or "skipped" in r else round(r[key], 3)


def summarize(res):
    """The compact table (report.py shows results["summary"])."""
    s = {"accuracy_by_k": {}}
    for task, rows in res["accuracy"].items():
        s["accuracy_by_k"][task + (" (greedy)" if any("acc_argmax" in r for r in rows.values()) else "")] = \
            {k: acc_of(r) for k, r in rows.items()}
        if any("acc_argmax" in r for r in rows.values()):
            s["accuracy_by_k"][task + " (argmax over labels)"] = {k: acc_of(r, "acc_argmax") for k, r in rows.items()}
        if any("acc_contains" in r for r in rows.values()):
            s["accuracy_by_k"][task + " (answer contained)"] = {k: acc_of(r, "acc_contains") for k, r in rows.items()}
    if res.get("cot"):
        s["addition_with_carries"] = {f"{m} (k={k})": acc_of(r) for m in ("direct", "cot")
                                      for k, r in res["cot"][m].items()}
    if res.get("order"):
        s["order_spread"] = {t: {"k": o["k"], "orderings": o["orderings"], "decoder": o["decoder"], "min": round(o["min"], 3),
                                 "max": round(o["max"], 3), "std": round(o["std"], 3)} for t, o in res["order"].items()}
    if res.get("choice"):
        s["example_choice"] = {t: {n: None if v is None else round(v, 3) for n, v in c.items()}
                               for t, c in res["choice"].items()}
    return s


def table(summary):
    fmt = lambda v: "  -  " if v is None else f"{v:.3f}"
    lines = []
    acc = summary["accuracy_by_k"]
    ks = sorted({k for rows in acc.values() for k in rows}, key=int)
    lines.append(f"{'accuracy':<34}" + "".join(f"{'k=' + k:>8}" for k in ks))
    for name, rows in acc.items():
        lines.append(f"{name:<34}" + "".join(f"{fmt(rows.get(k)):>8}" for k in ks))
    if "addition_with_carries" in summary:
        lines += ["", "additions with carries: " + ", ".join(f"{n} {fmt(v)}"
                                                            for n, v in summary["addition_with_carries"].items())]
    for t, o in summary.get("order_spread", {}).items():
        lines.append(f"order, {o['orderings']} orderings of {o['k']} fixed examples, {t} ({o['decoder']}): "
                     f"min {o['min']:.3f} max {o['max']:.3f} std {o['std']:.3f}")
    for t, c in summary.get("example_choice", {}).items():
        lines.append(f"example choice, {t}: " + ", ".join(f"{n} {fmt(v)}" for n, v in c.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    ctx = setup(args)
    t0 = time.time()
    model, enc, config = load_checkpoint(args.init, ctx.device, hint="python pretrain.py")
    model.eval()
    if args.compile:
        model = torch.compile(model)
    ev = Evaluator(model, enc, args, ctx)
    print(f"prompting {args.init} ({config.get('stage', '?')}, {model.num_params() / 1e6:.2f}M parameters "
          "without the position embeddings, "
          f"context {ev.block}) on {args.task_file or 'the default world'}")
    if args.examples_file and not args.task_file:
        raise UserError("--examples-file needs --task-file (the test examples it gives shots for)")
    res = file_study(ev, args) if args.task_file else world_study(ev, args)
    res["summary"] = summarize(res)
    res.update({"init": args.init, "stage": config.get("stage"), "args": vars(args), "notes": ev.notes,
                "time_s": round(time.time() - t0, 1)})
    print()
    print(table(res["summary"]))
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "results.json"), json.dumps(res, indent=1))
    print(f"\nwrote {os.path.join(args.out, 'results.json')} in {res['time_s']:.0f}s")
    return res


if __name__ == "__main__":
    run_cli(main)
