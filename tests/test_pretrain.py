"""Pre-training: the schedule, gradient accumulation, exact resume, DDP, and a loss that falls."""
import json

import pytest
import torch
from safetensors import safe_open

import pretrain
from common import read_safetensors
from gpt import GPT, GPTConfig, cross_entropy_loss
from training import lr_at
from conftest import torchrun


def tiny_args(tmp_path, text_file, out="run", **over):
    args = {"--data": str(text_file), "--out": str(tmp_path / out), "--vocab-size": "300", "--block-size": "32",
            "--n-layer": "1", "--n-head": "2", "--n-embd": "32", "--batch-size": "4", "--max-iters": "12",
            "--warmup": "2", "--eval-interval": "6", "--eval-tokens": "256", "--log-interval": "3",
            "--lr": "3e-3", "--recall-limit": "0", "--val-fraction": "0.2"}
    args.update(over)
    argv = []
    for k, v in args.items():
        if v is None:
            continue
        argv += [k] if v == "" else [k, v]
    return argv


@pytest.fixture
def text_file(tmp_path, small_text):
    p = tmp_path / "corpus.txt"
    p.write_text(small_text)
    return p


def test_lr_schedule_warms_up_peaks_and_ends_at_min():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] > 0
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 9
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_batch_in_one_step_equals_accumulated_micro_batches():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 50, (8, 16))
    y = torch.randint(0, 50, (8, 16))
    cross_entropy_loss(a(x), y).backward()
    for k in range(4):  # 4 micro-batches of 2, each loss divided by 4
        (cross_entropy_loss(b(x[2 * k:2 * k + 2]), y[2 * k:2 * k + 2]) / 4).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)
    na = torch.nn.utils.clip_grad_norm_(a.parameters(), 1e9)
    nb = torch.nn.utils.clip_grad_norm_(b.parameters(), 1e9)
    assert na == pytest.approx(nb.item(), rel=1e-5)  # clipping sees the same norm


def test_tiny_pretraining_lowers_the_loss(tmp_path, text_file):
    metrics = pretrain.main(tiny_args(tmp_path, text_file, **{"--max-iters": "30"}))
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [l["loss"] for l in lines if "loss" in l]
    assert losses[-1] < losses[0] - 0.5
    cfg = json.load(open(tmp_path / "run" / "config.json"))
    assert cfg["stage"] == "pretrain" and cfg["metrics"]["val_loss"] == metrics["val_loss"]
    assert not any(k.startswith("_orig_mod") for k in read_safetensors(tmp_path / "run" / "model.safetensors"))


def test_resume_from_mid_run_ends_at_the_same_loss(tmp_path, text_file):
    full = pretrain.main(tiny_args(tmp_path, text_file, out="full"))
    # stop after 6 steps (the state saved at eval step 6), then resume to 12
    pretrain.main(tiny_args(tmp_path, text_file, out="half", **{"--max-iters": "12", "--stop-at": "6"}))
    with safe_open(str(tmp_path / "half" / "resume" / "state.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 6
    resumed = pretrain.main(tiny_args(tmp_path, text_file, out="half", **{"--resume": ""}))
    assert resumed["train_loss"] == full["train_loss"]
    assert resumed["val_loss"] == full["val_loss"]


def test_two_process_torchrun_matches_one_process(tmp_path, text_file):
    common = {"--grad-accum": "2", "--max-iters": "4", "--eval-interval": "100"}
    one = pretrain.main(tiny_args(tmp_path, text_file, out="one", **common))
    torchrun("pretrain.py", tiny_args(tmp_path, text_file, out="two", **common), tmp_path, timeout=180)
    w1 = read_safetensors(tmp_path / "one" / "model.safetensors")
    w2 = read_safetensors(tmp_path / "two" / "model.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
    two = json.load(open(tmp_path / "two" / "config.json"))["metrics"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)


def test_val_data_is_scored_at_every_evaluation_as_evaluate_py_scores_it(tmp_path, text_file):
    import evaluate
    held = tmp_path / "held.txt"   # one paragraph: one document for pretrain.py and for evaluate.py alike
    held.write_text("the river of belmora is green . seven plus five is wide . " * 12)
    metrics = pretrain.main(tiny_args(tmp_path, text_file, **{"--val-data": str(held), "--max-iters": "6", "--eval-interval": "3"}))
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [l["step"] for l in lines if "heldout_bpb" in l] == [3]      # every evaluation; the final one in config
    assert metrics["heldout_loss"] > 0 and metrics["heldout_bpb"] != metrics["val_bpb"]
    again = evaluate.main([str(tmp_path / "run"), "--text", str(held), "--max-tokens", "256"])["text"][str(held)]
    assert again["tokens"] == 256
    assert again["nats_per_token"] == pytest.approx(metrics["heldout_loss"], rel=1e-5)
    assert again["bits_per_byte"] == pytest.approx(metrics["heldout_bpb"], rel=1e-5)


def test_val_data_shorter_than_a_window_is_refused_before_the_first_step(tmp_path, text_file):
    from common import UserError
    short = tmp_path / "short.txt"
    short.write_text("the river is wide .")
    with pytest.raises(UserError, match=r"--val-data: \d+ tokens, fewer than one window of --block-size 32"):
        pretrain.main(tiny_args(tmp_path, text_file, **{"--val-data": str(short)}))
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "model.safetensors").exists()
