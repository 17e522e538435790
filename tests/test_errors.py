"""The bad-input matrix: each case ends in ONE line naming the file (and line), a non-zero exit, no
traceback, and nothing written over what existed."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import pretrain
from gpt import GPT, GPTConfig, read_safetensors, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "300",
        "--batch-size", "4", "--recall-limit", "0", "--eval-tokens", "256"]


def cli(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240)
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
    code, err = cli("pretrain.py", "--init", str(tmp_path / "missing"), *TINY, "--max-iters", "1")
    assert_one_line_error(code, err, "missing")


def test_checkpoint_lacking_a_tensor(tmp_path, ckpt):
    bad = copy_ckpt(ckpt, tmp_path / "bad", lambda t: t.pop("transformer.ln_f.weight"))
    code, err = cli("pretrain.py", "--init", str(bad), *TINY, "--max-iters", "1", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "transformer.ln_f.weight", "missing")


def test_checkpoint_with_a_misshaped_tensor(tmp_path, ckpt):
    def edit(t):
        t["transformer.wpe.weight"] = torch.zeros(16, 32)
    bad = copy_ckpt(ckpt, tmp_path / "bad", edit)
    code, err = cli("pretrain.py", "--init", str(bad), *TINY, "--max-iters", "1", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "transformer.wpe.weight", "mis-shaped")


def test_checkpoint_whose_tokenizer_is_larger_than_its_vocabulary(tmp_path, ckpt):
    bad = copy_ckpt(ckpt, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["vocab_size"] = 100
    (bad / "config.json").write_text(json.dumps(cfg))
    code, err = cli("pretrain.py", "--init", str(bad), *TINY, "--max-iters", "1", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, str(bad))


def test_resume_without_a_state(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world. " * 400)
    code, err = cli("pretrain.py", "--data", str(corpus), *TINY, "--resume", "--out", str(tmp_path / "fresh"))
    assert_one_line_error(code, err, "--resume")


# ----------------------------------------------------------------------------- a loss that is not finite

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(data.pretrain_docs(data.make_world(2), size_chars=20_000)))
    out = tmp_path / "run"
    args = ["--data", str(corpus), *TINY, "--max-iters", "10", "--eval-interval", "3", "--out", str(out),
            "--log-interval", "1"]
    real, calls = pretrain.cross_entropy_loss, [0]

    def poisoned(logits, targets):
        calls[0] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls[0] == 5 else loss  # the 5th training step goes bad
    monkeypatch.setattr(pretrain, "cross_entropy_loss", poisoned)
    with pytest.raises(data.UserError, match="loss is nan at step 4"):
        pretrain.main(args)
    saved = json.loads((out / "config.json").read_text())
    assert saved["step"] == 3  # the checkpoint of step 3 is intact and loadable
    w = read_safetensors(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())
