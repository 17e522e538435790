"""Benchmarks: training throughput and MFU, KV-cached sampling, the cost of DPO, PPO and GRPO steps, memory.

    python bench.py                                    # 4 layers, 4 heads, 256 wide, ctx 256, vocab 4096, batch 8
    python bench.py --vs hf                            # + Hugging Face GPT2LMHeadModel, same config, side by side
    python bench.py --preset gpt2 --device cuda --compile --json out/bench/gpt2.json   # GPT-2 124M on a GPU
    python bench.py --only train,sample --repeats 7    # some sections, more repeats
    python bench.py --only stages --preset gpt2        # every stage's own CLI, a few steps each: s/step, peak RSS
    bash run.sh | tee run.log; python bench.py --run-log run.log   # wall time of each stage of a pipeline run

Everything runs the project's own pieces: gpt.GPT, gpt.cross_entropy_loss, gpt.generate,
gpt.completion_logprobs, data.completion_batch, training.setup / make_optimizer / wrap_model
(so on CUDA: bf16 autocast, TF32, fused AdamW, torch.compile by default), lora.inject_lora and
quant4.quantize_model. Models are randomly initialised: speed and memory do not depend on the
weights, and sampling always runs the full length (no EOS can stop it).

Timing: warm-up first, then `--repeats` timed runs; with --vs hf the two models alternate run
by run (and swap order every repeat) so a noisy shared machine slows both alike; figures are
medians. Speed lives here, never in tests.

The stages section (not in the default --only, bench_stages.py) runs the stage files themselves.
"""

import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from bench_common import (device_peak_flops, flops_per_token, interleaved, machine, median, mfu, print_memory, print_rl,
                          print_run_log, print_sample, print_train, run_log_times, sync)
from bench_stages import bench_stages, print_stages
from common import ArgumentParser, UserError, nonneg_float, nonneg_int, positive_int, run_cli
from gpt import GPT, GPTConfig, PRESETS, completion_logprobs, cross_entropy_loss, generate, token_logprobs
from lora import inject_lora
from quant4 import quantize_model
from training import make_optimizer, setup, wrap_model

SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # what --preset sets (gpt.PRESETS)
SECTIONS = ("train", "sample", "rl", "memory", "stages")
DEFAULT_SECTIONS = SECTIONS[:4]  # stages runs every stage file: ask for it by name
NO_EOS = -1  # an id no model emits: every sample runs its full length


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--preset", choices=["none", *PRESETS], default="none", help="gpt2 = GPT-2 124M (12/12/768, ctx 1024, vocab 50257); overrides the shape options")
    p.add_argument("--n-layer", type=positive_int, default=4)
    p.add_argument("--n-head", type=positive_int, default=4)
    p.add_argument("--n-embd", type=positive_int, default=256)
    p.add_argument("--block-size", type=positive_int, default=256)
    p.add_argument("--vocab-size", type=positive_int, default=4096)
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per training step")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--vs", choices=["none", "hf"], default="none", help="hf: also time transformers' GPT2LMHeadModel")
    p.add_argument("--steps", type=positive_int, default=3, help="training steps per timed run")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed runs first")
    p.add_argument("--peak-flops", type=nonneg_float, default=0.0, help="peak FLOP/s for MFU (default: known GPUs; CPU: n/a)")
    p.add_argument("--new-tokens", default="128,240", help="sampling lengths")
    p.add_argument("--sample-batches", default="1,16", help="sampling batch sizes")
    p.add_argument("--prompt-len", type=positive_int, default=16, help="prompt tokens for sampling")
    p.add_argument("--sample-repeats", type=positive_int, default=3, help="timed runs per sampling figure")
    p.add_argument("--rl-prompt-len", type=positive_int, default=32)
    p.add_argument("--rl-completion-len", type=positive_int, default=64)
    p.add_argument("--ppo-epochs", type=positive_int, default=2)
    p.add_argument("--ppo-minibatches", type=positive_int, default=2)
    p.add_argument("--grpo-group", type=positive_int, default=4, help="GRPO: completions per prompt (divides --batch-size)")
    p.add_argument("--lora-r", type=positive_int, default=8)
    p.add_argument("--stage-steps", type=positive_int, default=3, help="stages: optimizer steps (PPO: iterations) per stage")
    p.add_argument("--stage-out", default="out/bench/stages", help="stages: checkpoints, data and runs go here")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", default="", help="write every figure to this JSON file")
    p.add_argument("--run-log", default="", help="only tabulate the stage times of this run.sh log (no benchmark)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | mps")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training models (default: on for CUDA, off elsewhere)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.preset != "none":
        for k in SHAPE:
            setattr(args, k, getattr(PRESETS[args.preset], k))
    bad = set(args.only.split(",")) - set(SECTIONS)
    if bad:
        raise UserError(f"--only: unknown section(s) {sorted(bad)}; choose from {','.join(SECTIONS)}")
    return args


# ----------------------------------------------------------------------------- models

def gpt_config(args):
    return GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                     n_head=args.n_head, n_embd=args.n_embd, dropout=0.0)


def hf_model_from(model):
    """transformers' GPT2LMHeadModel with the same config and weights as our GPT (its Conv1D layers store
    W transposed), or None when transformers is not installed. Same weights -> same logits."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    c = model.config
    hf_cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        activation_function="gelu_new", bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_cfg._attn_implementation = "sdpa"
    hf = GPT2LMHeadModel(hf_cfg)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: v.t() if k.endswith(conv1d) else v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(not k.endswith(".weight") or k == "lm_head.weight" for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf.to(next(model.parameters()).device)


def ours_logits(model, x):
    return model(x)


def hf_logits(model, x):
    return model(input_ids=x, use_cache=False).logits


# ----------------------------------------------------------------------------- 1. training throughput

def train_step_fn(model, logits_fn, x, y, ctx):
    """One optimizer step of next-token training, as pretrain.py does it: autocast forward,
    cross_entropy_loss, backward, clip, AdamW (fused on CUDA)."""
    optimizer = make_optimizer(model, 1e-4, ctx=ctx)
    run_model = wrap_model(model, ctx)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with ctx.autocast():
            loss = cross_entropy_loss(logits_fn(run_model, x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def bench_train(args, ctx, model, hf=None):
    """Tokens per second of full training steps (median over repeats) and MFU; with hf, the same for
    GPT2LMHeadModel, interleaved."""
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size + 1), generator=g).to(ctx.device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    steps = {"ours": train_step_fn(model, ours_logits, x, y, ctx)}
    if hf is not None:
        steps["hf"] = train_step_fn(hf, hf_logits, x, y, ctx)
    runs = {name: (lambda s=s: [s() for _ in range(args.steps)]) for name, s in steps.items()}
    times = interleaved(runs, args.repeats, args.warmup, ctx.device)
    c = model.config
    fpt = flops_per_token(model.num_params(), c.n_layer, c.n_head, c.n_embd // c.n_head, c.block_size)
    peak = device_peak_flops(ctx.device, args.peak_flops)
    tok = args.batch_size * args.block_size * args.steps
    out = {"flops_per_token": fpt, "peak_flops": peak, "tokens_per_step": args.batch_size * args.block_size,
           "non_embedding_params": model.num_params()}
    for name, ts in times.items():
        tps = tok / median(ts)
        out[name] = {"tokens_per_s": tps, "step_ms": 1e3 * median(ts) / args.steps, "mfu": mfu(tps, fpt, peak),
                     "runs_tokens_per_s": [tok / t for t in ts]}
    if "hf" in out:
        out["ours_over_hf"] = out["ours"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
        # each repeat timed both back to back, under about the same load: the median of those ratios
        out["ours_over_hf_paired"] = median([h / o for o, h in zip(times["ours"], times["hf"])])
    return out


# ----------------------------------------------------------------------------- 2. sampling

def sample_prompts(batch, length, vocab, seed):
    """Random prompts, lengths length, length-1, ... (so batched rows are left-padded)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (max(1, length - b % 4),), generator=g).tolist() for b in range(batch)]


def hf_generate(hf, prompts, new_tokens, use_cache):
    P = max(len(p) for p in prompts)
    device = next(hf.parameters()).device
    ids = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, use_cache=use_cache, pad_token_id=0)
    return out[:, P:].tolist()


def token_agreement(a, b):
    """Share of positions where two lists of samples hold the same token, counted up to each row's
    first difference (greedy decoding diverges for good after one)."""
    same = total = 0
    for r, s in zip(a, b):
        total += max(len(r), len(s))
        same += next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), min(len(r), len(s)))
    return same / max(total, 1)


def bench_sample(args, ctx, model, hf=None):
    """Greedy sampling tokens/s with and without the KV cache, for each batch size and length;
    checks cached == recompute token for token (and reports agreement with HF's greedy tokens)."""
    model.eval()
    rows, warmed = [], False
    for B in [int(b) for b in args.sample_batches.split(",")]:
        for n in [int(n) for n in args.new_tokens.split(",")]:
            if args.prompt_len + n > args.block_size:
                raise UserError(f"--prompt-len {args.prompt_len} + {n} new tokens exceed the context {args.block_size}")
            prompts = sample_prompts(B, args.prompt_len, args.vocab_size, args.seed + B)
            outs = {}

            def ours(use_cache):
                def run(new=n):
                    outs[("ours", use_cache)] = generate(model, prompts, new, eos_id=NO_EOS, pad_id=0, greedy=True,
                                                         use_cache=use_cache)
                return run
            runs = {"ours_cache": ours(True), "ours_recompute": ours(False)}

            def hfrun(use_cache):
                def run(new=n):
                    outs[("hf", use_cache)] = hf_generate(hf, prompts, new, use_cache)
                return run
            if hf is not None:
                runs |= {"hf_cache": hfrun(True), "hf_recompute": hfrun(False)}
            if not warmed:  # a short untimed generation per contender, not a full-length one
                for fn in (ours(True), ours(False)) + ((hfrun(True), hfrun(False)) if hf is not None else ()):
                    fn(min(8, n))
                warmed = True
            times = interleaved(runs, args.sample_repeats, 0, ctx.device)
            row = {"batch": B, "new_tokens": n, "prompt_len": args.prompt_len}
            for name, ts in times.items():
                row[f"{name}_tokens_per_s"] = B * n / median(ts)
            row["cache_speedup"] = row["ours_cache_tokens_per_s"] / row["ours_recompute_tokens_per_s"]
            row["identical"] = outs[("ours", True)] == outs[("ours", False)]
            row["cache_token_agreement"] = token_agreement(outs[("ours", True)], outs[("ours", False)])
            if hf is not None:
                row["hf_cache_speedup"] = row["hf_cache_tokens_per_s"] / row["hf_recompute_tokens_per_s"]
                row["ours_over_hf_cache"] = row["ours_cache_tokens_per_s"] / row["hf_cache_tokens_per_s"]
                row["hf_token_agreement"] = token_agreement(outs[("ours", True)], outs[("hf", True)])
            rows.append(row)
            print(f"  sampled batch {B} x {n} new tokens: {row['ours_cache_tokens_per_s']:.0f} tok/s cached, "
                  f"{row['ours_recompute_tokens_per_s']:.0f} recompute", flush=True)
    return rows


# ----------------------------------------------------------------------------- 3. DPO and PPO against SFT

def dpo_loss_for_cost(pc, pr, rc, rr, beta=0.1):
    """The DPO objective (timed here only; dpo.py owns the real one):
    L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def ppo_loss_for_cost(logp, old_logp, adv, values, returns, mask, clip=0.2):
    """PPO's clipped surrogate + value loss (timed here only; ppo.py owns the real one):
    L = -min(r A, clip(r, 1-eps, 1+eps) A) + 0.5 (V - R)^2, r = exp(log pi - log pi_old), mean over completion tokens."""
    ratio = torch.exp(logp - old_logp)
    pg = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    vf = 0.5 * (values - returns) ** 2
    return ((pg + vf) * mask).sum() / mask.sum()


def grpo_loss_for_cost(logp, old_logp, ref_logp, adv, mask, max_len, beta=0.1, clip=0.2):
    """GRPO's loss (timed here only; grpo.py owns the real one): the clipped surrogate with A_i = (r_i - group mean)
    / group std on every token, and beta * k3 per token, summed over tokens / (B * max_len) (Dr. GRPO's norm)."""
    ratio = torch.exp(logp - old_logp)
    pg = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    log_rho = ref_logp - logp
    return ((pg + beta * (torch.expm1(log_rho) - log_rho)) * mask).sum() / (mask.size(0) * max_len)


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def slice_batch(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def bench_rl(args, ctx):
    """Seconds per SFT step, DPO step, PPO iteration and GRPO iteration on the same rows (B prompts of
    --rl-prompt-len tokens, completions of --rl-completion-len; GRPO: the same B completions as
    --grpo-group samples of B / G prompts, no value head), and the share of PPO's time spent generating."""
    torch.manual_seed(args.seed)
    cfg = gpt_config(args)
    policy = GPT(cfg).to(ctx.device)
    value_head = nn.Linear(cfg.n_embd, 1).to(ctx.device)    # shared-trunk critic
    actor_critic = nn.ModuleDict({"policy": policy, "value": value_head})
    ref = GPT(cfg).to(ctx.device).eval().requires_grad_(False)
    reward_trunk = GPT(cfg).to(ctx.device).eval().requires_grad_(False)
    reward_head = nn.Linear(cfg.n_embd, 1).to(ctx.device).requires_grad_(False)
    optimizer = make_optimizer(actor_critic, 1e-5, ctx=ctx)
    B, P, C, G = args.batch_size, args.rl_prompt_len, args.rl_completion_len, args.grpo_group
    if G < 2 or B % G:
        raise UserError(f"--grpo-group {G} must be at least 2 and divide --batch-size {B}")
    if P + C > cfg.block_size:
        raise UserError(f"--rl-prompt-len {P} + --rl-completion-len {C} exceed the context {cfg.block_size}")
    g = torch.Generator().manual_seed(args.seed)
    rand = lambda n: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rand(P - b % 4) for b in range(B)]
    group_prompts = [p for p in prompts[:B // G] for _ in range(G)]       # GRPO: G samples of each prompt
    chosen, rejected = [rand(C - b % 3) for b in range(B)], [rand(C - b % 5) for b in range(B)]
    sft_batch = to_device(data.completion_batch(prompts, chosen, pad_id=0), ctx.device)
    pair_batch = to_device(data.completion_batch(prompts + prompts, chosen + rejected, pad_id=0), ctx.device)

    def update(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(actor_critic.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sft_step():
        with ctx.autocast():
            loss = cross_entropy_loss(policy(sft_batch["input_ids"], sft_batch["attention_mask"],
                                             sft_batch["position_ids"]), sft_batch["targets"])
        update(loss)

    def dpo_step():
        with ctx.autocast():
            with torch.no_grad():
                ref_lp = completion_logprobs(ref, pair_batch).sum(-1)
            lp = completion_logprobs(policy, pair_batch).sum(-1)
            loss = dpo_loss_for_cost(lp[:B], lp[B:], ref_lp[:B], ref_lp[B:])
        update(loss)

    gen_time, rows_all = [], torch.arange(B, device=ctx.device)

    def ppo_iteration():
        sync(ctx.device)
        t = time.perf_counter()
        with ctx.autocast():
            completions = generate(policy, prompts, C, eos_id=NO_EOS, pad_id=0, temperature=1.0,
                                   generator=torch.Generator(device=ctx.device).manual_seed(args.seed))
        sync(ctx.device)
        gen_time.append(time.perf_counter() - t)
        policy.train()
        batch = to_device(data.completion_batch(prompts, completions, pad_id=0), ctx.device)
        args3 = (batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        mask = (batch["targets"] != -1).float()
        with torch.no_grad(), ctx.autocast():
            h = policy.hidden_states(*args3)
            old_lp = token_logprobs(policy.lm_head(h), batch["targets"])
            values = value_head(h).squeeze(-1).float() * mask
            ref_lp = completion_logprobs(ref, batch)
            score = reward_head(reward_trunk.hidden_states(*args3)[rows_all, batch["last_index"]]).squeeze(-1)
            rewards = -0.05 * (old_lp - ref_lp) * mask            # per-token KL penalty
            rewards[rows_all, batch["last_index"] - 1] += score.float()
            returns = rewards.flip(-1).cumsum(-1).flip(-1)        # gamma = lambda = 1
            adv = returns - values
        for _ in range(args.ppo_epochs):
            for rows in rows_all.chunk(args.ppo_minibatches):
                mb = slice_batch(batch, rows)
                with ctx.autocast():
                    h = policy.hidden_states(mb["input_ids"], mb["attention_mask"], mb["position_ids"])
                    lp = token_logprobs(policy.lm_head(h), mb["targets"])
                    loss = ppo_loss_for_cost(lp, old_lp[rows], adv[rows], value_head(h).squeeze(-1).float(),
                                             returns[rows], mask[rows])
                update(loss)

    def grpo_iteration():
        with ctx.autocast():
            completions = generate(policy, group_prompts, C, eos_id=NO_EOS, pad_id=0, temperature=1.0,
                                   generator=torch.Generator(device=ctx.device).manual_seed(args.seed))
        batch = to_device(data.completion_batch(group_prompts, completions, pad_id=0), ctx.device)
        mask = (batch["targets"] != -1).float()
        with torch.no_grad(), ctx.autocast():
            old_lp, ref_lp = completion_logprobs(policy, batch), completion_logprobs(ref, batch)
            h = reward_trunk.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            score = reward_head(h[rows_all, batch["last_index"]]).squeeze(-1).float()
            r = score.view(-1, G)                                   # no critic: the group is the baseline
            adv = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-4)).flatten()[:, None] * mask
        for _ in range(args.ppo_epochs):
            for rows in rows_all.chunk(args.ppo_minibatches):
                mb = slice_batch(batch, rows)
                with ctx.autocast():
                    lp = completion_logprobs(policy, mb)
                    loss = grpo_loss_for_cost(lp, old_lp[rows], ref_lp[rows], adv[rows], mask[rows], C)
                update(loss)

    times = interleaved({"sft": sft_step, "dpo": dpo_step, "ppo": ppo_iteration, "grpo": grpo_iteration},
                        args.repeats, args.warmup, ctx.device)
    sft, dpo, ppo, grpo = (median(times[k]) for k in ("sft", "dpo", "ppo", "grpo"))
    gen = median(gen_time[args.warmup:])
    return {"sft_step_s": sft, "dpo_step_s": dpo, "ppo_iteration_s": ppo, "dpo_over_sft": dpo / sft,
            "ppo_over_sft": ppo / sft, "ppo_generation_s": gen, "ppo_generation_share": gen / ppo,
            "grpo_iteration_s": grpo, "grpo_over_sft": grpo / sft, "grpo_over_ppo": grpo / ppo, "grpo_group": G,
            "rows": B, "prompt_len": P, "completion_len": C, "ppo_updates": args.ppo_epochs * args.ppo_minibatches}


# ----------------------------------------------------------------------------- 4. memory

def tensor_bytes(tensors):
    """Bytes of distinct storages (a tied weight counts once)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def optimizer_bytes(optimizer):
    return tensor_bytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))


def saved_activation_bytes(model, loss_fn):
    """Bytes autograd keeps for the backward pass (every tensor saved by a forward op, distinct storages,
    the model's own parameters and buffers excluded): the activation memory of one training step,
    measured the same way on every device. Returns (loss, bytes)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    return loss, sum(seen.values())


def bench_memory(args, ctx):
    """Full fine-tuning vs LoRA vs QLoRA (NF4 base + LoRA): parameter, gradient, optimizer and
    activation bytes of one training step (eager, no torch.compile), peak CUDA memory on a GPU, and
    tokens/s of the step."""
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size + 1), generator=g).to(ctx.device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    cuda = ctx.cuda
    out = {}
    for mode in ("full", "lora", "qlora"):
        torch.manual_seed(args.seed)
        if cuda:
            torch.cuda.empty_cache()
        model = GPT(gpt_config(args))
        if mode == "qlora":
            quantize_model(model)
        if mode != "full":
            inject_lora(model, args.lora_r)
        model.to(ctx.device).train()
        optimizer = make_optimizer(model, 1e-4, ctx=ctx)
        trainable = [p for p in model.parameters() if p.requires_grad]

        def step():
            if cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            before = torch.cuda.memory_allocated(ctx.device) if cuda else 0
            with ctx.autocast():
                loss, act = saved_activation_bytes(model, lambda: cross_entropy_loss(model(x), y))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            peak = torch.cuda.max_memory_allocated(ctx.device) - before if cuda else None
            return act, peak
        step()  # creates the optimizer state
        times = interleaved({"step": step}, args.repeats, 0, ctx.device)["step"]
        act, peak_step = step()
        row = {"params_bytes": tensor_bytes([*model.parameters(), *model.buffers()]),
               "trainable_params": sum(p.numel() for p in trainable),
               "grad_bytes": tensor_bytes(trainable), "optimizer_bytes": optimizer_bytes(optimizer),
               "activation_bytes_saved": act, "tokens_per_s": x.numel() / median(times)}
        if cuda:
            row["cuda_step_peak_over_state_bytes"] = peak_step
            row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
        out[mode] = row
        del model, optimizer, trainable
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.run_log:
        return print_run_log(args.run_log)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = setup(args)
    sections = args.only.split(",")
    results = {"machine": machine(ctx), "config": {k: getattr(args, k) for k in
               ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size")}, "args": vars(args)}
    cfg = results["config"]
    print(f"bench: {cfg} on {results['machine'].get('gpu', ctx.device)}, {torch.get_num_threads()} CPU threads, "
          f"compile {ctx.compile}, {results['machine']['date_utc']} UTC", flush=True)
    torch.manual_seed(args.seed)
    model = GPT(gpt_config(args)).to(ctx.device)
    hf = None
    if args.vs == "hf" and {"train", "sample"} & set(sections):
        hf = hf_model_from(model)
        if hf is None:
            print("--vs hf: transformers is not installed (pip install transformers); HF columns skipped")
            results["hf"] = "transformers not installed"
        else:
            import transformers
            results["machine"]["transformers"] = transformers.__version__
    if "sample" in sections:  # before training touches the weights, so ours and HF's stay equal
        results["sample"] = bench_sample(args, ctx, model, hf)
        print_sample(results["sample"], hf)
    if "train" in sections:
        results["train"] = bench_train(args, ctx, model, hf)
        print_train(results["train"], args)
    if "rl" in sections:
        results["rl"] = bench_rl(args, ctx)
        print_rl(results["rl"])
    if "memory" in sections:
        results["memory"] = bench_memory(args, ctx)
        print_memory(results["memory"], args, ctx)
    if "stages" in sections:
        results["stages"] = bench_stages(args, ctx, model)
        print_stages(results["stages"], args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    run_cli(main)
