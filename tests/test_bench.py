"""bench.py at toy size: the FLOPs formula by hand, MFU arithmetic, KV-cached == recompute, memory
accounting by hand, and a full run writing JSON. Properties only; speed is never asserted."""
import json

import pytest
import torch
import torch.nn as nn

import bench
from gpt import GPT

TOY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "48", "--vocab-size", "64",
       "--batch-size", "4", "--steps", "1", "--repeats", "1", "--warmup", "0", "--sample-repeats", "1",
       "--new-tokens", "8,20", "--sample-batches", "1,3", "--prompt-len", "6", "--rl-prompt-len", "6",
       "--rl-completion-len", "8", "--ppo-epochs", "1", "--ppo-minibatches", "2", "--lora-r", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """Toy-sized ops are all overhead: on a shared machine two intra-op threads only wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_flops_per_token_matches_a_hand_count(tiny_config):
    # tiny_config: vocab 64, context 32, 2 layers, 2 heads, 32 wide (head dim 16)
    C, V = 32, 64
    block = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)
    n = V * C + 2 * block + 2 * C  # wte (tied with lm_head) + blocks + ln_f; wpe is not counted
    assert n == 27520 and GPT(tiny_config).num_params() == n
    assert bench.flops_per_token(n, 2, 2, 16, 32) == 6 * 27520 + 12 * 2 * 2 * 16 * 32 == 189696
    # GPT-2 124M: nanoGPT's well-known figure of ~85M non-embedding + tied wte -> 6N + 12LHQT
    assert bench.flops_per_token(124_337_664, 12, 12, 64, 1024) == 6 * 124_337_664 + 12 * 12 * 12 * 64 * 1024


def test_mfu_and_peak_lookup():
    assert bench.mfu(1000.0, 2e9, 4e12) == pytest.approx(0.5)
    assert bench.mfu(1000.0, 2e9, None) is None
    assert bench.device_peak_flops("cpu") is None
    assert bench.device_peak_flops("cpu", override=1e12) == 1e12


def test_saved_activation_bytes_by_hand():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    # a linear layer saves its input (3 x 8 floats) for the weight gradient; the weight itself is not counted
    _, nbytes = bench.saved_activation_bytes(lin, lambda: lin(x).sum())
    assert nbytes == 3 * 8 * 4


def test_cached_sampling_is_token_identical_to_recompute():
    args = bench.parse_args(TOY)
    torch.manual_seed(0)
    model = GPT(bench.gpt_config(args))
    ctx = bench.setup(args)
    rows = bench.bench_sample(args, ctx, model)
    assert [(r["batch"], r["new_tokens"]) for r in rows] == [(1, 8), (1, 20), (3, 8), (3, 20)]
    assert all(r["identical"] and r["cache_speedup"] > 0 for r in rows)


def test_hf_copy_computes_the_same_logits():
    pytest.importorskip("transformers")
    args = bench.parse_args(TOY)
    torch.manual_seed(0)
    model = GPT(bench.gpt_config(args)).eval()
    hf = bench.hf_model_from(model).eval()
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        assert torch.allclose(bench.ours_logits(model, x), bench.hf_logits(hf, x), atol=1e-4)


def test_full_run_writes_json_with_consistent_figures(tmp_path):
    path = tmp_path / "b.json"
    res = bench.main(TOY + ["--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["config"]["n_layer"] == 2 and saved["machine"]["device"] == "cpu"
    tr = res["train"]
    assert tr["ours"]["tokens_per_s"] > 0 and tr["ours"]["mfu"] is None
    assert all(r["identical"] for r in res["sample"])
    rl = res["rl"]
    assert 0 < rl["ppo_generation_share"] < 1 and rl["ppo_updates"] == 2
    mem = res["memory"]
    for r in mem.values():  # AdamW keeps exp_avg and exp_avg_sq (2 x grads) plus one 4-byte step per tensor
        assert r["optimizer_bytes"] - 2 * r["grad_bytes"] in range(0, 4 * 100, 4)
        assert r["activation_bytes_saved"] > 0
    assert mem["lora"]["trainable_params"] == mem["qlora"]["trainable_params"] < mem["full"]["trainable_params"]
    assert mem["qlora"]["params_bytes"] < mem["lora"]["params_bytes"]


def test_unknown_section_is_a_clear_error():
    from common import UserError
    with pytest.raises(UserError, match="unknown section"):
        bench.parse_args(["--only", "train,speed"])


def test_token_agreement_counts_up_to_the_first_difference():
    assert bench.token_agreement([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]]) == 4 / 5
    assert bench.token_agreement([[1, 2, 3]], [[7, 2, 3]]) == 0


def test_dpo_and_ppo_cost_losses_by_hand():
    import math
    t = torch.tensor
    # (log pi - log ref) is +1 on the chosen row and -1 on the rejected one: L = -log sigmoid(beta * 2)
    got = bench.dpo_loss_for_cost(t([1.0]), t([-1.0]), t([0.0]), t([0.0]), beta=0.5)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1.0)))
    # ratio 1.5 with A = 2 is clipped to 1.2 -> -min(3, 2.4) = -2.4; V = R adds nothing; the masked token is ignored
    lp, old = t([[math.log(1.5), 0.0]]), t([[0.0, 0.0]])
    loss = bench.ppo_loss_for_cost(lp, old, t([[2.0, 5.0]]), t([[1.0, 1.0]]), t([[1.0, 9.0]]), t([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(-2.4)


def test_run_log_stage_times_by_hand(tmp_path, capsys):
    log = ("== pretrain: python3 pretrain.py --out out/pretrain\nstep 10/700 | loss 6.4 | elapsed 10s\n"
           "== pretrain done in 600 s\n== prompting: out/prompting/results.json exists, skipped (--force to redo)\n"
           "== sft done in 200 s\n== report done in 100 s\n== pipeline finished in 905 s; report: out/report.md\n")
    assert bench.run_log_times(log) == ([("pretrain", 600), ("sft", 200), ("report", 100)], 905)
    assert bench.run_log_times(log.split("== report")[0]) == ([("pretrain", 600), ("sft", 200)], None)
    (tmp_path / "run.log").write_text(log)
    assert bench.main(["--run-log", str(tmp_path / "run.log")]) == {"stages": {"pretrain": 600, "sft": 200, "report": 100},
                                                                    "total_s": 905}
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[-1] for l in lines if l.split()[:1] in (["pretrain"], ["sft"], ["report"])] == ["67%", "22%", "11%"]
