"""SFT: the loss mask, full / LoRA / QLoRA / domain runs end to end on a tiny model, exact resume."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

import data
import sft
from common import UserError, read_safetensors
from gpt import GPT, GPTConfig, load_checkpoint, save_checkpoint
from tokenizer import pad_id


def test_loss_counts_only_response_and_eos(tiny_model):
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11, 1], [12, 1]]   # 1 plays EOS
    b = data.completion_batch(prompts, completions, pad_id=0)
    loss = sft.sft_loss(tiny_model(b["input_ids"], b["attention_mask"], b["position_ids"]), b["targets"])
    # what the template says counts: 3 + 2 response tokens (EOS included) out of 6 + 4 real tokens
    assert int((b["targets"] != -1).sum()) == 5
    # the same loss, by hand: mean of -log p over exactly those 5 positions
    logits = tiny_model(b["input_ids"], b["attention_mask"], b["position_ids"])
    logp = torch.log_softmax(logits.float(), -1)
    picks = [logp[0, 2, 10], logp[0, 3, 11], logp[0, 4, 1], logp[1, 1, 12], logp[1, 2, 1]]
    assert torch.allclose(loss, -torch.stack(picks).mean(), atol=1e-6)
    # the pad token's id changes nothing
    b2 = data.completion_batch(prompts, completions, pad_id=33)
    loss2 = sft.sft_loss(tiny_model(b2["input_ids"], b2["attention_mask"], b2["position_ids"]), b2["targets"])
    assert torch.allclose(loss, loss2, atol=1e-6)


def test_prompt_and_pad_positions_never_change_the_loss(tiny_model):
    """Whatever the model predicts at prompt and padding positions, the loss is the same: only the
    response positions (and the one predicting EOS) are read."""
    b = data.completion_batch([[5, 6, 7], [8, 9]], [[10, 11, 1], [12, 1]], pad_id=0)
    logits = tiny_model(b["input_ids"], b["attention_mask"], b["position_ids"])
    noise = torch.randn_like(logits) * 10 * (b["targets"] == -1).unsqueeze(-1)
    assert torch.allclose(sft.sft_loss(logits, b["targets"]), sft.sft_loss(logits + noise, b["targets"]), atol=1e-6)
    assert b["targets"][0, :2].tolist() == [-1, -1] and b["targets"][1, 4].item() == -1   # prompt, pad


def test_step_indices_cover_each_epoch_once():
    seen = [i for s in range(5) for i in data.step_indices(10, 2, seed=3, step=s)]
    assert sorted(seen) == list(range(10))
    assert data.step_indices(10, 2, 3, 7) == data.step_indices(10, 2, 3, 7)
    epoch0 = [data.step_indices(10, 2, 3, s) for s in range(5)]
    epoch1 = [data.step_indices(10, 2, 3, s) for s in range(5, 10)]
    assert epoch0 != epoch1   # each epoch is reshuffled


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, small_enc):
    d = tmp_path_factory.mktemp("base") / "base"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=384, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(str(d), model, small_enc, {"stage": "pretrain"})
    return str(d)


def run(tiny_ckpt, out, *extra):
    argv = ["--init", tiny_ckpt, "--out", str(out), "--max-iters", "4", "--batch-size", "4", "--warmup", "1",
            "--eval-n", "3", "--recall-limit", "4", "--log-interval", "2", "--lr", "1e-3", *extra]
    return sft.main(argv)


def test_full_sft_on_the_world_reports_tasks_and_forgetting(tiny_ckpt, tmp_path):
    m = run(tiny_ckpt, tmp_path / "sft", "--tasks", "facts,sentiment")
    for k in ("facts_acc", "facts_format", "sentiment_acc", "domain_facts_acc", "pretrain_val_loss",
              "before_pretrain_val_loss", "fact_recall", "before_fact_recall", "domain_ppl", "time_s"):
        assert k in m, k
    assert m["trainable_params"] == m["total_params"]
    model, _, cfg = load_checkpoint(str(tmp_path / "sft"))
    assert cfg["stage"] == "sft" and cfg["metrics"]["facts_acc"] == m["facts_acc"]


def test_lora_trains_only_adapters_and_saves_merged_model(tiny_ckpt, tmp_path):
    m = run(tiny_ckpt, tmp_path / "lora", "--lora", "2", "--tasks", "sentiment")
    # r(d + k) per adapted matrix: c_attn 32->96, attn.c_proj 32->32, c_fc 32->128, mlp.c_proj 128->32
    assert m["trainable_params"] == 2 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    out = tmp_path / "lora"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    base, _, _ = load_checkpoint(tiny_ckpt)
    merged, _, _ = load_checkpoint(str(out))
    # embeddings and LayerNorms are frozen: bit-identical; adapted weights moved
    sb, sm = base.state_dict(), merged.state_dict()
    assert torch.equal(sb["transformer.wte.weight"], sm["transformer.wte.weight"])
    assert torch.equal(sb["transformer.h.0.ln_1.weight"], sm["transformer.h.0.ln_1.weight"])
    assert not torch.equal(sb["transformer.h.0.attn.c_attn.weight"], sm["transformer.h.0.attn.c_attn.weight"])


def test_qlora_reports_memory_and_saves_a_loadable_model(tiny_ckpt, tmp_path):
    m = run(tiny_ckpt, tmp_path / "qlora", "--qlora", "2", "--tasks", "sentiment")
    assert m["frozen_base_memory_ratio"] > 3.0   # 4-bit codes + scales vs bf16 (tiny blocks cost more)
    load_checkpoint(str(tmp_path / "qlora"))


def test_domain_mode_reports_perplexity_before_and_after(tiny_ckpt, tmp_path):
    m = run(tiny_ckpt, tmp_path / "dom", "--mode", "domain", "--block-size", "64", "--max-iters", "6", "--lr", "3e-3",
            "--replay", "0")
    assert m["domain_ppl"] < m["before_domain_ppl"]   # a random model learns the domain text at once
    assert "domain_facts_acc" in m and "before_domain_facts_acc" in m
    assert json.load(open(tmp_path / "dom" / "config.json"))["stage"] == "domain"


def test_user_alpaca_and_messages_files(tiny_ckpt, tmp_path):
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in "red green blue gold pink grey".split()]
    rows += [{"messages": [{"role": "user", "content": "Say tea."}, {"role": "assistant", "content": "tea"}]}]
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = run(tiny_ckpt, tmp_path / "own", "--data", str(f), "--val-fraction", "0.3")
    assert "custom_acc" in m and "pretrain_val_loss" not in m


def test_resume_continues_exactly(tiny_ckpt, tmp_path):
    full = run(tiny_ckpt, tmp_path / "a", "--lora", "2", "--tasks", "sentiment", "--max-iters", "6",
               "--eval-n", "1", "--recall-limit", "0")
    assert run(tiny_ckpt, tmp_path / "b", "--lora", "2", "--tasks", "sentiment", "--max-iters", "6",
               "--eval-n", "1", "--recall-limit", "0", "--stop-at", "3") is None
    resumed = run(tiny_ckpt, tmp_path / "b", "--lora", "2", "--tasks", "sentiment", "--max-iters", "6",
                  "--eval-n", "1", "--recall-limit", "0", "--resume")
    assert resumed["train_loss"] == full["train_loss"]
    a, b = read_safetensors(str(tmp_path / "a" / "model.safetensors")), read_safetensors(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_clear_error(tiny_ckpt, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        run(tiny_ckpt, tmp_path / "x", "--data", str(f))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "word " * 500, "output": "b"}) + "\n")
    with pytest.raises(UserError, match="longer than the context"):
        run(tiny_ckpt, tmp_path / "y", "--data", str(long), "--val-data", str(long))
    with pytest.raises(UserError, match="--lora R or --qlora R"):
        run(tiny_ckpt, tmp_path / "z", "--lora", "2", "--qlora", "2")


def test_domain_replay_mixes_pretraining_text(tiny_ckpt, tmp_path):
    m = run(tiny_ckpt, tmp_path / "rep", "--mode", "domain", "--block-size", "64", "--replay", "0.5",
            "--recall-limit", "0")
    assert (tmp_path / "rep" / "replay.bin").exists() and m["domain_ppl"] > 0
    with pytest.raises(SystemExit, match="2"):  # argparse: the range of --replay
        run(tiny_ckpt, tmp_path / "bad", "--mode", "domain", "--replay", "1.5")


def test_replay_loss_mixes_by_hand():
    assert sft.replay_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 4)
    assert sft.replay_loss(torch.tensor(2.0), torch.tensor(4.0), 0.0).item() == 2.0


def test_instruct_replay_appends_text_windows_as_wide_as_the_instructions(tiny_ckpt, tmp_path):
    args = sft.parse_args(["--init", tiny_ckpt, "--out", str(tmp_path), "--batch-size", "4", "--replay", "0.5"])
    enc = load_checkpoint(tiny_ckpt)[1]
    d = sft.load_data(args, enc, 384)
    ctx = SimpleNamespace(rank=0, world=1)
    x, mask, pos, y, rows = sft.micro_batch(d, args, ctx, pad_id(enc), 384, 3, 0)
    plain = sft.micro_batch(SimpleNamespace(**{**vars(d), "replay_tokens": None}), args, ctx, pad_id(enc), 384, 3, 0)
    assert rows == 4 and x.shape == (6, plain[0].size(1)) and plain[4] is None
    for a, b in zip((x, mask, pos, y), plain[:4]):  # the instruction rows are those of plain SFT
        assert torch.equal(a[:rows], b)
    T = x.size(1)
    assert mask[rows:].all() and (y[rows:] != -1).all() and torch.equal(pos[rows:], torch.arange(T).expand(2, T))
    assert torch.equal(x[rows:, 1:], y[rows:, :-1])  # next-token targets on every replayed token


def test_instruct_replay_trains_and_needs_text_with_your_data(tiny_ckpt, tmp_path):
    m = run(tiny_ckpt, tmp_path / "rep", "--replay", "0.3", "--recall-limit", "0")
    assert (tmp_path / "rep" / "replay.bin").exists() and math.isfinite(m["train_loss"])
    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "hi"}\n' * 8)
    with pytest.raises(UserError, match="--replay-data"):
        sft.check_args(sft.parse_args(["--data", str(path), "--replay", "0.3"]))
