"""GPT-2 sizes by name: the presets every entry point shares, and the grown tokenizer that lets a random
model of GPT-2's vocabulary run every stage (bench.py --only stages)."""
import os

import bench
import bench_stages
import pretrain
from gpt import GPT, PRESETS
from tokenizer import load_tokenizer, save_tokenizer


def test_gpt2_preset_is_124m_and_every_entry_point_uses_it():
    g = PRESETS["gpt2"]
    assert (g.n_layer, g.n_head, g.n_embd, g.block_size, g.vocab_size) == (12, 12, 768, 1024, 50257)
    # 124M: embeddings 50257*768 + 1024*768, 12 blocks of 12*768^2 + 13*768 weights and biases, ln_f
    n = 50257 * 768 + 1024 * 768 + 12 * (12 * 768 ** 2 + 13 * 768) + 2 * 768
    assert n == 124_439_808
    assert {k: (c.n_layer, c.n_head, c.n_embd) for k, c in PRESETS.items()} == {
        "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
    for argv, mod in ((["--preset", "gpt2-medium"], bench), (["--preset", "gpt2-medium", "--n-layer", "2"], pretrain)):
        a = mod.parse_args(argv)
        assert (a.n_layer, a.n_head, a.n_embd, a.block_size, a.vocab_size) == (24, 16, 1024, 1024, 50257)
    assert pretrain.parse_args([]).n_layer == 4  # no preset: the small default


def test_model_of_a_preset_has_the_published_parameter_count():
    from gpt import GPTConfig
    small = GPTConfig(**{**vars(PRESETS["gpt2"]), "n_layer": 1})  # one block: cheap to build
    per_block = 12 * 768 ** 2 + 13 * 768
    assert GPT(small).num_params(non_embedding=False) == 124_439_808 - 11 * per_block


def test_grown_tokenizer_has_the_vocabulary_every_id_decodes_and_text_round_trips(tmp_path):
    text = "the kettle is green and the inn is good; a bad pie is a bad pie. " * 40
    enc = bench_stages.grown_tokenizer(text, 900)
    assert enc.n_vocab == 900
    assert len(b"".join(enc.decode_single_token_bytes(i) for i in range(898))) > 0  # every id decodes
    sample = "the green inn, a good kettle"
    assert enc.decode(enc.encode_ordinary(sample)) == sample
    save_tokenizer(enc, str(tmp_path / "tok.json"))
    back = load_tokenizer(str(tmp_path / "tok.json"))
    assert back.n_vocab == 900 and back.encode_ordinary(sample) == enc.encode_ordinary(sample)


def test_stage_commands_name_existing_stage_files_with_distinct_outputs():
    runs = bench_stages.stage_commands("D", 3, "cpu")
    assert [name for name, _, _ in runs][:3] == ["SFT full", "SFT LoRA r=8", "SFT QLoRA r=8 (NF4)"]
    outs = [argv[argv.index("--out") + 1] for _, _, argv in runs]
    assert len(set(outs)) == len(outs)
    for _, script, _ in runs:
        assert os.path.exists(os.path.join(bench_stages.ROOT, script))
