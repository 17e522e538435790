"""LoRA: the layer's equation, exactness at B = 0, merge/unmerge, gradients, counts, and the PEFT file layout."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from common import UserError, read_safetensors
from gpt import GPT, GPTConfig
from lora import (LoRALinear, adapted_layers, inject_lora, load_adapter, lora_parameter_table, lora_scale, merge_lora,
                  parameter_counts, save_adapter)

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tokens(config, B=2, T=12, seed=0):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_B(model, seed=1):
    """Non-zero B, so that dW != 0 and merge / save checks mean something."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapted_layers(model):
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    return model


def lora_model(base, r=4, **kw):
    return inject_lora(copy.deepcopy(base), r, **kw)


# ----------------------------------------------------------------------------- the layer

def test_forward_is_the_lora_equation_in_float64():
    """y = W0 x + b + (alpha / r) * B A x, computed by hand in float64."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    layer = LoRALinear(base, r=3, alpha=12, dropout=0.0).double()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6, dtype=torch.float64)
    W0, b, A, B = base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight
    expected = torch.zeros(4, 5, dtype=torch.float64)
    for n in range(4):
        for i in range(5):
            expected[n, i] = b[i] + sum((W0[i, c] + 12 / 3 * sum(B[i, j] * A[j, c] for j in range(3))) * x[n, c]
                                        for c in range(6))
    assert torch.allclose(layer(x), expected, atol=1e-12)
    assert layer.scale == 4.0


def test_scale_and_rslora_scale():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, rslora=True) == 8.0  # alpha / sqrt(r) = 16 / 2
    layer = LoRALinear(nn.Linear(8, 8), r=4, alpha=16, rslora=True)
    assert layer.scale == 8.0
    x = torch.randn(3, 8)
    nn.init.normal_(layer.lora_B.weight)
    with torch.no_grad():
        expected = layer.base_layer(x) + 8.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_init_a_kaiming_uniform_b_zero():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32), r=8, alpha=16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a = sqrt(5): U(-1/sqrt(k), 1/sqrt(k))
    A = layer.lora_A.weight
    assert A.shape == (8, 64) and A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert layer.lora_B.weight.shape == (32, 8)


def test_dropout_acts_on_the_adapter_input_only_and_only_in_train_mode():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4, alpha=8, dropout=0.5)
    x = torch.randn(8, 16)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: the frozen path is never dropped
        nn.init.normal_(layer.lora_B.weight)
        assert not torch.equal(layer(x), layer(x))  # two dropout masks
        layer.eval()
        exact = layer.base_layer(x) + 2.0 * layer.lora_B(layer.lora_A(x))
        assert torch.equal(layer(x), layer(x)) and torch.allclose(layer(x), exact, atol=1e-6)


# ----------------------------------------------------------------------------- in a model

def test_b_zero_gives_bitwise_the_base_model(tiny_model, tiny_config):
    idx = tokens(tiny_config)
    model = lora_model(tiny_model, r=4, dropout=0.5)
    with torch.no_grad():
        assert torch.equal(model(idx), tiny_model(idx))
        model.train()  # adapter dropout on: still exactly the base while B = 0
        assert torch.equal(model(idx), tiny_model(idx))


def test_injection_targets_blocks_only_and_keeps_eval_mode(tiny_model):
    model = lora_model(tiny_model, r=2)
    names = [name for name, _ in adapted_layers(model)]
    assert names == [f"transformer.h.{i}.{s}" for i in range(2) for s in BLOCK_LINEARS]
    assert all(not layer.training for _, layer in adapted_layers(model))  # tiny_model is in eval mode
    only_attn_proj = lora_model(tiny_model, r=2, targets=("attn.c_proj",))
    assert [n for n, _ in adapted_layers(only_attn_proj)] == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    with_head = lora_model(tiny_model, r=2, targets=("c_fc", "lm_head", "wte", "wpe"))
    assert isinstance(with_head.lm_head, nn.Linear) and with_head.lm_head.weight is with_head.transformer.wte.weight
    assert len(adapted_layers(with_head)) == 2
    with pytest.raises(UserError, match="no linear layer"):
        lora_model(tiny_model, r=2, targets=("lm_head",))
    with pytest.raises(UserError, match="already has LoRA"):
        inject_lora(model, 2)


def test_merged_equals_unmerged_and_unmerge_restores_W0(tiny_model, tiny_config):
    idx = tokens(tiny_config)
    model = randomize_B(lora_model(tiny_model, r=4))
    W0 = {name: layer.base_layer.weight.clone() for name, layer in adapted_layers(model)}
    with torch.no_grad():
        unmerged = model(idx)
        assert (unmerged - tiny_model(idx)).abs().max() > 1e-2  # the adapters do change the output
        for _, layer in adapted_layers(model):
            layer.merge()
            layer.merge()  # a second merge is a no-op
        assert (model(idx) - unmerged).abs().max() < 1e-5
        for name, layer in adapted_layers(model):
            assert torch.allclose(layer.base_layer.weight, W0[name] + layer.delta_weight(), atol=1e-7)
            layer.unmerge()
            assert (layer.base_layer.weight - W0[name]).abs().max() < 1e-6
        assert (model(idx) - unmerged).abs().max() < 1e-5


def test_merge_lora_returns_a_plain_model(tiny_model, tiny_config):
    idx = tokens(tiny_config)
    model = randomize_B(lora_model(tiny_model, r=4))
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        assert not adapted_layers(model)
        assert all(type(model.get_submodule(f"transformer.h.0.{s}")) is nn.Linear for s in BLOCK_LINEARS)
        assert model.state_dict().keys() == tiny_model.state_dict().keys()  # loads as an ordinary checkpoint
        assert (model(idx) - unmerged).abs().max() < 1e-5
    assert all(p.requires_grad for p in model.parameters())


def test_only_adapter_parameters_receive_gradients(tiny_model, tiny_config):
    model = randomize_B(lora_model(tiny_model, r=4)).train()
    model(tokens(tiny_config)).square().mean().backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_trainable_count_is_r_times_d_plus_k(tiny_model):
    r, C = 4, 32  # tiny_config: n_embd 32, 2 layers
    model = lora_model(tiny_model, r=r)
    per_layer = r * (3 * C + C) + r * (C + C) + r * (4 * C + C) + r * (C + 4 * C)  # c_attn, c_proj, c_fc, c_proj
    assert per_layer == 2048
    rows = lora_parameter_table(model)
    assert sum(row["lora"] for row in rows) == 2 * per_layer
    assert sum(row["full"] for row in rows) == 2 * 12 * C * C
    trainable, total = parameter_counts(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer
    assert total == sum(p.numel() for p in tiny_model.parameters()) + 2 * per_layer
    c_attn = rows[0]
    assert (c_attn["d"], c_attn["k"], c_attn["full"], c_attn["lora"]) == (96, 32, 3072, 512)
    assert c_attn["ratio"] == pytest.approx(512 / 3072)


# ----------------------------------------------------------------------------- adapters on disk

def test_save_load_round_trips_exactly_on_a_fresh_base(tiny_model, tiny_config, tmp_path):
    idx = tokens(tiny_config)
    model = randomize_B(lora_model(tiny_model, r=4, alpha=6, dropout=0.1, rslora=True))
    save_adapter(model, tmp_path, base_model_path="out/pretrain")
    loaded = load_adapter(copy.deepcopy(tiny_model), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    layer = dict(adapted_layers(loaded))["transformer.h.1.mlp.c_fc"]
    assert (layer.r, layer.alpha, layer.dropout_p, layer.rslora) == (4, 6, 0.1, True)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
           [n for n, p in model.named_parameters() if p.requires_grad]


def test_saved_files_follow_peft_layout(tiny_model, tmp_path):
    model = randomize_B(lora_model(tiny_model, r=4))
    save_adapter(model, tmp_path, base_model_path="out/pretrain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)  # alpha = 2r by default
    assert config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert config["fan_in_fan_out"] is True and config["bias"] == "none" and config["use_rslora"] is False
    assert config["base_model_name_or_path"] == "out/pretrain"
    tensors = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.transformer.h.{i}.{s}.lora_{ab}.weight"
                            for i in range(2) for s in BLOCK_LINEARS for ab in "AB"}
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)   # (r, in)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)   # (out, r)
    assert tensors["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"].shape == (4, 128)
    assert tensors["base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"].shape == (32, 4)
    assert torch.equal(tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"],
                       model.transformer.h[0].attn.c_attn.lora_B.weight)
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_target_modules_name_full_paths_when_a_suffix_would_pick_more(tiny_model, tmp_path):
    model = randomize_B(lora_model(tiny_model, r=2, targets=("attn.c_proj",)))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    loaded = load_adapter(copy.deepcopy(tiny_model), tmp_path)
    assert [n for n, _ in adapted_layers(loaded)] == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]


def rewrite_adapter(path, rename=lambda k: k, change=None, config=None):
    """Edit a saved adapter the way another tool might have written it."""
    tensors = {rename(k): v for k, v in read_safetensors(path / "adapter_model.safetensors").items()}
    if change:
        change(tensors)
    save_file(tensors, path / "adapter_model.safetensors")
    if config:
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(config)
        (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("rename", [
    lambda k: k.replace("base_model.model.transformer.", "base_model.model."),  # HF GPT2Model naming
    lambda k: k.replace(".weight", ".default.weight"),                          # PEFT's in-memory naming
])
def test_load_accepts_peft_key_variants(tiny_model, tiny_config, tmp_path, rename):
    idx = tokens(tiny_config)
    model = randomize_B(lora_model(tiny_model, r=4))
    save_adapter(model, tmp_path)
    rewrite_adapter(tmp_path, rename)
    with torch.no_grad():
        assert torch.equal(load_adapter(copy.deepcopy(tiny_model), tmp_path)(idx), model(idx))


def test_load_uses_peft_defaults_for_omitted_fields(tiny_model, tmp_path):
    save_adapter(lora_model(tiny_model, r=8, alpha=32), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["c_attn"]}))
    rewrite_adapter(tmp_path, change=lambda t: [t.pop(k) for k in list(t) if ".c_attn." not in k])
    layer = dict(adapted_layers(load_adapter(copy.deepcopy(tiny_model), tmp_path)))["transformer.h.0.attn.c_attn"]
    assert (layer.r, layer.alpha, layer.scale) == (8, 8, 1.0)  # PEFT's defaults: r = 8, lora_alpha = 8


def test_load_refuses_bad_adapters(tiny_model, tmp_path):
    good = randomize_B(lora_model(tiny_model, r=4))

    def fresh(name, **edit):
        d = tmp_path / name
        save_adapter(good, d)
        if edit:
            rewrite_adapter(d, **edit)
        return d

    def b_wrong_shape(t):
        t["base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"] = torch.zeros(100, 4)

    def drop_b(t):
        del t["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]

    def extra_tensor(t):
        t["base_model.model.transformer.h.0.attn.c_attn.lora_A.bias"] = torch.zeros(4)

    cases = {
        "wrong_shape": (dict(change=b_wrong_shape), "another model"),
        "rank": (dict(config={"r": 2}), "rank mismatch"),
        "missing_b": (dict(change=drop_b), "lora_B.weight missing"),
        "extra": (dict(change=extra_tensor), "unexpected tensor"),
        "dora": (dict(config={"use_dora": True}), "use_dora"),
        "not_lora": (dict(config={"peft_type": "IA3"}), "not a LoRA adapter"),
        "untargeted": (dict(config={"target_modules": ["c_attn"]}), "target_modules"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(UserError, match=message):
            load_adapter(copy.deepcopy(tiny_model), fresh(name, **edit))
    # adapters for a deeper model adapt blocks this model does not have
    deeper = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=32))
    save_adapter(inject_lora(deeper, 4), tmp_path / "deeper")
    untouched = copy.deepcopy(tiny_model)
    with pytest.raises(UserError, match="adapter for another model.*transformer.h.2"):
        load_adapter(untouched, tmp_path / "deeper")
    assert not adapted_layers(untouched)  # checks run before the model is changed
    with pytest.raises(UserError, match="no LoRA adapter"):
        load_adapter(copy.deepcopy(tiny_model), tmp_path / "nowhere")
    with pytest.raises(UserError, match="no LoRA layers"):
        save_adapter(copy.deepcopy(tiny_model), tmp_path / "none")


# ----------------------------------------------------------------------------- other frozen bases

class FrozenMatrix(nn.Module):
    """A stand-in frozen base that is not nn.Linear: y = x M^T with M kept as a buffer (like a 4-bit base)."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("matrix", linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.matrix, self.bias)


def test_lora_over_a_frozen_base_that_is_not_nn_linear(tiny_model, tiny_config):
    idx = tokens(tiny_config)
    model = copy.deepcopy(tiny_model)
    model.transformer.h[0].mlp.c_fc = FrozenMatrix(model.transformer.h[0].mlp.c_fc)
    base_out = model(idx).detach()
    inject_lora(model, 4)
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, FrozenMatrix)
    with torch.no_grad():
        assert torch.equal(model(idx), base_out)
    randomize_B(model).train()
    model(idx).square().mean().backward()
    assert layer.base_layer.bias.grad is None and layer.lora_A.weight.grad is not None
    _, total = parameter_counts(model)
    assert total == sum(p.numel() for p in tiny_model.parameters()) + 2 * 2048  # the buffer counts as 128 x 32
    with pytest.raises(UserError, match="dequantize"):
        layer.merge()


def test_qlora_composes_with_quant4_linear4bit(tiny_model, tiny_config):
    from quant4 import Linear4bit, dequantize_model, quantize_model
    idx = tokens(tiny_config)
    model = quantize_model(copy.deepcopy(tiny_model), block_size=32)
    with torch.no_grad():
        quantized = model(idx)
    inject_lora(model, 4)
    assert all(isinstance(layer.base_layer, Linear4bit) for _, layer in adapted_layers(model))
    with torch.no_grad():
        assert torch.equal(model(idx), quantized)
    randomize_B(model).train()
    model(idx).square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
           {n for n, p in model.named_parameters() if ".lora_" in n}
    assert parameter_counts(model) == parameter_counts(lora_model(tiny_model, r=4))
    model.eval()
    with torch.no_grad():
        adapted = model(idx)
        with pytest.raises(UserError, match="4-bit"):
            merge_lora(model)
        assert len(adapted_layers(model)) == 8  # left untouched
        merge_lora(dequantize_model(model))  # export path: W_hat + dW in a plain nn.Linear
        assert not adapted_layers(model)
        assert (model(idx) - adapted).abs().max() < 1e-5
