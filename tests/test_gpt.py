"""The shared GPT: causality, padding, the KV cache, log-probs, sampling, checkpoints."""
import math

import pytest
import torch

from common import UserError
from gpt import (GPT, GPTConfig, cross_entropy_loss, generate, load_checkpoint, sample_next_token, save_checkpoint,
                 token_logprobs)

EOS, PAD = 62, 63


def test_changing_a_later_token_never_changes_earlier_logits(tiny_model):
    x = torch.randint(0, 62, (2, 20))
    for t in (0, 7, 19):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 62
        assert torch.equal(tiny_model(x)[:, :t], tiny_model(y)[:, :t])
        assert not torch.equal(tiny_model(x)[:, t:], tiny_model(y)[:, t:])


def test_left_padding_with_position_ids_leaves_logprobs_unchanged(tiny_model):
    rows = [torch.randint(0, 62, (n,)) for n in (5, 12, 9)]
    T = 12
    ids = torch.full((3, T), PAD)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = True
    padded = tiny_model(ids, attention_mask=mask)
    for b, r in enumerate(rows):
        alone = tiny_model(r[None])
        tgt = torch.roll(r, -1)[None]
        tgt[0, -1] = -1
        lp_alone = token_logprobs(alone, tgt)
        lp_padded = token_logprobs(padded[b:b + 1, T - len(r):], tgt)
        assert torch.allclose(lp_alone, lp_padded, atol=1e-5)


def test_right_padding_gives_the_same_logits_on_real_tokens(tiny_model):
    r = torch.randint(0, 62, (1, 7))
    ids = torch.cat([r, torch.full((1, 5), PAD)], 1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], 1).bool()
    assert torch.allclose(tiny_model(ids, mask)[:, :7], tiny_model(r), atol=1e-5)


def test_token_logprobs_matches_a_float64_loop_and_respects_temperature():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -1
    for temp in (1.0, 0.7):
        got = token_logprobs(logits, targets, temperature=temp)
        for b in range(2):
            for t in range(5):
                if targets[b, t] == -1:
                    assert got[b, t] == 0
                    continue
                z = [float(v) / temp for v in logits[b, t].double()]
                lse = math.log(sum(math.exp(v) for v in z))
                assert abs(got[b, t].item() - (z[targets[b, t]] - lse)) < 1e-5


def test_cross_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 0.0]]])  # p(1) = 3/4 at t=0
    targets = torch.tensor([[1, -1]])
    assert abs(cross_entropy_loss(logits, targets).item() - (-math.log(0.75))) < 1e-6


def test_kv_cached_greedy_equals_full_recompute(tiny_model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    a = generate(tiny_model, prompts, 20, eos_id=EOS, pad_id=PAD, greedy=True)
    b = generate(tiny_model, prompts, 20, eos_id=EOS, pad_id=PAD, greedy=True, use_cache=False)
    assert a == b
    # and batching never changes a row
    assert a == [generate(tiny_model, [p], 20, eos_id=EOS, pad_id=PAD, greedy=True)[0] for p in prompts]


def test_generation_stops_at_eos_per_row(tiny_model):
    with torch.no_grad():
        tiny_model.transformer.wte.weight[EOS] *= 6  # make EOS likely so some rows stop early
    gen = torch.Generator().manual_seed(0)
    outs = generate(tiny_model, [[i] for i in range(16)], 12, eos_id=EOS, pad_id=PAD, generator=gen)
    assert any(o[-1] == EOS for o in outs) and any(EOS not in o for o in outs)
    for o in outs:
        assert len(o) <= 12 and PAD not in o
        assert EOS not in o[:-1]


def test_sampling_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = sample_next_token(logits, greedy=True)
    assert torch.equal(sample_next_token(logits, top_k=1), greedy)
    assert torch.equal(sample_next_token(logits, top_p=1e-6), greedy)
    top5 = logits.topk(5).indices
    for _ in range(20):
        s = sample_next_token(logits, temperature=2.0, top_k=5)
        assert all(s[b] in top5[b] for b in range(4))
    # nucleus: the kept set is the smallest whose probability reaches top_p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    seen = {sample_next_token(probs, top_p=0.8).item() for _ in range(200)}
    assert seen == {0, 1}


def test_checkpoint_round_trip_and_bad_checkpoints(tmp_path, small_enc):
    cfg = GPTConfig(vocab_size=small_enc.n_vocab, block_size=16, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(cfg)
    save_checkpoint(tmp_path / "ck", model, small_enc, {"stage": "test"})
    loaded, enc, meta = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    assert torch.equal(loaded(x), model(x)) and meta["stage"] == "test"
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert enc.encode_ordinary("the flag") == small_enc.encode_ordinary("the flag")
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere", hint="python pretrain.py")
    # a checkpoint whose tensors do not fit the config
    bigger = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=16, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "bad", bigger, small_enc, {})
    cfg_json = (tmp_path / "bad" / "config.json").read_text().replace('"n_embd": 32', '"n_embd": 16')
    (tmp_path / "bad" / "config.json").write_text(cfg_json)
    with pytest.raises(UserError, match="mis-shaped"):
        load_checkpoint(tmp_path / "bad")
    # no pickle anywhere: the weights file is safetensors
    assert (tmp_path / "ck" / "model.safetensors").read_bytes()[8:9] == b"{"


def test_prompt_longer_than_context_is_a_clear_error(tiny_model):
    with pytest.raises(UserError, match="context"):
        generate(tiny_model, [[1] * 40], 4, eos_id=EOS, pad_id=PAD)
