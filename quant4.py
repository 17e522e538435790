"""Block-wise 4-bit quantization (NF4, FP4, INT4), double quantization, a frozen 4-bit Linear, and
the bitsandbytes/transformers file layout for 4-bit weights.

This is the storage half of QLoRA: the frozen base weights are kept as 4-bit codes plus one
scale per block of 64 weights, and are turned back into floats only inside forward. The LoRA
adapters (lora.py) train on top in bf16/fp32; sft.py --qlora wires the two together.

    w  --split into blocks of B-->  c = max|w_block|  (the absmax scale, one float per block)
       --scale-->  x = w / c  in [-1, 1]
       --round-->  q = argmin_j |x - code_j|  (a 4-bit index into a 16-entry codebook)
       --pack-->   two codes per byte, first element in the high nibble
    w_hat = c * code[q]

Why blocks: one scale for a whole tensor is set by its single largest value, so a few outliers
stretch the grid and most weights fall into the one or two codes around zero; with a scale per
block an outlier only coarsens its own 64 neighbours. `python quant4.py` measures this.

Double quantization (QLoRA's second level): the fp32 block scales cost 32/64 = 0.5 bit per weight;
storing them, minus their mean, as 8-bit codes of the dynamic map (dynamic_map) in blocks of 256,
with one fp32 scale per 256 blocks, brings that to about 0.127.

Files: hf.save_bnb / hf.load_bnb write and read 4-bit models in bitsandbytes' serialization (the one
transformers uses for load_in_4bit models): per quantized Linear X, X.weight (uint8 codes),
X.weight.absmax, X.weight.quant_map, X.weight.nested_absmax, X.weight.nested_quant_map and
X.weight.quant_state.bitsandbytes__nf4 (the remaining fields as JSON bytes).

Run:   python quant4.py          (error and memory tables, CPU, a few seconds)
Use:   quantize_model(model)     (swaps nn.Linear -> Linear4bit in place, skips lm_head/embeddings)
       dequantize_model(model)   (swaps back to nn.Linear holding the dequantized weights)
       hf.save_bnb(model, path), hf.load_bnb(model, path)   (bitsandbytes-format safetensors)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import ArgumentParser, run_cli


# ----------------------------------------------------------------------------------------------
# Codebooks: 16 float32 values in [-1, 1]; a 4-bit code q means the value CODEBOOKS[name][q].

# NF4 ("4-bit NormalFloat", QLoRA): bitsandbytes' table. Each value is a quantile of N(0, 1),
# rescaled to [-1, 1], so that for normally distributed weights every code is used about
# equally often. Code 7 is exactly 0; 8 codes are positive and 7 negative (see nf4_from_normal_quantiles).
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# Offset of the outermost NF4 quantile: the mean of the tail probabilities 1/(2*15) and
# 1/(2*16) of 15 and 16 equal-probability bins, 1 - (1/30 + 1/32)/2 = 0.96770833...,
# which bitsandbytes writes as the truncated literal below (and so do we, to match its table).
NF4_OFFSET = 0.9677083


def nf4_from_normal_quantiles(offset=NF4_OFFSET):
    """NF4 values = sorted({Phi^-1(p_i)} u {0} u {-Phi^-1(p'_k)}) / max, with
    p_i  = 8 evenly spaced probabilities from `offset` down to (not including) 0.5 -> 8 positive values,
    p'_k = 7 evenly spaced probabilities from `offset` down to (not including) 0.5 -> 7 negative values,
    plus an exact zero. Phi^-1 is the inverse normal CDF (torch.special.ndtri, in float64).
    The probability grid is built in float32, as bitsandbytes does, which reproduces its table bit for bit."""
    def upper_quantiles(n):
        p = torch.linspace(offset, 0.5, n + 1, dtype=torch.float32)[:-1]
        return torch.special.ndtri(p.double())
    values = torch.cat([upper_quantiles(8), torch.zeros(1, dtype=torch.float64), -upper_quantiles(7)])
    values = values.float().sort().values
    return values / values.max()


def fp4_e2m1_table():
    """bitsandbytes' FP4: 1 sign, 2 exponent, 1 mantissa bit; code q = s*8 + e*2 + m (bnb's bit order).
    |value| = 0.0625 * m  if e == 0 (subnormal), else 2^(4 - e) * (1 + m/2)  (bnb's exponent runs downward),
    giving {0, 0.0625, 2, 3, 4, 6, 8, 12}; the table is divided by its largest magnitude, 12."""
    values = []
    for q in range(16):
        s, e, m = q >> 3, (q >> 1) & 3, q & 1
        magnitude = 0.0625 * m if e == 0 else 2.0 ** (4 - e) * (1 + 0.5 * m)
        values.append(-magnitude if s else magnitude)
    table = torch.tensor(values, dtype=torch.float32)
    return table / table.abs().max()


FP4 = fp4_e2m1_table()

# INT4: symmetric absmax integers, value k/7 for k = -7..7 (code q = k + 7, so code 7 is 0 as in
# NF4), and code 8 is a second zero, like the +-0 pair of FP4 and bitsandbytes' int4. We use 15
# symmetric levels rather than -8..7 because an absmax scale must map both +c and -c exactly onto
# a code; with -8..7 the positive end would be 7/8 and the largest positive weight would lose 1/8.
INT4 = torch.tensor([k / 7 for k in range(-7, 1)] + [k / 7 for k in range(0, 8)], dtype=torch.float32)

CODEBOOKS = {"nf4": NF4, "fp4": FP4, "int4": INT4}


def codebook(name):
    if name not in CODEBOOKS:
        raise ValueError(f"unknown 4-bit code {name!r}; choose one of {sorted(CODEBOOKS)}")
    return CODEBOOKS[name]


def dynamic_map():
    """The signed 8-bit dynamic map of bitsandbytes (create_dynamic_map(signed=True); Dettmers 2015,
    "dynamic tree quantization"): QLoRA's second-level code for the block scales. A code's 8 bits are
        s | z zeros | 1 | f  (6 - z bits),  z = 0..6,
        value = (-1)^s * 10^-z * (0.1 + 0.9 * (f + 1/2) / 2^(6 - z)),
    i.e. the number of leading zeros after the sign is a decimal exponent, the first 1 ends it, and the
    6 - z bits left are a linear fraction on [0.1, 1], taken at the midpoints of its 2^(6 - z) bins:
    64 values in [0.1, 1], 32 in [0.01, 0.1], ..., 1 at 10^-6, and the same negated. The two patterns
    left, all zeros and the would-be -0, are 0 and 1.0. Sorted ascending, so the stored byte is a value's
    rank (index 127 is 0, 255 is 1.0, 0 is -0.99297). The step is relative: about 0.7% of |x| near
    1 down to 1.4% per decade, so small values keep their precision when one outlier block sets the group max.
    The bin midpoints are formed in float32 (linspace edges, their mean, times 10^-z), as bitsandbytes
    does, which reproduces its table bit for bit."""
    values = [torch.zeros(1), torch.ones(1)]
    for z in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (6 - z) + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** -z
        values += [mids, -mids]
    return torch.cat(values).sort().values


DYNAMIC8 = dynamic_map()


def max_half_gap(table):
    """Worst-case rounding error on [-1, 1] = half the largest gap between neighbouring code values."""
    values = table.double().sort().values
    return (values[1:] - values[:-1]).max().item() / 2


# ----------------------------------------------------------------------------------------------
# Rounding and packing


def nearest_code(x, table):
    """q = argmin_j |x - table_j|, ties (x exactly halfway between two values) to the lower index j.
    Done in float64 against the midpoints of the sorted table (torch.bucketize), so no N x 16
    distance matrix is built and the halfway test is exact. Returns uint8 codes, same shape as x."""
    values, order = torch.sort(table.double(), stable=True)
    rep = order.clone()                 # rep[i]: lowest code index whose value equals values[i]
    for i in range(1, len(values)):     # (the table's duplicates, +0/-0 of FP4 and 0/0 of INT4)
        if values[i] == values[i - 1]:
            rep[i] = rep[i - 1]
    rep = rep.to(x.device)
    mids = ((values[1:] + values[:-1]) / 2).to(x.device)
    xd = x.double()
    slot = torch.bucketize(xd, mids)    # mids[slot-1] < x <= mids[slot]: a tie goes to the lower slot
    upper = (slot + 1).clamp(max=len(values) - 1)
    tie = (slot < len(mids)) & (xd == mids[slot.clamp(max=len(mids) - 1)]) & (rep[upper] < rep[slot])
    return torch.where(tie, rep[upper], rep[slot]).to(torch.uint8)


def pack_nibbles(q, pad=0):
    """byte_i = q[2i] << 4 | q[2i+1]: two 4-bit codes per byte, the first in the HIGH nibble
    (bitsandbytes' order); an odd count is padded with one nibble `pad` (quantize_blockwise passes
    the code of 0.0, 7 for NF4, as bitsandbytes writes)."""
    q = q.flatten().to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), pad)])
    return (q[0::2] << 4) | q[1::2]


def unpack_nibbles(packed, n):
    """Inverse of pack_nibbles: the first n codes, high nibble first."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).flatten()[:n]


# ----------------------------------------------------------------------------------------------
# Block-wise absmax quantization (+ double quantization of the scales)


@dataclass
class QState:
    """A quantized tensor. Without double quant the block scales are `absmax` (fp32); with it they
    are `absmax_q` (uint8 indices into DYNAMIC8), `absmax_scale` (fp32, one per dq_block_size blocks)
    and `absmax_mean` (fp32). `dtype` names the dtype the weight had (bitsandbytes' "dtype" field)."""
    packed: torch.Tensor            # uint8, ceil(numel / 2): the 4-bit codes
    absmax: torch.Tensor | None     # fp32, n_blocks (None when double-quantized)
    shape: tuple
    block_size: int
    code: str
    numel: int
    absmax_q: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_mean: torch.Tensor | None = None
    dq_block_size: int = 256
    dtype: str = "float32"

    def tensors(self):
        return [t for t in (self.packed, self.absmax, self.absmax_q, self.absmax_scale, self.absmax_mean)
                if t is not None]

    def nbytes(self):
        """Bytes actually stored: packed codes + all scales (the shared 16-value codebook not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def absmax_per_block(w, block_size):
    """Split flat w into blocks of block_size (the last block may be shorter; it is padded with
    zeros, which never change a max) and return (blocks, c) with c = max|w_block|."""
    flat = w.flatten()
    n_blocks = math.ceil(flat.numel() / block_size)
    blocks = F.pad(flat, (0, n_blocks * block_size - flat.numel())).view(n_blocks, block_size)
    return blocks, blocks.abs().amax(dim=1)


def double_quantize(absmax, dq_block_size=256):
    """Second-level quantization of the block scales c (QLoRA; bitsandbytes' compress_statistics):
    m = mean(c); per group of dq_block_size scales s2 = max|c - m|;
    q8 = argmin_j |(c - m) / s2 - DYNAMIC8_j| (uint8, ties to the lower j): block-wise absmax
    quantization again, with the 8-bit dynamic map as codebook. Centring puts most scales near 0, and
    an outlier block makes s2 large, so most (c - m) / s2 are small: the map's relative step (0.7-1.4%
    of |x|, see dynamic_map) keeps them precise where a linear int8 grid's fixed step s2/127 would not.
    Returns (q8, s2, m)."""
    mean = absmax.mean()
    blocks, s2 = absmax_per_block(absmax - mean, dq_block_size)
    x = blocks / torch.where(s2 > 0, s2, 1.0)[:, None]
    return nearest_code(x, DYNAMIC8.to(x.device)).flatten()[:absmax.numel()], s2, mean


def double_dequantize(q8, s2, mean, dq_block_size=256):
    """c_hat = max(0, DYNAMIC8[q8] * s2 + m), in float32 in that order (as bitsandbytes computes it);
    clamped at 0 because a scale is never negative (bitsandbytes does not clamp; it differs only where
    its c_hat < 0, which would flip the signs of a block of near-zero weights)."""
    s2_each = s2.repeat_interleave(dq_block_size)[:q8.numel()]
    return (DYNAMIC8.to(s2.device)[q8.long()] * s2_each + mean).clamp(min=0)


def block_scales(state):
    """The fp32 per-block scales c of a QState (undoing double quantization if it was used)."""
    if state.absmax is not None:
        return state.absmax
    return double_dequantize(state.absmax_q, state.absmax_scale, state.absmax_mean, state.dq_block_size)


def quantize_blockwise(w, code="nf4", block_size=64, double_quant=False, dq_block_size=256):
    """Block-wise absmax quantization: c = max|w_block|, x = w / c (c = 0 -> x = 0),
    q = argmin_j |x - code_j| (ties to the lower j), codes packed two per byte. Per-tensor
    quantization is block_size = w.numel()."""
    table = codebook(code).to(w.device)
    blocks, c = absmax_per_block(w.detach().float(), block_size)
    x = blocks / torch.where(c > 0, c, 1.0)[:, None]
    q = nearest_code(x, table).flatten()[:w.numel()]
    zero_code = nearest_code(torch.zeros(1, device=w.device), table).item()
    state = QState(pack_nibbles(q, zero_code), c, tuple(w.shape), block_size, code, w.numel(),
                   dq_block_size=dq_block_size, dtype=str(w.dtype).removeprefix("torch."))
    if double_quant:
        state.absmax = None
        state.absmax_q, state.absmax_scale, state.absmax_mean = double_quantize(c, dq_block_size)
    return state


def dequantize_blockwise(state, dtype=torch.float32):
    """w_hat = c_block * code[q], reshaped to the original shape."""
    table = codebook(state.code).to(state.packed.device)
    q = unpack_nibbles(state.packed, state.numel).long()
    c = block_scales(state).repeat_interleave(state.block_size)[:state.numel]
    return (table[q] * c).view(state.shape).to(dtype)


def quantized_nbytes(numel, block_size=64, double_quant=True, dq_block_size=256):
    """Bytes of a quantized tensor: ceil(numel/2) for the codes, plus 4 per block (fp32 absmax), or with
    double quant 1 per block (uint8 code) + 4 per dq_block_size blocks (fp32 s2) + 4 (fp32 mean)."""
    n_blocks = math.ceil(numel / block_size)
    scales = n_blocks + 4 * math.ceil(n_blocks / dq_block_size) + 4 if double_quant else 4 * n_blocks
    return math.ceil(numel / 2) + scales


def bits_per_parameter(numel, block_size=64, double_quant=True, dq_block_size=256):
    """Storage cost per weight: 4 + 32/B without double quant (4.5 at B = 64);
    4 + 8/B + 32/(B * 256) + 32/numel with it (about 4.127 at B = 64); exact with tail blocks."""
    return 8 * quantized_nbytes(numel, block_size, double_quant, dq_block_size) / numel


# ----------------------------------------------------------------------------------------------
# The frozen 4-bit linear layer and model surgery


class Linear4bit(nn.Module):
    """A frozen stand-in for nn.Linear: y = x W_hat^T + b, W_hat = dequantize(codes, scales) in x's dtype.
    Codes and scales are buffers (never trained, moved by .to()); the bias is a frozen Parameter.
    Gradients flow to the input only, which is all LoRA adapters on top need.
    With `state` (a QState of shape (out, in), e.g. read by hf.load_bnb) the weight is that state, not
    linear's; linear then gives only the sizes and the bias."""

    def __init__(self, linear, code="nf4", block_size=64, double_quant=True, state=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if state is None:
            state = quantize_blockwise(linear.weight, code, block_size, double_quant)
        self.code, self.block_size, self.dq_block_size, self.weight_dtype = (
            state.code, state.block_size, state.dq_block_size, state.dtype)
        for name in ("packed", "absmax", "absmax_q", "absmax_scale", "absmax_mean"):
            self.register_buffer(name, getattr(state, name))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def qstate(self):
        return QState(self.packed, self.absmax, (self.out_features, self.in_features), self.block_size,
                      self.code, self.out_features * self.in_features, self.absmax_q, self.absmax_scale,
                      self.absmax_mean, self.dq_block_size, self.weight_dtype)

    def dequantized_weight(self, dtype=torch.float32):
        return dequantize_blockwise(self.qstate(), dtype)

    def weight_nbytes(self):
        """Bytes of the packed weight + its scales (not the bias)."""
        return self.qstate().nbytes()

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def to_linear(self):
        """A plain nn.Linear holding W_hat (e.g. to merge LoRA into, or to export)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.packed.device)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self):
        dq = "+dq" if self.absmax is None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, code={self.code}{dq}, block_size={self.block_size}")


def quantize_model(model, code="nf4", block_size=64, double_quant=True, skip=("lm_head", "wte", "wpe")):
    """Swap, in place, every nn.Linear whose dotted name has no part in `skip` for a frozen Linear4bit;
    nn.Embedding is never touched (it is not an nn.Linear). A Linear shared by two names becomes one
    shared Linear4bit. Call it before injecting LoRA (else the adapters' own Linears get quantized too,
    unless their names are added to skip). Returns the model."""
    made = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, nn.Linear) or set(name.split(".")) & set(skip):
            continue
        if name == "":
            raise ValueError("quantize_model needs a model containing nn.Linear layers; wrap a bare "
                             "nn.Linear as Linear4bit(linear) instead")
        if id(module) not in made:
            made[id(module)] = Linear4bit(module, code, block_size, double_quant)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, made[id(module)])
    return model


def dequantize_model(model):
    """The inverse swap: every Linear4bit becomes a plain nn.Linear holding W_hat (fp32), e.g. before
    merging LoRA adapters into the base and saving an ordinary checkpoint. Returns the model."""
    made = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, Linear4bit) and name:
            made.setdefault(id(module), module.to_linear())
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, made[id(module)])
    return model


# ----------------------------------------------------------------------------------------------
# python quant4.py: reconstruction error and memory


def reconstruction_error(w, code, block_size, double_quant=False):
    """MSE = mean (w - w_hat)^2 and MAE = mean |w - w_hat|."""
    err = w - dequantize_blockwise(quantize_blockwise(w, code, block_size, double_quant))
    return err.pow(2).mean().item(), err.abs().mean().item()


def second_level_error(w, block_size=64, dq_block_size=256):
    """What double quantization costs on w: (median over blocks of |c_hat - c| / c, for c > 0;
    MSE(w - w_hat) with double quant / MSE(w - w_hat) without)."""
    state = quantize_blockwise(w, "nf4", block_size, False, dq_block_size)
    c = state.absmax
    mse = (dequantize_blockwise(state) - w).pow(2).mean()
    state.absmax = None
    state.absmax_q, state.absmax_scale, state.absmax_mean = double_quantize(c, dq_block_size)
    c_hat = block_scales(state)
    dq_mse = (dequantize_blockwise(state) - w).pow(2).mean()
    return ((c_hat - c).abs() / c)[c > 0].median().item(), (dq_mse / mse).item()


def outlier_weight(shape=(256, 320), n_outliers=24, size=20.0, seed=0):
    """An N(0, 1) weight with n_outliers entries set to +-size (the test case of the second level)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    where = torch.randperm(w.numel(), generator=g)[:n_outliers]
    w.view(-1)[where] = size * torch.sign(torch.randn(n_outliers, generator=g))
    return w


def gpt_tensors(vocab_size, block_size, n_layer, n_embd):
    """(numel, kind) of every parameter tensor of our GPT (bias=True, lm_head tied to wte):
    embeddings V*C + T*C; per layer the 4 linear weights 3C^2 + C^2 + 4C^2 + 4C^2 = 12C^2,
    their biases 3C + C + 4C + C and two LayerNorms 2*2C; a final LayerNorm 2C."""
    C = n_embd
    tensors = [(vocab_size * C, "embedding"), (block_size * C, "embedding"), (2 * C, "other")]
    for _ in range(n_layer):
        tensors += [(C * 3 * C, "linear"), (C * C, "linear"), (C * 4 * C, "linear"), (4 * C * C, "linear")]
        tensors += [(3 * C, "other"), (C, "other"), (4 * C, "other"), (C, "other"), (4 * C, "other")]
    return tensors


def model_nbytes(tensors, fmt, block_size=64):
    """fp32: 4 bytes each; bf16: 2; nf4 / nf4+dq: linear weights 4-bit, everything else bf16."""
    if fmt in ("fp32", "bf16"):
        return sum(n for n, _ in tensors) * (4 if fmt == "fp32" else 2)
    dq = fmt == "nf4+dq"
    return sum(quantized_nbytes(n, block_size, dq) if kind == "linear" else 2 * n for n, kind in tensors)


def build_parser():
    return ArgumentParser(description=__doc__ + "\n    python quant4.py    # reconstruction errors, bits per parameter "
                          "and model memory of the three 4-bit codes")


def main(argv=None):
    build_parser().parse_args(argv)
    torch.manual_seed(0)
    n_rows, n_outliers, outlier_size = 1024, 16, 20.0
    w = torch.randn(n_rows, n_rows)    # N(0, 1): NF4 at block 64 gives MSE ~0.0085 at this scale
    w_out = w.clone()
    where = torch.randperm(w.numel())[:n_outliers]
    w_out.view(-1)[where] = outlier_size * torch.sign(torch.randn(n_outliers))
    print(f"Reconstruction error on a {n_rows}x{n_rows} N(0, 1) weight, and the same weight with "
          f"{n_outliers} entries set to +-{outlier_size:g}:")
    print(f"{'weights':<10}{'code':<8}{'block':>10}{'MSE':>12}{'MAE':>10}")
    for label, x in (("gaussian", w), ("outliers", w_out)):
        for code in ("nf4", "fp4", "int4"):
            for block in (64, 4096, x.numel()):
                mse, mae = reconstruction_error(x, code, block)
                print(f"{label:<10}{code:<8}{block if block < x.numel() else 'tensor':>10}{mse:>12.5f}{mae:>10.5f}")
        mse, mae = reconstruction_error(x, "nf4", 64, double_quant=True)
        print(f"{label:<10}{'nf4+dq':<8}{64:>10}{mse:>12.5f}{mae:>10.5f}")

    print("\nSecond level (block scales as 8-bit dynamic codes in groups of 256), NF4 at block 64:")
    for label, x in (("256x320, 24 entries +-20", outlier_weight()), ("256x320 N(0, 1)", outlier_weight(n_outliers=0))):
        rel, ratio = second_level_error(x)
        print(f"  {label:<26} median |c_hat - c| / c = {rel:.2e}   MSE x{ratio:.4f} of the fp32-scale MSE")

    print("\nBits per parameter (block 64, double-quant groups of 256 scales):")
    for shape in ((768, 2304), (1024, 1024), (256, 768)):
        n = shape[0] * shape[1]
        print(f"  {f'{shape[0]}x{shape[1]}':<10} no double quant {bits_per_parameter(n, 64, False):.4f}"
              f"   double quant {bits_per_parameter(n, 64, True):.4f}")

    print("\nModel memory (MB = 1e6 bytes); 4-bit rows quantize the Linear weights, keep embeddings, "
          "biases and LayerNorms in bf16:")
    configs = {"default (4096 vocab, 256 ctx, 4x256)": (4096, 256, 4, 256),
               "GPT-2 124M (50257 vocab, 1024 ctx, 12x768)": (50257, 1024, 12, 768)}
    print(f"{'model':<44}{'params':>12}{'fp32':>9}{'bf16':>9}{'nf4':>9}{'nf4+dq':>9}{'linear bf16/nf4+dq':>20}")
    for label, cfg in configs.items():
        tensors = gpt_tensors(*cfg)
        linear = [t for t in tensors if t[1] == "linear"]
        sizes = [model_nbytes(tensors, f) / 1e6 for f in ("fp32", "bf16", "nf4", "nf4+dq")]
        ratio = model_nbytes(linear, "bf16") / model_nbytes(linear, "nf4+dq")
        print(f"{label:<44}{sum(n for n, _ in tensors):>12,}" + "".join(f"{s:>9.2f}" for s in sizes)
              + f"{ratio:>19.2f}x")


if __name__ == "__main__":
    run_cli(main)
