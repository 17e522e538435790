"""What every section of bench.py uses: FLOPs per token and MFU, timing runs side by side, and the printed
tables (fmt, table, and one print_* per section), and the stage times of run.sh's log."""

import datetime
import os
import platform
import re
import statistics
import time

import torch

import data
from common import UserError

# dense bf16 peak of one GPU (tensor cores, no sparsity), in FLOP/s; matched against the device name
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ----------------------------------------------------------------------------- FLOPs and timing

def flops_per_token(n_params, n_layer, n_head, head_dim, context):
    """Training FLOPs per token (PaLM appendix B, as nanoGPT's estimate_mfu):
    6N + 12 * L * H * Q * T, with N the non-embedding parameters (forward 2N + backward 4N for the
    matmuls with weights) and 12*L*H*Q*T for attention's two T-long matmuls per layer (QK^T and AV,
    2 FLOPs per multiply-add, times 3 for forward + backward)."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * context


def mfu(tokens_per_s, flops_per_tok, peak):
    """Model FLOPs utilisation = achieved FLOP/s / peak FLOP/s (None when the peak is unknown)."""
    return tokens_per_s * flops_per_tok / peak if peak else None


def device_peak_flops(device, override=0.0):
    if override:
        return override
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def interleaved(runs, repeats, warmup, device):
    """{name: fn} -> {name: [seconds per run]}: warm-up runs, then the runs alternate, order swapped
    each repeat, so a slow moment of a shared machine falls on every contender alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t = time.perf_counter()
            runs[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def median(xs):
    return statistics.median(xs)


# ----------------------------------------------------------------------------- the printed tables

def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.3g}{unit}" if abs(v) < 100 else f"{v:,.0f}{unit}"
    return f"{v:,}{unit}"


def mib(n):
    return None if n is None else n / 2 ** 20


def table(title, header, rows):
    cells = [header] + [[fmt(c) if not isinstance(c, str) else c for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"\n{title}", "  ".join(h.rjust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    print("\n".join(lines), flush=True)


def machine(ctx):
    m = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "device": ctx.device,
         "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
         "platform": platform.platform()}
    if ctx.cuda:
        m["gpu"] = torch.cuda.get_device_name(ctx.device)
    return m


def print_sample(rows, hf):
    hdr = ["batch", "new", "cached tok/s", "recompute tok/s", "speedup", "identical"]
    if hf is not None:
        hdr += ["HF cached tok/s", "HF recompute tok/s", "HF speedup", "ours/HF cached", "= HF tokens"]
    table("greedy sampling (gpt.generate, KV cache vs full recompute)", hdr,
          [[r["batch"], r["new_tokens"], r["ours_cache_tokens_per_s"], r["ours_recompute_tokens_per_s"],
            r["cache_speedup"], r["identical"]] + ([r["hf_cache_tokens_per_s"], r["hf_recompute_tokens_per_s"],
            r["hf_cache_speedup"], r["ours_over_hf_cache"], f"{100 * r['hf_token_agreement']:.0f}%"] if hf else [])
           for r in rows])
    if not all(r["identical"] for r in rows):  # exact in float32 on CPU; TF32/bf16 GPU kernels may round apart
        print("WARNING: KV-cached and recomputed greedy samples differ (see cache_token_agreement)")


def print_train(tr, args):
    table(f"training throughput (batch {args.batch_size} x {args.block_size} tokens, {args.steps} steps per run, "
          f"median of {args.repeats}; FLOPs/token = 6N + 12LHQT = {tr['flops_per_token']:,})",
          ["model", "tokens/s", "ms/step", "GFLOP/s", "MFU"],
          [[name, tr[name]["tokens_per_s"], tr[name]["step_ms"], tr[name]["tokens_per_s"] * tr["flops_per_token"] / 1e9,
            "n/a (no peak known; --peak-flops)" if tr[name]["mfu"] is None else f"{100 * tr[name]['mfu']:.1f}%"]
           for name in ("ours", "hf") if name in tr])
    if "ours_over_hf" in tr:
        print(f"ours / HF training tokens/s: {tr['ours_over_hf']:.3f} (ratio of medians), "
              f"{tr['ours_over_hf_paired']:.3f} (median of back-to-back pairs)")


def print_rl(rl):
    table(f"alignment step costs ({rl['rows']} prompts x {rl['prompt_len']} tokens, completions of "
          f"{rl['completion_len']}; PPO: generate + ref/value/reward forwards + {rl['ppo_updates']} minibatch updates)",
          ["step", "seconds", "x SFT step"],
          [["SFT step", rl["sft_step_s"], 1.0], ["DPO step", rl["dpo_step_s"], rl["dpo_over_sft"]],
           ["PPO iteration", rl["ppo_iteration_s"], rl["ppo_over_sft"]],
           ["  of which generation", rl["ppo_generation_s"], rl["ppo_generation_s"] / rl["sft_step_s"]],
           [f"GRPO iteration (G={rl['grpo_group']})", rl["grpo_iteration_s"], rl["grpo_over_sft"]]])
    print(f"GRPO / PPO iteration time: {rl['grpo_over_ppo']:.2f} (no value head; same completions and updates)")
    print(f"PPO time spent generating: {100 * rl['ppo_generation_share']:.0f}%")


def print_memory(mem, args, ctx):
    hdr = ["mode", "trainable", "params MiB", "grads MiB", "AdamW MiB", "activations MiB", "tokens/s"]
    if ctx.cuda:
        hdr += ["CUDA peak MiB"]
    table(f"memory per training step (batch {args.batch_size} x {args.block_size}; activations = tensors "
          f"saved for backward; LoRA r={args.lora_r}, QLoRA = NF4 base + LoRA)", hdr,
          [[m, r["trainable_params"], mib(r["params_bytes"]), mib(r["grad_bytes"]), mib(r["optimizer_bytes"]),
            mib(r["activation_bytes_saved"]), r["tokens_per_s"]] + ([mib(r["cuda_peak_bytes"])] if ctx.cuda else [])
           for m, r in mem.items()])
    if not ctx.cuda:
        print("(CPU: no peak-memory counter; activations are the bytes autograd saved, measured by hooks)")


# ----------------------------------------------------------------------------- run.sh's log

def run_log_times(text):
    """run.sh's log -> [(stage, seconds)] from its "== NAME done in N s" lines, in order, and the total from
    "== pipeline finished in N s" (None if the run did not finish)."""
    times = [(m[1], int(m[2])) for m in re.finditer(r"^== (\S+) done in (\d+) s$", text, re.M)]
    total = re.search(r"^== pipeline finished in (\d+) s", text, re.M)
    return times, int(total[1]) if total else None


def print_run_log(path):
    times, total = run_log_times(data.read_utf8(path))
    if not times:
        raise UserError(f"{path}: no '== NAME done in N s' lines; pass the output of bash run.sh")
    ran = sum(t for _, t in times)
    table(f"stage wall times ({path}; {len(times)} stages run, skipped ones not listed)", ["stage", "s", "min", "share"],
          [[name, t, f"{t / 60:.1f}", f"{100 * t / ran:.0f}%"] for name, t in times] +
          [["all stages", ran, f"{ran / 60:.1f}", "100%"]] +
          ([["pipeline (with the shell)", total, f"{total / 60:.1f}", ""]] if total is not None else []))
    return {"stages": dict(times), "total_s": total}
