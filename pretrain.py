"""Stage 1, pre-training: next-token prediction on a text corpus.

    python pretrain.py                       # the embedded default world, CPU, ~8 minutes
    python pretrain.py --data my/*.txt       # your own plain-text files
    python pretrain.py --data my/*.txt --val-data held_out/*.txt   # + loss on text it never trains on
    torchrun --nproc_per_node=4 pretrain.py  # DistributedDataParallel, same effective batch
    python pretrain.py --preset gpt2 --data my/*.txt   # GPT-2 124M's shape (gpt.PRESETS)

Reads the corpus, trains a byte-level BPE tokenizer on it (or takes the one of --init),
caches the tokens as flat arrays on disk, trains a GPT with the cross-entropy loss, and
saves OUT/model.safetensors, config.json (with the final metrics) and tokenizer.json.
At every evaluation it reports validation loss (nats per token, bits per byte) on the held-out slice of
the corpus, and on --val-data files when given (heldout_loss, heldout_bpb); at the end also fact recall:
how many facts of the world it read it completes correctly ("The flag of X is" -> colour).

Before any work check_args refuses options that contradict each other (RULES) or the checkpoint of
--init; once the tokenizer is known, the final evaluation's prompts are checked against the context.
The trained model is saved before the final evaluation, so an error there never costs it.
"""

import contextlib
import os
import time

import torch

import data
import world
from common import (ArgumentParser, Rule, UserError, check_input_files, check_out_is_not_an_input, check_rules,
                    fraction, fraction0, no_effect, nonneg_int, positive_int, run_cli)
from evals import fact_recall, text_loss
from gpt import GPT, GPTConfig, PRESETS, cross_entropy_loss, generate, load_checkpoint, save_checkpoint
from tokenizer import eos_id, load_tokenizer, pad_id, tokenizer_fingerprint, train_tokenizer
from training import (MetricsLog, StopFlag, add_common_args, add_optimizer_args, all_reduce_mean, check_finite,
                      check_policy, final_evaluation, load_train_state, mark_finished, lr_at, make_optimizer, micro_steps,
                      optimizer_step, save_train_state, set_lr, setup, wrap_model)


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data", nargs="*", default=None, help="plain-text files; documents are separated by blank "
                   "lines (default: the embedded world)")
    p.add_argument("--world-seed", type=int, default=1337, help="seed of the default world")
    p.add_argument("--init", default=None, help="start from this checkpoint instead of random weights")
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="GPT-2's shape (gpt2 = 124M: 12 layers, "
                   "12 heads, 768 wide, context 1024, vocab 50257); overrides --n-layer/--n-head/--n-embd/--block-size "
                   "and --vocab-size (the model's vocabulary is the tokenizer's: a small corpus may give a BPE with fewer)")
    p.add_argument("--vocab-size", type=positive_int, default=4096, help="BPE vocabulary, 256 bytes + merges + EOS")
    p.add_argument("--split-digits", action="store_true", help="the tokenizer writes every digit as its own token "
                   "(as LLaMA does; saved in tokenizer.json); default: numbers of up to 3 digits, merged as BPE learns")
    p.add_argument("--block-size", type=positive_int, default=256, help="context length in tokens")
    p.add_argument("--n-layer", type=positive_int, default=4)
    p.add_argument("--n-head", type=positive_int, default=4)
    p.add_argument("--n-embd", type=positive_int, default=256)
    p.add_argument("--dropout", type=fraction0, default=0.0)
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step, summed over all processes")
    p.add_argument("--max-iters", type=positive_int, default=700, help="optimizer steps")
    add_optimizer_args(p, lr=2e-3, min_lr=2e-4, warmup=50, weight_decay=0.1)
    p.add_argument("--eval-interval", type=positive_int, default=100, help="steps between validation (and a save)")
    p.add_argument("--eval-tokens", type=positive_int, default=65536, help="validation tokens per evaluation")
    p.add_argument("--val-fraction", type=fraction, default=0.05, help="share of the documents held out")
    p.add_argument("--val-data", nargs="+", default=None, metavar="FILE", help="held-out text files (documents at "
                   "blank lines), never trained on: their loss and bits per byte at every evaluation")
    p.add_argument("--stop-at", type=nonneg_int, default=0, help="save a resumable state and stop after this step "
                   "(as Ctrl-C would, but exit 0; for tests and job schedulers; 0 = never)")
    p.add_argument("--recall-limit", type=nonneg_int, default=400, help="fact-recall prompts to test (0 = none)")
    add_common_args(p, out="out/pretrain")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.preset:
        shape = PRESETS[args.preset]
        args.n_layer, args.n_head, args.n_embd, args.block_size, args.vocab_size = (
            shape.n_layer, shape.n_head, shape.n_embd, shape.block_size, shape.vocab_size)
    return args


# what check_args refuses before any work, each rule with a command line that breaks it
EVAL_TOKENS = "--eval-tokens {a.eval_tokens} must be at least --block-size {a.block_size}: the validation loss is " \
    "measured on whole blocks"
SHAPE_OPTIONS = ("--vocab-size", "--block-size", "--n-layer", "--n-head", "--n-embd")
RULES = [
    *[no_effect(o, lambda a: a.init, "with --init: the model is the checkpoint's", ("--init", "ckpt", o, value))
      for o, value in (("--preset", "gpt2"), ("--vocab-size", "512"), ("--n-layer", "2"), ("--n-head", "2"),
                       ("--n-embd", "64"), ("--dropout", "0.1"))],
    no_effect("--split-digits", lambda a: a.init, "with --init: the tokenizer is the checkpoint's",
              ("--init", "ckpt", "--split-digits")),
    *[no_effect(o, lambda a: a.preset, "with --preset {a.preset}, which sets the model's shape",
                ("--preset", "gpt2", o, "64")) for o in SHAPE_OPTIONS],
    Rule(lambda a: a.n_embd % a.n_head, "--n-embd {a.n_embd} must be divisible by --n-head {a.n_head}: each head "
         "reads an equal share of the width", ("--n-head", "3", "--n-embd", "64")),
    Rule(lambda a: a.eval_tokens < a.block_size and not (a.init and "block_size" not in a.given),  # see check_args
         EVAL_TOKENS, ("--eval-tokens", "10")),
    no_effect("--world-seed", lambda a: a.data, "with --data: it seeds the default world", ("--data", "x.txt",
              "--world-seed", "1")),
    no_effect("--recall-limit", lambda a: a.data and a.recall_limit, "with --data: fact recall tests the default "
              "world's facts", ("--data", "x.txt", "--recall-limit", "5")),
]


def check_args(args):
    """Before any work: RULES, the input files, and --init: a language model, not --out, whose context bounds
    --block-size (which follows it when not given)."""
    check_rules(args, RULES)
    check_input_files("--data", args.data, ".txt")
    if args.init:
        context = check_policy(args.init, hint="python pretrain.py")["block_size"]
        check_out_is_not_an_input(args.out, {"--init": args.init})
        if "block_size" in args.given and args.block_size > context:
            raise UserError(f"--block-size {args.block_size} is longer than the context of --init {args.init} "
                            f"({context}); give --block-size {context} or less")
        args.block_size = args.block_size if "block_size" in args.given else context
        if args.eval_tokens < args.block_size:  # the rule, now that the context is known
            raise UserError(EVAL_TOKENS.format(a=args))


def check_context(model, enc, cloze, args):
    """Once the tokenizer is known, before the corpus is tokenized: the final evaluation's prompts (fact recall's
    cloze prompts and the sample's "The", each after EOS) leave room for new tokens in the context."""
    prompts = [c["prompt"] for c in cloze[:args.recall_limit]] + ["The"]
    need = 2 + max(len(enc.encode_ordinary(p)) for p in prompts)
    if model.config.block_size < need:
        raise UserError(f"--block-size {model.config.block_size}: the final evaluation's prompts (fact recall, the "
                        f"sample) need a context of {need} tokens; give --block-size {need} or more"
                        + (", or --recall-limit 0" if len(prompts) > 1 else ""))


# ----------------------------------------------------------------------------- data

def load_corpus(args):
    """-> (train documents, validation documents, fact-recall cloze prompts)."""
    if args.data:
        docs, cloze = data.read_text(args.data, split_blank_lines=True), []
    else:
        w = world.make_world(args.world_seed)
        docs, cloze = world.pretrain_docs(w), world.fact_cloze(w)
    train_docs, val_docs = data.split_documents(docs, args.val_fraction)
    return train_docs, val_docs, cloze


# ----------------------------------------------------------------------------- evaluation

def load_heldout(args, enc, fingerprint):
    """--val-data: the files' documents as one token array (cached beside the corpus), or None."""
    if not args.val_data:
        return None
    docs = data.read_text(args.val_data, split_blank_lines=True)
    tokens = data.tokenize_corpus(docs, enc, os.path.join(args.out, "heldout.bin"), fingerprint=fingerprint)
    if len(tokens) <= args.block_size:   # found before the first step, not at the first evaluation
        raise UserError(f"--val-data: {len(tokens)} tokens, fewer than one window of --block-size {args.block_size} "
                        f"(+1 target); give more held-out text")
    return tokens


def evaluate(model, enc, val_tokens, heldout, args, ctx):
    """Validation loss in nats per token and bits per byte (see evals.text_loss), and the same on --val-data."""
    kw = dict(block_size=args.block_size, max_tokens=args.eval_tokens, batch_size=args.batch_size, device=ctx.device,
              autocast=ctx.autocast)
    m = dict(zip(("val_loss", "val_bpb"), text_loss(model, enc, val_tokens, **kw)))
    if heldout is not None:
        m.update(zip(("heldout_loss", "heldout_bpb"), text_loss(model, enc, heldout, **kw)))
    return m


# ----------------------------------------------------------------------------- model, one step, saving

def model_and_tokenizer(args, train_docs):
    """-> (model, enc): from --init, or a new GPT with a BPE tokenizer trained on the training documents.
    Training the tokenizer is deterministic, so every DDP process trains the same one; --resume reuses it."""
    if args.init:
        model, enc, _ = load_checkpoint(args.init, hint="python pretrain.py")
        return model, enc
    saved = os.path.join(args.out, "tokenizer.json")
    enc = load_tokenizer(saved) if args.resume and os.path.exists(saved) else \
        train_tokenizer("\n\n".join(train_docs), args.vocab_size, args.split_digits)
    config = GPTConfig(vocab_size=enc.n_vocab, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    return GPT(config), enc


def train_step(train_model, train_tokens, args, ctx, step, accum):
    """Forward and backward of one optimizer step's micro-batches (each process its own); -> the last loss."""
    for micro in range(accum):
        x, y = data.get_batch(train_tokens, args.batch_size, args.block_size, args.seed, step,
                              ctx.rank + ctx.world * micro)
        x, y = x.to(ctx.device), y.to(ctx.device)
        sync = ctx.ddp and micro < accum - 1
        with train_model.no_sync() if sync else contextlib.nullcontext(), ctx.autocast():
            loss = cross_entropy_loss(train_model(x), y)
            (loss / accum).backward()
    return loss


def save(args, model, optimizer, enc, step, metrics):
    """The resumable state (with the metrics so far) and the model; config.json says "finished": false until
    mark_finished, after the final evaluation (run.sh skips only finished runs)."""
    save_train_state(args.out, model, optimizer, step, extra={"metrics": metrics}, args=args)
    save_checkpoint(args.out, model, enc, {"stage": "pretrain", "args": vars(args), "step": step, "metrics": metrics,
                                           "finished": False})


def print_sample(model, enc, seed, device):
    """A continuation of "The" at temperature 0.8, top-k 50: what the model writes."""
    sample = generate(model, [[eos_id(enc)] + enc.encode_ordinary("The")], 60, eos_id=eos_id(enc),
                      pad_id=pad_id(enc), temperature=0.8, top_k=50,
                      generator=torch.Generator(device=device).manual_seed(seed))[0]
    print("sample:", "The" + enc.decode(sample[:-1] if sample[-1:] == [eos_id(enc)] else sample))


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    ctx = setup(args)
    accum = micro_steps(args.grad_accum, ctx)
    os.makedirs(args.out, exist_ok=True)
    train_docs, val_docs, cloze = load_corpus(args)
    model, enc = model_and_tokenizer(args, train_docs)
    check_context(model, enc, cloze, args)
    fp = tokenizer_fingerprint(enc)
    train_tokens = data.tokenize_corpus(train_docs, enc, os.path.join(args.out, "train.bin"), fingerprint=fp)
    val_tokens = data.tokenize_corpus(val_docs, enc, os.path.join(args.out, "val.bin"), fingerprint=fp)
    heldout = load_heldout(args, enc, fp)
    if ctx.master:
        print(f"corpus: {len(train_tokens):,} train / {len(val_tokens):,} val tokens, vocab {enc.n_vocab}; "
              f"model: {model.num_params() / 1e6:.2f}M parameters without the position embeddings")

    model.to(ctx.device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, ctx=ctx)
    start, saved = load_train_state(args.out, model, optimizer) if args.resume else (0, {})
    train_model = wrap_model(model, ctx)
    stop = StopFlag()
    log = MetricsLog(args.out, args.max_iters, ctx.master, resume=args.resume)
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum
    t_last = time.time()
    for step in range(start, args.max_iters):
        lr = lr_at(step, args.lr, args.warmup, args.max_iters, args.min_lr)
        set_lr(optimizer, lr)
        loss = train_step(train_model, train_tokens, args, ctx, step, accum)
        check_finite(loss, step)
        grad_norm = optimizer_step(model, optimizer, args.grad_clip)
        done = step + 1
        if done % args.log_interval == 0 or done == args.max_iters:
            dt, t_last = time.time() - t_last, time.time()
            log.log(done, loss=all_reduce_mean(loss, ctx).item(), grad_norm=grad_norm.item(), lr=lr,
                    tok_per_s=round(tokens_per_step * args.log_interval / max(dt, 1e-9)))
        if done % args.eval_interval == 0 and done < args.max_iters:
            val = evaluate(train_model, enc, val_tokens, heldout, args, ctx)
            log.log(done, **val)
            if ctx.master:
                save(args, model, optimizer, enc, done, val)
        if stop.requested_anywhere(ctx) or done == args.stop_at:
            if ctx.master:
                save(args, model, optimizer, enc, done, {})
            print(f"stopped at step {done}; continue with: python pretrain.py --resume --out {args.out}")
            return

    # the trained model first, then the final evaluation and samples: an error there never costs the model
    # (a --resume at the last step, after such an error, runs the evaluation alone)
    metrics = {"train_loss": loss.item(), "tokens": args.max_iters * tokens_per_step} if start < args.max_iters \
        else saved.get("metrics", {})
    if ctx.master:
        save(args, model, optimizer, enc, args.max_iters, metrics)
    with final_evaluation(args.out, "python pretrain.py"):
        metrics.update(evaluate(train_model, enc, val_tokens, heldout, args, ctx))
        if ctx.master and args.recall_limit and cloze[:args.recall_limit]:
            metrics["fact_recall"] = fact_recall(model, enc, cloze[:args.recall_limit])
        if ctx.master:
            print_sample(model, enc, args.seed, ctx.device)
    if ctx.master:
        mark_finished(args.out, metrics)
        print("final: " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    run_cli(main)
