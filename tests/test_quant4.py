"""quant4.py: codebooks, nearest-code rounding, packing, block-wise absmax, double quant (the 8-bit
dynamic map), Linear4bit, and the bitsandbytes file layout.

Cross-checks against bitsandbytes run when it is installed (it runs on CPU); otherwise the values it
gave, stored in tests/data/bnb_reference.json, stand in. Rewrite that file (with bitsandbytes installed):
    python tests/test_quant4.py --write-reference
"""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import UserError
from hf import QS_KEY, bnb_state_dict, bnb_tensors, load_bnb, load_bnb_state_dict, qstate_from_bnb, save_bnb
from quant4 import (CODEBOOKS, DYNAMIC8, FP4, INT4, Linear4bit, NF4, NF4_OFFSET, bits_per_parameter, block_scales,
                    dequantize_blockwise, dequantize_model, double_dequantize, double_quantize, dynamic_map,
                    max_half_gap, nearest_code, nf4_from_normal_quantiles, outlier_weight, pack_nibbles,
                    quantize_blockwise, quantize_model, reconstruction_error, second_level_error, unpack_nibbles)

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bnb_reference.json")

# Typed from bitsandbytes' functional.get_4bit_type (NF4 as listed; FP4 in bnb's code order, then / 12).
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
BNB_FP4_RAW = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def test_codebooks_equal_bitsandbytes_tables():
    assert NF4.dtype == FP4.dtype == INT4.dtype == torch.float32
    assert (NF4.double() - torch.tensor(BNB_NF4, dtype=torch.float64)).abs().max() <= 1e-7
    bnb_fp4 = torch.tensor(BNB_FP4_RAW, dtype=torch.float64) / 12
    assert (FP4.double() - bnb_fp4).abs().max() <= 1e-7
    assert NF4[7] == 0 and NF4[0] == -1 and NF4[15] == 1
    assert torch.equal(INT4 * 7, torch.tensor([-7, -6, -5, -4, -3, -2, -1, 0, 0, 1, 2, 3, 4, 5, 6, 7.]))
    for table in CODEBOOKS.values():
        assert table.numel() == 16 and table.abs().max() == 1


def test_nf4_recipe_from_normal_quantiles_matches_table():
    recipe = nf4_from_normal_quantiles()
    assert (recipe.double() - NF4.double()).abs().max() <= 1e-7
    assert (recipe > 0).sum() == 8 and (recipe < 0).sum() == 7 and (recipe == 0).sum() == 1
    # the offset is the mean of the 15- and 16-bin tail probabilities, truncated to 7 digits
    assert abs(NF4_OFFSET - (1 - (1 / 30 + 1 / 32) / 2)) < 1e-7
    # the top value before normalisation is the offset's normal quantile: Phi(1.848) ~ 0.9677
    assert abs(0.5 * (1 + math.erf(torch.special.ndtri(torch.tensor(NF4_OFFSET, dtype=torch.float64)).item()
                                   / math.sqrt(2))) - NF4_OFFSET) < 1e-12


def brute_force_codes(x, table):
    """Reference: distance to all 16 values in float64, torch.argmin takes the first (lowest) index on ties."""
    return (x.double().unsqueeze(-1) - table.double()).abs().argmin(dim=-1)


@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
def test_nearest_code_equals_brute_force_argmin_including_ties(name):
    table = CODEBOOKS[name]
    g = torch.Generator().manual_seed(0)
    values = table.double().sort().values
    mids = (values[1:] + values[:-1]) / 2          # exact halfway points (ties), in float64
    x = torch.cat([torch.rand(20000, generator=g, dtype=torch.float64) * 2 - 1,
                   mids, values, torch.tensor([-1.0, 1.0, 0.0, -0.0], dtype=torch.float64)])
    assert torch.equal(nearest_code(x, table).long(), brute_force_codes(x, table))
    x32 = torch.rand(20000, generator=g) * 2 - 1
    assert torch.equal(nearest_code(x32, table).long(), brute_force_codes(x32, table))


def test_tie_rule_by_hand():
    half = lambda a, b: torch.tensor([(a.double() + b.double()).item() / 2], dtype=torch.float64)
    assert nearest_code(half(NF4[7], NF4[8]), NF4).item() == 7           # 0 vs 0.0796: lower index 7
    assert nearest_code(half(FP4[6], FP4[7]), FP4).item() == 6           # 2/12 vs 3/12
    assert nearest_code(half(FP4[14], FP4[15]), FP4).item() == 14        # -2/12 vs -3/12: index 14 < 15
    assert nearest_code(torch.tensor([0.0, -0.0]), FP4).tolist() == [0, 0]   # +0 (code 0), never -0 (code 8)
    assert nearest_code(torch.tensor([0.0, 0.01, -0.01]), INT4).tolist() == [7, 7, 7]  # never the spare zero


def test_pack_unpack_nibble_order_and_inverse():
    assert pack_nibbles(torch.tensor([1, 2])).tolist() == [0x12]
    assert pack_nibbles(torch.tensor([15, 0, 10])).tolist() == [0xF0, 0xA0]   # odd: padded low nibble
    assert pack_nibbles(torch.tensor([15, 0, 10]), pad=7).tolist() == [0xF0, 0xA7]
    q = torch.randint(0, 16, (1001,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 501
    assert torch.equal(unpack_nibbles(packed, 1001), q)


@pytest.mark.parametrize("name,zero_code", [("nf4", 7), ("fp4", 0), ("int4", 7)])
def test_odd_count_spare_nibble_is_the_code_of_zero(name, zero_code):
    assert CODEBOOKS[name][zero_code] == 0
    state = quantize_blockwise(gaussian((7, 9)), name, 64)
    assert state.packed.numel() == 32 and state.packed[-1].item() & 0x0F == zero_code


def gaussian(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
def test_largest_element_of_each_block_is_exact(name):
    w = gaussian((37, 29))                               # 1073 = 16 full blocks of 64 + a tail of 49
    w_hat = dequantize_blockwise(quantize_blockwise(w, name, 64))
    flat, flat_hat = w.flatten(), w_hat.flatten()
    for start in range(0, flat.numel(), 64):
        i = start + flat[start:start + 64].abs().argmax()
        assert flat_hat[i] == flat[i]


@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_requantizing_dequantized_tensor_gives_same_codes(name, double_quant):
    w = gaussian((64, 100), seed=2)
    s1 = quantize_blockwise(w, name, 64, double_quant)
    s2 = quantize_blockwise(dequantize_blockwise(s1), name, 64, double_quant)
    assert torch.equal(s1.packed, s2.packed)


@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("block", [64, 4096])
def test_error_bound_half_largest_gap_times_absmax(name, block):
    w = gaussian((50, 123), seed=3)
    w[3, 7] = 25.0                                       # an outlier only widens its own block's bound
    state = quantize_blockwise(w, name, block)
    err = (w - dequantize_blockwise(state)).abs().flatten()
    c = state.absmax.repeat_interleave(block)[:w.numel()]
    assert (err <= max_half_gap(CODEBOOKS[name]) * c * (1 + 1e-6)).all()


@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
def test_all_zero_block_and_tail_block(name):
    w = gaussian(64 * 3 + 5, seed=4)
    w[64:128] = 0.0
    state = quantize_blockwise(w, name, 64)
    w_hat = dequantize_blockwise(state)
    assert state.absmax.tolist()[1] == 0.0 and state.absmax.numel() == 4
    assert state.absmax[3] == w[-5:].abs().max() and state.packed.numel() == math.ceil(197 / 2)
    assert torch.isfinite(w_hat).all() and (w_hat[64:128] == 0).all()
    assert (w_hat[-5:] - w[-5:]).abs().max() <= max_half_gap(CODEBOOKS[name]) * state.absmax[3] * (1 + 1e-6)
    one = quantize_blockwise(torch.tensor([-0.3]), name, 64)    # a single element: one short block
    assert dequantize_blockwise(one).tolist() == pytest.approx([-0.3])
    zero = dequantize_blockwise(quantize_blockwise(torch.zeros(10), name, 64, double_quant=True))
    assert torch.equal(zero, torch.zeros(10))


def test_dynamic_map_from_its_definition():
    """value = (-1)^s 10^-z (0.1 + 0.9 (f + 1/2) / 2^(6-z)), z = 0..6, f < 2^(6-z); plus 0 and 1."""
    assert DYNAMIC8.dtype == torch.float32 and DYNAMIC8.numel() == 256
    by_hand = [0.0, 1.0]
    for z in range(7):
        for f in range(2 ** (6 - z)):
            v = 10.0 ** -z * (0.1 + 0.9 * (f + 0.5) / 2 ** (6 - z))
            by_hand += [v, -v]
    by_hand = torch.tensor(sorted(by_hand), dtype=torch.float64)
    assert ((DYNAMIC8.double() - by_hand).abs() <= 2.4e-7 * by_hand.abs()).all()   # within 2 float32 ulps
    assert (DYNAMIC8[1:] > DYNAMIC8[:-1]).all() and DYNAMIC8[127] == 0 and DYNAMIC8[255] == 1
    assert DYNAMIC8[0].item() == pytest.approx(-(1 - 0.9 / 128)) and DYNAMIC8[128].item() == pytest.approx(0.55e-6)
    for z in range(7):       # 2^(6-z) positive values in each decade [10^-(z+1), 10^-z)
        assert ((DYNAMIC8 >= 10.0 ** -(z + 1)) & (DYNAMIC8 < 10.0 ** -z)).sum() == 2 ** (6 - z)
    assert torch.equal(dynamic_map(), DYNAMIC8)


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(DYNAMIC8, torch.tensor(reference()["dynamic_map"], dtype=torch.float32))
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(DYNAMIC8, bnb_f.create_dynamic_map(signed=True))


def test_double_quant_absmax_is_nearest_dynamic_code():
    w = gaussian(64 * 700 + 13, seed=5)                  # 701 blocks -> 3 groups of scales, the last partial
    c = quantize_blockwise(w, "nf4", 64).absmax
    q8, s2, mean = double_quantize(c, 256)
    assert q8.dtype == torch.uint8 and q8.numel() == 701 and s2.numel() == 3
    assert abs(mean.item() - c.mean().item()) < 1e-6
    s2_each = s2.repeat_interleave(256)[:701]
    assert torch.equal(s2, torch.stack([(c - mean)[i:i + 256].abs().max() for i in range(0, 701, 256)]))
    assert torch.equal(q8.long(), brute_force_codes((c - mean) / s2_each, DYNAMIC8))
    c_hat = double_dequantize(q8, s2, mean, 256)
    assert torch.equal(c_hat, (DYNAMIC8[q8.long()] * s2_each + mean).clamp(min=0))
    assert ((c_hat - c).abs() <= s2_each * max_half_gap(DYNAMIC8) * (1 + 1e-5) + 1e-6).all()
    state = quantize_blockwise(w, "nf4", 64, double_quant=True)
    assert state.absmax is None and torch.allclose(block_scales(state), c_hat)
    dq_mse, _ = reconstruction_error(w, "nf4", 64, double_quant=True)
    mse, _ = reconstruction_error(w, "nf4", 64)
    assert dq_mse < 1.005 * mse                           # the 8-bit scales cost almost nothing


def test_second_level_error_within_bitsandbytes_on_outliers():
    """24 entries of +-20 in a 256x320 N(0, 1) weight: the outlier blocks set each group's max, the other
    centred scales are small against it. Ours within 1.5x of bitsandbytes' (median relative scale error,
    and the MSE added by the second level)."""
    ref = reference()["second_level"]
    w = outlier_weight(tuple(ref["shape"]), ref["n_outliers"], ref["size"], ref["seed"])
    rel, ratio = second_level_error(w)
    bnb_f = optional_bnb()
    if bnb_f is not None:
        ref = bnb_second_level(bnb_f, w)
    assert rel <= 1.5 * ref["median_rel_scale_error"]
    assert ratio - 1 <= 1.5 * (ref["mse_ratio"] - 1)
    assert rel < 5e-3 and ratio < 1.003      # a linear int8 grid on this tensor: ~1.3e-2 and x1.018


def test_double_quant_never_flips_a_tiny_block():
    # 200 blocks of ~1e-6 and one block of ~1: mean - s2/127 < 0, so an unclamped scale would be negative
    w = torch.cat([gaussian(64 * 200, seed=7) * 1e-6, gaussian(64, seed=8)])
    c_hat = block_scales(quantize_blockwise(w, "nf4", 64, double_quant=True))
    assert (c_hat >= 0).all()
    w_hat = dequantize_blockwise(quantize_blockwise(w, "nf4", 64, double_quant=True))
    assert (w_hat * w >= 0).all()


def test_bits_per_parameter():
    assert bits_per_parameter(768 * 2304, 64, double_quant=False) == 4.5
    n = 768 * 2304
    with_dq = bits_per_parameter(n, 64, double_quant=True)
    assert with_dq == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n, abs=1e-12)
    assert abs(with_dq - 4.127) <= 0.001
    for shape, dq in [((33, 70), True), ((33, 70), False), ((512, 512), True)]:   # tails included
        state = quantize_blockwise(gaussian(shape), "nf4", 64, dq)
        assert 8 * state.nbytes() / state.numel == pytest.approx(bits_per_parameter(state.numel, 64, dq))


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_forward_and_gradients(double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = Linear4bit(linear, "nf4", 64, double_quant)
    assert (layer.in_features, layer.out_features) == (96, 40)
    assert not any(p.requires_grad for p in layer.parameters())
    assert all(not b.is_floating_point() or not b.requires_grad for b in layer.buffers())
    w_hat = layer.dequantized_weight()
    err = (w_hat - linear.weight).abs().max()
    assert w_hat.shape == linear.weight.shape and err <= 1.01 * max_half_gap(NF4) * linear.weight.abs().max()
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, w_hat, linear.bias))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(3, 5, 40) @ w_hat)
    assert layer.bias.grad is None
    assert layer.weight_nbytes() * 8 == pytest.approx(bits_per_parameter(96 * 40, 64, double_quant) * 96 * 40)
    assert layer(x.detach().bfloat16()).dtype == torch.bfloat16
    assert torch.equal(layer.to_linear().weight, w_hat)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(32, 96), nn.Linear(32, 32)


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(50, 32), wpe=nn.Embedding(8, 32),
                                              h=nn.ModuleList([nn.ModuleDict(dict(attn=Attn())) for _ in range(2)])))
        self.lm_head = nn.Linear(32, 50, bias=False)
        self.lm_head.weight = self.transformer.wte.weight    # tied, as in our GPT


def test_quantize_model_swaps_linears_but_not_embeddings_or_lm_head():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(8, 16)
    y = seq(x)
    assert quantize_model(seq) is seq
    assert isinstance(seq[0], Linear4bit) and isinstance(seq[2], Linear4bit)
    assert (seq(x) - y).abs().max() < 0.2 * y.abs().max()

    model = TinyGPT()
    quantize_model(model, code="fp4", double_quant=False)
    for block in model.transformer.h:
        assert isinstance(block.attn.c_attn, Linear4bit) and isinstance(block.attn.c_proj, Linear4bit)
        assert block.attn.c_attn.code == "fp4" and block.attn.c_attn.absmax is not None
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    assert type(model.transformer.wte) is nn.Embedding and type(model.transformer.wpe) is nn.Embedding

    shared = nn.Linear(8, 8)
    pair = nn.ModuleDict(dict(a=shared, b=shared))
    quantize_model(pair)
    assert isinstance(pair.a, Linear4bit) and pair.a is pair.b


def test_dequantize_model_restores_plain_linears_with_the_same_outputs():
    torch.manual_seed(0)
    seq = quantize_model(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4, bias=False)))
    x = torch.randn(8, 16)
    y = seq(x)
    dequantize_model(seq)
    assert type(seq[0]) is nn.Linear and type(seq[2]) is nn.Linear and seq[2].bias is None
    assert torch.allclose(seq(x), y, atol=1e-6)


def test_gaussian_error_ordering_and_outliers():
    w = gaussian((256, 256), seed=6)
    mse = {name: reconstruction_error(w, name, 64)[0] for name in ("nf4", "fp4", "int4")}
    assert mse["nf4"] < mse["int4"] < mse["fp4"]
    w[0, :4] = 20.0
    assert reconstruction_error(w, "nf4", 64)[0] * 5 < reconstruction_error(w, "nf4", w.numel())[0]


# ----------------------------------------------------------------------------------------------
# bitsandbytes file layout


def optional_bnb():
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError:
        return None
    return bnb_f


def reference():
    with open(REFERENCE) as f:
        return json.load(f)


def bnb_second_level(bnb_f, w):
    """bitsandbytes' second-level cost on w, measured as second_level_error measures ours."""
    q, plain = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    q2, nested = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    c = plain.absmax
    c_hat = bnb_f.dequantize_blockwise(nested.absmax, nested.state2) + nested.offset
    mse = (bnb_f.dequantize_4bit(q, plain) - w).pow(2).mean()
    dq_mse = (bnb_f.dequantize_4bit(q2, nested) - w).pow(2).mean()
    return {"median_rel_scale_error": ((c_hat - c).abs() / c)[c > 0].median().item(),
            "mse_ratio": (dq_mse / mse).item()}


def bnb_file_tensors(bnb_f, w, quant_type="nf4", nested=True):
    """What bitsandbytes' Linear4bit.state_dict() holds for weight w: weight + QuantState.as_dict(packed=True)."""
    q, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    return {"weight": q, **{"weight." + k: v for k, v in state.as_dict(packed=True).items()}}, \
        bnb_f.dequantize_4bit(q, state)


def write_reference():
    """tests/data/bnb_reference.json from the installed bitsandbytes."""
    import bitsandbytes
    bnb_f = optional_bnb()
    case = {"shape": [256, 320], "n_outliers": 24, "size": 20.0, "seed": 0}
    small = outlier_weight((9, 71), 3, 20.0, seed=1)    # 639 values: a tail block and a spare nibble
    tensors, deq = bnb_file_tensors(bnb_f, small)
    ref = {"bitsandbytes": bitsandbytes.__version__,
           "dynamic_map": bnb_f.create_dynamic_map(signed=True).tolist(),
           "second_level": {**case, **bnb_second_level(bnb_f, outlier_weight(**{**case, "shape": (256, 320)}))},
           "file": {"shape": [9, 71], "n_outliers": 3, "size": 20.0, "seed": 1,
                    "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                                    "values": v.flatten().tolist()} for k, v in tensors.items()},
                    "dequantized": deq.flatten().tolist()}}
    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    with open(REFERENCE, "w") as f:
        json.dump(ref, f)
        f.write("\n")


def stored_bnb_file():
    ref = reference()["file"]
    tensors = {k: torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])).view(v["shape"])
               for k, v in ref["tensors"].items()}
    w = outlier_weight(tuple(ref["shape"]), ref["n_outliers"], ref["size"], ref["seed"])
    return w, tensors, torch.tensor(ref["dequantized"]).view(ref["shape"])


def test_bnb_tensors_layout_and_json():
    state = quantize_blockwise(gaussian((9, 71), seed=3), "nf4", 64, double_quant=True)
    t = bnb_tensors(state, "h.0.fc")
    assert list(t) == ["h.0.fc.weight", "h.0.fc.weight.absmax", "h.0.fc.weight.quant_map",
                       "h.0.fc.weight.nested_absmax", "h.0.fc.weight.nested_quant_map",
                       "h.0.fc.weight.quant_state.bitsandbytes__nf4"]
    assert t["h.0.fc.weight"].dtype == torch.uint8 and t["h.0.fc.weight"].shape == (320, 1)
    assert t["h.0.fc.weight.absmax"].dtype == torch.uint8 and t["h.0.fc.weight.absmax"].shape == (10,)
    assert torch.equal(t["h.0.fc.weight.quant_map"], NF4) and torch.equal(t["h.0.fc.weight.nested_quant_map"], DYNAMIC8)
    assert t["h.0.fc.weight.nested_absmax"].shape == (1,)
    text = bytes(t["h.0.fc.weight.quant_state.bitsandbytes__nf4"].tolist()).decode()
    assert text == ('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [9, 71], '
                    '"nested_blocksize": 256, "nested_dtype": "float32", '
                    f'"nested_offset": {state.absmax_mean.item()}}}')
    plain = bnb_tensors(quantize_blockwise(gaussian((9, 71), seed=3), "fp4", 64), "")
    assert set(plain) == {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__fp4"}
    assert plain["weight.absmax"].dtype == torch.float32
    with pytest.raises(UserError, match="nf4 or fp4"):
        bnb_tensors(quantize_blockwise(gaussian(64), "int4", 64))
    with pytest.raises(UserError, match="block size"):
        bnb_tensors(quantize_blockwise(gaussian(64), "nf4", 48))


@pytest.mark.parametrize("code,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_qstate_round_trip_through_bnb_tensors(code, double_quant):
    state = quantize_blockwise(outlier_weight((40, 33), 2, seed=4), code, 64, double_quant)
    back = qstate_from_bnb(bnb_tensors(state, "a.b"), "a.b")
    for name in ("packed", "absmax", "absmax_q", "absmax_scale", "absmax_mean"):
        mine, theirs = getattr(state, name), getattr(back, name)
        assert (mine is None and theirs is None) or torch.equal(mine, theirs)
    assert (back.shape, back.block_size, back.code, back.numel, back.dq_block_size, back.dtype) == \
        (state.shape, state.block_size, state.code, state.numel, state.dq_block_size, state.dtype)
    assert torch.equal(dequantize_blockwise(back), dequantize_blockwise(state))


def test_stored_bitsandbytes_tensors_load_with_their_values():
    """A 9x71 weight as bitsandbytes 0.50.2 wrote it (nested NF4): ours dequantizes it to bitsandbytes'
    values exactly and writes the same tensors back, JSON included."""
    w, tensors, bnb_values = stored_bnb_file()
    state = qstate_from_bnb(tensors)
    assert torch.equal(dequantize_blockwise(state), bnb_values)
    again = bnb_tensors(state)
    assert list(again) == list(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)
    ours = quantize_blockwise(w, "nf4", 64, double_quant=True)
    assert torch.equal(ours.packed, tensors["weight"].flatten())           # same codes, spare nibble included


@pytest.mark.parametrize("shape,code,nested", [((9, 71), "nf4", True), ((256, 320), "nf4", True),
                                               ((33, 70), "nf4", False), ((7, 9), "fp4", True)])
def test_bitsandbytes_written_state_loads_here_and_ours_loads_there(shape, code, nested):
    bnb_f = optional_bnb()
    if bnb_f is None:
        pytest.skip("bitsandbytes not installed: stored reference values are checked instead")
    w = outlier_weight(shape, 3, seed=1)
    tensors, bnb_values = bnb_file_tensors(bnb_f, w, code, nested)
    assert torch.equal(dequantize_blockwise(qstate_from_bnb(tensors)), bnb_values)
    ours = quantize_blockwise(w, code, 64, nested)
    mine = bnb_tensors(ours)
    their_state = bnb_f.QuantState.from_dict({k[len("weight."):]: v for k, v in mine.items() if k != "weight"},
                                             device="cpu")
    assert torch.equal(bnb_f.dequantize_4bit(mine["weight"], their_state), dequantize_blockwise(ours))
    key = QS_KEY + code
    assert torch.equal(mine[key], tensors[key])                         # same JSON bytes


def test_save_bnb_load_bnb_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(TinyGPT())
    model.transformer.h[0].attn.c_proj = Linear4bit(nn.Linear(31, 33))   # 1023 values: a spare nibble
    save_bnb(model, tmp_path / "a.safetensors")
    fresh = TinyGPT()
    fresh.transformer.h[0].attn.c_proj = nn.Linear(31, 33)
    load_bnb(fresh, tmp_path / "a.safetensors")                          # plain Linears become Linear4bit
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            other = fresh.get_submodule(name)
            assert isinstance(other, Linear4bit)
            for b in ("packed", "absmax_q", "absmax_scale", "absmax_mean", "bias"):
                assert torch.equal(getattr(m, b), getattr(other, b))
            assert torch.equal(m.dequantized_weight(), other.dequantized_weight())
    assert torch.equal(model.transformer.wte.weight, fresh.transformer.wte.weight)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    save_bnb(fresh, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    requant = quantize_model(TinyGPT(), double_quant=False)              # into Linear4bit layers too
    requant.transformer.h[0].attn.c_proj = Linear4bit(nn.Linear(31, 33))
    load_bnb(requant, tmp_path / "a.safetensors")
    assert torch.equal(requant.transformer.h[1].attn.c_attn.dequantized_weight(),
                       model.transformer.h[1].attn.c_attn.dequantized_weight())


def test_load_bnb_refuses_what_does_not_fit(tmp_path):
    torch.manual_seed(0)
    tensors = bnb_state_dict(quantize_model(TinyGPT()))
    key = "transformer.h.0.attn.c_attn.weight"

    def refused(change, match):
        bad = dict(tensors)
        change(bad)
        with pytest.raises(UserError, match=match):
            load_bnb_state_dict(TinyGPT(), bad, where="f")

    def set_json(bad, **fields):
        text = json.loads(bytes(bad[key + ".quant_state.bitsandbytes__nf4"].tolist()).decode())
        bad[key + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps({**text, **fields}).encode()),
                                                                   dtype=torch.uint8)

    refused(lambda b: b.__setitem__(key + ".quant_map", FP4.clone()), "quant_map is not the nf4 codebook")
    refused(lambda b: b.__setitem__(key + ".nested_quant_map", torch.linspace(-1, 1, 256)), "dynamic map")
    refused(lambda b: set_json(b, blocksize=48), "blocksize = 48")
    refused(lambda b: set_json(b, nested_blocksize=100), "nested_blocksize = 100")
    refused(lambda b: set_json(b, quant_type="int4"), "quant_type = 'int4'")
    refused(lambda b: set_json(b, dtype="int8"), "dtype = 'int8'")
    refused(lambda b: set_json(b, shape=[32, 96]), r"shape \(32, 96\), the model's Linear \(96, 32\)")
    refused(lambda b: set_json(b, compress="yes"), "does not know")
    refused(lambda b: b.pop(key + ".nested_absmax"), "nested_absmax is missing")
    refused(lambda b: b.__setitem__(key + ".absmax", b[key + ".absmax"].float()), "absmax is torch.float32")
    refused(lambda b: b.__setitem__(key + ".quant_state.bitsandbytes__nf4", torch.tensor([1, 2], dtype=torch.uint8)),
            "not JSON")
    refused(lambda b: b.__setitem__("transformer.h.0.attn.extra", torch.zeros(1)), "unexpected")
    refused(lambda b: b.pop("transformer.h.1.attn.c_proj.bias"), "missing")
    refused(lambda b: b.__setitem__("nothere.weight.quant_state.bitsandbytes__nf4", b[key + ".quant_state.bitsandbytes__nf4"]),
            "no Linear named 'nothere'")
    plain = TinyGPT()
    tensors_plain = {k: v for k, v in plain.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(UserError, match="missing"):          # a 4-bit model, a plain file: named, not crashed
        load_bnb_state_dict(quantize_model(TinyGPT()), tensors_plain, where="f")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="junk.safetensors"):
        load_bnb(TinyGPT(), tmp_path / "junk.safetensors")



def test_transformers_4bit_gpt2_loads_here_with_their_logits(tmp_path):
    """transformers + bitsandbytes quantize a tiny GPT-2 on CPU (nf4, double quant) and save it; load_bnb
    reads it into our GPT (same module names), logits match theirs to float32 rounding, and save_bnb writes
    the same tensors, bit for bit. bitsandbytes' CPU forward is switched to its float32 path (its default there
    may compute in bf16)."""
    transformers = pytest.importorskip("transformers")
    bnb_nn = pytest.importorskip("bitsandbytes.nn")
    pytest.importorskip("accelerate")
    from gpt import GPT, GPTConfig
    from safetensors.torch import load_file
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2,
                                                         n_head=2)).save_pretrained(tmp_path / "fp")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "fp", quantization_config=config,
                                                      device_map="cpu").eval()
    hf.save_pretrained(tmp_path / "q")
    for m in hf.modules():
        if isinstance(m, bnb_nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    ours = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True)).eval()
    load_bnb(ours, tmp_path / "q" / "model.safetensors")
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == 8
    idx = torch.tensor([[1, 5, 9, 3, 7, 60]])
    with torch.no_grad():
        # the same dequantized weights, but two implementations of the forward (their attention, their 4-bit
        # matmul) sum in different orders, and a matmul's order depends on the thread count: logits of size
        # ~1 agree to ~1e-6, not bit for bit. 1e-5 allows that and nothing more: one wrong 4-bit code moves a
        # weight by >= 1e-2 of its block's absmax, and the logits by far more than 1e-5
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=0, atol=1e-5)
    save_bnb(ours, tmp_path / "ours.safetensors")
    theirs, mine = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "ours.safetensors")
    assert sorted(theirs) == sorted(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)


if __name__ == "__main__" and sys.argv[1:] == ["--write-reference"]:
    write_reference()
