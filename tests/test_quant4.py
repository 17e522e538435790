"""quant4.py: codebooks, nearest-code rounding, packing, block-wise absmax, double quant, Linear4bit."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant4 import (CODEBOOKS, FP4, INT4, Linear4bit, NF4, NF4_OFFSET, bits_per_parameter, block_scales,
                    dequantize_blockwise, dequantize_model, double_dequantize, double_quantize, max_half_gap,
                    nearest_code, nf4_from_normal_quantiles, pack_nibbles, quantize_blockwise, quantize_model,
                    reconstruction_error, unpack_nibbles)

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
    q = torch.randint(0, 16, (1001,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 501
    assert torch.equal(unpack_nibbles(packed, 1001), q)


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


def test_double_quant_absmax_within_bound():
    w = gaussian(64 * 700 + 13, seed=5)                  # 701 blocks -> 3 groups of scales, the last partial
    c = quantize_blockwise(w, "nf4", 64).absmax
    q8, s2, mean = double_quantize(c, 256)
    assert q8.dtype == torch.int8 and q8.numel() == 701 and s2.numel() == 3
    assert abs(mean.item() - c.mean().item()) < 1e-6
    c_hat = double_dequantize(q8, s2, mean, 256)
    bound = s2.repeat_interleave(256)[:701] / 254
    assert ((c_hat - c).abs() <= bound * (1 + 1e-5) + 1e-7).all()
    state = quantize_blockwise(w, "nf4", 64, double_quant=True)
    assert state.absmax is None and torch.allclose(block_scales(state), c_hat)
    dq_mse, _ = reconstruction_error(w, "nf4", 64, double_quant=True)
    mse, _ = reconstruction_error(w, "nf4", 64)
    assert dq_mse < 1.05 * mse                            # the 8-bit scales cost almost nothing


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
