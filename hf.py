"""Hugging Face GPT-2 directories, both ways: what gpt.load_checkpoint reads when --init names one,
and what `python gpt.py export` writes.

A Hugging Face GPT-2 directory holds model.safetensors + config.json ({"model_type": "gpt2", "n_embd", ...})
and, for OpenAI's tokenizer, vocab.json + merges.txt. Larger models are published sharded instead:
model.safetensors.index.json ({"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}})
beside the shards model-00001-of-0000N.safetensors; both layouts load, and export_hf writes either. Its tensors differ from ours in three ways:
  1. names: GPT2LMHeadModel prefixes "transformer." (wte, h.0.attn.c_attn, ...), a bare GPT2Model does not;
  2. attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj are Conv1D layers whose weight is stored (in, out),
     the transpose of nn.Linear's (out, in);
  3. older files carry the causal-mask buffers attn.bias / attn.masked_bias (not weights), and
     lm_head.weight is the token embedding (tied), written once or not at all.
Our MLP uses the tanh approximation of GELU, which is HF's "gelu_new" (also "gelu_pytorch_tanh").
"""

import json
import os

import torch
import torch.nn as nn

from common import UserError, atomic_save_safetensors, atomic_write_json, read_safetensors, unique_state_dict
from tokenizer import copy_gpt2_vocab, gpt2_tokenizer, load_tokenizer, save_tokenizer


HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_BUFFERS = ("bias", "masked_bias")  # h.N.attn.bias / h.N.attn.masked_bias
HF_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
OUR_TOKENIZER_FILE = "pipeline_tokenizer.json"  # our BPE beside an exported model (HF's tokenizer.json differs)


def is_hf_config(config):
    """A Hugging Face GPT-2 config.json: model_type gpt2, or GPT-2 fields without our "model" entry."""
    return isinstance(config, dict) and (config.get("model_type") == "gpt2" or
                                         ("model" not in config and "n_embd" in config))


def config_from_hf(hf, where):
    """HF GPT2Config fields -> our GPTConfig fields (a dict), refusing the variants our GPT does not compute."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{where}: model_type {hf['model_type']!r} is not gpt2; only GPT-2 weights can be imported")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if not isinstance(hf.get(k), int)]
    if missing:
        raise UserError(f"{where}: GPT-2 config needs integer {', '.join(missing)}")
    n_embd = hf["n_embd"]
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") in HF_TANH_GELU,
                                f"use one of {list(HF_TANH_GELU)} (our MLP's tanh GELU)"),
        "n_inner": (hf.get("n_inner") in (None, 4 * n_embd), f"must be null or 4 * n_embd = {4 * n_embd}"),
        "layer_norm_epsilon": (isinstance(eps := hf.get("layer_norm_epsilon", 1e-5), (int, float))
                               and abs(eps - 1e-5) < 1e-12, "must be 1e-5"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True) is True, "must be true"),
        "scale_attn_by_inverse_layer_idx": (not hf.get("scale_attn_by_inverse_layer_idx", False), "must be false"),
        "add_cross_attention": (not hf.get("add_cross_attention", False), "must be false"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True) is True, "must be true (the LM head is wte)"),
    }
    bad = [f"{k} = {hf.get(k)!r} ({fix})" for k, (ok, fix) in unsupported.items() if not ok]
    if bad:
        raise UserError(f"{where}: a GPT-2 variant this GPT does not compute: " + "; ".join(bad))
    block_size = hf.get("n_positions", hf.get("n_ctx"))
    if not isinstance(block_size, int):
        raise UserError(f"{where}: GPT-2 config needs n_positions (the context length)")
    return dict(vocab_size=hf["vocab_size"], block_size=block_size, n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=n_embd, dropout=0.0, bias=True)


def tensors_from_hf(tensors, where):
    """HF GPT-2 tensors (either naming) -> our state dict: "transformer." prefix, Conv1D weights
    transposed to (out, in), mask buffers dropped, lm_head dropped (it is wte in our model)."""
    out = {}
    wte = tensors.get("transformer.wte.weight", tensors.get("wte.weight"))
    for key, t in tensors.items():
        if key == "lm_head.weight":
            if wte is not None and (t.shape != wte.shape or not torch.equal(t, wte)):
                raise UserError(f"{where}: lm_head.weight differs from wte.weight; this GPT ties them, "
                                "so an untied LM head cannot be imported")
            continue
        name = key if key.startswith("transformer.") else "transformer." + key
        if name.split(".")[-2:] in (["attn", b] for b in HF_BUFFERS):  # not attn.c_attn.bias
            continue
        if name.endswith(HF_CONV1D):
            t = t.t()
        out[name] = t.float().contiguous()
    return out


def tensors_to_hf(model):
    """Our state dict -> GPT2LMHeadModel's safetensors: same "transformer." names, Conv1D weights as
    (in, out), no lm_head.weight (HF ties it to wte, and its own save_pretrained omits it too)."""
    return {k: (v.t() if k.endswith(HF_CONV1D) else v).detach().float().contiguous()
            for k, v in unique_state_dict(model).items() if k != "lm_head.weight"}


def hf_config(config, enc=None):
    """GPTConfig -> a GPT-2 config.json that transformers' GPT2LMHeadModel loads as the same function."""
    eos = enc.eot_token if enc is not None else config.vocab_size - 1
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "initializer_range": 0.02,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "float32"}


def shard_name(i, n):
    """The k-th of n shard file names as transformers' save_pretrained writes them (k from 1)."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def plan_shards(sizes, max_bytes):
    """Tensor byte sizes (in writing order) -> lists of their indices, one list per shard: tensors are
    taken in order and a shard closes before the tensor that would take it past max_bytes (a tensor
    larger than max_bytes gets a shard of its own), as transformers' save_pretrained packs them."""
    shards, current, size = [], [], 0
    for i, n in enumerate(sizes):
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    return shards + [current] if current else shards


def read_index(path):
    """model.safetensors.index.json -> {tensor name: shard file name}, refusing names that leave the directory."""
    where = os.path.join(path, INDEX_FILE)
    try:
        with open(where) as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise UserError(f"{where}: needs a non-empty \"weight_map\" of tensor name -> shard file name")
    for shard in set(weight_map.values()):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise UserError(f"{where}: shard {shard!r} is not a file name in {path}")
    return weight_map


def read_shards(path):
    """Every tensor of a sharded directory, checked against its index both ways: a missing shard, a tensor
    the index names but its shard lacks, or a shard's tensor the index does not name is refused."""
    weight_map = read_index(path)
    where = os.path.join(path, INDEX_FILE)
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(path, shard)
        if not os.path.exists(file):
            raise UserError(f"{path}: shard {shard} is missing (listed in {INDEX_FILE}); download every shard")
        for name, t in read_safetensors(file).items():
            if weight_map.get(name) != shard:
                raise UserError(f"{file}: tensor {name} is not listed for this shard in {where}; "
                                "the index and the shards are from different saves")
            tensors[name] = t
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise UserError(f"{where} lists {len(absent)} tensor(s) missing from their shards, e.g. {absent[0]} "
                        f"in {weight_map[absent[0]]}")
    return tensors, where


def read_hf_dir(path, hf):
    """A Hugging Face GPT-2 directory -> (config, tensors, enc) for gpt.load_checkpoint: our config
    dict ({"model": GPTConfig fields, ...}), our state dict, and the tokenizer: our BPE when the directory
    came from export_hf with one (pipeline_tokenizer.json), else OpenAI's gpt2 (vocab.json + merges.txt).
    The weights are model.safetensors, or else the shards that model.safetensors.index.json lists."""
    where = os.path.join(path, "config.json")
    model_config = config_from_hf(hf, where)
    weights = os.path.join(path, SINGLE_FILE)
    if os.path.exists(weights):
        raw = read_safetensors(weights)
    elif os.path.exists(os.path.join(path, INDEX_FILE)):
        raw, weights = read_shards(path)
    else:
        other = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
                 if os.path.exists(os.path.join(path, f))]
        raise UserError(f"{path}: no model.safetensors or {INDEX_FILE}" + (
            f" (only {other[0]}, a pickle/foreign format this project never loads; download the repository's "
            "safetensors files)" if other else ""))
    tensors = tensors_from_hf(raw, weights)
    ours = os.path.join(path, OUR_TOKENIZER_FILE)
    enc = load_tokenizer(ours) if os.path.exists(ours) else gpt2_tokenizer(path)
    config = {"model": model_config, "stage": "hf_import", "source": os.path.abspath(path), "hf_config": hf}
    return config, tensors, enc


def write_weights(tensors, out_dir, max_shard_bytes=None):
    """tensors -> out_dir/model.safetensors, or (max_shard_bytes set and exceeded) shards + index, as
    save_pretrained names them; the other layout's files from an earlier export are removed, so a
    directory never holds two sets of weights."""
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    names = list(tensors)
    shards = plan_shards(sizes, max_shard_bytes) if max_shard_bytes else [list(range(len(names)))]
    stale = [f for f in os.listdir(out_dir) if f == INDEX_FILE or (f.startswith("model-") and f.endswith(".safetensors"))]
    if len(shards) == 1:
        atomic_save_safetensors(tensors, os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
    else:
        stale.append(SINGLE_FILE)
        weight_map = {}
        for k, idx in enumerate(shards, 1):
            file = shard_name(k, len(shards))
            atomic_save_safetensors({names[i]: tensors[names[i]] for i in idx}, os.path.join(out_dir, file),
                                    metadata={"format": "pt"})
            weight_map |= {names[i]: file for i in idx}
        stale = [f for f in stale if f not in weight_map.values()]
        atomic_write_json({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
                          os.path.join(out_dir, INDEX_FILE))
    for f in stale:
        if os.path.exists(os.path.join(out_dir, f)):
            os.remove(os.path.join(out_dir, f))


def export_hf(model, out_dir, enc=None, max_shard_bytes=None):
    """Write out_dir as a Hugging Face GPT-2 directory: model.safetensors (HF names, Conv1D layout) and
    config.json, which transformers.GPT2LMHeadModel.from_pretrained(out_dir) loads; plus the tokenizer:
    vocab.json + merges.txt for gpt2, or pipeline_tokenizer.json (our BPE) that read_hf_dir reads back.
    With max_shard_bytes, weights larger than that are written as shards + model.safetensors.index.json."""
    model = getattr(model, "_orig_mod", getattr(model, "module", model))
    if any(not isinstance(m, nn.Linear) for blk in model.transformer.h for m in (blk.attn.c_attn, blk.attn.c_proj,
                                                                                   blk.mlp.c_fc, blk.mlp.c_proj)):
        raise UserError("export_hf: the model has LoRA or 4-bit layers; merge them first (lora.merge_lora, "
                        "quant4.dequantize_model), or save the adapter with lora.save_adapter for PEFT")
    os.makedirs(out_dir, exist_ok=True)
    write_weights(tensors_to_hf(model), out_dir, max_shard_bytes)
    if enc is not None:
        if enc.name == "gpt2":
            copy_gpt2_vocab(enc, out_dir)
        else:
            save_tokenizer(enc, os.path.join(out_dir, OUR_TOKENIZER_FILE))
    atomic_write_json(hf_config(model.config, enc), os.path.join(out_dir, "config.json"))
