"""LoRA: trainable low-rank adapters on a frozen model, merged for export, saved in PEFT's layout.

A linear layer computes y = W0 x with W0 in R^{d x k} (d = out_features, k = in_features).
LoRA keeps W0 frozen and learns a low-rank correction next to it:

    W = W0 + dW,   dW = (alpha / r) * B A,   B in R^{d x r},  A in R^{r x k},  r << min(d, k)
    y = W0 x + (alpha / r) * B (A dropout(x))

so one d x k matrix trains r*(d + k) numbers instead of d*k. A starts Kaiming-uniform and B at
zero: at step 0 dW = 0 and the adapted model computes exactly what the base model computes.
With rsLoRA (rank-stabilised LoRA) the factor is alpha / sqrt(r) instead of alpha / r.

The frozen base may be any module with in_features, out_features and a forward: nn.Linear, or
quant4.Linear4bit for QLoRA (4-bit frozen base, adapters trained in full precision).

Run:  python lora.py [--init out/pretrain] [--r 8]    parameter table + merge check, seconds on CPU
Use:  inject_lora(model, r) -> train -> save_adapter(model, dir)   or   merge_lora(model) to export;
      load_adapter(fresh_base_model, dir) puts saved adapters back.

On disk, PEFT's LoRA layout (so peft.PeftModel.from_pretrained loads our adapters onto the exported
Hugging Face GPT-2, and adapters PEFT made for a GPT-2 load here):
    adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors  base_model.model.transformer.h.0.attn.c_attn.lora_A.weight   (r, k)
                               base_model.model.transformer.h.0.attn.c_attn.lora_B.weight   (d, r)
Hugging Face's GPT-2 keeps these projections in Conv1D layers whose weight is stored transposed,
(k, d); PEFT then sets fan_in_fan_out = true, which only transposes dW when it merges. Its lora_A
and lora_B are ordinary nn.Linear layers with the shapes above, so one file serves both models.
"""

import json
import math
import os
import re

import torch
import torch.nn as nn

from common import (ArgumentParser, UserError, atomic_save_safetensors, atomic_write_json, positive_float,
                    positive_int, read_safetensors, run_cli, unwrap)
from gpt import GPT, GPTConfig, load_checkpoint

DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")  # every attention and MLP linear of a GPT-2 block
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT wraps the model twice (PeftModel -> LoraModel -> model)
PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA = 8, 8  # what PEFT assumes when adapter_config.json omits them


def lora_scale(alpha, r, rslora=False):
    """The factor in front of B A: alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA, which keeps the
    size of the update from shrinking as r grows)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """y = base_layer(x) + scale * B(A(dropout(x))), base_layer frozen; only A and B train.
    Dropout acts on the adapter's input only: the frozen path always sees x itself."""

    def __init__(self, base_layer, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        if int(r) != r or r < 1:
            raise UserError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.dropout_p, self.rslora = int(r), alpha, dropout, rslora
        self.scale = lora_scale(alpha, self.r, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A and B live where the base does, in its float dtype (fp32 next to a 4-bit base)
        ref = next(iter([*base_layer.parameters(), *base_layer.buffers()]), None)
        weight = getattr(base_layer, "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
        kw = dict(bias=False, device=None if ref is None else ref.device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, self.r, **kw)   # A: weight (r, k)
        self.lora_B = nn.Linear(self.r, self.out_features, **kw)  # B: weight (d, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's (and PEFT's) init
        nn.init.zeros_(self.lora_B.weight)                           # so dW = 0 at the start
        self.merged = False  # True while dW sits inside the base weight (see merge)

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def delta_weight(self):
        """dW = scale * B A, a (d, k) matrix shaped like nn.Linear's weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale

    def mergeable_weight(self):
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (self.out_features, self.in_features):
            raise UserError(f"cannot merge LoRA into a {type(self.base_layer).__name__} base: it has no (out, in) "
                            "float weight (a 4-bit base cannot hold W0 + dW); dequantize first with "
                            "quant4.dequantize_model(model), then merge")
        return weight

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + dW. The layer then computes the same outputs with one matmul (no adapter path);
        A and B stay, so unmerge() can take dW out again. Do not train while merged."""
        if not self.merged:
            weight = self.mergeable_weight()
            weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W0 + dW <- W0 (equal up to float rounding)."""
        if self.merged:
            weight = self.mergeable_weight()
            weight -= self.delta_weight().to(weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout_p:g}, merged={self.merged}"


# ----------------------------------------------------------------------------- injection and merging

def matches(name, targets):
    """PEFT's rule for a list of targets: a module is adapted when its name equals a target or ends
    with "." + target, so "c_proj" picks both attn.c_proj and mlp.c_proj, "attn.c_proj" only the first."""
    return any(name == t or name.endswith("." + t) for t in targets)


def block_linears(model):
    """{name: module} for every linear-like layer (anything with in_features and out_features:
    nn.Linear, quant4.Linear4bit, LoRALinear) inside the transformer blocks. The embeddings and the
    LM head live outside transformer.h, so they are never candidates; nor are LoRA's own A, B, base."""
    return {name: m for name, m in model.named_modules()
            if name.startswith("transformer.h.") and hasattr(m, "in_features") and hasattr(m, "out_features")
            and not {"lora_A", "lora_B", "base_layer"} & set(name.split("."))}


def adapted_layers(model):
    """[(name, LoRALinear)] in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def check_rank(option, r, n_embd):
    """Before any work: LoRA's rank r is at most the width it factors (dW = B A, A of r x n_embd)."""
    if r > n_embd:
        raise UserError(f"{option} {r} is larger than the model's width {n_embd}: a LoRA rank is at most the width")


def inject_lora(model, r, alpha=None, dropout=0.05, targets=DEFAULT_TARGETS, rslora=False):
    """Wrap every block linear whose name matches `targets` in a LoRALinear and freeze every other
    parameter of the model (embeddings, LayerNorms, biases, W0). alpha=None means alpha = 2r, i.e.
    a scale of 2 whatever r is. Quantize (quant4.quantize_model) BEFORE injecting. Returns model."""
    alpha = 2 * r if alpha is None else alpha
    chosen = {name: m for name, m in block_linears(model).items() if matches(name, targets)}
    if not chosen:
        raise UserError(f"no linear layer in the transformer blocks matches LoRA targets {list(targets)}; "
                        f"GPT-2's are {list(DEFAULT_TARGETS)} (or attn.c_proj / mlp.c_proj)")
    if any(isinstance(m, LoRALinear) for m in chosen.values()):
        raise UserError("the model already has LoRA adapters on these layers; inject into a fresh base model")
    model.requires_grad_(False)
    for name, module in chosen.items():
        parent, _, child = name.rpartition(".")
        layer = LoRALinear(module, r, alpha, dropout, rslora).train(module.training)  # keep eval mode
        setattr(model.get_submodule(parent), child, layer)
    return model


def merge_lora(model):
    """Fold each adapter into its base weight (W0 <- W0 + dW) and put the plain base layer back in
    place of the LoRALinear: an ordinary model for save_checkpoint / export, every parameter trainable
    again. Checks every layer first, so a 4-bit base leaves the model untouched. Returns model."""
    layers = adapted_layers(model)
    for _, layer in layers:
        layer.mergeable_weight()
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    return model.requires_grad_(True)


# ----------------------------------------------------------------------------- parameter counts

def lora_parameter_table(model):
    """One row per adapted matrix W (d x k): the d*k numbers full fine-tuning trains against the
    r*(d + k) that LoRA trains (B: d*r, A: r*k)."""
    rows = []
    for name, m in adapted_layers(model):
        d, k = m.out_features, m.in_features
        rows.append(dict(name=name, d=d, k=k, r=m.r, full=d * k, lora=m.r * (d + k), ratio=m.r * (d + k) / (d * k)))
    return rows


def parameter_counts(model):
    """(trainable, total) parameters, a tied tensor counted once. A frozen base that keeps its
    weight outside parameters (a 4-bit base stores codes as buffers) counts as its d*k weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.out_features * m.in_features for m in model.modules()
                 if hasattr(m, "in_features") and hasattr(m, "out_features") and not isinstance(m, LoRALinear)
                 and not isinstance(getattr(m, "weight", None), torch.Tensor))
    return trainable, total


def format_parameter_table(model):
    rows = lora_parameter_table(model)
    w = max([len("module")] + [len(row["name"]) for row in rows])
    lines = [f"{'module':<{w}}  {'d x k':>11}  {'d*k':>11}  {'r(d+k)':>9}  {'ratio':>6}"]
    for row in rows:
        lines.append(f"{row['name']:<{w}}  {str(row['d']) + ' x ' + str(row['k']):>11}  {row['full']:>11,}  "
                     f"{row['lora']:>9,}  {row['ratio']:>6.2%}")
    full, lora = sum(row["full"] for row in rows), sum(row["lora"] for row in rows)
    lines.append(f"{'total (' + str(len(rows)) + ' matrices)':<{w}}  {'':>11}  {full:>11,}  {lora:>9,}  {lora / max(full, 1):>6.2%}")
    trainable, total = parameter_counts(model)
    lines.append(f"trainable: {trainable:,} of {total:,} parameters ({trainable / total:.2%} of the model)")
    return "\n".join(lines)


def print_parameter_table(model):
    print(format_parameter_table(model))


# ----------------------------------------------------------------------------- adapters on disk

def peft_target_modules(model, names):
    """The target list PEFT should use to pick exactly these modules: their last name parts
    (["c_attn", "c_fc", "c_proj"]) when those pick no other block linear, else the full names."""
    short = sorted({name.rsplit(".", 1)[-1] for name in names})
    picked = {name for name in block_linears(model) if matches(name, short)}
    return short if picked == set(names) else sorted(names)


def save_adapter(model, out_dir, base_model_path=""):
    """out_dir/adapter_config.json + adapter_model.safetensors in PEFT's layout: only A and B, keyed
    base_model.model.<module>.lora_A.weight (PEFT drops its adapter name "default" when saving).
    r, alpha, dropout and rsLoRA are read off the layers. Atomic writes, the config last."""
    model = unwrap(model)  # DDP, torch.compile
    layers = adapted_layers(model)
    if not layers:
        raise UserError("save_adapter: the model has no LoRA layers; call inject_lora (or load_adapter) first")
    settings = {(m.r, m.alpha, m.dropout_p, m.rslora) for _, m in layers}
    if len(settings) > 1:
        raise UserError(f"save_adapter: layers differ in (r, alpha, dropout, rslora) {sorted(settings)}; "
                        "one adapter_config.json describes one setting")
    r, alpha, dropout, rslora = settings.pop()
    tensors = {}
    for name, m in layers:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_path or None,
        "r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": dropout,
        "use_rslora": rslora, "target_modules": peft_target_modules(model, [name for name, _ in layers]),
        "fan_in_fan_out": True,  # for HF GPT-2's transposed Conv1D; our nn.Linear never needs it
        "bias": "none", "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True, "revision": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    atomic_save_safetensors(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    atomic_write_json(config, os.path.join(out_dir, CONFIG_FILE))


# base_model.model.<module>.lora_A[.<adapter name>].weight; <module> may lack "transformer." (GPT2Model)
ADAPTER_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<AB>[AB])(?:\.[^.]+)?\.weight")
# PEFT options that change what the file means; we accept only their plain values
PLAIN_OPTIONS = {"use_dora": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
                 "layers_to_transform": None, "exclude_modules": None, "rank_pattern": {}, "alpha_pattern": {}}


def read_adapter(adapter_dir):
    """-> (config dict, {module name: {"A": tensor, "B": tensor}}), refusing what we cannot honour."""
    config_path, weights_path = os.path.join(adapter_dir, CONFIG_FILE), os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.exists(config_path):
        raise UserError(f"no LoRA adapter at {adapter_dir} ({CONFIG_FILE} missing); save one with "
                        "lora.save_adapter or `python sft.py --lora R`")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({e})")
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{config_path}: not a LoRA adapter (peft_type {config.get('peft_type')!r}, want 'LORA')")
    for key, plain in PLAIN_OPTIONS.items():
        if config.get(key) and config[key] != plain:
            raise UserError(f"{config_path}: {key} = {config[key]!r} is not supported here (only {plain!r})")
    if not os.path.exists(weights_path) and os.path.exists(os.path.join(adapter_dir, "adapter_model.bin")):
        raise UserError(f"{adapter_dir}: adapter_model.bin is a pickle file, which this project never loads; "
                        "re-save the adapter with PEFT's save_pretrained(..., safe_serialization=True)")
    found = {}
    for key, tensor in read_safetensors(weights_path).items():
        m = ADAPTER_KEY.fullmatch(key)
        if m is None:
            raise UserError(f"{weights_path}: unexpected tensor {key}; a LoRA adapter holds only "
                            "base_model.model.<module>.lora_A.weight and .lora_B.weight")
        name = m["module"] if m["module"].startswith("transformer.") else "transformer." + m["module"]
        if m["AB"] in found.setdefault(name, {}):
            raise UserError(f"{weights_path}: two lora_{m['AB']} tensors for {name}")
        found[name][m["AB"]] = tensor
    return config, found


def load_adapter(model, adapter_dir):
    """Inject LoRA as adapter_config.json says and load A and B from adapter_model.safetensors, into a
    model that has no adapters yet. Every check runs before the model is touched: a module the model
    lacks, a missing or mis-shaped A or B, a rank other than config's r -> UserError. Returns model."""
    config, found = read_adapter(adapter_dir)
    where = os.path.join(adapter_dir, WEIGHTS_FILE)
    r = config.get("r", PEFT_DEFAULT_R)
    if not isinstance(r, int) or r < 1:
        raise UserError(f"{adapter_dir}/{CONFIG_FILE}: r must be a positive integer, got {r!r}")
    linears = block_linears(model)
    for name, ab in found.items():
        if name not in linears:
            raise UserError(f"{where}: adapter for another model: it adapts {name}, which this model does not have")
        if set(ab) != {"A", "B"}:
            raise UserError(f"{where}: {name} has lora_{'A' if 'B' in ab else 'B'}.weight missing")
        A, B, base = ab["A"], ab["B"], linears[name]
        if A.dim() == 2 and B.dim() == 2 and A.shape[0] == B.shape[1] != r:
            raise UserError(f"{where}: rank mismatch: {name} has rank {A.shape[0]} but {CONFIG_FILE} says r = {r}")
        if tuple(A.shape) != (r, base.in_features) or tuple(B.shape) != (base.out_features, r):
            raise UserError(f"{where}: adapter for another model: {name} has lora_A {tuple(A.shape)} and lora_B "
                            f"{tuple(B.shape)}, this model needs {(r, base.in_features)} and {(base.out_features, r)}")
    targets = config.get("target_modules") or sorted(found)
    if isinstance(targets, str):  # PEFT also takes one regex, matched against the whole module name
        expected = {n for n in linears if re.fullmatch(targets, n) or re.fullmatch(targets, n[len("transformer."):])}
    else:
        expected = {n for n in linears if matches(n, targets) or matches(n[len("transformer."):], targets)}
    if expected != set(found):
        missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
        raise UserError(f"{where}: tensors do not fit target_modules {targets}: "
                        + (f"missing {missing[:3]}" if missing else f"not targeted {extra[:3]}"))
    inject_lora(model, r, config.get("lora_alpha", PEFT_DEFAULT_ALPHA), config.get("lora_dropout", 0.0),
                targets=sorted(found), rslora=bool(config.get("use_rslora", False)))
    with torch.no_grad():
        for name, ab in found.items():
            layer = model.get_submodule(name)
            layer.lora_A.weight.copy_(ab["A"])
            layer.lora_B.weight.copy_(ab["B"])
    return model


# ----------------------------------------------------------------------------- python lora.py

def build_parser():
    p = ArgumentParser(description="Inject LoRA into a GPT, print the trainable-parameter table and "
                       "check that merging the adapters changes no output.")
    p.add_argument("--init", default="", help="checkpoint directory (default: a fresh model of gpt.GPTConfig())")
    p.add_argument("--r", type=positive_int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=positive_float, default=None, help="LoRA alpha (default: 2r, a scale of 2)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated module-name suffixes")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_checkpoint(args.init, hint="python pretrain.py")[0] if args.init else GPT(GPTConfig())
    check_rank("--r", args.r, model.config.n_embd)
    model.eval()
    inject_lora(model, args.r, args.alpha, targets=tuple(args.targets.split(",")), rslora=args.rslora)
    print(f"LoRA r={args.r}, alpha={args.alpha or 2 * args.r:g}, targets {args.targets}")
    print_parameter_table(model)

    # merge check: with B = 0 the check would be trivial, so give B random values (dW != 0)
    layers = [layer for _, layer in adapted_layers(model)]
    idx = torch.randint(0, model.config.vocab_size, (2, min(64, model.config.block_size)))
    W0 = [layer.base_layer.weight.clone() for layer in layers]
    with torch.no_grad():
        base_logits = model(idx)  # B = 0: the base model
        for layer in layers:
            nn.init.normal_(layer.lora_B.weight, std=0.02)
        unmerged = model(idx)
        for layer in layers:
            layer.merge()
        merged = model(idx)
        for layer in layers:
            layer.unmerge()
    moved = (unmerged - base_logits).abs().max().item()
    merge_err = (merged - unmerged).abs().max().item()
    restore_err = max((layer.base_layer.weight - w).abs().max().item() for layer, w in zip(layers, W0))
    ok = moved > 1e-3 and merge_err < 1e-4 and restore_err < 1e-5
    print(f"adapters with random B move the logits by up to {moved:.3g}")
    print(f"max |logits merged - unmerged| = {merge_err:.2e}   max |W after unmerge - W0| = {restore_err:.2e}   "
          + ("ok" if ok else "FAILED"))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(main)
