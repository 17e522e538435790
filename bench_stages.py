"""bench.py's stages section (--only stages): runs the stage files themselves as subprocesses on a random
model of the bench shape, saved with a byte-level BPE grown to the model's vocabulary (so every sampled id
decodes), and on small files made from the default world: full SFT, LoRA, QLoRA, the reward model, DPO
and PPO, --stage-steps steps each. Seconds per step come from each run's metrics.jsonl (logged every step,
so loading and the final evaluation are left out); peak RSS is the process's own (wait4's ru_maxrss).
"""

import json
import os
import subprocess
import sys
import time

import data
import world
from bench_common import fmt, mib, table
from gpt import save_checkpoint
from tokenizer import encoding_from_merges, train_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))


def grown_tokenizer(text, n_vocab):
    """A byte-level BPE learned on text (at most 4096 tokens), then grown to exactly n_vocab tokens by extra
    merges of two learned tokens into a new byte string, so that every id a random model of that vocabulary
    samples decodes. The extra merges rank after the learned ones: the text is still split as learned."""
    enc = train_tokenizer(text, min(n_vocab, 4096))
    merges, vocab = list(enc._merges), [bytes([b]) for b in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    seen, learned = set(vocab), range(256, len(vocab))
    for a in learned:
        for b in learned:
            if 256 + len(merges) + 2 >= n_vocab:
                break
            if vocab[a] + vocab[b] not in seen:
                seen.add(vocab[a] + vocab[b])
                merges.append((a, b))
    grown = encoding_from_merges(merges, name=f"bpe{256 + len(merges) + 2}")
    grown._merges = merges
    return grown


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def stage_fixture(model, d, seed):
    """d/init: the model with a grown BPE; d/sft*.jsonl (Alpaca rows), d/pairs/{train,val}.jsonl (prompt,
    chosen, rejected), d/prompts.jsonl: the default world's review tasks, a few dozen rows each."""
    w = world.make_world(seed)
    enc = grown_tokenizer("\n\n".join(world.pretrain_docs(w)[:400]), model.config.vocab_size)
    save_checkpoint(os.path.join(d, "init"), model, enc, {"stage": "bench", "args": {}, "metrics": {}})
    review = world.task_sets(w)["review"]
    train, val = review["train"][:64], review["val"][:8]
    write_jsonl(os.path.join(d, "sft.jsonl"), train)
    write_jsonl(os.path.join(d, "sft_val.jsonl"), val[:2])
    os.makedirs(os.path.join(d, "pairs"), exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        write_jsonl(os.path.join(d, "pairs", f"{name}.jsonl"), [
            {"prompt": data.format_prompt(e["instruction"], e["input"]), "chosen": data.format_completion(e["output"]),
             "rejected": data.format_completion(rows[(i + 1) % len(rows)]["output"])} for i, e in enumerate(rows)])
    write_jsonl(os.path.join(d, "prompts.jsonl"), [{"prompt": data.format_prompt(e["instruction"], e["input"])}
                                                   for e in train[:16]])


def stage_commands(d, steps, device):
    """(name, stage file, arguments): a few steps each, small batches, a log line every step, evaluations cut short."""
    n, common = str(steps), ["--device", device, "--log-interval", "1", "--warmup", "1"]
    sft = ["--init", f"{d}/init", "--data", f"{d}/sft.jsonl", "--val-data", f"{d}/sft_val.jsonl", "--batch-size", "4",
           "--max-iters", n, "--eval-n", "1", "--recall-limit", "0"] + common
    pairs = ["--init", f"{d}/init", "--data", f"{d}/pairs/train.jsonl", "--batch-size", "4", "--max-iters", n] + common
    return [("SFT full", "sft.py", sft + ["--out", f"{d}/sft"]),
            ("SFT LoRA r=8", "sft.py", sft + ["--lora", "8", "--out", f"{d}/lora"]),
            ("SFT QLoRA r=8 (NF4)", "sft.py", sft + ["--qlora", "8", "--out", f"{d}/qlora"]),
            ("reward model (all)", "reward.py", pairs + ["--out", f"{d}/reward"]),
            ("DPO", "dpo.py", pairs + ["--eval-prompts", "none", "--out", f"{d}/dpo"]),
            ("PPO (iteration)", "ppo.py", ["--init", f"{d}/init", "--reward", f"{d}/reward", "--prompts",
             f"{d}/prompts.jsonl", "--iters", n, "--rollout-batch", "4", "--minibatch", "4", "--ppo-epochs", "1",
             "--max-new-tokens", "32", "--eval-prompts", "none", "--out", f"{d}/ppo"] + common)]


def run_stage(script, argv, out):
    """-> (exit code, seconds per step from out/metrics.jsonl, peak RSS bytes of the stage process, wall seconds)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        print(f"  {script} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    path = os.path.join(out, "metrics.jsonl")
    logs = [r for r in (json.loads(l) for l in open(path)) if "lr" in r] if os.path.exists(path) else []
    per_step = (logs[-1]["elapsed"] - logs[0]["elapsed"]) / (logs[-1]["step"] - logs[0]["step"]) if len(logs) > 1 else None
    return proc.returncode, per_step, usage.ru_maxrss * 1024, time.time() - t0  # ru_maxrss: KiB on Linux


def bench_stages(args, ctx, model):
    d = os.path.abspath(args.stage_out)
    os.makedirs(d, exist_ok=True)
    stage_fixture(model, d, args.seed)
    rows = []
    for name, script, argv in stage_commands(d, args.stage_steps, ctx.device.split(":")[0]):
        rc, per_step, rss, wall = run_stage(script, argv, argv[argv.index("--out") + 1])
        rows.append({"stage": name, "command": f"python {script} " + " ".join(argv).replace(d, "$D"), "exit": rc,
                     "s_per_step": per_step, "peak_rss_bytes": rss, "wall_s": round(wall, 1)})
        print(f"  {name}: {fmt(per_step)} s/step, peak RSS {fmt(mib(rss))} MiB, {wall:.0f}s in all", flush=True)
    qlora = os.path.join(d, "qlora", "config.json")
    if os.path.exists(qlora):
        m = json.load(open(qlora))["metrics"]
        rows.append({"stage": "QLoRA frozen base", "frozen_base_bytes_4bit": m["frozen_base_bytes_4bit"],
                     "frozen_base_bytes_bf16": m["frozen_base_bytes_bf16"], "ratio": m["frozen_base_memory_ratio"]})
    return rows


def print_stages(st, args):
    table(f"the stage files, {args.stage_steps} steps each (s/step from metrics.jsonl; PPO: s per iteration)",
          ["stage", "s/step", "peak RSS MiB", "exit"],
          [[r["stage"], r["s_per_step"], mib(r["peak_rss_bytes"]), r["exit"]] for r in st if "exit" in r])
    for r in st:
        if "ratio" in r:
            print(f"QLoRA frozen base: {fmt(mib(r['frozen_base_bytes_4bit']))} MiB 4-bit vs "
                  f"{fmt(mib(r['frozen_base_bytes_bf16']))} MiB bf16 = {r['ratio']:.2f}x smaller")
