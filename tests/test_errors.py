"""The bad-input matrix: each case ends in ONE line naming the file (and line), a non-zero exit, no
traceback, and nothing written over what existed."""
import json

import pytest
import torch

import pretrain
import world
from common import UserError, read_safetensors
from conftest import run_script
from gpt import GPT, GPTConfig, save_checkpoint

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "300",
        "--batch-size", "4", "--recall-limit", "0", "--eval-tokens", "256"]
INIT_TINY = ["--batch-size", "4", "--recall-limit", "0", "--eval-tokens", "256"]  # the shape is --init's


def cli(*args):
    r = run_script(*args)
    return r.returncode, r.stderr.strip()


def assert_one_line_error(code, err, *needles):
    assert code != 0
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for n in needles:
        assert n in last, (n, last)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, small_enc):
    """A tiny checkpoint of our own, to damage in different ways."""
    d = tmp_path_factory.mktemp("ckpt") / "base"
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(str(d), model, small_enc, {"stage": "pretrain"})
    return d


def copy_ckpt(src, dst, edit=None):
    import shutil
    shutil.copytree(src, dst)
    if edit:
        tensors = read_safetensors(dst / "model.safetensors")
        edit(tensors)
        from safetensors.torch import save_file
        save_file(tensors, dst / "model.safetensors")
    return dst


# ----------------------------------------------------------------------------- text data

def test_empty_text_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    assert_one_line_error(*cli("pretrain.py", "--data", str(f), *TINY, "--out", str(tmp_path / "o")), "empty.txt")


def test_non_utf8_text_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"caf\xe9 " * 100)
    assert_one_line_error(*cli("pretrain.py", "--data", str(f), *TINY, "--out", str(tmp_path / "o")), "latin1.txt")


def test_missing_text_file(tmp_path):
    assert_one_line_error(*cli("pretrain.py", "--data", str(tmp_path / "nope.txt"), *TINY), "nope.txt")


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_directory_that_does_not_exist(tmp_path):
    code, err = cli("pretrain.py", "--init", str(tmp_path / "missing"), *INIT_TINY, "--max-iters", "1")
    assert_one_line_error(code, err, "missing")


def test_checkpoint_lacking_a_tensor(tmp_path, ckpt):
    bad = copy_ckpt(ckpt, tmp_path / "bad", lambda t: t.pop("transformer.ln_f.weight"))
    code, err = cli("pretrain.py", "--init", str(bad), *INIT_TINY, "--max-iters", "1", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "transformer.ln_f.weight", "missing")


def test_checkpoint_with_a_misshaped_tensor(tmp_path, ckpt):
    def edit(t):
        t["transformer.wpe.weight"] = torch.zeros(16, 32)
    bad = copy_ckpt(ckpt, tmp_path / "bad", edit)
    code, err = cli("pretrain.py", "--init", str(bad), *INIT_TINY, "--max-iters", "1", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "transformer.wpe.weight", "mis-shaped")


def test_checkpoint_whose_tokenizer_is_larger_than_its_vocabulary(tmp_path, ckpt):
    bad = copy_ckpt(ckpt, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["vocab_size"] = 100
    (bad / "config.json").write_text(json.dumps(cfg))
    code, err = cli("pretrain.py", "--init", str(bad), *INIT_TINY, "--max-iters", "1", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, str(bad))


def test_resume_without_a_state(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world. " * 400)
    code, err = cli("pretrain.py", "--data", str(corpus), *TINY, "--resume", "--out", str(tmp_path / "fresh"))
    assert_one_line_error(code, err, "--resume")


# ----------------------------------------------------------------------------- a loss that is not finite

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(world.pretrain_docs(world.make_world(2), size_chars=20_000)))
    out = tmp_path / "run"
    args = ["--data", str(corpus), *TINY, "--max-iters", "10", "--eval-interval", "3", "--out", str(out),
            "--log-interval", "1"]
    real, calls = pretrain.cross_entropy_loss, [0]

    def poisoned(logits, targets):
        calls[0] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls[0] == 5 else loss  # the 5th training step goes bad
    monkeypatch.setattr(pretrain, "cross_entropy_loss", poisoned)
    with pytest.raises(UserError, match="loss is nan at step 4"):
        pretrain.main(args)
    saved = json.loads((out / "config.json").read_text())
    assert saved["step"] == 3  # the checkpoint of step 3 is intact and loadable
    w = read_safetensors(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())


# ----------------------------------------------------------------------------- instruction and preference data

@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory, small_enc):
    """A tiny checkpoint with room for real examples (context 128)."""
    d = tmp_path_factory.mktemp("wide") / "base"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(str(d), model, small_enc, {"stage": "sft"})
    return d


def jsonl_file(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


SFT_TINY = ["--max-iters", "1", "--batch-size", "2", "--eval-n", "1", "--recall-limit", "0"]
GOOD = {"instruction": "Say red.", "input": "", "output": "red"}


@pytest.mark.parametrize("bad_line, needle", [
    ('{"instruction": "Say red.", "output": ', "malformed JSON"),
    ({"instruction": "Say red."}, "output"),                                 # missing field
    ({"instruction": "Say red.", "output": 7}, "output"),                    # wrong type
    ({"instruction": "Say red.", "output": ""}, "empty"),                    # empty completion
    ({"instruction": "word " * 200, "output": "red"}, "longer than the context"),
])
def test_bad_sft_records(tmp_path, wide_ckpt, bad_line, needle):
    f = jsonl_file(tmp_path / "train.jsonl", [GOOD, bad_line, GOOD])
    code, err = cli("sft.py", "--init", str(wide_ckpt), "--data", str(f), "--val-data", str(f), *SFT_TINY,
                    "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "train.jsonl:2", needle)


def test_chosen_equal_to_rejected(tmp_path, wide_ckpt):
    pair = {"prompt": "Instruction: Say a colour.\nOutput:", "chosen": " red", "rejected": " blue"}
    f = jsonl_file(tmp_path / "pairs.jsonl", [pair, {**pair, "rejected": " red"}])
    code, err = cli("dpo.py", "--init", str(wide_ckpt), "--data", str(f), "--val-data", str(f), "--max-iters", "1",
                    "--eval-prompts", "none", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "pairs.jsonl:2", "identical")


def test_reference_with_another_tokenizer(tmp_path, wide_ckpt, small_text):
    from tokenizer import train_tokenizer
    other = tmp_path / "other"
    enc = train_tokenizer(small_text, 280)
    save_checkpoint(str(other), GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=128, n_layer=1, n_head=2,
                                              n_embd=32)), enc, {"stage": "sft"})
    pair = {"prompt": "Instruction: Say a colour.\nOutput:", "chosen": " red", "rejected": " blue"}
    f = jsonl_file(tmp_path / "pairs.jsonl", [pair, pair])
    code, err = cli("dpo.py", "--init", str(wide_ckpt), "--ref", str(other), "--data", str(f), "--val-data", str(f),
                    "--max-iters", "1", "--eval-prompts", "none", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "tokenizer")


def test_reward_model_with_another_tokenizer(tmp_path, wide_ckpt, small_text):
    from reward import HEAD_FILE, RewardModel, head_state
    from common import atomic_save_safetensors
    from tokenizer import train_tokenizer
    enc = train_tokenizer(small_text, 280)
    rm = RewardModel(GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32)))
    d = tmp_path / "rm"
    save_checkpoint(str(d), rm.trunk, enc, {"stage": "reward"})
    atomic_save_safetensors(head_state(rm), str(d / HEAD_FILE))
    prompts = jsonl_file(tmp_path / "prompts.jsonl", [{"prompt": "Instruction: Say a colour.\nOutput:"}] * 4)
    code, err = cli("ppo.py", "--init", str(wide_ckpt), "--reward", str(d), "--prompts", str(prompts), "--iters", "1",
                    "--rollout-batch", "2", "--minibatch", "2", "--eval-prompts", "none", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "tokenizer")


def test_adapter_for_another_model(tmp_path, small_enc):
    from lora import inject_lora, load_adapter, save_adapter
    wide = inject_lora(GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=32)), 2)
    save_adapter(wide, str(tmp_path / "adapter"))
    narrow = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(UserError, match="another model"):
        load_adapter(narrow, str(tmp_path / "adapter"))
    other_width = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=48))
    with pytest.raises(UserError, match="another model"):
        load_adapter(other_width, str(tmp_path / "adapter"))
