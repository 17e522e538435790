"""Interoperability: Hugging Face GPT-2 import/export (both key conventions, Conv1D transposes, tied head),
PEFT adapters both ways, and the loaders for the common public data formats, malformed lines included.

The transformers / PEFT comparisons run only when those packages are installed (they are not
dependencies of the project); everything else builds its Hugging Face files by hand."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

import data
from common import UserError, read_safetensors, unique_state_dict
from conftest import run_script
from gpt import GPT, GPTConfig, load_checkpoint, save_checkpoint
from hf import INDEX_FILE, export_hf, plan_shards, shard_name
from tokenizer import tokenizer_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e"]  # a toy GPT-2 tokenizer: 256 bytes + 8 merges


def bytes_to_unicode():
    """GPT-2's printable stand-in for every byte, in the order of its first 256 token ids."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_gpt2_tokenizer(d):
    """vocab.json + merges.txt in the Hugging Face GPT-2 layout (265 tokens, EOS = 264)."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for m in MERGES:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in MERGES))
    return len(vocab)


def hf_config_json(cfg, **extra):
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, **extra}


def write_hf_dir(d, model, prefix=True, buffers=True, lm_head=True, tokenizer=True, **config_extra):
    """By hand, what a Hugging Face GPT-2 download holds: names with or without "transformer.",
    Conv1D weights stored (in, out), the causal-mask buffers, the tied LM head written out."""
    os.makedirs(d, exist_ok=True)
    tensors = {}
    for k, v in unique_state_dict(model).items():
        if k == "lm_head.weight":
            continue
        name = k if prefix else k[len("transformer."):]
        tensors[name] = (v.t() if k.endswith(CONV1D) else v).clone().contiguous()
    T = model.config.block_size
    for i in range(model.config.n_layer):
        p = ("transformer." if prefix else "") + f"h.{i}.attn."
        if buffers:
            tensors[p + "bias"] = torch.tril(torch.ones(T, T, dtype=torch.uint8)).view(1, 1, T, T)
            tensors[p + "masked_bias"] = torch.tensor(-1e4)
    if lm_head:
        tensors["lm_head.weight"] = model.transformer.wte.weight.detach().clone()
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hf_config_json(model.config, **config_extra), f)
    if tokenizer:
        write_gpt2_tokenizer(d)
    return d


@pytest.fixture
def hf_model():
    """Our GPT with random weights everywhere (biases and LayerNorms too), vocab fitting the toy tokenizer."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=272, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens(vocab, B=2, T=16, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_same_weights(a, b):
    sa, sb = unique_state_dict(a), unique_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- import

@pytest.mark.parametrize("prefix", [True, False], ids=["transformer.-prefix", "bare-GPT2Model"])
def test_import_hf_directory_in_both_key_conventions(tmp_path, hf_model, prefix):
    d = write_hf_dir(str(tmp_path / "hf"), hf_model, prefix=prefix, buffers=prefix, lm_head=prefix)
    model, enc, config = load_checkpoint(d)
    assert config["stage"] == "hf_import" and config["model"]["block_size"] == 32
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert_same_weights(model, hf_model)
    idx = tokens(272)
    with torch.no_grad():
        assert torch.allclose(model(idx), hf_model(idx), atol=1e-5, rtol=0)
    # OpenAI's gpt2 encoding, read from the directory's vocab.json + merges.txt
    assert enc.name == "gpt2" and enc.n_vocab == 265 and enc.eot_token == 264
    assert enc.decode(enc.encode_ordinary(" the inner tree")) == " the inner tree"
    assert enc.encode_ordinary(" the") == [256 + MERGES.index("Ġt he")]


def test_conv1d_weights_are_transposed_on_import(tmp_path, hf_model):
    """A Conv1D weight W_hf (in, out) computes x @ W_hf; our nn.Linear computes x @ W.T, so W = W_hf.T."""
    d = write_hf_dir(str(tmp_path / "hf"), hf_model)
    model, _, _ = load_checkpoint(d)
    w_hf = read_safetensors(os.path.join(d, "model.safetensors"))["transformer.h.0.mlp.c_fc.weight"]
    assert w_hf.shape == (32, 128)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(model.transformer.h[0].mlp.c_fc(x), x @ w_hf + model.transformer.h[0].mlp.c_fc.bias,
                              atol=1e-6)


def test_our_mlp_gelu_is_the_tanh_approximation_hf_calls_gelu_new(tiny_model):
    """gelu_new(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): what the exported config must name."""
    mlp, x = tiny_model.transformer.h[0].mlp, torch.randn(4, 32)
    h = mlp.c_fc(x)
    gelu_new = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    with torch.no_grad():
        assert torch.allclose(mlp(x), mlp.c_proj(gelu_new), atol=1e-6)


# ----------------------------------------------------------------------------- export

def test_export_writes_hf_names_and_layout_and_import_is_the_identity(tmp_path, tiny_config, small_enc):
    torch.manual_seed(0)
    tiny_model = GPT(GPTConfig(**{**vars(tiny_config), "vocab_size": small_enc.n_vocab}))
    d = str(tmp_path / "hf")
    export_hf(tiny_model, d, small_enc)
    tensors = read_safetensors(os.path.join(d, "model.safetensors"))
    assert all(k.startswith("transformer.") for k in tensors) and "lm_head.weight" not in tensors
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # (in, out)
    assert torch.equal(tensors["transformer.h.1.mlp.c_proj.weight"], tiny_model.transformer.h[1].mlp.c_proj.weight.t())
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert cfg["activation_function"] == "gelu_new" and cfg["n_positions"] == cfg["n_ctx"] == 32
    assert cfg["eos_token_id"] == small_enc.eot_token
    model, enc, _ = load_checkpoint(d)  # export -> import
    assert_same_weights(model, tiny_model)
    assert tokenizer_fingerprint(enc) == tokenizer_fingerprint(small_enc)  # our BPE came along


def test_cli_import_then_stages_then_export_round_trip(tmp_path, hf_model):
    """python gpt.py import: the gpt2 vocab files travel with every checkpoint made from it, so the
    chain keeps loading offline; python gpt.py export gives back the same tensors."""
    import gpt
    hf = write_hf_dir(str(tmp_path / "hf"), hf_model, prefix=False, lm_head=False)
    gpt.main(["import", hf, str(tmp_path / "ours")])
    model, enc, config = load_checkpoint(str(tmp_path / "ours"))
    assert config["stage"] == "import" and enc.name == "gpt2"
    assert sorted(f for f in os.listdir(tmp_path / "ours") if f.endswith((".json", ".txt"))) == \
        ["config.json", "merges.txt", "tokenizer.json", "vocab.json"]
    save_checkpoint(str(tmp_path / "sft"), model, enc, {"stage": "sft", "args": {}, "metrics": {"time_s": 0}})
    model2, enc2, _ = load_checkpoint(str(tmp_path / "sft"))  # a later stage reloads it
    assert_same_weights(model2, hf_model) and enc2.encode_ordinary(" the") == enc.encode_ordinary(" the")
    gpt.main(["export", str(tmp_path / "sft"), str(tmp_path / "hf2")])
    back = read_safetensors(str(tmp_path / "hf2" / "model.safetensors"))
    orig = read_safetensors(os.path.join(hf, "model.safetensors"))
    orig = {"transformer." + k: v for k, v in orig.items() if k.split(".")[-2:] not in (["attn", "bias"], ["attn", "masked_bias"])}
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in back)
    assert os.path.exists(tmp_path / "hf2" / "vocab.json")


# ----------------------------------------------------------------------------- sharded safetensors

def test_plan_shards_packs_in_order_and_isolates_a_tensor_over_the_limit():
    assert plan_shards([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert plan_shards([4, 20, 4, 3, 2], 8) == [[0], [1], [2, 3], [4]]  # 20 > 8: a shard of its own
    assert plan_shards([4, 4], 100) == [[0, 1]] and plan_shards([], 8) == []
    assert shard_name(2, 13) == "model-00002-of-00013.safetensors"


def test_sharded_export_imports_with_the_single_file_logits(tmp_path, hf_model):
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    export_hf(hf_model, single)
    export_hf(hf_model, sharded, max_shard_bytes=20_000)
    index = json.load(open(os.path.join(sharded, INDEX_FILE)))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == shard_name(1, len(shards)) and not os.path.exists(f"{sharded}/model.safetensors")
    assert sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors")) == shards
    one = read_safetensors(os.path.join(single, "model.safetensors"))
    assert index["weight_map"].keys() == one.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    for shard in shards:  # no shard past the limit unless it holds a single larger tensor
        part = read_safetensors(os.path.join(sharded, shard))
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 20_000 or len(part) == 1
    for d in (single, sharded):
        write_gpt2_tokenizer(d)
    a, _, _ = load_checkpoint(single)
    b, _, config = load_checkpoint(sharded)
    assert config["stage"] == "hf_import"
    idx = tokens(272, B=2, T=32)
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))
    assert_same_weights(b, hf_model)
    export_hf(hf_model, sharded)  # exporting again unsharded leaves one set of weights
    assert sorted(f for f in os.listdir(sharded) if "safetensors" in f) == ["model.safetensors"]


def test_sharded_directory_refuses_a_missing_shard_and_index_mismatches(tmp_path, hf_model):
    def fresh(name):
        d = str(tmp_path / name)
        export_hf(hf_model, d, max_shard_bytes=20_000)
        write_gpt2_tokenizer(d)
        return d, json.load(open(os.path.join(d, INDEX_FILE)))

    d, index = fresh("missing")
    last = sorted(set(index["weight_map"].values()))[-1]
    os.remove(os.path.join(d, last))
    with pytest.raises(UserError, match=f"shard {last} is missing"):
        load_checkpoint(d)
    r = run_script("gpt.py", "import", d, tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and last in r.stderr
    d, index = fresh("unlisted")  # a shard holds a tensor the index does not name
    name = "transformer.h.0.attn.c_attn.bias"
    del index["weight_map"][name]
    json.dump(index, open(os.path.join(d, INDEX_FILE), "w"))
    with pytest.raises(UserError, match=f"tensor {name} is not listed"):
        load_checkpoint(d)
    d, index = fresh("absent")  # the index names a tensor its shard lacks
    index["weight_map"]["transformer.h.9.mlp.c_fc.bias"] = sorted(set(index["weight_map"].values()))[0]
    json.dump(index, open(os.path.join(d, INDEX_FILE), "w"))
    with pytest.raises(UserError, match="missing from their shards, e.g. transformer.h.9.mlp.c_fc.bias"):
        load_checkpoint(d)
    d, index = fresh("escape")
    index["weight_map"][name] = "../model-00001-of-00002.safetensors"
    json.dump(index, open(os.path.join(d, INDEX_FILE), "w"))
    with pytest.raises(UserError, match="is not a file name"):
        load_checkpoint(d)
    open(os.path.join(d, INDEX_FILE), "w").write("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_checkpoint(d)


def test_transformers_sharded_save_imports_with_the_single_file_logits(tmp_path, hf_model):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: sharded save check skipped")
    export_hf(hf_model, str(tmp_path / "hf"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / INDEX_FILE) and not os.path.exists(tmp_path / "sharded" / "model.safetensors")
    for d in ("hf", "sharded"):
        write_gpt2_tokenizer(str(tmp_path / d))
    a, _, _ = load_checkpoint(str(tmp_path / "hf"))
    b, _, _ = load_checkpoint(str(tmp_path / "sharded"))
    idx = tokens(272, B=2, T=32)
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))
        assert (b(idx) - hf_logits(hf, idx)).abs().max() < 1e-4


# ----------------------------------------------------------------------------- what is refused, in one line

def test_import_refuses_what_it_cannot_load(tmp_path, hf_model, monkeypatch):
    def fresh(name, **kw):
        return write_hf_dir(str(tmp_path / name), hf_model, **kw)

    with pytest.raises(UserError, match="activation_function = 'gelu'"):
        load_checkpoint(fresh("gelu", activation_function="gelu"))
    d = fresh("untied")
    t = read_safetensors(os.path.join(d, "model.safetensors"))
    t["lm_head.weight"] = t["lm_head.weight"] + 1
    save_file(t, os.path.join(d, "model.safetensors"))
    with pytest.raises(UserError, match="untied LM head"):
        load_checkpoint(d)
    d = fresh("shape")
    t = read_safetensors(os.path.join(d, "model.safetensors"))
    t["transformer.h.0.mlp.c_fc.weight"] = t["transformer.h.0.mlp.c_fc.weight"][:, :64].contiguous()
    save_file(t, os.path.join(d, "model.safetensors"))
    with pytest.raises(UserError, match="mis-shaped"):
        load_checkpoint(d)
    d = fresh("pickle")
    os.replace(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(UserError, match="pickle"):
        load_checkpoint(d)
    d = fresh("stale")
    load_checkpoint(d)  # tiktoken caches local vocab files by path: an edited file must be read again
    with open(os.path.join(d, "merges.txt"), "a") as f:
        f.write("q u\n")
    with pytest.raises(UserError, match="not a matching GPT-2 byte-level BPE"):
        load_checkpoint(d)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    with pytest.raises(UserError, match="vocab.json and merges.txt"):
        load_checkpoint(fresh("notok", tokenizer=False))


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, hf_model):
    d = write_hf_dir(str(tmp_path / "hf"), hf_model, activation_function="relu")
    r = run_script("gpt.py", "import", d, tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "activation_function" in r.stderr


# ----------------------------------------------------------------------------- transformers and PEFT (optional)

def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(input_ids=idx).logits


def test_transformers_gpt2_gives_our_logits_on_the_exported_checkpoint(tmp_path, hf_model):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: HF logits check skipped")
    export_hf(hf_model, str(tmp_path / "hf"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    idx = tokens(272, B=3, T=32)
    with torch.no_grad():
        ours = hf_model(idx)
    assert (hf_logits(hf, idx) - ours).abs().max() < 1e-4
    # and the other way: a model transformers saves is one we import
    hf.save_pretrained(str(tmp_path / "saved"))
    write_gpt2_tokenizer(str(tmp_path / "saved"))
    model, _, _ = load_checkpoint(str(tmp_path / "saved"))
    with torch.no_grad():
        assert (model(idx) - ours).abs().max() < 1e-5


def test_lora_adapters_load_in_peft_and_peft_adapters_load_here(tmp_path, hf_model):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: PEFT check skipped")
    peft = pytest.importorskip("peft", reason="peft not installed: PEFT check skipped")
    import copy
    from lora import adapted_layers, inject_lora, load_adapter, save_adapter
    export_hf(hf_model, str(tmp_path / "hf"))
    idx = tokens(272, B=2, T=20)

    # ours -> PEFT
    ours = inject_lora(copy.deepcopy(hf_model), r=4, alpha=8, dropout=0.0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapted_layers(ours):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
        want = ours(idx)
    save_adapter(ours, str(tmp_path / "ours_adapter"))
    base = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours_adapter")).eval()
    assert (hf_logits(pm, idx) - want).abs().max() < 1e-4
    assert (hf_logits(pm, idx) - hf_logits(base.__class__.from_pretrained(str(tmp_path / "hf")), idx)).abs().max() > 1e-3

    # PEFT (fan_in_fan_out on GPT-2's Conv1D) -> ours
    base = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    cfg = peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=0.0, target_modules=["c_attn", "c_fc"],
                          fan_in_fan_out=True, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(tmp_path / "peft_adapter"))
    want = hf_logits(pm, idx)
    mine = load_adapter(copy.deepcopy(hf_model), str(tmp_path / "peft_adapter")).eval()
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in adapted_layers(mine)}) == ["c_attn", "c_fc"]
    with torch.no_grad():
        assert (mine(idx) - want).abs().max() < 1e-4


# ----------------------------------------------------------------------------- data formats

def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_plain_text_files_and_directories(tmp_path):
    a = write(tmp_path, "a.txt", "First doc.\n\nSecond para.\n")
    (tmp_path / "dir").mkdir()
    write(tmp_path, "dir/b.txt", "Inside a dir.")
    write(tmp_path, "dir/skip.md", "not text")
    assert data.read_text([a, str(tmp_path / "dir")]) == ["First doc.\n\nSecond para.", "Inside a dir."]
    assert data.read_text(a, split_blank_lines=True) == ["First doc.", "Second para."]
    (tmp_path / "bad.txt").write_bytes(b"ok line\nbad \xff byte\n")
    with pytest.raises(UserError, match=r"bad\.txt:2: not UTF-8"):
        data.read_text(str(tmp_path / "bad.txt"))


def test_alpaca_jsonl_and_json_array_and_chat_messages(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Greet.", "input": "", "output": "Hi"}]
    want = [("Instruction: Add.\nInput: 2 and 3\nOutput:", " 5"), ("Instruction: Greet.\nOutput:", " Hi")]
    assert data.load_sft_examples(write(tmp_path, "a.jsonl", jsonl(*rows))) == want
    # the original Alpaca release is one pretty-printed JSON array (alpaca_data.json)
    assert data.load_sft_examples(write(tmp_path, "alpaca_data.json", json.dumps(rows, indent=4))) == want
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}]}
    assert data.load_sft_examples(write(tmp_path, "chat.jsonl", jsonl(chat))) == \
        [("Instruction: Be brief. Hi?\nOutput:", " Hello.")]
    assert data.load_prompts(write(tmp_path, "p.jsonl", jsonl(rows[0], chat, {"prompt": "Raw:"}))) == \
        [want[0][0], "Instruction: Be brief. Hi?\nOutput:", "Raw:"]


@pytest.mark.parametrize("name,text,where", [
    ("bad.jsonl", jsonl({"instruction": "a", "output": "b"}) + "{oops\n", r"bad\.jsonl:2: malformed JSON"),
    ("miss.jsonl", "\n" + jsonl({"instruction": "a", "output": "b"}, {"instruction": "c"}), r"miss\.jsonl:3: missing field 'output'"),
    ("arr.json", json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 7}], indent=2),
     r"arr\.json:6: field 'output' must be a string"),
    ("broken.json", '[\n  {"instruction": "a",\n   "output": }\n]', r"broken\.json:3: malformed JSON"),
    ("chat.jsonl", jsonl({"messages": [{"role": "user", "content": "only a question"}]}), r"chat\.jsonl:1: the last message"),
    ("data.csv", "instruction,output\n", r"data\.csv: unknown data format"),
])
def test_malformed_sft_files_name_file_and_line(tmp_path, name, text, where):
    with pytest.raises(UserError, match=where):
        data.load_sft_examples(write(tmp_path, name, text))


def test_preference_pairs_prompt_chosen_rejected_hh_and_messages(tmp_path):
    plain = {"prompt": "Q:", "chosen": " good", "rejected": " bad", "score_chosen": 1, "score_rejected": 0}
    hh = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
    msgs = {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]}
    pairs = data.load_preference_pairs(write(tmp_path, "pairs.jsonl", jsonl(plain, hh, msgs)))
    assert pairs[0] == {"prompt": "Q:", "chosen": " good", "rejected": " bad", "score_chosen": 1.0, "score_rejected": 0.0}
    assert pairs[1] == {"prompt": "\n\nHuman: Hi?\n\nAssistant:", "chosen": " Hello there.", "rejected": " Go away."}
    assert pairs[2] == {"prompt": "Instruction: Hi?\nOutput:", "chosen": " Hello.", "rejected": " No."}


@pytest.mark.parametrize("row,where", [
    ({"prompt": "Q:", "chosen": " same", "rejected": " same"}, "identical"),
    ({"prompt": "Q:", "chosen": " a"}, "missing field 'rejected'"),
    ({"chosen": "Human: x", "rejected": "Other: y"}, r"no 'prompt' field and no shared"),
    ({"prompt": "Q:", "chosen": " a", "rejected": " b", "score_chosen": "high"}, "'score_chosen' must be a number"),
])
def test_malformed_preference_lines_name_file_and_line(tmp_path, row, where):
    text = jsonl({"prompt": "P:", "chosen": " x", "rejected": " y"}, row)
    with pytest.raises(UserError, match=r"pairs\.jsonl:2: .*" + where):
        data.load_preference_pairs(write(tmp_path, "pairs.jsonl", text))
