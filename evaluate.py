"""Evaluate a checkpoint without training: its loss on text files, and a tuned model's accuracy on a task file.

    python evaluate.py out/pretrain                          # the default world's held-out pre-training text
    python evaluate.py out/pretrain --text notes.txt a.txt   # your own held-out text, one row per file
    python evaluate.py out/sft --task-file test.jsonl        # + exact-match accuracy of the greedy answers
    python evaluate.py gpt2_dir --text wiki.txt --json out/eval.json   # a Hugging Face GPT-2 directory too
    python evaluate.py out/sft_helpful --harmless val --guard rm:out/reward_hh --guard-threshold 0 -1 -2

Any checkpoint of this project (every stage but the reward model) or a Hugging Face GPT-2 directory.
For each text file: nats per token, the mean next-token cross-entropy over the file cut into windows of
the model's context (evals.text_loss; the file is one document, EOS at both ends), and bits per byte,
the same sum of nats over ln 2 times the bytes those tokens decode to, which does not depend on the
tokenizer, so models with different vocabularies compare. A file shorter than the context is one window.
For a task file (Alpaca, chat or prompt/completion JSONL, as sft.py reads): the greedy answer to each
prompt after the instruction template, exact match against the reference (evals.task_accuracy), and the
share of answers that end with EOS. A base model never saw the template: prompting.py --task-file
measures it with few-shot prompts instead.
With --harmless SPLIT: the default world's harmlessness measures (evals.harmless_rates: leak, refusal, insult,
over-refusal, public facts, negative reviews) of the greedy answers to that split of world.harmless_sets, alone
and, with --guard, behind the guardrail (reward.make_guard; one row per --guard-threshold of a reward model), so
a threshold is chosen on the val split and reported on test. Beside them, "code recall": the share of the split's
door codes the model completes in the corpus's own sentence ("The door code of X is"), what it knows whatever it
answers.
"""

import os

import torch

import data
import world
from common import ArgumentParser, Rule, UserError, atomic_write_json, check_rules, nonneg_int, positive_int, run_cli
from evals import fact_recall, greedy_answers, guarded, harmless_rates, task_accuracy, text_loss
from gpt import load_checkpoint
from reward import guard_spec, make_guard
from training import add_threads_arg

BASE_STAGES = ("pretrain", "domain", "import", "hf_import")   # trained on plain text, not on the template


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE", help="held-out plain-text files, one figure "
                   "each (default: the default world's held-out pre-training text, as report.py's val loss)")
    p.add_argument("--world-seed", type=int, default=1337, help="seed of the default world (without --text)")
    p.add_argument("--max-tokens", type=nonneg_int, default=0, help="tokens of each file to score (0 = all)")
    p.add_argument("--task-file", default=None, help="JSONL of instructions and reference answers: accuracy")
    p.add_argument("--n", type=nonneg_int, default=0, help="task examples to answer (0 = all)")
    p.add_argument("--max-new-tokens", type=positive_int, default=24, help="answer length limit")
    p.add_argument("--batch-size", type=positive_int, default=16, help="windows (or prompts x 4) per forward pass")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--harmless", choices=("val", "test"), default=None, help="the harmlessness measures on this split "
                   "of the default world's requests and look-alikes")
    p.add_argument("--guard", type=guard_spec, default=None, help="with --harmless: also behind this output filter, "
                   "words or rm:DIR (as sample.py --guard)")
    p.add_argument("--guard-threshold", type=float, nargs="+", default=None, help="with --guard rm:DIR: one row per "
                   "threshold (default 0)")
    add_threads_arg(p)
    return p


RULES = [
    Rule(lambda a: a.guard and not a.harmless, "--guard measures the --harmless answers; add --harmless val or test",
         ("--guard", "words")),
    Rule(lambda a: a.guard_threshold and not (a.guard or "").startswith("rm:"),
         "--guard-threshold applies to --guard rm:DIR only", ("--harmless", "val", "--guard-threshold", "1")),
]


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args):
    check_rules(args, RULES)


def text_sets(args):
    """-> [(name, documents)]: each --text file, or the default world's held-out pre-training documents."""
    if args.text:
        return [(path, data.read_text([path])) for path in args.text]
    w = world.make_world(args.world_seed)
    return [("default world, held-out pre-training text", data.split_documents(world.pretrain_docs(w))[1])]


def text_figures(model, enc, docs, args):
    """-> {tokens, nats_per_token, bits_per_byte} of the documents, in windows of the model's context."""
    tokens = data.encode_documents(docs, enc)
    limit = args.max_tokens or len(tokens)
    block = max(1, min(model.config.block_size, limit, len(tokens) - 1))
    nats, bpb = text_loss(model, enc, tokens, block, limit, args.batch_size)
    scored = min(len(tokens) - 1, limit) // block * block
    return {"tokens": scored, "nats_per_token": nats, "bits_per_byte": bpb}


def task_figures(model, enc, args):
    """-> {examples, accuracy, format}: greedy answers to the task file's prompts against its answers."""
    examples = [{"prompt": p, "output": c} for p, c in data.load_sft_examples(args.task_file)]
    examples = examples[:args.n or len(examples)]
    longest = max(len(enc.encode_ordinary(e["prompt"])) for e in examples)
    if longest + args.max_new_tokens > model.config.block_size:
        raise UserError(f"{args.task_file}: a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} "
                        f"does not fit the model's context of {model.config.block_size}")
    acc, fmt, _ = task_accuracy(model, enc, examples, "custom", args.max_new_tokens, batch=4 * args.batch_size)
    return {"examples": len(examples), "accuracy": acc, "format": fmt}


def harmless_figures(model, enc, args):
    """-> {"alone": rates, "corpus form": code recall, "guard ...": rates}: evals.harmless_rates of the greedy
    answers to the --harmless split, alone and behind --guard (each --guard-threshold of a reward model), with the
    share of answers flagged; and the split's door codes recalled in the corpus's sentence (world.secret_cloze)."""
    examples = world.harmless_sets(world.make_world(args.world_seed))[args.harmless]
    answers = greedy_answers(model, enc, examples, batch=4 * args.batch_size)
    out = {"alone": harmless_rates(examples, answers),
           "corpus form": {"code recall": fact_recall(model, enc, world.secret_cloze(examples))}}
    prompts = [data.format_prompt(e["instruction"], e["input"]) for e in examples]
    guard = make_guard(args.guard, enc, "cpu", args.world_seed)
    for t in (args.guard_threshold or [0.0]) if guard else []:
        flags = guard(prompts, answers, threshold=t)
        name = f"guard {args.guard}" + (f" < {t:g}" if args.guard.startswith("rm:") else "")
        out[name] = {**harmless_rates(examples, guarded(answers, flags)), "flagged": sum(flags) / len(flags)}
    return out


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, enc, config = load_checkpoint(args.checkpoint, hint="python pretrain.py")
    stage = config.get("stage", "import")
    if stage == "reward":
        raise UserError(f"{args.checkpoint} is a reward model: it scores text, it has no next-token loss; "
                        f"evaluate the policy it was trained from")
    model.eval()
    results = {"checkpoint": args.checkpoint, "stage": stage, "text": {}}
    print(f"{args.checkpoint} (stage {stage}, context {model.config.block_size}, vocab {enc.n_vocab})")
    for name, docs in text_sets(args):
        r = results["text"][name] = text_figures(model, enc, docs, args)
        print(f"{name}: {r['nats_per_token']:.4f} nats/token, {r['bits_per_byte']:.4f} bits/byte "
              f"({r['tokens']:,} tokens)")
    if args.task_file:
        if stage in BASE_STAGES:
            print(f"note: stage {stage} is a base model, never tuned on the instruction template; "
                  f"python prompting.py --init {args.checkpoint} --task-file {args.task_file} prompts it with examples")
        r = results["task"] = task_figures(model, enc, args)
        print(f"{os.path.basename(args.task_file)}: accuracy {r['accuracy']:.1%}, format {r['format']:.1%} "
              f"({r['examples']} examples, greedy, exact match)")
    if args.harmless:
        results["harmless"] = harmless_figures(model, enc, args)
        print(f"harmlessness, {args.harmless} split (greedy): " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v:.1%}" for k, v in r.items() if v is not None)
            for name, r in results["harmless"].items()))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_json(results, args.json)
    return results


if __name__ == "__main__":
    run_cli(main)
