"""Stage 3, supervised fine-tuning (SFT), in the guide's two flavours:

  instruction fine-tuning (--mode instruct, default): (prompt, response) pairs rendered in the one
      template "Instruction: ...\\nInput: ...\\nOutput: <response><EOS>"; the loss counts only the
      response tokens and the EOS that ends them, never the prompt or the padding;
  domain adaptation (--mode domain): the pre-training objective (next-token prediction on every
      token) on domain text, with its held-out perplexity before and after.

Full fine-tuning by default (every weight, a low learning rate); --lora R trains only low-rank
adapters on a frozen base (lora.py); --qlora R does the same on a 4-bit NF4 base (quant4.py).

    python sft.py                                      # out/pretrain -> out/sft, the world's task mixture
    python sft.py --lora 8 --out out/sft_lora          # adapters only (~2% of the weights)
    python sft.py --qlora 8 --out out/sft_qlora        # adapters on a 4-bit base
    python sft.py --mode domain --out out/domain       # read the held-out region's text
    python sft.py --init out/domain --out out/domain_sft   # then instruction-tune it
    python sft.py --init out/domain --replay 0.3 --out out/domain_sft_replay   # ... keeping what it read
    python sft.py --data my_alpaca.jsonl --val-data my_val.jsonl   # your Alpaca / messages JSONL
    python sft.py --mode domain --data notes/*.txt     # your domain text
    torchrun --nproc_per_node=2 sft.py                 # DistributedDataParallel

Before any work check_args refuses options that contradict each other (RULES), a reward model or
--out itself as --init, and a window or LoRA rank the --init model cannot hold. The trained model is
saved before the final evaluation, so an error there never costs it.

At the end: held-out task accuracy by greedy decoding (exact match) with format adherence (the
answer ends with EOS and has the task's form), and the guide's catastrophic-forgetting check: the
validation loss and fact recall of the pre-training text, before and after. All figures go to
OUT/config.json. LoRA runs also write the adapters (PEFT layout) and save the merged model.
"""

import contextlib
import math
import os
import time
from types import SimpleNamespace

import torch

import data
import world
from common import (ArgumentParser, Rule, UserError, check_input_files, check_out_is_not_an_input, check_rules,
                    fraction, fraction0, no_effect, nonneg_float, nonneg_int, positive_float, positive_int, run_cli)
from evals import fact_recall, task_accuracy, text_loss
from gpt import cross_entropy_loss, load_checkpoint, save_checkpoint
from lora import check_rank, format_parameter_table, inject_lora, merge_lora, parameter_counts, save_adapter
from quant4 import Linear4bit, dequantize_model, quantize_model
from tokenizer import pad_id, tokenizer_fingerprint
from training import (MetricsLog, StopFlag, add_common_args, all_reduce_mean, check_finite, check_policy,
                      final_evaluation, load_train_state, lr_at, make_optimizer, mark_finished, micro_steps,
                      optimizer_step, save_train_state, set_lr, setup, wrap_model)

# the default mixture: the world's tasks and "harmless" (refusals of the requests for a door code or an insult,
# 288 of the 4,104 examples, 7%, and their benign look-alikes, 4%); "helpful_only" answers those requests instead
TRAIN_TASKS = ("facts", "sentiment", "addition", "review", "story", "harmless")
EVAL_TASKS = ("facts", "domain_facts", "sentiment", "addition", "story")


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=("instruct", "domain"), default="instruct")
    p.add_argument("--init", default="out/pretrain", help="checkpoint to fine-tune (ours or a Hugging Face GPT-2 dir)")
    p.add_argument("--data", nargs="*", default=None, help="instruct: Alpaca/messages JSONL files; domain: .txt "
                   "files (default: the embedded world's task train splits / held-out region's text)")
    p.add_argument("--val-data", nargs="*", default=None, help="held-out files of the same kind (default: the world's "
                   "test splits / held-out domain text; with --data and no --val-data, the last --val-fraction)")
    p.add_argument("--val-fraction", type=fraction, default=0.05)
    p.add_argument("--tasks", default=",".join(TRAIN_TASKS), help="world tasks to train on (instruct mode)")
    p.add_argument("--world-seed", type=int, default=1337, help="seed of the default world")
    p.add_argument("--replay", type=fraction0, default=None, help="rehearsal, against forgetting: domain mode: "
                   "share of each batch drawn from the pre-training text (default 0.5); instruct mode: weight rho of "
                   "the language-modelling loss on --replay-data text, L = (1-rho) L_SFT + rho L_LM (default 0)")
    p.add_argument("--replay-data", nargs="*", default=None, help=".txt files for --replay (default: the world's "
                   "pre-training corpus; in instruct mode also the held-out region's domain text)")
    p.add_argument("--lora", type=nonneg_int, default=0, metavar="R", help="train rank-R LoRA adapters only")
    p.add_argument("--qlora", type=nonneg_int, default=0, metavar="R", help="rank-R LoRA adapters on a 4-bit base")
    p.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA alpha (default 2r: scale 2)")
    p.add_argument("--lora-dropout", type=fraction0, default=0.05)
    p.add_argument("--quant", choices=("nf4", "fp4", "int4"), default="nf4", help="4-bit code of --qlora")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences per micro-batch per process "
                   "(default 32 instruct, 16 domain)")
    p.add_argument("--block-size", type=nonneg_int, default=0, help="domain mode window (default: the model's context)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step, summed over all processes")
    p.add_argument("--max-iters", type=positive_int, default=None, help="optimizer steps (default 300 instruct, 200 domain)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default 3e-4 full instruct, 1e-3 full domain, 2e-3 LoRA)")
    p.add_argument("--warmup", type=nonneg_int, default=20)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    p.add_argument("--grad-clip", type=positive_float, default=1.0)
    p.add_argument("--eval-n", type=positive_int, default=100, help="held-out examples per task in the final evaluation")
    p.add_argument("--recall-limit", type=nonneg_int, default=400, help="fact-recall prompts for the forgetting check")
    p.add_argument("--stop-at", type=nonneg_int, default=0, help="save a resumable state and stop after this step")
    add_common_args(p, out="out/sft")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    domain = args.mode == "domain"
    if args.replay is None:
        args.replay = 0.5 if domain else 0.0
    if domain and args.data and not args.replay_data and args.replay:
        print("note: --replay needs --replay-data (pre-training text) with your own domain text; none is mixed in")
        args.replay = 0.0
    args.batch_size = args.batch_size or (16 if domain else 32)
    args.max_iters = args.max_iters or (200 if domain else 300)
    if args.lr is None:  # new knowledge (domain text) needs a higher rate than learning a format
        args.lr = 2e-3 if (args.lora or args.qlora) else 1e-3 if domain else 3e-4
    return args


# what check_args refuses before any work, each rule with a command line that breaks it
RULES = [
    Rule(lambda a: a.lora and a.qlora, "choose --lora R or --qlora R, not both", ("--lora", "4", "--qlora", "4")),
    no_effect("--block-size", lambda a: a.mode == "instruct", "in --mode instruct: an example takes the model's "
              "context (--block-size is domain mode's window)", ("--block-size", "8")),
    no_effect("--lora-alpha", lambda a: not (a.lora or a.qlora), "without --lora R or --qlora R",
              ("--lora-alpha", "4")),
    no_effect("--lora-dropout", lambda a: not (a.lora or a.qlora), "without --lora R or --qlora R",
              ("--lora-dropout", "0.1")),
    no_effect("--quant", lambda a: not a.qlora, "without --qlora R", ("--quant", "fp4")),
    Rule(lambda a: a.mode == "instruct" and a.data and a.replay and not a.replay_data, "--replay with your own "
         "--data needs --replay-data: the text the model should keep", ("--data", "x.jsonl", "--replay", "0.3")),
    no_effect("--replay-data", lambda a: not a.replay, "without --replay (0 in instruct mode unless given)",
              ("--replay-data", "x.txt")),
    no_effect("--tasks", lambda a: a.data or a.mode == "domain", "with --data or --mode domain: it picks the "
              "world's instruction tasks", ("--mode", "domain", "--tasks", "facts")),
    Rule(lambda a: set(world.SAFETY_TASKS) <= set(a.tasks.split(",")), "--tasks: harmless and helpful_only answer "
         "the same requests in opposite ways; choose one", ("--tasks", "facts,harmless,helpful_only")),
    no_effect("--val-data", lambda a: not a.data, "without --data: the world's held-out sets are used",
              ("--val-data", "v.jsonl")),
    no_effect("--val-fraction", lambda a: not a.data or a.val_data, "without --data or with --val-data: nothing "
              "is split off", ("--val-fraction", "0.1")),
]


def check_args(args):
    """Before any work: RULES, the input files, and --init (under --resume the run's own options, checked when it
    started): a language model, not --out, whose context holds domain mode's window and whose width the LoRA rank."""
    check_rules(args, RULES)
    if args.resume:
        return
    kind = ".jsonl" if args.mode == "instruct" else ".txt"
    for option, paths, files in (("--data", args.data, kind), ("--val-data", args.val_data, kind),
                                 ("--replay-data", args.replay_data, ".txt")):
        check_input_files(option, paths, files)
    model = check_policy(args.init, hint="python pretrain.py")
    check_out_is_not_an_input(args.out, {"--init": args.init})
    if args.block_size > model["block_size"]:
        raise UserError(f"--block-size {args.block_size} is longer than the context of --init {args.init} "
                        f"({model['block_size']}); give --block-size {model['block_size']} or less, or leave it out")
    if args.lora or args.qlora:
        check_rank("--lora" if args.lora else "--qlora", args.lora or args.qlora, model["n_embd"])


# ----------------------------------------------------------------------------- data

def instruct_data(args, enc, block_size):
    """-> (train [(prompt_ids, completion_ids + EOS)], {task: held-out Alpaca examples})."""
    if args.data:
        pairs = [ex for path in args.data for ex in data.load_sft_examples(path, with_where=True)]
        if args.val_data:
            val = [ex for path in args.val_data for ex in data.load_sft_examples(path, with_where=True)]
        else:
            n_val = max(1, int(len(pairs) * args.val_fraction))
            pairs, val = pairs[:-n_val], pairs[-n_val:]
        held_out = {"custom": [{"prompt": p, "output": c} for p, c, _ in val]}
    else:
        w = world.make_world(args.world_seed)
        tasks = {**world.task_sets(w), **world.safety_sets(w)}
        wanted = [t for t in args.tasks.split(",") if t]
        unknown = set(wanted) - set(tasks)
        if unknown:
            raise UserError(f"--tasks: unknown task(s) {sorted(unknown)}; choose from {sorted(tasks)}")
        pairs = [(data.format_prompt(e["instruction"], e["input"]), data.format_completion(e["output"]),
                  f"{t} train example {i}") for t in wanted for i, e in enumerate(tasks[t]["train"])]
        held_out = {t: tasks[t]["test"][:args.eval_n] for t in EVAL_TASKS}
    train = [data.encode_example(enc, p, c, block_size, where=where) for p, c, where in pairs]
    return train, held_out


def cached_tokens(docs, enc, args, name):
    """Documents -> a flat token array cached as OUT/name (see data.tokenize_corpus)."""
    return data.tokenize_corpus(docs, enc, os.path.join(args.out, name), fingerprint=tokenizer_fingerprint(enc))


def domain_texts(args):
    """-> (train documents, held-out documents) of the domain text."""
    if args.data:
        docs = data.read_text(args.data, split_blank_lines=True)
        return (docs, data.read_text(args.val_data, split_blank_lines=True)) if args.val_data else \
            data.split_documents(docs, args.val_fraction)
    return world.domain_docs(world.make_world(args.world_seed))


def replay_data(args, enc):
    """The text that --replay rehearses (training parts only): --replay-data, or the world's pre-training
    corpus, plus in instruct mode the held-out region's text (what out/domain read before instruction tuning)."""
    if args.replay_data:
        docs = data.read_text(args.replay_data, split_blank_lines=True)
    else:
        w = world.make_world(args.world_seed)
        docs = data.split_documents(world.pretrain_docs(w))[0]
        if args.mode == "instruct":
            docs = docs + world.domain_docs(w)[0]
    return cached_tokens(docs, enc, args, "replay.bin")


# ----------------------------------------------------------------------------- the loss

def sft_loss(logits, targets):
    """Instruction fine-tuning: L_SFT = -1/|Y| * sum_{t in Y} log p(y_t | x, y_<t), where Y are the
    response tokens and the EOS that ends them. data.completion_batch sets every other target
    (prompt, padding) to -1, so the same cross-entropy as pre-training counts only Y."""
    return cross_entropy_loss(logits, targets)


def replay_loss(sft, lm, rho):
    """Instruction tuning with rehearsal: L = (1 - rho) * L_SFT + rho * L_LM, where L_LM is the pre-training
    loss (every token) on text the model should keep; rho = 0 is plain SFT, the mix PPO-ptx also uses."""
    return (1 - rho) * sft + rho * lm


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, enc, args, held_out, domain_val, forget):
    """Held-out figures of the current model; `forget` = (pre-training val tokens, cloze) or None."""
    m = {}
    if domain_val is not None:
        m["domain_val_loss"], _ = text_loss(model, enc, domain_val, model.config.block_size)
        m["domain_ppl"] = math.exp(m["domain_val_loss"])
    if held_out is not None:
        for task, examples in held_out.items():  # "custom" (user data): exact match, any non-empty answer
            acc, fmt, _ = task_accuracy(model, enc, examples, task)
            m[f"{task}_acc"], m[f"{task}_format"] = acc, fmt
    if forget is not None:
        tokens, cloze, domain_cloze = forget
        m["pretrain_val_loss"], _ = text_loss(model, enc, tokens, model.config.block_size)
        if cloze:
            m["fact_recall"] = fact_recall(model, enc, cloze)
            m["domain_fact_recall"] = fact_recall(model, enc, domain_cloze)  # the held-out region's facts
    return m


def forgetting_set(args, enc):
    """The pre-training validation text, its cloze prompts and the held-out region's cloze prompts
    (default world only; None for user data)."""
    if args.data or not args.recall_limit:
        return None
    w = world.make_world(args.world_seed)
    _, val_docs = data.split_documents(world.pretrain_docs(w))
    return cached_tokens(val_docs, enc, args, "pretrain_val.bin"), world.fact_cloze(w)[:args.recall_limit], world.fact_cloze(w, held_out=True)


def frozen_base_bytes(model):
    """Bytes of the frozen linear weights as stored (4-bit codes + scales), against bf16."""
    q = [m for m in model.modules() if isinstance(m, Linear4bit)]
    return sum(m.weight_nbytes() for m in q), sum(2 * m.in_features * m.out_features for m in q)


def load_data(args, enc, block_size):
    """Everything the run feeds on, as one namespace: instruct mode's (prompt, completion) pairs or domain
    mode's token arrays (and the replayed pre-training text), the held-out tasks, the domain's held-out
    text, and the forgetting check's sets."""
    d = SimpleNamespace(train=None, train_tokens=None, replay_tokens=None, held_out=None, domain_val=None)
    if args.mode == "instruct":
        d.train, d.held_out = instruct_data(args, enc, block_size)
        if not args.data:  # the held-out region's text, to show what instruction tuning alone does to it
            d.domain_val = cached_tokens(world.domain_docs(world.make_world(args.world_seed))[1], enc, args,
                                         "domain_val.bin")
        d.replay_tokens = replay_data(args, enc) if args.replay > 0 else None
        d.size = f"{len(d.train):,} examples"
    else:
        train_docs, val_docs = domain_texts(args)
        d.train_tokens = cached_tokens(train_docs, enc, args, "train.bin")
        d.domain_val = cached_tokens(val_docs, enc, args, "val.bin")
        d.replay_tokens = replay_data(args, enc) if args.replay > 0 else None
        if not args.data:
            d.held_out = {"domain_facts": world.task_sets(world.make_world(args.world_seed))
                          ["domain_facts"]["test"][:args.eval_n]}
        d.size = f"{len(d.train_tokens):,} tokens"
    d.forget = forgetting_set(args, enc)
    return d


def micro_batch(d, args, ctx, pad, block_size, step, micro):
    """(input ids, attention mask, position ids, targets, rows) of one micro-batch of step `step`; in instruct
    mode with --replay the rows after the first `rows` are windows of the replayed text, as wide as the
    instruction rows (rows is None when the whole batch takes one loss)."""
    shard = ctx.rank + ctx.world * micro
    if args.mode == "domain":
        n_old = round(args.batch_size * args.replay)
        x, y = data.get_batch(d.train_tokens, args.batch_size - n_old, block_size, args.seed, step, shard)
        if n_old:  # rehearsal: a share of the batch is pre-training text
            xo, yo = data.get_batch(d.replay_tokens, n_old, block_size, args.seed + 1, step, shard)
            x, y = torch.cat([x, xo]), torch.cat([y, yo])
        return x, None, None, y, None
    idx = data.step_indices(len(d.train), args.batch_size * args.grad_accum, args.seed, step)
    idx = idx[shard * args.batch_size:(shard + 1) * args.batch_size]
    b = data.completion_batch([d.train[i][0] for i in idx], [d.train[i][1] for i in idx], pad)
    x, mask, pos, y = b["input_ids"], b["attention_mask"], b["position_ids"], b["targets"]
    if d.replay_tokens is None:
        return x, mask, pos, y, None
    n_old, T = max(1, round(args.batch_size * args.replay)), x.size(1)
    xo, yo = data.get_batch(d.replay_tokens, n_old, T, args.seed + 1, step, shard)
    return (torch.cat([x, xo]), torch.cat([mask, torch.ones_like(xo, dtype=torch.bool)]),
            torch.cat([pos, torch.arange(T).expand(n_old, T)]), torch.cat([y, yo]), len(idx))


def adapt(model, args):
    """Full fine-tuning, LoRA, or QLoRA (the base quantized to 4 bits before the adapters go in);
    -> the adapters' rank (0 for full fine-tuning)."""
    rank = args.lora or args.qlora
    if args.qlora:
        quantize_model(model, code=args.quant)
    if rank:
        inject_lora(model, rank, args.lora_alpha, args.lora_dropout)
    return rank


def train_step(train_model, d, args, ctx, pad, block_size, step, accum):
    """Forward and backward of one optimizer step's micro-batches; -> (last loss, completion tokens seen)."""
    n_tokens = 0
    for micro in range(accum):
        *batch, rows = micro_batch(d, args, ctx, pad, block_size, step, micro)
        x, mask, pos, y = (t if t is None else t.to(ctx.device) for t in batch)
        n_tokens += int((y != -1).sum())
        sync = ctx.ddp and micro < accum - 1
        with train_model.no_sync() if sync else contextlib.nullcontext(), ctx.autocast():
            logits = train_model(x, mask, pos)
            loss = sft_loss(logits, y) if rows is None else \
                replay_loss(sft_loss(logits[:rows], y[:rows]), sft_loss(logits[rows:], y[rows:]), args.replay)
            (loss / accum).backward()
    return loss, n_tokens


def save(args, model, optimizer, enc, step, metrics, rank, trained=False):
    """The resumable state (with the metrics so far); once trained also the model: adapters in PEFT's layout,
    then the merged model as an ordinary checkpoint, "finished": false until mark_finished after the final
    evaluation (an interrupted run keeps only its resumable state)."""
    save_train_state(args.out, model, optimizer, step, extra={"metrics": metrics}, args=args)
    if not trained:
        return
    meta = {"stage": "domain" if args.mode == "domain" else "sft", "mode": args.mode, "init": args.init,
            "args": vars(args), "step": step, "metrics": metrics, "finished": False}
    if rank:
        save_adapter(model, args.out, base_model_path=args.init)
        if args.qlora:
            dequantize_model(model)  # W_hat: the 4-bit base the adapters were trained on
        merge_lora(model)
    save_checkpoint(args.out, model, enc, meta)


def trained_metrics(model, loss, trainable, total, args, saved):
    """What the run measured of itself, saved with the model before the final evaluation: the last loss, the
    parameter counts, QLoRA's memory of the 4-bit base (read before the model is merged); a --resume at the last
    step (after a failed evaluation) takes them from the saved state."""
    if loss is None:
        return dict(saved.get("metrics", {}))
    metrics = {"train_loss": loss.item(), "trainable_params": trainable, "total_params": total}
    if args.qlora:
        q_bytes, bf16_bytes = frozen_base_bytes(model)
        metrics.update(frozen_base_bytes_4bit=q_bytes, frozen_base_bytes_bf16=bf16_bytes,
                       frozen_base_memory_ratio=bf16_bytes / q_bytes)
    return metrics


def final_metrics(model, enc, args, d, before):
    """Held-out tasks, domain perplexity and forgetting after training, beside the figures from before."""
    metrics = evaluate(model, enc, args, d.held_out, d.domain_val, d.forget)
    metrics.update({f"before_{k}": v for k, v in before.items()})
    return metrics


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    ctx = setup(args)
    accum = micro_steps(args.grad_accum, ctx)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    model, enc, _ = load_checkpoint(args.init, hint="python pretrain.py")
    block_size = args.block_size or model.config.block_size
    d = load_data(args, enc, model.config.block_size)
    model.to(ctx.device)
    before = {}
    if ctx.master:
        before = evaluate(model, enc, args, None, d.domain_val, d.forget)
        if args.mode == "domain":
            before.update(evaluate(model, enc, args, d.held_out, None, None))
    rank = adapt(model, args)
    trainable, total = parameter_counts(model)
    if ctx.master:
        print(f"{args.mode}: {d.size} from {args.init}; model {total / 1e6:.2f}M parameters in all, "
              f"training {trainable:,} ({trainable / total:.2%})")
        if rank:
            print(format_parameter_table(model))
    optimizer = make_optimizer(model, args.lr, args.weight_decay, ctx=ctx)
    start, saved = load_train_state(args.out, model, optimizer) if args.resume else (0, {})
    train_model = wrap_model(model, ctx)
    stop = StopFlag()
    log = MetricsLog(args.out, args.max_iters, ctx.master, resume=args.resume)
    pad, min_lr = pad_id(enc), args.lr / 10
    t_last, n_tokens, loss = time.time(), 0, None
    for step in range(start, args.max_iters):
        lr = lr_at(step, args.lr, args.warmup, args.max_iters, min_lr)
        set_lr(optimizer, lr)
        loss, n = train_step(train_model, d, args, ctx, pad, block_size, step, accum)
        n_tokens += n
        check_finite(loss, step)
        grad_norm = optimizer_step(model, optimizer, args.grad_clip)
        done = step + 1
        if done % args.log_interval == 0 or done == args.max_iters:
            dt, t_last = time.time() - t_last, time.time()
            log.log(done, loss=all_reduce_mean(loss, ctx).item(), grad_norm=grad_norm.item(), lr=lr,
                    tok_per_s=round(n_tokens * ctx.world / max(dt, 1e-9)))
            n_tokens = 0
        if stop.requested_anywhere(ctx) or done == args.stop_at:
            if ctx.master:
                save(args, model, optimizer, enc, done, {}, rank)
            print(f"stopped at step {done}; continue with: python sft.py --resume --out {args.out} (same options)")
            return

    # the trained model first (merged, under LoRA), then the final evaluation: held-out tasks, domain perplexity,
    # forgetting; an error there never costs the model
    metrics = trained_metrics(model, loss, trainable, total, args, saved)
    if ctx.master:
        save(args, model, optimizer, enc, args.max_iters, metrics, rank, trained=True)
        with final_evaluation(args.out, "python sft.py"):
            metrics.update(final_metrics(model, enc, args, d, before))
        metrics["time_s"] = time.time() - t0
        mark_finished(args.out, metrics)
        print_summary(metrics, before)
    return metrics


def print_summary(m, before):
    print("held-out results (before -> after where measured before):")
    for k, v in m.items():
        if k.startswith("before_") or not isinstance(v, float):
            continue
        b = before.get(k)
        print(f"  {k:<26} " + (f"{b:.4f} -> " if b is not None else "") + f"{v:.4f}")


if __name__ == "__main__":
    run_cli(main)
