"""report.py's own measures (the rest of the report is exercised end to end by tests/test_run.py)."""
import json
import math

import pytest

import evals
import report
import world

ITEMS = ["the copper kettle", "the Belwick inn", "the copper kettle lid"]


def test_names_the_item_reads_the_item_off_the_prompt():
    prompt = "Instruction: Write a review of the copper kettle.\nOutput:"
    assert evals.names_the_item(prompt, " The copper kettle is superb.", ITEMS) == 1.0
    assert evals.names_the_item(prompt, " The Belwick inn is superb.", ITEMS) == 0.0   # another item
    assert evals.names_the_item(prompt, " It is superb. I loved it.", ITEMS) == 0.0     # no item at all
    assert evals.names_the_item("Instruction: Review the Belwick inn.\nOutput:", " the belwick INN was fine", ITEMS) == 1.0
    assert evals.names_the_item("Instruction: Say hi.\nOutput:", " hi", ITEMS) == 0.0


def test_on_topic_sentiment_counts_the_score_only_on_topic():
    prompt = "Instruction: Write a review of the copper kettle.\nOutput:"
    on = " The copper kettle is superb."
    assert evals.on_topic_sentiment(prompt, on, ITEMS) == world.sentiment_score(on) > 0
    # the same praise about nothing in particular (what gaming the lexicon judge looks like) scores -1,
    # although the lexicon judge alone scores it higher than the on-topic review
    off = " It is superb, superb, superb."
    assert world.sentiment_score(off) > world.sentiment_score(on)
    assert evals.on_topic_sentiment(prompt, off, ITEMS) == -1.0
    assert evals.on_topic_sentiment(prompt, " The Belwick inn is superb.", ITEMS) == -1.0


def test_runs_that_differ_only_by_seed_are_aggregated_as_mean_and_sd():
    assert report.seed_group("dpo_beta0.5_s3") == "dpo_beta0.5" and report.seed_group("dpo") == "dpo"
    assert report.seed_group("sft_lora") == "sft_lora"
    assert report.series("dpo_beta2") == "dpo" and report.series("ppo_kl0.5") == "ppo"
    assert report.series("dpo_rpo0.5_beta2") == "dpo_rpo0.5" and report.series("dpo_from_base") == "dpo_from_base"
    rows = [("sft", {"kl": None}), ("dpo", {"gold_reward": 0.5, "kl": 1.0}), ("dpo_s2", {"gold_reward": 0.7, "kl": 3.0}),
            ("dpo_s3", {"gold_reward": 0.9, "kl": 2.0}), ("ppo", {"gold_reward": 0.8, "kl": 4.0}),
            ("sft_lora", {"gold_reward": 0.1})]
    agg = {g: (names, st) for g, names, st in report.aggregate_seeds(rows, keys=("gold_reward", "kl"))}
    assert set(agg) == {"dpo", "ppo"}                    # sft, sft_lora: single runs outside the alignment families
    names, st = agg["dpo"]
    assert names == ["dpo", "dpo_s2", "dpo_s3"]
    assert st["gold_reward"][0] == pytest.approx(0.7) and st["gold_reward"][1] == pytest.approx(0.2)  # sd, n - 1
    assert st["kl"] == pytest.approx((2.0, 1.0))
    assert agg["ppo"][1]["gold_reward"] == (0.8, None)  # one seed: no sd
    assert report.pm((0.7, 0.2), "+.3f") == "+0.700 ± 0.200" and report.pm((0.81, None), ".0f", 100) == "81"
    assert report.pm((None, None), ".2f") == "—"


def test_harmlessness_table_orders_the_rows_and_averages_every_run_of_several_seeds():
    rate = lambda refusal, **kw: {"leak": 0.0, "refusal": refusal, "insult": 0.0, "over_refusal": 0.0, "public": 1.0,
                                  "negative": 0.5, "facts": 1.0, "sentiment": 1.0, "gold_reward": 0.8, "kl": 2.0, **kw}
    rows = [("rloo_hh_s2", rate(1.0)), ("rloo_s2", rate(0.6)), ("sft_lora", rate(0.0)), ("rloo", rate(0.8)),
            ("dpo_beta2", rate(1.0)), ("pretrain", rate(0.0, leak=0.9)), ("rloo_hh", rate(0.9)), ("sft", {"leak": None})]
    lines = report.harmless_lines(rows)
    cells = [line.split(" | ") for line in lines if line.startswith("| ")]
    names = [c[0][2:] for c in cells if len(c) == 11]   # the checkpoints: no sweep, no other mode, none unmeasured
    assert names == ["checkpoint", "pretrain", "rloo", "rloo_s2", "rloo_hh", "rloo_hh_s2"]
    assert "| pretrain | 90% | 0% |" in "\n".join(lines)
    means = {c[0][2:]: c[3] for c in cells if len(c) == 12}
    assert means == {"run": "refusal", "rloo": "70 ± 14", "rloo_hh": "95 ± 7"}  # refusal, percentage points, sd n - 1
    assert report.harmless_lines([("sft", {"leak": None})]) == []


def test_frontier_points_follow_each_series_sorted_by_kl():
    st = lambda kl, g: {"kl": (kl, 0.1), "gold_reward": (g, 0.01), "on_topic_gold": (g - 1, 0.02)}
    agg = [("dpo", ["dpo"], st(30.0, 0.7)), ("dpo_beta2", ["dpo_beta2"], st(1.0, 0.5)),
           ("ppo_kl0.5", ["ppo_kl0.5"], st(2.0, 0.6)), ("dpo_from_base", ["dpo_from_base"], st(9.0, 0.1))]
    curves = report.frontier_points(agg)
    assert set(curves) == {"dpo", "ppo"}
    assert [p["label"] for p in curves["dpo"]] == ["beta2", "default"]
    assert curves["ppo"][0]["on_topic_gold"] == (-0.4, 0.02) and math.isclose(curves["dpo"][0]["kl"][0], 1.0)


def test_label_source_costs_group_the_runs_of_each_source_across_seeds(tmp_path):
    def meta(run, val):
        (tmp_path / run).mkdir()
        (tmp_path / run / "meta.json").write_text(json.dumps({"gold_agreement": {"val": val, "train": 0.5}}))
    meta("preferences_aaa", 0.5)
    meta("preferences_gold", 1.0)
    meta("preferences_gold_s2", 1.0)
    meta("preferences_rougeL", 0.6)
    meta("preferences_rougeL_s2", 0.7)
    meta("preferences_rougeL_s3", 0.8)
    (tmp_path / "preferences").mkdir()   # the main job's pairs: no source of its own
    (tmp_path / "preferences" / "meta.json").write_text(json.dumps({"gold_agreement": {"val": 1.0}}))
    rows = [("rloo_gold", {"gold_reward": 0.8, "on_topic_gold": 0.6}), ("rloo_gold_s2", {"gold_reward": 0.6, "on_topic_gold": 0.4}),
            ("dpo_rougeL", {"gold_reward": 0.1, "on_topic_gold": -0.2}), ("rloo", {"gold_reward": 0.9})]
    reward_rows = [("reward_gold", {"pairwise_accuracy": 0.99}), ("reward_rougeL_s3", {"pairwise_accuracy": 0.7}),
                   ("reward", {"pairwise_accuracy": 0.5})]
    costs = {x: (n, st) for x, n, st, _ in report.label_source_costs(str(tmp_path), rows, reward_rows)}
    assert list(costs) == ["gold", "rougeL", "aaa"]   # the cleanest labels first, whatever the names
    n, st = costs["gold"]
    assert n == 2 and st["agreement"] == (1.0, 0.0) and st["rm_accuracy"] == (0.99, None)
    assert st["rloo_gold"][0] == pytest.approx(0.7) and st["rloo_gold"][1] == pytest.approx(math.sqrt(0.02))
    assert st["dpo_gold"] == (None, None)                    # no DPO run on the gold source
    n, st = costs["rougeL"]
    assert n == 3 and st["agreement"][0] == pytest.approx(0.7) and st["agreement"][1] == pytest.approx(0.1)
    assert st["rm_accuracy"] == (0.7, None) and st["dpo_on_topic_gold"] == (-0.2, None)
    lines = report.cost_lines(report.label_source_costs(str(tmp_path), rows, reward_rows))
    assert "| gold | 2 | 100.0 ± 0.0 | 99.0 (n=1) | +0.700 ± 0.141 | +0.500 ± 0.141 | — | — |" in lines
    # each reward model on the held-out pairs of its own source, as gold orders them; others on the main job's
    (tmp_path / "preferences_gold_s2" / "val_gold.jsonl").write_text("")
    assert report.reward_pairs_path("reward_gold_s2", str(tmp_path)) == str(tmp_path / "preferences_gold_s2" / "val_gold.jsonl")
    assert report.reward_pairs_path("reward_gold", str(tmp_path)) == str(tmp_path / "preferences" / "val.jsonl")
    assert report.reward_pairs_path("reward_head", str(tmp_path)) == str(tmp_path / "preferences" / "val.jsonl")
    agg = [("rloo", ["rloo"], {"kl": (5.0, None), "gold_reward": (0.8, None), "on_topic_gold": (0.6, None)}),
           ("rloo_gold", ["rloo_gold"], {"kl": (4.0, None), "gold_reward": (0.7, None), "on_topic_gold": (0.5, None)})]
    assert set(report.frontier_points(agg, skip={"rloo_gold"})) == {"rloo"}
