"""Chain of thought on additions: the answer read after the worked steps, the SFT data of both targets
(same problems, prompt masked, steps and answer trained), and no held-out sum among the training examples."""
import json
import re

import pytest

import data
import evals
import grpo
import world
from common import UserError


@pytest.fixture(scope="module")
def w():
    return world.make_world(1337)


def pair(e):
    a, b = map(int, re.findall(r"\d+", e["input"]))
    return min(a, b), max(a, b)


def test_answer_is_read_after_the_steps():
    steps = "7 + 5 = 12, write 2 carry 1. 4 + 8 + 1 = 13, write 13."
    assert world.extract_answer_number(steps + " The answer is 132.") == 132
    assert evals.number_match(steps + " The answer is 132.", "132") == 1.0
    assert evals.number_match(steps + " The answer is 132.", "2 + 0 = 2, write 2. The answer is 132.") == 1.0
    # the numbers inside the steps are not the answer: steps cut off before it answer nothing
    assert world.extract_answer_number(steps) is None and evals.number_match(steps, "13") == 0.0
    # a wrong step with the right final answer still counts (the answer is what is checked) ...
    assert evals.number_match("7 + 5 = 11, write 1 carry 1. The answer is 132.", "132") == 1.0
    # ... the last answer is the one read, and a wrong one does not count
    assert evals.number_match("The answer is 132. 4 + 8 = 12. The answer is 122.", "132") == 0.0
    assert evals.number_match("132", "132") == 1.0 and evals.number_match("", "132") == 0.0


def test_steps_well_formed():
    assert world.steps_well_formed(world.addition_cot(47, 85))
    assert world.steps_well_formed("2 + 0 = 2, write 2. 1 + 3 = 4, write 4. The answer is 42.")
    assert world.steps_well_formed("7 + 5 = 11, write 1 carry 1. The answer is 9.")   # form, not truth
    assert not world.steps_well_formed("The answer is 42.")                           # no steps
    assert not world.steps_well_formed("2 + 0 = 2, write 2. 1 + 3 = 4, write 4.")     # no answer
    assert not world.steps_well_formed("2 + 0 = 2, write 2. The answer is 42. Yes")   # more after it
    assert all(world.steps_well_formed(world.addition_cot(a, b)) for a, b in [(5, 995), (999, 1), (10, 10)])


def test_carries_by_hand():
    assert world.carries(58, 7) == 1 and world.carries(12, 30) == 0 and world.carries(999, 1) == 3
    assert world.carries(47, 85) == 2 and world.carries(50, 50) == 1


def test_both_targets_ask_the_same_problems(w):
    cot, direct = world.addition_sft(w, "cot"), world.addition_sft(w, "direct")
    assert [e["input"] for e in cot] == [e["input"] for e in direct] and len(cot) == 1000
    for c, d in zip(cot, direct):
        a, b = map(int, re.findall(r"\d+", c["input"]))
        assert d["output"] == str(a + b) and c["output"] == world.addition_cot(a, b)
        assert c["instruction"] == world.TASK_INSTRUCTIONS["addition_cot"]
        assert d["instruction"] == world.TASK_INSTRUCTIONS["addition"]
    test = world.addition_sft(w, "cot", "test", with_carries=True)
    assert test and all(world.carries(*pair(e)) for e in test)
    assert len(test) < len(world.addition_sft(w, "cot", "test"))
    rl = world.addition_sft(w, "cot", answer_only=True)   # RL prompts: the same question, the number to check
    assert [(e["instruction"], e["input"]) for e in rl] == [(e["instruction"], e["input"]) for e in cot]
    assert [e["output"] for e in rl] == [e["output"] for e in direct]
    with pytest.raises(ValueError):
        world.addition_sft(w, "steps")


def test_no_training_example_shares_its_sum_with_a_held_out_one(w):
    train = {pair(e) for e in world.addition_sft(w, "cot")}
    for split in ("val", "test"):
        held = {pair(e) for e in world.addition_sft(w, "cot", split)}
        assert held and not train & held, split
    # nor does the pre-training text hold a held-out sum
    _, excluded_pairs = world.held_out_questions(world.task_sets(w))
    assert {pair(e) for e in world.addition_sft(w, "direct", "test")} <= excluded_pairs


def test_cot_target_masks_the_prompt_and_trains_on_steps_and_answer(tmp_path, w, small_enc):
    path = tmp_path / "cot.jsonl"
    world.main(["--addition-sft", "cot", str(path)])
    rows = [json.loads(line) for line in open(path)]
    assert rows == world.addition_sft(w, "cot")
    (prompt, completion), = data.load_sft_examples(str(path))[:1]
    assert prompt == data.format_prompt(rows[0]["instruction"], rows[0]["input"]) and prompt.endswith("Output:")
    p, c = data.encode_example(small_enc, prompt, completion, 1024)
    b = data.completion_batch([p], [c], pad_id=0)
    trained = b["targets"][0][b["targets"][0] != -1].tolist()
    assert trained == c and trained[-1] == small_enc.eot_token             # steps, answer, EOS: every one
    assert (b["targets"][0, :len(p) - 1] == -1).all()                      # no prompt token is a target
    text = small_enc.decode(trained[:-1])
    assert text == " " + rows[0]["output"]
    assert world.extract_answer_number(text) == sum(pair(rows[0]))


def test_cli_writes_a_split_and_refuses_a_bad_target(tmp_path, w):
    path = tmp_path / "test.jsonl"
    world.main(["--split", "test", "--with-carries", "--addition-sft", "direct", str(path)])
    assert [json.loads(line) for line in open(path)] == world.addition_sft(w, "direct", "test", with_carries=True)
    with pytest.raises(UserError, match="TARGET"):
        world.main(["--addition-sft", "steps", str(tmp_path / "x.jsonl")])
    world.main(["--n-train", "1100", "--addition-sft", "cot", str(path)])
    assert [json.loads(line) for line in open(path)] == world.addition_sft(w, "cot", n_train=1100)
    with pytest.raises(UserError, match="--n-train"):  # val and test keep their size
        world.main(["--split", "test", "--n-train", "1100", "--addition-sft", "cot", str(path)])


def test_more_training_sums_never_a_held_out_sum(w):
    sets = world.task_sets(w)["addition"]
    held = {pair(e) for k in ("val", "test") for e in sets[k]}
    rows = world.addition_sft(w, "cot", n_train=3000)
    pairs = [pair(r) for r in rows]
    assert len(rows) == 3000 and len(set(pairs)) == 3000 and not set(pairs) & held
    assert rows[:1000] == world.addition_sft(w, "cot")  # the split's 1000 first, then new ones
    direct = world.addition_sft(w, "direct", n_train=3000)
    assert [r["input"] for r in direct] == [r["input"] for r in rows]  # both targets, the same problems
    assert all(world.extract_answer_number(r["output"]) == sum(pair(r)) for r in rows[1000:])
    assert len(world.addition_sft(w, "cot", n_train=10)) == 10


def test_format_reward_counts_the_form_not_the_truth():
    right = world.addition_cot(47, 85)                                      # well formed, right
    wrong = "7 + 5 = 11, write 1 carry 1. 4 + 8 + 1 = 13, write 13. The answer is 131."  # well formed, wrong
    bare = "The answer is 132."                                             # right, no steps
    r = grpo.reasoning_rewards(["What is 47 + 85?"] * 4, [right, wrong, bare, right + " More."], 0.25)
    assert r.tolist() == [0.25, 0.25, 0.0, 0.0]
    assert [grpo.exact_reward(t, "132") for t in (right, wrong, bare)] == [1.0, 0.0, 1.0]
    with pytest.raises(UserError, match="--format-reward has no effect"):  # only the exact reward reads steps
        grpo.main(["--reward", "gold", "--format-reward", "0.1"])


def test_steps_reward_checks_each_column_step_at_its_place():
    right = world.addition_cot(47, 85)            # 2 steps, both right
    one_wrong = "7 + 5 = 11, write 1 carry 1. 4 + 8 + 1 = 13, write 13. The answer is 131."
    swapped = "4 + 8 + 1 = 13, write 13. 7 + 5 = 12, write 2 carry 1. The answer is 132."  # right steps, wrong places
    assert [world.steps_right(t, 47, 85) for t in (right, one_wrong, swapped, "The answer is 132.")] == [1, .5, 0, 0]
    assert world.steps_right(world.addition_cot(347, 85), 347, 85) == 1
    assert world.steps_right(right, 347, 85) == 1 / 3   # 47 + 85's first column is 347 + 85's; then it differs
    prompts = ["### Instruction:\nAdd.\n\n### Input:\nWhat is 47 + 85?\n\n### Response:\n"] * 3 + ["Say hi."]
    assert grpo.reasoning_rewards(prompts, [right, one_wrong, swapped, "hi"], steps_w=0.5).tolist() == [0.5, 0.25, 0, 0]
    assert grpo.reasoning_rewards(prompts[:2], [right, one_wrong], 0.1, 0.5).tolist() == pytest.approx([0.6, 0.35])
    assert grpo.reasoning_rewards(prompts, [right] * 4).tolist() == [0.0] * 4
    with pytest.raises(UserError, match="--steps-reward has no effect"):
        grpo.main(["--reward", "gold", "--steps-reward", "0.1"])
