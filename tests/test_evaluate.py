"""evaluate.py: a checkpoint's loss on any text file (nats/token, bits/byte) and accuracy on a task file,
without training; checked against the loss computed by hand."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import evaluate
from common import UserError
from evals import token_bytes
from gpt import GPT, GPTConfig, generate, save_checkpoint
from tokenizer import eos_id, pad_id


@pytest.fixture
def checkpoint(tmp_path, small_enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=48, n_layer=1, n_head=2, n_embd=32)).eval()
    save_checkpoint(str(tmp_path / "ckpt"), model, small_enc, {"stage": "sft"})
    return tmp_path / "ckpt", model, small_enc


def test_nats_per_token_and_bits_per_byte_by_hand(tmp_path, checkpoint):
    path, model, enc = checkpoint
    text = "the flag of belmora is green . the river of tosk is wide . " * 4
    (tmp_path / "a.txt").write_text(text)
    ids = torch.tensor([enc.eot_token] + enc.encode_ordinary(text.strip()) + [enc.eot_token])
    assert 96 < len(ids) - 1 < 144   # two full windows of the context, the rest dropped
    x, y = ids[:96].view(2, 48), ids[1:97].view(2, 48)
    with torch.no_grad():
        nats = sum(F.cross_entropy(model(x[i:i + 1])[0], y[i], reduction="sum").item() for i in range(2))
    r = evaluate.main([str(path), "--text", str(tmp_path / "a.txt")])["text"][str(tmp_path / "a.txt")]
    assert r["tokens"] == 96
    assert r["nats_per_token"] == pytest.approx(nats / 96, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(nats / (math.log(2) * token_bytes(enc)[y].sum().item()), rel=1e-5)


def test_a_file_shorter_than_the_context_is_one_window(tmp_path, checkpoint):
    path, model, enc = checkpoint
    (tmp_path / "short.txt").write_text("seven plus five is twelve .")
    ids = torch.tensor([enc.eot_token] + enc.encode_ordinary("seven plus five is twelve .") + [enc.eot_token])
    with torch.no_grad():
        nats = F.cross_entropy(model(ids[None, :-1])[0], ids[1:]).item()
    r = evaluate.main([str(path), "--text", str(tmp_path / "short.txt")])["text"][str(tmp_path / "short.txt")]
    assert r["tokens"] == len(ids) - 1 and r["nats_per_token"] == pytest.approx(nats, rel=1e-5)


def test_task_accuracy_counts_exact_answers(tmp_path, checkpoint):
    path, model, enc = checkpoint
    prompts = [f"Instruction: name thing {i}.\nResponse:" for i in range(4)]
    outs = generate(model, [enc.encode_ordinary(p) for p in prompts], 8, eos_id=eos_id(enc), pad_id=pad_id(enc),
                    greedy=True)
    answers = [enc.decode([t for t in o if t != eos_id(enc)]) for o in outs]
    assert all(a.strip() for a in answers)
    records = [{"prompt": p, "completion": a if i < 3 else a + " and more"} for i, (p, a) in enumerate(zip(prompts, answers))]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = evaluate.main([str(path), "--text", str(tmp_path / "task.jsonl"), "--task-file", str(tmp_path / "task.jsonl"),
                       "--max-new-tokens", "8", "--json", str(tmp_path / "out" / "eval.json")])
    assert r["task"]["examples"] == 4 and r["task"]["accuracy"] == 0.75   # the model's own answers, one changed
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["task"] == r["task"]


def test_a_reward_model_and_a_prompt_too_long_are_one_line(tmp_path, checkpoint):
    path, model, enc = checkpoint
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "stage": "reward"}))
    with pytest.raises(UserError, match="is a reward model"):
        evaluate.main([str(path)])
    (path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "word " * 60, "completion": "x"}) + "\n")
    with pytest.raises(UserError, match="does not fit the model's context of 48"):
        evaluate.main([str(path), "--text", str(tmp_path / "long.jsonl"), "--task-file", str(tmp_path / "long.jsonl")])
