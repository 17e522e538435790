"""The CUDA path in one go: every stage at a small size on the GPU (bf16 autocast, TF32, fused AdamW,
torch.compile), each checked against the same command on CPU in float32, then bench.py's GPT-2 124M
figures compiled and eager. One JSON and one markdown table under --work.

    python gpu_check.py --device cuda                              # the whole check, at most ~8 minutes
    python gpu_check.py --device cuda --stages sft_qlora,ppo --skip-bench   # rerun some stages only
    python gpu_check.py --device cpu --tiny                        # the same plan at toy size, CPU only (~1 min)

Per stage (pretrain, sft, sft_lora, sft_qlora, reward, dpo, ppo, and grpo when grpo.py exists):
  1. the reference: the stage's own command line on CPU, float32, one log line per step (--log-interval 1);
  2. the device run: the same command with --device DEVICE, starting from the same inputs (the reference
     runs' checkpoints are every --init), so a difference comes from the device and its precision only;
  3. the check: the first N_LOSSES losses of OUT/metrics.jsonl of both runs,
         |loss_device - loss_cpu| <= ATOL + RTOL * |loss_cpu|        (RTOL 1%, ATOL 0.005 nats).
Why 1%: bf16 keeps 8 significant bits, so each product and activation rounds by up to 2^-9 = 0.2%
relative, but matmuls accumulate in float32 and the loss is taken in float32 from the logits
(gpt.cross_entropy_loss), so the errors average out: on CPU, bf16 autocast moves three AdamW steps of a
small GPT by about 0.01% (tests/test_gpu_check.py, the test named bf16).
1% leaves room for CUDA's other kernels (TF32 matmuls, flash attention, torch.compile's fused kernels)
and still catches what a device or dtype bug does to a loss: counting the wrong tokens, reading a
reward at a pad token, an overflow to inf, a weight left in the wrong dtype.
Sampled stages (ppo.py, grpo.py) draw their completions from the device's random generator, and CUDA's
and the CPU's streams differ, so their losses cannot be compared; for them the check is that every
logged number is finite and that the first iteration's KL to the reference is ~0 (policy = reference
then, on every device): |kl| <= KL_TOL.

Then bench.py --preset gpt2 (tokens/s, MFU, peak memory, KV-cached sampling, DPO/PPO step costs) with
--compile, and its training section again with --no-compile, to show what torch.compile gains. On CPU
the compiled run is skipped (inductor needs about a minute even at toy size) and --tiny shrinks the model.

Time: each run has its own timeout and the whole check a budget (--budget, default 480 s, of which
--bench-reserve is kept for the benchmark): a run gets at most what is left; once the budget is spent the
remaining runs are reported as skipped. A crash or timeout is reported with the tail of its stderr and
the check goes on with the next stage. Exit code 0 when every stage that ran passed, 1 otherwise.
Writes WORK/gpu_check.json (every figure, every command), WORK/gpu_check.md (the tables, also printed),
WORK/reference/STAGE, WORK/device/STAGE (each run's OUT, stdout.log and stderr.log), WORK/bench/*.json.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time

import torch

from common import UserError, run_cli
from world import make_world, review_pairs

ROOT = os.path.dirname(os.path.abspath(__file__))
N_LOSSES = 3        # first logged losses compared per stage
RTOL, ATOL = 0.01, 0.005
KL_TOL = 0.05       # nats per sequence, first PPO/GRPO iteration
MFU_TARGET = 0.40   # GPT-2 124M pre-training in bf16 (llm.c's level on an H100)
STAGES = ("pretrain", "sft", "sft_lora", "sft_qlora", "reward", "dpo", "ppo", "grpo")

# Sizes: `small` is the GPU check, `tiny` the CPU test. Every stage logs every step and skips the slow
# end-of-run evaluations that no loss depends on.
PLANS = {
    "small": {
        "pretrain": "--n-layer 2 --n-head 4 --n-embd 128 --vocab-size 512 --block-size 256 --batch-size 16 "
                    "--max-iters 10 --warmup 1 --eval-interval 1000 --eval-tokens 8192 --recall-limit 20",
        "sft": "--batch-size 16 --max-iters 5 --warmup 1 --eval-n 4 --recall-limit 0",
        "lora_r": 8,
        "reward": "--batch-size 16 --max-iters 5 --warmup 1 --eval-interval 1000",
        "dpo": "--batch-size 8 --max-iters 5 --warmup 1 --eval-prompts none",
        "rl": "--iters 2 --rollout-batch 16 --minibatch 8 --max-new-tokens 24 --eval-prompts none",
        "bench": "--preset gpt2",
        "timeout_reference": 120, "timeout_device": 150, "timeout_bench_compile": 240, "timeout_bench_eager": 120,
    },
    "tiny": {
        "pretrain": "--n-layer 1 --n-head 2 --n-embd 32 --vocab-size 300 --block-size 256 --batch-size 4 "
                    "--max-iters 3 --warmup 1 --eval-interval 1000 --eval-tokens 256 --recall-limit 0",
        "sft": "--batch-size 4 --max-iters 3 --warmup 1 --eval-n 1 --recall-limit 0",
        "lora_r": 4,
        "reward": "--batch-size 4 --max-iters 3 --warmup 1 --eval-interval 1000 --eval-batch 16",
        "dpo": "--batch-size 4 --max-iters 3 --warmup 1 --eval-prompts none",
        "rl": "--iters 1 --rollout-batch 4 --minibatch 2 --max-new-tokens 6 --eval-prompts none",
        "bench": "--n-layer 1 --n-head 2 --n-embd 32 --block-size 64 --vocab-size 256 --batch-size 2 --grpo-group 2 --steps 1 "
                 "--repeats 1 --warmup 1 --new-tokens 8 --sample-batches 1,2 --prompt-len 4 --sample-repeats 1 "
                 "--rl-prompt-len 8 --rl-completion-len 8 --lora-r 2",
        "timeout_reference": 120, "timeout_device": 120, "timeout_bench_compile": 120, "timeout_bench_eager": 120,
    },
}


# ----------------------------------------------------------------------------- the checks

def within_tolerance(device_value, cpu_value, rtol=RTOL, atol=ATOL):
    """|device - cpu| <= atol + rtol * |cpu| (numpy's allclose rule), and both finite."""
    if not (math.isfinite(device_value) and math.isfinite(cpu_value)):
        return False
    return abs(device_value - cpu_value) <= atol + rtol * abs(cpu_value)


def compare_losses(device_losses, cpu_losses, n=N_LOSSES, rtol=RTOL, atol=ATOL):
    """The first n losses of the two runs, pairwise within tolerance -> {passed, max_abs_diff, max_rel_diff, why}."""
    if len(device_losses) < n or len(cpu_losses) < n:
        return {"passed": False, "why": f"fewer than {n} losses logged (device {len(device_losses)}, "
                                        f"cpu {len(cpu_losses)})"}
    pairs = list(zip(device_losses[:n], cpu_losses[:n]))
    diffs = [abs(d - c) for d, c in pairs]
    out = {"passed": all(within_tolerance(d, c, rtol, atol) for d, c in pairs), "max_abs_diff": max(diffs),
           "max_rel_diff": max(abs(d - c) / max(abs(c), 1e-12) for d, c in pairs)}
    if not out["passed"]:
        bad = next(i for i, (d, c) in enumerate(pairs) if not within_tolerance(d, c, rtol, atol))
        out["why"] = (f"step {bad + 1}: device {pairs[bad][0]:.5g} vs cpu {pairs[bad][1]:.5g}, "
                      f"beyond {atol} + {rtol:.0%} of cpu")
    return out


def check_sampled(records, kl_tol=KL_TOL):
    """A sampled stage's log: every number finite, and the first iteration's KL to the reference within
    kl_tol of 0 (when the stage logs one) -> {passed, why}."""
    if not records:
        return {"passed": False, "why": "nothing logged"}
    bad = [f"{k} at step {r['step']}" for r in records for k, v in r.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        return {"passed": False, "why": "not finite: " + ", ".join(bad[:4])}
    kl = records[0].get("kl")
    if kl is not None and abs(kl) > kl_tol:
        return {"passed": False, "why": f"KL to the reference {kl:.4g} at the first iteration, where policy = "
                                        f"reference (|kl| <= {kl_tol} expected)"}
    return {"passed": True, "first_kl": kl}


def compile_gain(compiled_tokens_per_s, eager_tokens_per_s):
    """Speed-up of torch.compile: compiled tokens/s / eager tokens/s (None when either is missing)."""
    if not compiled_tokens_per_s or not eager_tokens_per_s:
        return None
    return compiled_tokens_per_s / eager_tokens_per_s


# ----------------------------------------------------------------------------- running the stages

class Budget:
    """Seconds left of the whole check; a run gets min(its own timeout, what is left minus a reserve)."""

    def __init__(self, seconds):
        self.deadline = time.time() + seconds

    def allow(self, timeout, reserve=0.0):
        return min(timeout, self.deadline - reserve - time.time())


def start_logged(cmd, log_dir, env=None):
    """Starts cmd in its own process group (environment += env), stdout/stderr to log_dir."""
    os.makedirs(log_dir, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    err_path = os.path.join(log_dir, "stderr.log")
    with open(os.path.join(log_dir, "stdout.log"), "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, start_new_session=True, env=env)
    return {"proc": proc, "cmd": cmd, "t0": time.time(), "err_path": err_path}


def stop_group(proc):
    """Kills a started run's process group (the stage and any compile workers it started), if still running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.wait()


def finish_logged(run, timeout):
    """Waits for a started run until `timeout` seconds after its start, then stops it; Ctrl-C stops it too.
    -> {cmd, rc, seconds, timed_out, stderr_tail}."""
    proc = run["proc"]
    try:
        rc, timed_out = proc.wait(timeout=max(run["t0"] + timeout - time.time(), 0.1)), False
    except subprocess.TimeoutExpired:
        rc, timed_out = stop_group(proc), True
    except KeyboardInterrupt:
        stop_group(proc)
        raise
    with open(run["err_path"]) as f:
        tail = f.read()[-2000:]
    return {"cmd": shlex.join(run["cmd"]), "rc": rc, "seconds": round(time.time() - run["t0"], 1),
            "timed_out": timed_out, "stderr_tail": tail if rc else ""}


def run_logged(cmd, log_dir, timeout):
    return finish_logged(start_logged(cmd, log_dir), timeout)


def read_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(records, key="loss"):
    return [r[key] for r in records if key in r]


def write_pairs(work):
    """The default world's review pairs (chosen = the higher gold score), every fifth held out:
    WORK/pairs/train.jsonl and val.jsonl, the data of the reward and DPO stages."""
    pairs, d = review_pairs(make_world(1337)), os.path.join(work, "pairs")
    os.makedirs(d, exist_ok=True)
    for name, rows in (("train", [p for i, p in enumerate(pairs) if i % 5]), ("val", pairs[::5])):
        with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return os.path.join(d, "train.jsonl")


def stage_specs(plan, work, stages):
    """-> [(stage, argv after the interpreter, the reference stages it starts from)] for the chosen stages;
    every --init names a reference (CPU) run, so both runs of a stage start from the same weights."""
    ref, pairs = os.path.join(work, "reference"), os.path.join(work, "pairs", "train.jsonl")
    sft, lora_r = shlex.split(plan["sft"]), str(plan["lora_r"])
    from_pretrain, from_sft = ["--init", os.path.join(ref, "pretrain")], ["--init", os.path.join(ref, "sft")]
    rl = from_sft + ["--reward", os.path.join(ref, "reward")] + shlex.split(plan["rl"])
    specs = [("pretrain", ["pretrain.py", *shlex.split(plan["pretrain"])], ()),
             ("sft", ["sft.py", *from_pretrain, *sft], ("pretrain",)),
             ("sft_lora", ["sft.py", *from_pretrain, "--lora", lora_r, *sft], ("pretrain",)),
             ("sft_qlora", ["sft.py", *from_pretrain, "--qlora", lora_r, *sft], ("pretrain",)),
             ("reward", ["reward.py", *from_sft, "--data", pairs, *shlex.split(plan["reward"])], ("sft",)),
             ("dpo", ["dpo.py", *from_sft, "--data", pairs, *shlex.split(plan["dpo"])], ("sft",)),
             ("ppo", ["ppo.py", *rl], ("sft", "reward")),
             ("grpo", ["grpo.py", *rl], ("sft", "reward"))]
    return [s for s in specs if s[0] in stages]


def stage_command(argv, device, out):
    """--force: a stage stopped in an earlier check (Ctrl-C, a timeout) left its resumable state in OUT, which a
    fresh run refuses without it."""
    return [sys.executable, *argv, "--device", device, "--out", out, "--log-interval", "1", "--force"]


def run_status(run):
    return "timeout" if run["timed_out"] else "crash" if run["rc"] else "ok"


def reference_ready(stage, work, results):
    """The CPU reference of `stage` ran in this check and succeeded, or (not chosen by --stages this time)
    a finished one is on disk from an earlier check."""
    if stage in results:
        return results[stage].get("reference", {}).get("rc") == 0
    return os.path.exists(os.path.join(work, "reference", stage, "config.json"))


def check_stage(name, argv, needs, args, plan, budget, results):
    """Reference run (CPU, float32, no GPU visible) and device run side by side, each with half the CPU
    threads, then the comparison -> the stage's entry in the report."""
    entry = {"stage": name}
    missing = [s for s in needs if not reference_ready(s, args.work, results)]
    if name == "grpo" and not os.path.exists(os.path.join(ROOT, "grpo.py")):
        return entry | {"status": "skipped", "why": "no grpo.py in this checkout"}
    if missing:
        return entry | {"status": "skipped", "why": f"needs the CPU reference run of {', '.join(missing)}"}
    left = budget.allow(max(plan["timeout_reference"], plan["timeout_device"]), 0 if args.skip_bench else args.bench_reserve)
    if left < 5:
        return entry | {"status": "skipped", "why": "the time budget is spent"}
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    started = {role: start_logged(stage_command(argv, dev, os.path.join(args.work, role, name)),
                                  os.path.join(args.work, role, name), threads | env)
               for role, dev, env in (("reference", "cpu", {"CUDA_VISIBLE_DEVICES": ""}), ("device", args.device, {}))}
    try:
        for role in ("reference", "device"):
            entry[role] = finish_logged(started[role], min(plan[f"timeout_{role}"], left))
            entry[role]["records"] = read_metrics(os.path.join(args.work, role, name))
    finally:  # Ctrl-C while waiting for one: the other is stopped too
        for run in started.values():
            stop_group(run["proc"])
    for role in ("reference", "device"):
        if run_status(entry[role]) != "ok":
            last = (entry[role]["stderr_tail"].strip().splitlines() or [""])[-1][:160]
            return entry | {"status": run_status(entry[role]),
                            "why": f"{role} run: {run_status(entry[role])} (rc {entry[role]['rc']}) {last}".strip()}
    sampled = name in ("ppo", "grpo")
    key = "pg_loss" if sampled else "loss"
    dev_losses, cpu_losses = losses(entry["device"]["records"], key), losses(entry["reference"]["records"], key)
    verdict = check_sampled(entry["device"]["records"]) if sampled else compare_losses(dev_losses, cpu_losses)
    return entry | {"status": "pass" if verdict.pop("passed") else "fail", "compared": "sampled" if sampled else key,
                    "device_losses": dev_losses[:N_LOSSES], "cpu_losses": cpu_losses[:N_LOSSES], **verdict}


# ----------------------------------------------------------------------------- the benchmark

def bench_summary(path):
    """The figures worth a table from one bench.py --json file."""
    with open(path) as f:
        b = json.load(f)
    tr = b.get("train", {})
    out = {"tokens_per_s": tr.get("ours", {}).get("tokens_per_s"), "mfu": tr.get("ours", {}).get("mfu"),
           "step_ms": tr.get("ours", {}).get("step_ms"), "tokens_per_step": tr.get("tokens_per_step"),
           "config": b.get("config"), "gpu": b.get("machine", {}).get("gpu")}
    if "memory" in b:
        out["peak_bytes"] = {m: r.get("cuda_peak_bytes") for m, r in b["memory"].items()}
        out["activation_bytes"] = {m: r["activation_bytes_saved"] for m, r in b["memory"].items()}
    if "sample" in b:
        out["sampling"] = [{k: r[k] for k in ("batch", "new_tokens", "ours_cache_tokens_per_s",
                                              "ours_recompute_tokens_per_s", "cache_speedup", "identical")}
                           for r in b["sample"]]
    if "rl" in b:
        out["rl"] = {k: b["rl"][k] for k in ("sft_step_s", "dpo_step_s", "ppo_iteration_s", "ppo_generation_share")}
    return out


def run_bench(args, plan, budget):
    """bench.py compiled (every section) and eager (training only) -> {mode: run + summary, compile_gain}.
    Off CUDA the compiled run is skipped and the eager run does every section."""
    out, cuda = {}, args.device.startswith("cuda")
    modes = (("compile", ["--compile"], "timeout_bench_compile"),
             ("eager", ["--no-compile", "--only", "train"] if cuda else ["--no-compile"], "timeout_bench_eager"))
    for mode, flags, timeout in modes:
        path = os.path.join(args.work, "bench", f"{mode}.json")
        cmd = [sys.executable, "bench.py", *shlex.split(plan["bench"]), "--device", args.device, *flags,
               "--json", path, *shlex.split(args.bench_args)]
        left = budget.allow(plan[timeout])
        if mode == "compile" and not cuda:
            out[mode] = {"cmd": shlex.join(cmd), "skipped": "torch.compile on CPU takes about a minute even at toy size"}
        elif left < 5:
            out[mode] = {"cmd": shlex.join(cmd), "skipped": "the time budget is spent"}
        else:
            out[mode] = run_logged(cmd, os.path.join(args.work, "bench", mode), left)
            if out[mode]["rc"] == 0:
                out[mode]["summary"] = bench_summary(path)
    tps = [out[m].get("summary", {}).get("tokens_per_s") for m in ("compile", "eager")]
    out["compile_gain"] = compile_gain(*tps)
    return out


# ----------------------------------------------------------------------------- report

def num(v, fmt="{:.4f}"):
    return "n/a" if v is None else fmt.format(v)


def loss_list(values):
    return ", ".join(f"{v:.4f}" for v in values or []) or "-"


def stage_rows(stages):
    rows = ["| stage | status | device losses | CPU fp32 losses | max rel. diff | device s | CPU s | note |",
            "|---|---|---|---|---|---|---|---|"]
    for e in stages:
        dev, ref = e.get("device", {}), e.get("reference", {})
        note = e.get("why", "")
        if e.get("compared") == "sampled":
            note = f"sampled: finite, first-iteration KL {num(e.get('first_kl'), '{:.2g}')} (pg_loss shown)"
        rows.append(f"| {e['stage']} | {e['status']} | {loss_list(e.get('device_losses'))} | "
                    f"{loss_list(e.get('cpu_losses'))} | "
                    f"{num(e.get('max_rel_diff'), '{:.2%}')} | {dev.get('seconds', '-')} | {ref.get('seconds', '-')} | "
                    f"{note.replace('|', '/')} |")
    return rows


def bench_rows(bench):
    rows = ["| bench.py | status | tokens/s | ms/step | MFU | peak MiB (full / LoRA / QLoRA) | "
            "KV-cached sampling tok/s (batch x new: speed-up over recompute) | s |", "|---|---|---|---|---|---|---|---|"]
    for mode in ("compile", "eager"):
        r = bench.get(mode, {})
        s = r.get("summary", {})
        status = "skipped" if r.get("skipped") else "ok" if r.get("rc") == 0 else f"rc {r.get('rc')}"
        peak = s.get("peak_bytes") or {}
        peaks = " / ".join(num(v and v / 2 ** 20, "{:.0f}") for v in peak.values()) or "-"
        sampling = ", ".join(f"{x['batch']}x{x['new_tokens']}: {x['ours_cache_tokens_per_s']:.0f} "
                             f"({x['cache_speedup']:.1f}x)" for x in s.get("sampling", [])) or "-"
        mfu = s.get("mfu")
        rows.append(f"| {mode} | {status} | {num(s.get('tokens_per_s'), '{:,.0f}')} | {num(s.get('step_ms'), '{:.1f}')} | "
                    f"{num(mfu, '{:.1%}')} | {peaks} | {sampling} | {r.get('seconds', '-')} |")
    return rows


def markdown(report):
    m = report["machine"]
    lines = [f"# gpu_check: {m.get('gpu') or m['device']}, {m['date_utc']} UTC",
             f"torch {m['torch']}, CUDA {m.get('cuda') or '-'}, commit {m.get('commit') or '-'}; plan `{report['plan']}`; "
             f"{report['seconds']:.0f} s of a {report['budget_s']} s budget",
             "", f"Stages: first {N_LOSSES} losses on {m['device']} vs the same command on CPU in float32, "
             f"pass if |device - cpu| <= {ATOL} + {RTOL:.0%} of cpu.", "", *stage_rows(report["stages"])]
    if report.get("bench"):
        b = report["bench"]
        gain = b.get("compile_gain")
        mfu = b.get("compile", {}).get("summary", {}).get("mfu")
        lines += ["", *bench_rows(b), "",
                  f"torch.compile over eager (training tokens/s): {num(gain, '{:.2f}x')}; MFU {num(mfu, '{:.1%}')} "
                  f"(target >= {MFU_TARGET:.0%} for GPT-2 124M in bf16: {'n/a' if mfu is None else mfu >= MFU_TARGET})"]
    return "\n".join(lines) + "\n"


def machine(device):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    m = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "device": device,
         "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
         "cpu_count": os.cpu_count(), "commit": commit}
    if device.startswith("cuda"):
        m |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
              "gpu_count": torch.cuda.device_count()}
    return m


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="device of the checked runs: cuda, cuda:N, cpu (or mps)")
    p.add_argument("--tiny", action="store_true", help="toy sizes everywhere (the CPU test)")
    p.add_argument("--work", default="out/gpu_check", help="directory for every run, the JSON and the table")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--skip-bench", action="store_true", help="stages only")
    p.add_argument("--bench-args", default="", help="extra bench.py options, e.g. '--batch-size 16'")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole check")
    p.add_argument("--bench-reserve", type=float, default=200, help="seconds of the budget kept for bench.py")
    args = p.parse_args(argv)
    bad = set(args.stages.split(",")) - set(STAGES)
    if bad:
        raise UserError(f"--stages: unknown stage(s) {sorted(bad)}; choose from {','.join(STAGES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is visible to torch {torch.__version__}")
    args.work = os.path.abspath(args.work)
    return args


def save_report(report, work, t0):
    """WORK/gpu_check.json and gpu_check.md as they stand (rewritten after every stage, so a check cut short
    still leaves its results) -> the markdown."""
    report["seconds"] = round(time.time() - t0, 1)
    table = markdown(report)
    write_atomic(os.path.join(work, "gpu_check.json"), json.dumps(report, indent=2, default=str))
    write_atomic(os.path.join(work, "gpu_check.md"), table)
    return table


def print_tails(name, runs):
    for role, run in runs.items():
        if isinstance(run, dict) and run.get("stderr_tail"):
            print(f"   {name} {role} stderr (tail):\n" + run["stderr_tail"], flush=True)


def main(argv=None):
    args = parse_args(argv)
    plan_name = "tiny" if args.tiny else "small"
    plan, budget, t0 = PLANS[plan_name], Budget(args.budget), time.time()
    os.makedirs(args.work, exist_ok=True)
    write_pairs(args.work)
    report = {"machine": machine(args.device), "plan": plan_name, "budget_s": args.budget,
              "tolerance": {"rtol": RTOL, "atol": ATOL, "n_losses": N_LOSSES, "kl_tol": KL_TOL}, "stages": []}
    results = {}
    for name, stage_argv, needs in stage_specs(plan, args.work, args.stages.split(",")):
        print(f"== {name}", flush=True)
        entry = results[name] = check_stage(name, stage_argv, needs, args, plan, budget, results)
        report["stages"].append(entry)
        print(f"   {entry['status']}" + (f": {entry['why']}" if entry.get("why") else ""), flush=True)
        print_tails(name, {r: entry[r] for r in ("reference", "device") if r in entry})
        save_report(report, args.work, t0)
    if not args.skip_bench:
        print("== bench.py", flush=True)
        report["bench"] = run_bench(args, plan, budget)
        print_tails("bench.py", report["bench"])
    table = save_report(report, args.work, t0)
    print("\n" + table + f"\nwrote {args.work}/gpu_check.json and gpu_check.md", flush=True)
    ran = [e for e in report["stages"] if e["status"] != "skipped"]
    bench_ok = all(r.get("rc") in (0, None) for r in report.get("bench", {}).values() if isinstance(r, dict))
    if not (all(e["status"] == "pass" for e in ran) and bench_ok):
        sys.exit(1)
    return report

if __name__ == "__main__":
    run_cli(main)
