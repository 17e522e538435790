"""What every training stage's loop needs, written once: device and precision, the
optimizer and its learning-rate schedule, DistributedDataParallel and sharing work across processes,
resumable training state, one-line logs with metrics.jsonl, clean stops on Ctrl-C / SIGTERM / a
non-finite loss, the pre-flight checks of a stage's checkpoints and context, and the final evaluation
that runs only after the trained model is saved (the one-line error for bad input is common.run_cli's).

Nothing here is a trainer: each stage writes its own loop, top to bottom, and calls these
small functions where it needs them.
"""

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from safetensors import safe_open

import hf
from common import (UserError, atomic_save_safetensors, atomic_write, atomic_write_json, check_checkpoint_dir,
                    check_device, claim_output_dir, nonneg_float, nonneg_int, note_stop_signal, positive_float,
                    positive_int, read_safetensors, unwrap)
from gpt import read_config


# ----------------------------------------------------------------------------- CLI and device

# --resume takes back the options of the run it continues (saved with its state), except those that
# belong to this command alone. Of the options typed again, these may differ: where and how fast it
# runs, how often it logs, how long it trains, how much the final evaluation measures. Any other one
# typed differently (data, model, optimizer, seeds) is refused.
RESUME_NOT_SAVED = {"out", "resume", "force", "stop_at"}
RESUME_MAY_CHANGE = {"device", "compile", "threads", "log_interval", "eval_interval", "max_iters", "iters",
                     "recall_limit", "eval_n", "eval_limit", "eval_tokens", "eval_prompts", "eval_batch"}


def add_common_args(p, out):
    g = p.add_argument_group("common")
    g.add_argument("--out", default=out, help="output checkpoint directory")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | mps")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT where it stopped, with the "
                   "data, model and optimizer options it was started with")
    g.add_argument("--force", action="store_true", help="start afresh in an OUT that holds a stopped run, "
                   "discarding its resumable state (without it such an OUT is refused)")
    g.add_argument("--log-interval", type=positive_int, default=10, help="steps between log lines")
    add_threads_arg(g)
    return p


def add_threads_arg(p):
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads, 0 = torch's default (one "
                   "per core); use 1 when other work shares the cores: much faster then")


def add_optimizer_args(p, lr, min_lr, warmup, weight_decay=0.0):
    """AdamW and its schedule, with this stage's defaults: --lr, --min-lr, --warmup, --weight-decay, --grad-clip."""
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=positive_float, default=lr, help="peak learning rate")
    g.add_argument("--min-lr", type=nonneg_float, default=min_lr, help="learning rate at the last step (cosine decay)")
    g.add_argument("--warmup", type=nonneg_int, default=warmup, help="steps of linear warm-up")
    g.add_argument("--weight-decay", type=nonneg_float, default=weight_decay, help="AdamW weight decay of the matrices")
    g.add_argument("--grad-clip", type=positive_float, default=1.0, help="clip the gradient norm to this")
    return p


def setup(args):
    """Threads, device, precision, seeds, (under torchrun) the process group; then the output directory
    checked and locked, and for --resume the saved options taken back, all before any work."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = check_device(args.device)
    rank, world = 0, 1
    if ddp:
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    if rank == 0 and getattr(args, "out", None):
        claim_output_dir(args.out)
        if hasattr(args, "force"):
            check_stopped_run(args.out, args.resume, args.force)
    if getattr(args, "resume", False):
        resume_options(args, rank == 0)
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    use_compile = cuda if args.compile is None else args.compile
    return SimpleNamespace(device=device, cuda=cuda, ddp=ddp, rank=rank, world=world, master=rank == 0,
                           compile=use_compile, autocast=lambda: autocast(cuda))


def autocast(cuda):
    """A fresh precision context for one forward pass: bf16 autocast on CUDA, nothing elsewhere. Fresh per use
    (ctx.autocast() makes a new one each call): one torch.autocast object entered twice, nested, remembers
    the state of its second entry (on) as the one to restore, so autocast stays on after the outer block.
    Backward and the optimizer step run outside it."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


def check_stopped_run(out, resume, force):
    """A fresh run (no --resume) on an OUT that holds a stopped run's resumable state is refused, so a
    forgotten --resume never throws that run away; --force starts afresh and says the state is discarded."""
    if resume or not os.path.exists(state_path(out)) or run_finished(out):
        return
    step = read_state_meta(out)["step"]
    if not force:
        raise UserError(f"{out} holds a run stopped at step {step}: continue it with --resume, or start "
                        "afresh with --force (its saved state is then discarded)")
    os.remove(state_path(out))
    print(f"--force: the resumable state of the run stopped at step {step} in {out} is discarded")


def micro_steps(grad_accum, ctx):
    """Micro-batches each process runs per optimizer step: --grad-accum counts them summed over all
    processes, so the effective batch is the same for any number of processes."""
    if grad_accum % ctx.world:
        raise UserError(f"--grad-accum {grad_accum} must be a multiple of the {ctx.world} processes")
    return grad_accum // ctx.world


def wrap_model(model, ctx, compile=None):
    """torch.compile and DDP as the context asks (compile=False: never, for a model whose input shapes change
    every step); returns the model to call in the loop."""
    if ctx.compile if compile is None else compile:
        model = torch.compile(model)
    if ctx.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.cuda else None)
    return model


def all_reduce_mean(x, ctx):
    """The mean of x over the processes (x itself in one process)."""
    if ctx is not None and ctx.ddp:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG if ctx.cuda else dist.ReduceOp.SUM)
        if not ctx.cuda:
            x /= ctx.world
    return x


def all_reduce_max(x, ctx):
    """The largest x of the processes, elementwise (x itself in one process)."""
    if ctx is not None and ctx.ddp:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x



# ----------------------------------------------------------------------------- pre-flight checks of a checkpoint

def init_model(path, option="--init", hint=""):
    """-> (GPTConfig fields, stage) of a checkpoint, ours or a Hugging Face GPT-2 directory, from its
    config.json alone (no weight is read): what a stage's check_args compares its options with."""
    check_checkpoint_dir(path, option)
    config = read_config(path, hint)
    if hf.is_hf_config(config):
        return hf.config_from_hf(config, os.path.join(path, "config.json")), "hf_import"
    if not isinstance(config.get("model"), dict):
        raise UserError(f"{path}/config.json has no 'model' entry: not a checkpoint of this project")
    return config["model"], config.get("stage")


def check_policy(path, option="--init", hint=""):
    """A checkpoint a language model trains or samples from, never a reward model (its trunk scores text, it
    was not trained to write it) -> its GPTConfig fields."""
    model, stage = init_model(path, option, hint)
    if stage == "reward":
        raise UserError(f"{option} {path} is a reward model (reward.py: it scores text, it does not write it); "
                        "pass a language model: the SFT or pre-trained checkpoint it was trained from")
    return model


def check_prompts_fit(option, prompts, enc, block_size):
    """Prompts (strings) the run answers leave room for an answer in the model's context; one line naming the
    option, checked before any step."""
    longest = max((len(enc.encode_ordinary(p)) for p in prompts), default=0)
    if longest >= block_size:
        raise UserError(f"{option}: a prompt of {longest} tokens leaves no room for an answer in the model's "
                        f"context of {block_size}; shorten the prompts")


def mark_finished(out, metrics, **entries):
    """The last write of a run: OUT/config.json with the final metrics (and entries) and "finished": true; the
    model and the resumable state were saved before the final evaluation and stay as they are."""
    config = read_config(out)
    config.update(entries, metrics=metrics, finished=True)
    atomic_write_json(config, os.path.join(out, "config.json"))


@contextlib.contextmanager
def final_evaluation(out, command):
    """Around the final evaluation, which runs after the trained model, its config and metrics are saved: an
    error there (a bug, a prompt too long) ends in one line saying the model is kept and how to evaluate it
    again (--resume: the run is saved at its last step, not yet marked finished); a traceback goes to
    OUT/eval_error.txt."""
    again = f"the trained model is saved in {out}; `{command} --resume --out {out}` runs the evaluation again"
    try:
        yield
    except UserError as e:
        raise UserError(f"the final evaluation failed: {e}; {again}") from None
    except Exception as e:
        atomic_write(os.path.join(out, "eval_error.txt"), traceback.format_exc())
        raise UserError(f"the final evaluation failed ({type(e).__name__}: {e}; traceback in "
                        f"{os.path.join(out, 'eval_error.txt')}); {again}") from None


# ----------------------------------------------------------------------------- sharing work across processes

def rank_slice(n, ctx=None):
    """This process's contiguous share [lo, hi) of n items: ceil(n / world) each (the last fewer); all of them
    without torchrun."""
    if ctx is None or not ctx.ddp:
        return 0, n
    m = -(-n // ctx.world)
    return min(n, ctx.rank * m), min(n, (ctx.rank + 1) * m)


def gather_rows(x, n, ctx=None):
    """Each process's rows x of rank_slice(n) -> all n rows in order, on every process."""
    if ctx is None or not ctx.ddp:
        return x
    m = -(-n // ctx.world)
    padded = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=ctx.device)  # all_gather needs equal sizes
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded)
    counts = [max(0, min(n, (r + 1) * m) - r * m) for r in range(ctx.world)]
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)


def chunk_seed(seed, k, stream=0):
    """The generator seed of chunk k of a stream of work (an RL iteration's rollout, a data split; 0 for a
    one-off set such as a held-out evaluation): a pure function of (seed, k, stream), so a chunk's samples do not
    depend on which process draws it, nor on the chunks drawn before it. Chunk 0 of stream 0 keeps `seed`, so a
    set that fits one chunk samples as one generator seeded with `seed` does."""
    return (seed + 1_000_003 * k + 1_000_000_007 * stream) % 2 ** 63


def check_divisible(n, option, ctx):
    """Every process takes an equal share of n items (a minibatch): n must be a multiple of the process count."""
    if n % ctx.world:
        raise UserError(f"{option} {n} must be a multiple of the {ctx.world} processes: each takes an equal share")


def all_gather_json(obj, ctx):
    """-> [each process's obj], in rank order, on every process: JSON bytes in uint8 tensors (no pickle),
    padded to the longest for all_gather."""
    if ctx is None or not ctx.ddp:
        return [obj]
    device = ctx.device if ctx.cuda else "cpu"  # NCCL moves CUDA tensors only
    raw = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros((), dtype=torch.long, device=device) for _ in range(ctx.world)]
    dist.all_gather(sizes, torch.tensor(len(raw), device=device))
    longest = max(int(n) for n in sizes)
    parts = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(ctx.world)]
    dist.all_gather(parts, torch.cat([raw, raw.new_zeros(longest - len(raw))]))
    return [json.loads(bytes(p[:int(n)].tolist()).decode()) for p, n in zip(parts, sizes)]


def my_chunks(n, size, ctx=None):
    """[(k, lo, hi)] of the chunks of `size` items (the last one fewer) this process handles: chunk k by process
    k mod N; every chunk without torchrun."""
    rank, world = (ctx.rank, ctx.world) if ctx is not None and ctx.ddp else (0, 1)
    return [(k, lo, min(lo + size, n)) for k, lo in enumerate(range(0, n, size)) if k % world == rank]


def gather_chunks(mine, ctx=None):
    """{k: [results of chunk k]} of this process -> the results of every chunk in order, on every process
    (JSON through all_gather_json under torchrun: token ids and floats travel exactly)."""
    parts = all_gather_json(mine, ctx) if ctx is not None and ctx.ddp else [mine]
    chunks = {int(k): v for part in parts for k, v in part.items()}
    return [x for k in sorted(chunks) for x in chunks[k]]


# ----------------------------------------------------------------------------- optimizer and schedule

def make_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.95), ctx=None):
    """AdamW over the trainable parameters; weight decay on matrices only (not on biases,
    LayerNorm gains or other vectors). Fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = bool(ctx is not None and ctx.cuda)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def optimizer_step(model, optimizer, grad_clip):
    """Clip the norm of the trainable parameters' gradient to grad_clip, step, zero the gradients;
    -> the norm before clipping (what the logs call grad_norm)."""
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def lr_at(step, max_lr, warmup, total, min_lr):
    """Linear warm-up to max_lr over `warmup` steps (starting above zero), then cosine decay
    to min_lr at the last step:  lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if total <= warmup + 1:
        return max_lr
    progress = min(1.0, (step - warmup) / (total - 1 - warmup))
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


def check_finite(loss, step):
    """A NaN or inf loss stops the run; the last checkpoint on disk stays as it was."""
    if not torch.isfinite(loss).all():
        raise UserError(f"loss is {loss.item()} at step {step}: training stopped, the last good checkpoint "
                        "is kept; lower the learning rate or check the data")


# ----------------------------------------------------------------------------- resumable state

def state_path(out_dir):
    return os.path.join(out_dir, "resume", "state.safetensors")


def read_state_meta(out_dir):
    """The JSON header of OUT/resume/state.safetensors (step, options, ...) without reading the tensors."""
    path = state_path(out_dir)
    if not os.path.exists(path):
        raise UserError(f"--resume: no training state in {os.path.dirname(path)}; run without --resume first")
    try:
        with safe_open(path, framework="pt") as f:
            return json.loads(f.metadata()["state"])
    except Exception:  # a truncated or foreign file
        raise UserError(f"{path}: not a training state written by this project") from None


def run_finished(out_dir):
    """config.json is the done-marker: a checkpoint saved mid-run says "finished": false."""
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            return json.load(f).get("finished", True) is not False
    except (OSError, ValueError):
        return False


def _option(key):
    return "--" + key.replace("_", "-")


def resume_options(args, master=True):
    """--resume: take the options of the run being continued (its data, model, optimizer), refuse one
    typed differently, and say when the run is finished already (exit 0) or --max-iters is behind it
    (the first process alone says it)."""
    meta = read_state_meta(args.out)
    step, saved, given = meta["step"], meta.get("args", {}), getattr(args, "given", frozenset())
    for key, then in saved.items():
        if key in RESUME_NOT_SAVED or not hasattr(args, key):
            continue
        now = json.loads(json.dumps(getattr(args, key)))
        if now == then or (key in given and key in RESUME_MAY_CHANGE):
            continue
        if key in given:
            raise UserError(f"{_option(key)} {now} differs from the run in {args.out} ({then}); --resume "
                            f"continues a run with its own options: drop {_option(key)}, or choose another --out")
        setattr(args, key, then)
    length = "iters" if hasattr(args, "iters") else "max_iters"
    longer = length in given and getattr(args, length) > step
    if run_finished(args.out) and not longer:
        if master:
            print(f"{args.out} holds a finished run ({step} steps): nothing to resume; a larger {_option(length)} "
                  "continues it")
        sys.exit(0)
    if length in given and getattr(args, length) and not longer:
        raise UserError(f"{_option(length)} {getattr(args, length)}: the run in {args.out} is at step {step} "
                        f"already; give a larger {_option(length)}")
    if master:
        print(f"resuming {args.out} at step {step} with the options it was started with")


def save_train_state(out_dir, model, optimizer, step, extra=None, args=None):
    """OUT/resume/state.safetensors: trainable weights, optimizer moments, RNG states, and (as JSON in
    its header) the step, hyper-parameters and the run's options (args, which --resume takes back);
    written atomically, no pickle. With it --resume continues bit for bit on CPU."""
    d = os.path.join(out_dir, "resume")
    os.makedirs(d, exist_ok=True)
    model = unwrap(model)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    groups = []
    for g in optimizer.param_groups:
        groups.append({k: v for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in g["params"]]})
        for p in g["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                tensors[f"opt.{names[id(p)]}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    # One file, so a kill mid-write leaves the previous state whole: the JSON part rides in the header.
    state = {"step": step, "param_groups": groups, "python_rng": random.getstate(), "extra": extra or {},
             "args": vars(args) if args is not None else {}}
    atomic_save_safetensors(tensors, os.path.join(d, "state.safetensors"), metadata={"state": json.dumps(state)})


def load_train_state(out_dir, model, optimizer):
    """-> (step, extra). Restores what save_train_state wrote."""
    d = os.path.join(out_dir, "resume")
    path = os.path.join(d, "state.safetensors")
    if not os.path.exists(path):
        raise UserError(f"--resume: no training state in {d}; run without --resume first")
    tensors = read_safetensors(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: not a training state written by this project") from None
    model = unwrap(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            if p.requires_grad:
                if f"model.{n}" not in tensors:
                    raise UserError(f"--resume: {d} lacks weights for {n}; it was made by another model or mode")
                p.copy_(tensors[f"model.{n}"])
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise UserError(f"--resume: {d} was made with another optimizer setup")
    for g, saved in zip(optimizer.param_groups, meta["param_groups"]):
        for k, v in saved.items():
            if k != "params":
                g[k] = tuple(v) if isinstance(g.get(k), tuple) else v
        for n in saved["params"]:
            p = params[n]
            state = {k.split(".")[-1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt.{n}.")
                     and k[len(f"opt.{n}."):].count(".") == 0}
            if state:
                optimizer.state[p] = state
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    py = meta["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return meta["step"], meta["extra"]


# ----------------------------------------------------------------------------- stopping and logging

class StopFlag:
    """Ctrl-C or SIGTERM sets .requested; the loop checks it, saves a resumable state and exits. Under
    torchrun a signal may reach one process only: requested_anywhere is the decision they all take."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        note_stop_signal(signum)  # the stage saves, returns, and run_cli exits 128 + signum: not finished
        print(f"\n{signal.Signals(signum).name}: saving a resumable state, then stopping "
              "(press again to stop at once)", file=sys.stderr, flush=True)

    def requested_anywhere(self, ctx):
        """True on every process when any process was asked to stop: one all_reduce (MAX) of the flag, so
        every process leaves the loop at the same step and none waits for the others in a collective."""
        if ctx is None or not ctx.ddp:
            return self.requested
        flag = torch.tensor(float(self.requested), device=ctx.device if ctx.cuda else "cpu")
        return bool(all_reduce_max(flag, ctx).item())


class MetricsLog:
    """One line per log interval on stdout, the same records in OUT/metrics.jsonl. After --resume the
    ETA counts only the steps run since the resumed step, and records past that step (written before
    a crash, then lost) are dropped."""

    def __init__(self, out_dir, total, master=True, resume=False):
        self.path, self.total, self.master = os.path.join(out_dir, "metrics.jsonl"), total, master
        self.t0, self.start = time.time(), 0
        if resume and os.path.exists(state_path(out_dir)):
            self.start = read_state_meta(out_dir)["step"]
        if master:
            os.makedirs(out_dir, exist_ok=True)
            if not resume and os.path.exists(self.path):
                os.remove(self.path)
            elif resume and os.path.exists(self.path):
                kept = [line for line in open(self.path) if line.strip()
                        and json.loads(line).get("step", 0) <= self.start]
                atomic_write(self.path, "".join(kept))

    def log(self, step, **metrics):
        if not self.master:
            return
        elapsed = time.time() - self.t0
        done = step - self.start
        eta = elapsed / done * max(self.total - step, 0) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total}"]
        for k, v in metrics.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"elapsed {elapsed:.0f}s eta {eta:.0f}s")
        print(" | ".join(parts), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "elapsed": round(elapsed, 3), **metrics}) + "\n")
