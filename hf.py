"""The Hugging Face formats, both ways: GPT-2 directories (what gpt.load_checkpoint reads when --init names
one, and what `python gpt.py export` writes), and 4-bit weights in the bitsandbytes / transformers
serialization (save_bnb, load_bnb; quant4.py computes the codes).

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
import math
import os

import torch
import torch.nn as nn

from common import (UserError, atomic_save_safetensors, atomic_write_json, check_tensors_fit, read_safetensors,
                    unique_state_dict, unwrap)
from quant4 import DYNAMIC8, Linear4bit, QState, codebook
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
    model = unwrap(model)
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


# ----------------------------------------------------------------------------- bitsandbytes' 4-bit weights
#
# The bitsandbytes / transformers serialization of 4-bit weights (quant4.py computes them).
# For a quantized Linear X, bitsandbytes' Linear4bit._save_to_state_dict writes X.weight (the packed
# codes, uint8 of shape (ceil(n/2), 1)), X.bias, and QuantState.as_dict(packed=True) under "X.weight.":
# absmax (uint8 codes when nested, else fp32), quant_map (the 16 values), nested_absmax (fp32 s2),
# nested_quant_map (the 256 values of DYNAMIC8) and quant_state.bitsandbytes__<nf4|fp4>, the UTF-8
# bytes of json.dumps({"quant_type", "blocksize", "dtype", "shape", and when nested "nested_blocksize",
# "nested_dtype", "nested_offset" (the mean m)}) as a uint8 tensor.

BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # those bitsandbytes' quantize_4bit accepts
BNB_DTYPES = ("float32", "float16", "bfloat16")
QS_KEY = "weight.quant_state.bitsandbytes__"


def join(prefix, key):
    return f"{prefix}.{key}" if prefix else key


def bnb_tensors(state, prefix=""):
    """A QState as bitsandbytes' tensors for the Linear named prefix (keys prefix.weight, prefix.weight.*),
    in as_dict's order, with its JSON byte for byte (json.dumps of the same dict in the same order)."""
    if state.code not in ("nf4", "fp4") or state.block_size not in BNB_BLOCK_SIZES:
        raise UserError(f"{prefix or 'weight'}: bitsandbytes stores nf4 or fp4 with block size in "
                        f"{BNB_BLOCK_SIZES}, not {state.code} at block size {state.block_size}")
    nested = state.absmax is None
    out = {"weight": state.packed.view(-1, 1),
           "weight.absmax": state.absmax_q if nested else state.absmax,
           "weight.quant_map": codebook(state.code).clone()}
    fields = {"quant_type": state.code, "blocksize": state.block_size, "dtype": state.dtype, "shape": list(state.shape)}
    if nested:
        out["weight.nested_absmax"] = state.absmax_scale
        out["weight.nested_quant_map"] = DYNAMIC8.clone()
        fields.update(nested_blocksize=state.dq_block_size, nested_dtype="float32",
                      nested_offset=state.absmax_mean.item())
    out[QS_KEY + state.code] = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)
    return {join(prefix, k): v.detach().cpu() for k, v in out.items()}


def read_quant_fields(tensor, where):
    """The JSON fields of a quant_state.bitsandbytes__* tensor, checked: quant_type, block sizes, dtypes."""
    try:
        fields = json.loads(bytes(tensor.to(torch.uint8).flatten().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: quant_state is not JSON ({e})")
    if not isinstance(fields, dict):
        raise UserError(f"{where}: quant_state is not a JSON object")
    nested = "nested_blocksize" in fields
    wants = {"quant_type": ("nf4", "fp4"), "blocksize": BNB_BLOCK_SIZES, "dtype": BNB_DTYPES}
    if nested:
        wants.update(nested_blocksize=BNB_BLOCK_SIZES, nested_dtype=("float32",))
    for key, allowed in wants.items():
        if fields.get(key) not in allowed:
            raise UserError(f"{where}: quant_state {key} = {fields.get(key)!r} is not supported (choose from {list(allowed)})")
    shape = fields.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise UserError(f"{where}: quant_state shape {shape!r} is not the (out, in) shape of a Linear weight")
    if nested and not isinstance(fields.get("nested_offset"), (int, float)):
        raise UserError(f"{where}: quant_state nested_offset {fields.get('nested_offset')!r} is not a number")
    unknown = sorted(set(fields) - {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                                    "nested_dtype", "nested_offset"})
    if unknown:
        raise UserError(f"{where}: quant_state has fields this loader does not know: {unknown}")
    return fields


def qstate_from_bnb(tensors, prefix="", where="state dict"):
    """The QState of the Linear named prefix from bitsandbytes' tensors (inverse of bnb_tensors): the
    JSON fields checked, quant_map and nested_quant_map equal to NF4/FP4 and DYNAMIC8 exactly, every
    tensor of the dtype and size the fields imply; anything else -> UserError naming the tensor."""
    where = f"{where}: {join(prefix, 'weight')}"
    qs = [k for k in tensors if k.startswith(join(prefix, QS_KEY))]
    if len(qs) != 1:
        raise UserError(f"{where}: expected one quant_state.bitsandbytes__nf4 or __fp4 tensor, found {len(qs)}")
    fields = read_quant_fields(tensors[qs[0]], where)
    if qs[0] != join(prefix, QS_KEY + fields["quant_type"]):
        raise UserError(f"{where}: {qs[0]} holds quant_type {fields['quant_type']!r}")
    nested = "nested_blocksize" in fields
    numel = fields["shape"][0] * fields["shape"][1]
    n_blocks = math.ceil(numel / fields["blocksize"])
    expect = {"weight": (torch.uint8, (math.ceil(numel / 2), 1)), "weight.quant_map": (torch.float32, (16,)),
              "weight.absmax": (torch.uint8 if nested else torch.float32, (n_blocks,))}
    if nested:
        expect["weight.nested_absmax"] = (torch.float32, (math.ceil(n_blocks / fields["nested_blocksize"]),))
        expect["weight.nested_quant_map"] = (torch.float32, (256,))
    extra = sorted(k for k in tensors if k.startswith(join(prefix, "weight.")) and k != qs[0]
                   and k[len(join(prefix, "")):] not in expect)
    if extra:
        raise UserError(f"{where}: unexpected tensor {extra[0]} for a {'nested ' if nested else ''}quant state")
    got = {}
    for key, (dtype, shape) in expect.items():
        t = tensors.get(join(prefix, key))
        if t is None:
            raise UserError(f"{where}: {join(prefix, key)} is missing")
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise UserError(f"{where}: {join(prefix, key)} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
        got[key] = t
    if not torch.equal(got["weight.quant_map"], codebook(fields["quant_type"])):
        raise UserError(f"{where}: quant_map is not the {fields['quant_type']} codebook")
    if nested and not torch.equal(got["weight.nested_quant_map"], DYNAMIC8):
        raise UserError(f"{where}: nested_quant_map is not the 8-bit dynamic map")
    state = QState(got["weight"].flatten(), None if nested else got["weight.absmax"], tuple(fields["shape"]),
                   fields["blocksize"], fields["quant_type"], numel, dtype=fields["dtype"])
    if nested:
        state.absmax_q, state.absmax_scale = got["weight.absmax"], got["weight.nested_absmax"]
        state.absmax_mean = torch.tensor(float(fields["nested_offset"]), dtype=torch.float32)
        state.dq_block_size = fields["nested_blocksize"]
    return state


def bnb_state_dict(model):
    """model's tensors (tied duplicates once) with every Linear4bit's buffers replaced by bitsandbytes'
    tensors under the Linear's name: what bitsandbytes' Linear4bit.state_dict() gives in a transformers model."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    out = {}
    for key, tensor in unique_state_dict(model).items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in quantized or leaf == "bias":
            out[key] = tensor
        elif leaf == "packed":
            out.update(bnb_tensors(quantized[prefix].qstate(), prefix))
    return out


def load_bnb_state_dict(model, tensors, where="state dict"):
    """Load bitsandbytes-format tensors into model, in place: each Linear (or Linear4bit) X that has an
    X.weight.quant_state.bitsandbytes__* entry becomes a Linear4bit holding that quantized weight; all
    other tensors load as usual. Missing, unexpected or mis-shaped entries -> UserError. Returns model."""
    modules = dict(model.named_modules())
    prefixes = [k[:-len(QS_KEY) - 3].removesuffix(".") for k in tensors if k[-3:] in ("nf4", "fp4")
                and k[:-3].endswith(QS_KEY)]
    for prefix in prefixes:
        module = modules.get(prefix)
        if not prefix or not isinstance(module, (nn.Linear, Linear4bit)):
            raise UserError(f"{where}: {join(prefix, 'weight')} is a 4-bit weight but the model has no Linear "
                            f"named {prefix!r} inside it")
        state = qstate_from_bnb(tensors, prefix, where)
        if state.shape != (module.out_features, module.in_features):
            raise UserError(f"{where}: {join(prefix, 'weight')} has shape {state.shape}, the model's Linear "
                            f"{(module.out_features, module.in_features)}")
        device = module.packed.device if isinstance(module, Linear4bit) else module.weight.device
        shell = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        layer = Linear4bit(shell, state=state)
        if module.bias is not None:
            layer.bias = nn.Parameter(torch.zeros_like(module.bias), requires_grad=False)
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to(device))
    check_tensors_fit(bnb_state_dict(model), tensors, where, what="4-bit checkpoint")
    own = unique_state_dict(model)      # the bias, embeddings, LayerNorms...: not the 4-bit entries
    model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    return model


def save_bnb(model, path):
    """Write model with its Linear4bit layers in bitsandbytes' serialization to a safetensors file (atomic)."""
    atomic_save_safetensors(bnb_state_dict(model), path, metadata={"format": "pt"})


def load_bnb(model, path):
    """Read a bitsandbytes-format safetensors file (save_bnb's, or a transformers 4-bit model's with
    matching names) into model, in place (see load_bnb_state_dict). Returns model."""
    return load_bnb_state_dict(model, read_safetensors(path), where=path)
