"""The one GPT every stage shares: GPT-2's architecture, written out in full.

    token + learned position embeddings
    -> n_layer x [x + attn(ln_1(x)); x + mlp(ln_2(x))]     (pre-LayerNorm blocks)
    -> ln_f -> lm_head (tied to the token embedding)

Module names are GPT-2's (transformer.h.0.attn.c_attn, ...) so that Hugging Face weights
and PEFT adapters map onto it one to one. Besides the model this file holds what every
stage needs from a language model: per-token log-probabilities, the cross-entropy loss,
batched KV-cached sampling, and checkpoints (safetensors + JSON, never pickle), which may also
be Hugging Face GPT-2 directories (hf.py converts them):

    python gpt.py import HF_GPT2_DIR out/gpt2     # or simply pass HF_GPT2_DIR to any --init
    python gpt.py export out/sft hf/sft           # transformers.GPT2LMHeadModel.from_pretrained("hf/sft")

Padding. Stages batch sequences of different lengths. `attention_mask` (True = real token)
keeps real tokens from attending to padding, and the position ids count real tokens only,
so a left-padded row gives exactly the logits of the same row unpadded.
"""

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf
from common import (UserError, atomic_save_safetensors, atomic_write_json, check_tensors_fit, read_safetensors, run_cli,
                    unique_state_dict, unwrap)
from tokenizer import copy_gpt2_vocab, load_tokenizer, save_tokenizer, tokenizer_fingerprint


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256   # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True


# GPT-2's published shapes (OpenAI's 124M, 355M, 774M, 1.5B checkpoints): every field but dropout and bias.
# pretrain.py --preset and bench.py --preset build these; every later stage takes its shape from --init
# (a checkpoint pretrain.py --preset wrote, or a Hugging Face GPT-2 directory such as gpt2-medium's).
PRESETS = {
    "gpt2": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
}


# ----------------------------------------------------------------------------- model

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, cache=None, cache_pos=0):
        """attn_mask: None (plain causal) or a bool (B, 1, T, T_keys) mask, True = may attend.
        cache: None or a (k, v) pair of preallocated (B, H, T_max, D) tensors; this call's keys
        and values are written at [cache_pos, cache_pos + T) and attention reads [0, cache_pos + T)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            cache[0][:, :, cache_pos:cache_pos + T] = k
            cache[1][:, :, cache_pos:cache_pos + T] = v
            k, v = cache[0][:, :, :cache_pos + T], cache[1][:, :, :cache_pos + T]
        p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, cache_pos=0):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, cache_pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden_states(self, idx, attention_mask=None, position_ids=None, cache=None, cache_pos=0):
        """(B, T) token ids -> (B, T, C) final hidden states (after ln_f)."""
        B, T = idx.shape
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask)
            else:
                position_ids = torch.arange(cache_pos, cache_pos + T, device=idx.device).expand(B, T)
        if position_ids.max() >= self.config.block_size:
            raise UserError(f"sequence of {int(position_ids.max()) + 1} tokens is longer than the "
                            f"model's context ({self.config.block_size}, fixed when the model was made); shorten it")
        if cache is not None and attention_mask is None:
            attention_mask = torch.ones(B, cache_pos + T, dtype=torch.bool, device=idx.device)
        attn_mask = None if attention_mask is None else padding_attention_mask(attention_mask.bool(), T, cache_pos)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, None if cache is None else cache[i], cache_pos)
        return self.transformer.ln_f(x)

    def forward(self, idx, attention_mask=None, position_ids=None):
        """(B, T) token ids -> (B, T, vocab) logits."""
        return self.lm_head(self.hidden_states(idx, attention_mask, position_ids))


def position_ids_from_mask(attention_mask):
    """Positions count real tokens only: a row [pad pad a b c] gets positions [0 0 0 1 2]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padding_attention_mask(attention_mask, T, offset=0):
    """(B, T_keys) real-token mask -> (B, 1, T, offset + T) attention mask for the queries at
    positions [offset, offset + T): causal, never onto padding. Every query may also see itself,
    so a padding query has one key and no NaN appears (a NaN value would poison even the
    rows that mask it out, since 0 * NaN = NaN); its output is never used."""
    K = offset + T
    q = torch.arange(offset, K, device=attention_mask.device)[:, None]
    k = torch.arange(K, device=attention_mask.device)[None, :]
    return ((k <= q) & attention_mask[:, None, None, :K]) | (k == q)


# ----------------------------------------------------------------------------- log-probs and loss

def token_logprobs(logits, targets, temperature=1.0):
    """log pi(y_t | x, y_<t) for each position: log_softmax(logits / temperature)[target].

    Positions whose target is -1 (prompt, padding) give 0, so summing over t gives
    log pi(y|x) = sum_t log p(y_t | x, y_<t), the log of the guide's product
    pi(y|x) = p(y1|x) * p(y2|x,y<2) * ... * p(yn|x,y<n).
    The temperature is the one used to sample, so rollout, reference and training
    log-probs describe the same distribution."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets != -1)


def completion_logprobs(model, batch, temperature=1.0):
    """Per-token log pi(y_t | x, y_<t) of a data.completion_batch: (B, T), 0 off the completion.
    `.sum(-1)` is the sequence log-probability log pi(y|x) that reward, DPO and PPO use."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    return token_logprobs(logits, batch["targets"], temperature)


def cross_entropy_loss(logits, targets):
    """Next-token prediction: L = -1/N * sum_{t: target_t != -1} log p(target_t | tokens_<=t),
    the mean cross-entropy over every position that counts (targets of -1 never count)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


# ----------------------------------------------------------------------------- sampling

def sample_next_token(logits, temperature=1.0, top_k=0, top_p=1.0, greedy=False, generator=None):
    """(B, V) logits -> (B,) next tokens. greedy = argmax; otherwise sample from
    softmax(logits / temperature), restricted to the top_k tokens (0 = all) and to the
    smallest set whose probability reaches top_p (nucleus; 1.0 = all)."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, eos_id, pad_id, temperature=1.0, top_k=0, top_p=1.0,
             greedy=False, use_cache=True, generator=None, on_token=None):
    """Continue each prompt (a list of token ids) until EOS or max_new_tokens.

    Prompts are left-padded into one batch; the KV cache holds keys and values of every
    position so each new token costs one position's work. A row that has emitted EOS keeps
    receiving padding, which nothing reads. Returns each row's new tokens, up to and
    including its EOS when it emitted one. With use_cache=False every step recomputes the
    whole sequence (the slow reference the cache must match). on_token, if given, is called with each
    step's (B,) new tokens as soon as they are sampled (sample.py streams them to the terminal)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = min(P + max_new_tokens, model.config.block_size)
    if any(len(p) == 0 for p in prompts):
        raise UserError("generate: every prompt needs at least one token")
    if P >= model.config.block_size:
        raise UserError(f"prompt of {P} tokens leaves no room in the model's context of "
                        f"{model.config.block_size}; shorten the prompt")
    ids = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, total), dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):P] = torch.tensor(p, device=device)
        mask[b, P - len(p):P] = True
    pos = position_ids_from_mask(mask)
    mask[:, P:] = True                       # generated slots count as real keys
    pos[:, P:] = pos[:, P - 1:P] + torch.arange(1, total - P + 1, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = None
    if use_cache:
        C, H = model.config.n_embd, model.config.n_head
        dtype = next(model.parameters()).dtype
        cache = [tuple(torch.empty(B, H, total, C // H, device=device, dtype=dtype) for _ in range(2))
                 for _ in range(model.config.n_layer)]
    t = P
    try:
        while t < total and not done.all():
            if use_cache:
                start = 0 if t == P else t - 1  # first step: the whole prompt; then one token
                h = model.hidden_states(ids[:, start:t], mask, pos[:, start:t], cache=cache, cache_pos=start)
            else:
                h = model.hidden_states(ids[:, :t], mask[:, :t], pos[:, :t])
            logits = model.lm_head(h[:, -1])
            nxt = sample_next_token(logits, temperature, top_k, top_p, greedy, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            ids[:, t] = nxt
            done |= nxt == eos_id
            t += 1
            if on_token is not None:
                on_token(nxt)
    finally:
        model.train(was_training)
    out = []
    for row in ids[:, P:t].tolist():
        out.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return out


# ----------------------------------------------------------------------------- checkpoints

def load_tensors_strict(module, tensors, where):
    """Copy tensors into module, refusing missing, unexpected or mis-shaped entries."""
    check_tensors_fit(unique_state_dict(module), tensors, where)
    module.load_state_dict(tensors, strict=False)


def save_checkpoint(out_dir, model, enc, meta):
    """out_dir/model.safetensors + config.json ({"model": config, **meta}) + tokenizer.json.
    Each file is written atomically; config.json goes last."""
    os.makedirs(out_dir, exist_ok=True)
    model = unwrap(model)  # never save compile/DDP prefixes
    atomic_save_safetensors(unique_state_dict(model), os.path.join(out_dir, "model.safetensors"))
    save_tokenizer(enc, os.path.join(out_dir, "tokenizer.json"))
    copy_gpt2_vocab(enc, out_dir)  # a gpt2 tokenizer read from vocab.json + merges.txt keeps them beside it
    config = {"model": asdict(model.config), "tokenizer": tokenizer_fingerprint(enc), **meta}
    atomic_write_json(config, os.path.join(out_dir, "config.json"))


def read_config(path, hint=""):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.exists(cfg_path):
        raise UserError(f"no checkpoint at {path}" + (f"; make it with `{hint}`" if hint else ""))
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})")


def load_checkpoint(path, device="cpu", hint=""):
    """-> (model, enc, config dict) of a checkpoint of this project or a Hugging Face GPT-2 directory.
    `hint` names the command that makes the checkpoint."""
    config = read_config(path, hint)
    if hf.is_hf_config(config):  # a Hugging Face GPT-2 directory: hf.py converts names, layout and config
        config, tensors, enc = hf.read_hf_dir(path, config)
    elif "model" in config:
        tensors = read_safetensors(os.path.join(path, "model.safetensors"))
        enc = load_tokenizer(os.path.join(path, "tokenizer.json"))
    else:
        raise UserError(f"{path}/config.json has no 'model' entry: not a checkpoint of this project")
    model = GPT(GPTConfig(**config["model"]))
    load_tensors_strict(model, tensors, path)
    if enc.n_vocab > model.config.vocab_size:
        raise UserError(f"{path}: tokenizer has {enc.n_vocab} tokens but the model only {model.config.vocab_size}")
    return model.to(device), enc, config


def check_same_tokenizer(enc_a, enc_b, what_a, what_b):
    if tokenizer_fingerprint(enc_a) != tokenizer_fingerprint(enc_b):
        raise UserError(f"{what_a} and {what_b} use different tokenizers; train them from the same base checkpoint")


# ----------------------------------------------------------------------------- import/export

PIPELINE_STAGE = "pipeline_stage"  # our stage in an exported config.json (transformers ignores the extra key)

def main(argv=None):
    p = argparse.ArgumentParser(description=(
        "Convert between Hugging Face GPT-2 directories and this project's checkpoints.\n"
        "  python gpt.py export CKPT_DIR OUT_DIR   # ours -> HF (transformers, PEFT)\n"
        "  python gpt.py import HF_DIR OUT_DIR     # HF GPT-2 -> ours (or pass HF_DIR to --init)"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("export", "import"))
    p.add_argument("src", help="checkpoint directory to read")
    p.add_argument("out", help="directory to write")
    args = p.parse_args(argv)
    t0 = time.time()
    model, enc, config = load_checkpoint(args.src, hint="python pretrain.py")
    raw = read_config(args.src)
    # the pipeline's stage (sft, dpo, ...) survives the round trip: sample.py renders prompts as the stage says
    stage = raw.get(PIPELINE_STAGE) if hf.is_hf_config(raw) else config.get("stage")
    if args.command == "export":
        hf.export_hf(model, args.out, enc)
        if stage:
            hf_config = read_config(args.out)
            atomic_write_json({**hf_config, PIPELINE_STAGE: stage}, os.path.join(args.out, "config.json"))
    else:
        save_checkpoint(args.out, model, enc, {"stage": stage or "import", "imported_from": args.src,
                                               "args": vars(args), "metrics": {"time_s": time.time() - t0}})
    n = model.num_params(non_embedding=False)
    print(f"{args.command}: {args.src} -> {args.out} ({n / 1e6:.1f}M parameters, tokenizer {enc.name}, "
          f"{time.time() - t0:.1f}s)")
    return {"params": n, "time_s": time.time() - t0}


if __name__ == "__main__":
    run_cli(main)
