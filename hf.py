"""Hugging Face GPT-2 directories, both ways: what gpt.load_checkpoint reads when --init names one,
and what `python gpt.py export` writes.

A Hugging Face GPT-2 directory holds model.safetensors + config.json ({"model_type": "gpt2", "n_embd", ...})
and, for OpenAI's tokenizer, vocab.json + merges.txt. Its tensors differ from ours in three ways:
  1. names: GPT2LMHeadModel prefixes "transformer." (wte, h.0.attn.c_attn, ...), a bare GPT2Model does not;
  2. attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj are Conv1D layers whose weight is stored (in, out),
     the transpose of nn.Linear's (out, in);
  3. older files carry the causal-mask buffers attn.bias / attn.masked_bias (not weights), and
     lm_head.weight is the token embedding (tied), written once or not at all.
Our MLP uses the tanh approximation of GELU, which is HF's "gelu_new" (also "gelu_pytorch_tanh").
"""

import os

import torch
import torch.nn as nn

from common import UserError, atomic_save_safetensors, atomic_write_json, read_safetensors, unique_state_dict
from tokenizer import copy_gpt2_vocab, gpt2_tokenizer, load_tokenizer, save_tokenizer


HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_BUFFERS = ("bias", "masked_bias")  # h.N.attn.bias / h.N.attn.masked_bias
HF_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
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


def read_hf_dir(path, hf):
    """A Hugging Face GPT-2 directory -> (config, tensors, enc) for gpt.load_checkpoint: our config
    dict ({"model": GPTConfig fields, ...}), our state dict, and the tokenizer: our BPE when the directory
    came from export_hf with one (pipeline_tokenizer.json), else OpenAI's gpt2 (vocab.json + merges.txt)."""
    where = os.path.join(path, "config.json")
    model_config = config_from_hf(hf, where)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        other = [f for f in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
                 if os.path.exists(os.path.join(path, f))]
        raise UserError(f"{path}: no model.safetensors" + (f" (only {other[0]}, a pickle/foreign format this project "
                        "never loads; download the repository's model.safetensors)" if other else ""))
    tensors = tensors_from_hf(read_safetensors(weights), weights)
    ours = os.path.join(path, OUR_TOKENIZER_FILE)
    enc = load_tokenizer(ours) if os.path.exists(ours) else gpt2_tokenizer(path)
    config = {"model": model_config, "stage": "hf_import", "source": os.path.abspath(path), "hf_config": hf}
    return config, tensors, enc


def export_hf(model, out_dir, enc=None):
    """Write out_dir as a Hugging Face GPT-2 directory: model.safetensors (HF names, Conv1D layout) and
    config.json, which transformers.GPT2LMHeadModel.from_pretrained(out_dir) loads; plus the tokenizer:
    vocab.json + merges.txt for gpt2, or pipeline_tokenizer.json (our BPE) that import_hf reads back."""
    model = getattr(model, "_orig_mod", getattr(model, "module", model))
    if any(not isinstance(m, nn.Linear) for blk in model.transformer.h for m in (blk.attn.c_attn, blk.attn.c_proj,
                                                                                   blk.mlp.c_fc, blk.mlp.c_proj)):
        raise UserError("export_hf: the model has LoRA or 4-bit layers; merge them first (lora.merge_lora, "
                        "quant4.dequantize_model), or save the adapter with lora.save_adapter for PEFT")
    os.makedirs(out_dir, exist_ok=True)
    atomic_save_safetensors(tensors_to_hf(model), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if enc is not None:
        if enc.name == "gpt2":
            copy_gpt2_vocab(enc, out_dir)
        else:
            save_tokenizer(enc, os.path.join(out_dir, OUR_TOKENIZER_FILE))
    atomic_write_json(hf_config(model.config, enc), os.path.join(out_dir, "config.json"))
