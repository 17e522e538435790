"""The held-out evaluation shared by DPO, PPO and GRPO: under torchrun the prompts go in fixed-size chunks,
chunk k sampled by process k mod N with a generator seeded from (seed, k), so the completions, and every
figure computed from them, do not depend on N; a set that fits one chunk samples as one generator seeded
with the seed does."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

import align
import evals
import training
from gpt import GPT, GPTConfig, generate
from tokenizer import eos_id, pad_id

PROMPTS = ["Instruction: Write a review of the kettle.\nOutput:", "Instruction: Write a review of the pie.\nOutput:",
           "Instruction: Write a review of the inn.\nOutput:", "Instruction: Describe the river.\nOutput:",
           "Instruction: Write a review of the flag.\nOutput:"]


def fake_ctx(rank, world):
    """What one process of `world` sees: the chunking functions read only rank and world."""
    return SimpleNamespace(ddp=True, rank=rank, world=world, device="cpu")


@pytest.fixture
def tiny(small_enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    return model, small_enc, [small_enc.encode_ordinary(p) for p in PROMPTS]


def test_chunk_k_goes_to_process_k_mod_n_and_the_chunks_cover_the_items_once():
    for n, size, world in ((5, 2, 2), (7, 3, 3), (1, 64, 4), (0, 2, 2), (128, 64, 2)):
        owned = [training.my_chunks(n, size, fake_ctx(r, world)) for r in range(world)]
        assert all(k % world == r for r in range(world) for k, _, _ in owned[r])
        cover = sorted((k, lo, hi) for part in owned for k, lo, hi in part)
        assert cover == training.my_chunks(n, size)                     # one process: every chunk, in order
        assert [i for _, lo, hi in cover for i in range(lo, hi)] == list(range(n))
    assert training.gather_chunks({1: ["c", "d"], 0: ["a", "b"], 2: ["e"]}) == ["a", "b", "c", "d", "e"]


def test_samples_do_not_depend_on_the_number_of_processes(tiny):
    model, enc, ids = tiny
    one = evals.sample_completions(model, enc, ids, 8, seed=3, batch=2)   # 3 chunks of 2, 2, 1 prompts
    assert len(one) == len(ids) and len({tuple(c) for c in one}) > 1
    for world in (2, 3):
        parts = [evals.sample_chunks(model, enc, ids, 8, 3, batch=2, ctx=fake_ctx(r, world)) for r in range(world)]
        assert sorted(k for p in parts for k in p) == [0, 1, 2]
        assert training.gather_chunks({k: v for p in parts for k, v in p.items()}) == one
    # chunk 0 is sampled with the seed itself: a set of one chunk samples as it did with a single generator
    gen = torch.Generator().manual_seed(3)
    assert one[:2] == generate(model, ids[:2], 8, eos_id=eos_id(enc), pad_id=pad_id(enc), generator=gen)
    assert evals.sample_completions(model, enc, ids, 8, seed=3) == generate(
        model, ids, 8, eos_id=eos_id(enc), pad_id=pad_id(enc), generator=torch.Generator().manual_seed(3))
    # later chunks have generators of their own: not a continuation of chunk 0's
    assert training.chunk_seed(3, 0) == 3 and len({training.chunk_seed(3, k) for k in range(4)}) == 4


def test_sequence_kl_in_chunks_equals_the_mean_of_the_per_prompt_log_ratios(tiny):
    model, enc, ids = tiny
    torch.manual_seed(1)
    ref = align.frozen_copy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    comps = evals.sample_completions(model, enc, ids, 8, seed=0)
    by_row = [evals.sequence_kl(model, ref, [x], [y], enc, "cpu") for x, y in zip(ids, comps)]
    for batch in (1, 2, 32):
        assert evals.sequence_kl(model, ref, ids, comps, enc, "cpu", batch=batch) == pytest.approx(
            sum(by_row) / len(by_row), abs=1e-5)
    assert abs(sum(by_row)) > 1e-3   # the check is not trivial


def test_heldout_eval_figures_come_from_the_whole_set(tiny):
    model, enc, _ = tiny
    ref = align.frozen_copy(model)
    metrics, samples = align.heldout_eval(model, ref, enc, PROMPTS, 8, 0, contextlib.nullcontext)
    # policy = reference and the same seed: the same samples, KL 0, every prompt a tie
    assert metrics["kl"] == pytest.approx(0, abs=1e-6) and metrics["win_rate"] == 0.5
    assert metrics["gold_reward"] == metrics["ref_gold_reward"] and len(samples) == len(PROMPTS)
