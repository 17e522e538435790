"""The report card: every checkpoint in out/ measured the same way, on the same held-out sets.

    python report.py                 # after `bash run.sh` (or any subset of the stages)
    python report.py --n 200         # more held-out examples per task (slower, tighter intervals)

For each policy checkpoint (a directory of out/ with model.safetensors and config.json) it measures:
  val loss      nats per token on the held-out pre-training text (data.split_documents)
  fact recall   greedy cloze completion of facts of the world ("The flag of X is" -> colour)
  facts/sentiment/addition/story   exact-match accuracy on the TEST splits, greedy decoding
  addition (CoT) the test additions with a carry, asked for worked column steps (zero-shot), counted by the
                number after the steps (evals.addition_cot_accuracy): what the chain-of-thought SFT is for
  format        share of those answers that end with EOS and have the task's form
  region        exact-match accuracy on the held-out region's test questions (domain_facts)
  gold reward   the lexicon judge's score of sampled reviews for held-out prompts, mean ± 95% interval
  on-topic gold the same score counted only when the review names the item asked about, else -1
                (evals.on_topic_sentiment: no reward model sees it); on topic: the share that names it
  win vs SFT    share of prompts where the checkpoint's review beats the SFT model's (ties half)
  KL vs SFT     sequence-level KL(pi || pi_SFT) on the checkpoint's own samples
  RM score      the trained reward model's mean score of those samples (the proxy the policy optimised)
  harmlessness  leak, refusal, insult, over-refusal and helpfulness kept on the held-out people's requests
                (evals.harmless_rates), alone and behind the word guardrail
and for reward models: pairwise accuracy on held-out preference pairs. It writes out/report.md,
out/report/results.json, and, when matplotlib is installed, loss curves and the gold reward-KL
frontiers of the DPO, PPO, GRPO and RLOO sweeps (out/report/*.png). Runs that differ only by seed (out/dpo,
out/dpo_s2 from `bash run.sh --seeds 2`) are also summarised as mean ± sd (error bars on the frontier).
Runs on other label sources (preferences_X -> reward_X -> rloo_X, and dpo_X, per seed: run.sh --all) make
the table of what each label source costs. Results are cached per checkpoint (the weights' size and
modification time), so a second run takes seconds.
"""

import glob
import json
import math
import os
import re
import time

import data
import evals
import world
from common import ArgumentParser, UserError, positive_int, run_cli
from gpt import load_checkpoint, read_config
from reward import load_reward_model, reward_scores
from tokenizer import tokenizer_fingerprint

TASKS = ("facts", "sentiment", "addition", "story")
CACHE_VERSION = 7  # bump when the figures of a row change, so cached rows are recomputed (4: --prompts beyond 64 are
#                   sampled in chunks of 64, each with a generator of its own, training.chunk_seed; 5: the region column;
#                   6: the addition (CoT) column; 7: the harmlessness table)
FRONTIER_FAMILIES = ("dpo", "ppo", "grpo", "rloo")
SEED_KEYS = ("gold_reward", "on_topic_gold", "on_topic", "win_rate", "kl", "sentiment", "story", "facts", "addition",
             "addition_cot",
             "drift_chosen", "drift_rejected")
ORDER = ("pretrain", "sft", "sft_lora", "sft_qlora", "domain", "domain_sft", "domain_sft_replay", "domain_grpo", "dpo",
         "dpo_from_base", "ppo", "grpo", "rloo")


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out-dir", default="out", help="where the stages wrote their checkpoints")
    p.add_argument("--sft", default=None, help="the reference policy for win rate and KL (default OUT_DIR/sft)")
    p.add_argument("--reward", default=None, help="reward model for the RM score (default OUT_DIR/reward)")
    p.add_argument("--n", type=positive_int, default=100, help="held-out examples per task and cloze prompts")
    p.add_argument("--prompts", type=positive_int, default=64, help="held-out review prompts for the alignment figures")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--world-seed", type=int, default=1337)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="re-evaluate even when a cached result exists")
    p.add_argument("--device", default="cpu")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------- checkpoints

def seed_group(name):
    """Runs that differ only by seed share a group: out/dpo, out/dpo_s2, out/dpo_s3 (run.sh --seeds 3) -> dpo."""
    return re.sub(r"_s\d+$", "", name)


def series(group):
    """The curve a run belongs to on the frontier plot: its name without the swept beta / KL coefficient
    (dpo_beta0.5 -> dpo, ppo_kl0.2 -> ppo, dpo_rpo0.5_beta2 -> dpo_rpo0.5)."""
    parts = group.split("_")
    return "_".join([parts[0]] + [p for p in parts[1:] if not p.startswith(("beta", "kl"))])


def mean_sd(xs):
    """Mean and sample standard deviation (n - 1 in the denominator; None for a single value)."""
    if not (xs := [x for x in xs if x is not None]):
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def aggregate_seeds(rows, keys=SEED_KEYS):
    """[(name, row)] -> [(group, names, {key: (mean, sd)})] for every group of two or more runs differing only
    by seed, plus single runs of the DPO/PPO/GRPO families, in the order of the rows."""
    groups = {}
    for name, r in rows:
        groups.setdefault(seed_group(name), []).append((name, r))
    out = []
    for group, members in groups.items():
        if len(members) < 2 and group.split("_")[0] not in FRONTIER_FAMILIES:
            continue
        out.append((group, [n for n, _ in members], {k: mean_sd([r.get(k) for _, r in members]) for k in keys}))
    return out


def sort_key(name):
    name = seed_group(name)
    base = name.split("_beta")[0].split("_kl")[0]
    return (ORDER.index(base) if base in ORDER else len(ORDER), name)


def find_checkpoints(out_dir):
    """-> ([(name, path, config)] of policies, [(name, path, config)] of reward models)."""
    policies, rewards = [], []
    for cfg_path in glob.glob(os.path.join(out_dir, "*", "config.json")):
        path = os.path.dirname(cfg_path)
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            continue
        config = read_config(path)
        stage = config.get("stage")
        kind = rewards if stage == "reward" else None if stage == "judge" else policies if "model" in config else None
        if kind is not None:
            kind.append((os.path.basename(path), path, config))
    return sorted(policies, key=lambda c: sort_key(c[0])), sorted(rewards, key=lambda c: sort_key(c[0]))


def stage_time(path, config):
    t, log = config.get("metrics", {}).get("time_s"), os.path.join(path, "metrics.jsonl")
    lines = open(log).read().splitlines() if t is None and os.path.exists(log) else []
    return json.loads(lines[-1]).get("elapsed") if lines else t


def cache_key(path, args, extra=""):
    st = os.stat(os.path.join(path, "model.safetensors"))
    return f"v{CACHE_VERSION}:{st.st_size}:{st.st_mtime_ns}:{args.n}:{args.prompts}:{args.max_new_tokens}:{args.seed}:{extra}"


# ----------------------------------------------------------------------------- held-out sets

def held_out_sets(args):
    w = world.make_world(args.world_seed)
    tasks = world.task_sets(w)
    _, val_docs = data.split_documents(world.pretrain_docs(w))
    review_prompts = sorted({data.format_prompt(e["instruction"], e["input"]) for e in tasks["review"]["test"]})
    return {"val_docs": val_docs, "cloze": world.fact_cloze(w)[:args.n], "items": w.items,
            "tasks": {t: tasks[t]["test"][:args.n] for t in TASKS}, "region": tasks["domain_facts"]["test"][:args.n],
            "addition_carries": world.addition_sft(w, "direct", "test", with_carries=True)[:args.n],
            "review_prompts": review_prompts[:args.prompts], "secrets": [p.code for p in w.people],
            "harmless": (h := world.harmless_sets(w)["test"])[::max(1, len(h) // args.n)]}   # all 168 from --n 85 up


def evaluate_policy(model, enc, sets, sft, sft_samples, rm, args):
    """One row of the table (see the module docstring for each figure)."""
    row = {}
    row["val_loss"], row["val_bpb"] = evals.text_loss(model, enc, data.encode_documents(sets["val_docs"], enc),
                                                      model.config.block_size, device=args.device)
    row["fact_recall"] = evals.fact_recall(model, enc, sets["cloze"])
    formats = []
    for task, examples in sets["tasks"].items():
        acc, fmt, _ = evals.task_accuracy(model, enc, examples, task)
        row[task], _ = acc, formats.append(fmt)
    row["format"] = sum(formats) / len(formats)
    row["region"] = evals.task_accuracy(model, enc, sets["region"], "domain_facts")[0]
    row["addition_cot"] = evals.addition_cot_accuracy(model, enc, sets["addition_carries"])[0]
    answers = evals.greedy_answers(model, enc, sets["harmless"])   # alone, then behind the word guardrail
    guarded = evals.guarded(answers, [evals.word_guard(a, sets["secrets"]) for a in answers])
    row.update({**evals.harmless_rates(sets["harmless"], answers),
                **{f"guard_{k}": v for k, v in evals.harmless_rates(sets["harmless"], guarded).items()}})
    if sft is not None:
        al = evals.alignment_eval(model, sft, enc, sets["review_prompts"], world.sentiment_score,
                                  args.max_new_tokens, seed=args.seed, ref_completions=sft_samples,
                                  return_completions=True)
        row.update({k: al[k] for k in ("gold_reward", "gold_reward_ci95", "win_rate", "kl", "eos_rate", "mean_len")})
        row["samples"] = al["samples"]
        texts = [enc.decode(evals.strip_eos(c, enc)) for c in al["completions"]]
        pairs = list(zip(sets["review_prompts"], texts))
        row["on_topic"] = sum(evals.names_the_item(p, t, sets["items"]) for p, t in pairs) / len(texts)
        row["on_topic_gold"], row["on_topic_gold_ci95"] = evals.mean_ci95(
            [evals.on_topic_sentiment(p, t, sets["items"]) for p, t in pairs])
        if rm is not None:
            prompt_ids = [enc.encode_ordinary(p) for p in sets["review_prompts"]]
            row["rm_score"] = reward_scores(rm, enc, prompt_ids, al["completions"]).mean().item()
    return row


def reward_pairs_path(name, out_dir):
    """The held-out pairs a reward model is measured on: reward_X[_sK], trained on the labels of one label source,
    on preferences_X[_sK]/val_gold.jsonl (the same held-out pairs as the gold judge orders them, so its accuracy is
    against gold whatever labels it learned), or without one on its own held-out pairs (reward_hh: preferences_hh's
    val.jsonl); any other on OUT/preferences/val.jsonl."""
    for path in (os.path.join(out_dir, "preferences" + name[len("reward"):], f) for f in ("val_gold.jsonl", "val.jsonl")):
        if name.startswith("reward_") and os.path.exists(path):
            return path
    return os.path.join(out_dir, "preferences", "val.jsonl")


def evaluate_reward_model(path, pairs_path, args):
    """Pairwise accuracy of a reward model on the held-out preference pairs at pairs_path."""
    if not os.path.exists(pairs_path):
        return {}
    rm, enc, _ = load_reward_model(path, args.device)
    pairs = data.load_preference_pairs(pairs_path)
    prompt_ids = [enc.encode_ordinary(p["prompt"]) for p in pairs]
    chosen = [enc.encode_ordinary(p["chosen"]) + [enc.eot_token] for p in pairs]
    rejected = [enc.encode_ordinary(p["rejected"]) + [enc.eot_token] for p in pairs]
    r_w, r_l = reward_scores(rm, enc, prompt_ids, chosen), reward_scores(rm, enc, prompt_ids, rejected)
    return {"pairwise_accuracy": (r_w > r_l).float().mean().item(), "pairs": len(pairs)}


def label_source_lines(out_dir):
    """Markdown for the LLM judges (judge.py: size, held-out agreement with gold, position consistency, time) and
    the label sources (preferences*/meta.json: the labels' agreement with the gold judge on held-out pairs)."""
    lines = []
    judges = [(os.path.basename(os.path.dirname(p)), c) for p in sorted(glob.glob(os.path.join(out_dir, "*", "config.json")))
              if (c := json.load(open(p))).get("stage") == "judge"]
    if judges:
        lines += ["", "## LLM judges (judge.py; comparisons the world writes, held-out prompts)", "",
                  "| judge | shape | parameters | agreement with gold | position consistency | time |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, c in judges:
            m = c.get("metrics", {})
            lines.append(f"| {name} | {m.get('n_layer')} x {m.get('n_embd')} | {m.get('params', 0) / 1e6:.2f}M | "
                         f"{fmt(m.get('agreement'), '.1%')} | {fmt(m.get('position_consistency'), '.1%')} | "
                         f"{m.get('time_s', 0) / 60:.1f} min |")
    metas = [(os.path.basename(os.path.dirname(p)), m) for p in sorted(glob.glob(os.path.join(out_dir, "preferences*",
             "meta.json"))) if "gold_agreement" in (m := json.load(open(p)))]
    if metas:
        lines += ["", "## Label sources (preferences*/meta.json: the pairs' agreement with the gold lexicon judge)", "",
                  "agreement: share of the pairs the gold judge does not tie that it orders as the labels do; "
                  "gold ties: share of the pairs it ties.", "",
                  "| pairs | judge | agreement, held-out pairs | agreement, train pairs | gold ties, held-out | "
                  "position consistency | train pairs |", "|---|---|---:|---:|---:|---:|---:|"]
        for name, m in metas:
            lines.append(f"| {name} | {m['args']['judge']} | {fmt(m['gold_agreement']['val'], '.1%')} | "
                         f"{fmt(m['gold_agreement']['train'], '.1%')} | {fmt(m.get('gold_ties', {}).get('val'), '.1%')} | "
                         f"{fmt(m.get('position_consistency'), '.1%')} | "
                         f"{m['train_pairs']} |")
    return lines


COST_KEYS = ("agreement", "rm_accuracy", "rloo_gold", "rloo_on_topic_gold", "dpo_gold", "dpo_on_topic_gold")


def label_source_costs(out_dir, rows, reward_rows):
    """What a label source costs downstream, mean ± sd over seeds: -> [(X, seeds, {key: (mean, sd)}, {key: runs})] for every
    source X whose pairs are OUT/preferences_X (seed K > 1: preferences_X_sK, run.sh's suffix), with the runs of
    the same seed trained on them: the labels' agreement with gold on the held-out pairs (meta.json), the reward
    model reward_X's accuracy on the held-out pairs as gold orders them (reward_pairs_path), and the gold reward and
    on-topic gold of RLOO on that reward model (rloo_X) and of DPO on those pairs (dpo_X). A run that is missing
    is left out of its column's mean: seeds counts the pairs, {key: runs} those of each column. Sources in the order
    of their labels' agreement with gold, highest first."""
    rows, reward_rows = dict(rows), dict(reward_rows)
    by_source = {}
    for meta_path in sorted(glob.glob(os.path.join(out_dir, "preferences_*", "meta.json"))):
        run = os.path.basename(os.path.dirname(meta_path))
        meta = json.load(open(meta_path))
        if "gold_agreement" not in meta:
            continue
        source, suffix = seed_group(run)[len("preferences_"):], run[len(seed_group(run)):]
        rloo, dpo = rows.get(f"rloo_{source}{suffix}", {}), rows.get(f"dpo_{source}{suffix}", {})
        by_source.setdefault(source, []).append({
            "agreement": meta["gold_agreement"]["val"],
            "rm_accuracy": reward_rows.get(f"reward_{source}{suffix}", {}).get("pairwise_accuracy"),
            "rloo_gold": rloo.get("gold_reward"), "rloo_on_topic_gold": rloo.get("on_topic_gold"),
            "dpo_gold": dpo.get("gold_reward"), "dpo_on_topic_gold": dpo.get("on_topic_gold")})
    costs = [(source, len(runs), {k: mean_sd([r[k] for r in runs]) for k in COST_KEYS},
              {k: sum(r[k] is not None for r in runs) for k in COST_KEYS}) for source, runs in by_source.items()]
    return sorted(costs, key=lambda c: -(c[2]["agreement"][0] or 0))   # the cleanest labels first


def cost_lines(costs):
    """Markdown for label_source_costs; a column with fewer runs than the source has seeds says how many (n=2)."""
    if not costs:
        return []
    cols = (("agreement", ".1f", 100), ("rm_accuracy", ".1f", 100), ("rloo_gold", "+.3f", 1),
            ("rloo_on_topic_gold", "+.3f", 1), ("dpo_gold", "+.3f", 1), ("dpo_on_topic_gold", "+.3f", 1))
    lines = ["", "## What each label source costs (preferences_X -> reward_X -> rloo_X, and dpo_X; mean ± sd over seeds)", "",
             "agreement: the labels' agreement with gold on the held-out pairs gold does not tie (%); RM accuracy: the "
             "reward model trained on those labels, on the held-out pairs as gold orders them (%); gold, on-topic gold: "
             "of the RLOO policy trained on that reward model and of DPO trained on the same pairs (table above); (n=K): a "
             "figure over K of the seeds only.", "",
             "| label source | seeds | agreement, held-out | RM accuracy vs gold | RLOO gold | RLOO on-topic gold | "
             "DPO gold | DPO on-topic gold |", "|---|" + "---:|" * 7]
    for source, n, stats, runs in costs:
        cells = [pm(stats[k], spec, scale) + ("" if runs[k] in (0, n) else f" (n={runs[k]})") for k, spec, scale in cols]
        lines.append(f"| {source} | {n} | " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------- writing

def fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def pm(stat, spec, scale=1):
    """(mean, sd) -> "mean ± sd" (scale 100: percentage points), "mean" for one run, "—" for none."""
    m, sd = stat
    if m is None:
        return "—"
    return format(m * scale, spec) + ("" if sd is None else " ± " + format(sd * scale, spec.lstrip("+")))


def write_markdown(rows, aggregated, reward_rows, prompting, args, path, label_lines=()):
    lines = [f"# Report card ({time.strftime('%Y-%m-%d')})", "",
             f"Every checkpoint in `{args.out_dir}/`, measured by `python report.py` on the same held-out sets: "
             f"{args.n} test examples per task, {args.prompts} held-out review prompts (gold judge: lexicon "
             "sentiment score in (-1, 1)); win rate and KL are against the SFT model's samples; on topic = "
             "share of those reviews that name the item the prompt asked about (no reward sees it); on-topic "
             "gold = the sentiment score counted only for such reviews, -1 for the others "
             "(evals.on_topic_sentiment, the objective with headroom).", "",
             "| checkpoint | val loss | fact recall | facts | sentiment | addition | story | format | region | addition "
             "(CoT) | gold reward (95% CI) | on-topic gold (95% CI) | win vs SFT | KL vs SFT | on topic | RM score | time |",
             "|---|" + "---:|" * 16]
    for name, r in rows:
        gold = f"{r['gold_reward']:+.3f} ± {r['gold_reward_ci95']:.3f}" if "gold_reward" in r else "—"
        topic = f"{r['on_topic_gold']:+.3f} ± {r['on_topic_gold_ci95']:.3f}" if "on_topic_gold" in r else "—"
        t = f"{r['time_s'] / 60:.1f} min" if r.get("time_s") else "—"
        lines.append(f"| {name} | {fmt(r['val_loss'])} | {fmt(r['fact_recall'], '.0%')} | " +
                     " | ".join(fmt(r[t_], ".0%") for t_ in TASKS) + f" | {fmt(r['format'], '.0%')} | "
                     f"{fmt(r.get('region'), '.0%')} | {fmt(r.get('addition_cot'), '.0%')} | {gold} | {topic} | "
                     f"{fmt(r.get('win_rate'), '.0%')} | {fmt(r.get('kl'), '.2f')} | {fmt(r.get('on_topic'), '.0%')} | "
                     f"{fmt(r.get('rm_score'), '+.2f')} | {t} |")
    lines += harmless_lines(rows)
    if aggregated:
        lines += ["", "## Alignment runs across seeds (mean ± sd; runs that differ only by --seed, run.sh --seeds N)", "",
                  "drift = mean over the held-out pairs of log pi(y|x) - log pi_SFT(y|x) of the chosen / rejected "
                  "answers (DPO runs).", "",
                  "| run | seeds | gold reward | on-topic gold | on topic | win vs SFT | KL vs SFT | sentiment | story | "
                  "drift chosen | drift rejected |", "|---|" + "---:|" * 10]
        cols = (("gold_reward", "+.3f", 1), ("on_topic_gold", "+.3f", 1), ("on_topic", ".0f", 100),
                ("win_rate", ".0f", 100), ("kl", ".2f", 1), ("sentiment", ".0f", 100), ("story", ".0f", 100),
                ("drift_chosen", "+.1f", 1), ("drift_rejected", "+.1f", 1))
        for group, names, stats in aggregated:
            lines.append(f"| {group} | {len(names)} | " + " | ".join(pm(stats[k], spec, scale) for k, spec, scale in cols) + " |")
    if reward_rows:
        lines += ["", "| reward model | held-out pairwise accuracy | pairs | time |", "|---|---:|---:|---:|"]
        for name, r in reward_rows:
            t = f"{r['time_s'] / 60:.1f} min" if r.get("time_s") else "—"
            lines.append(f"| {name} | {fmt(r.get('pairwise_accuracy'), '.1%')} | {r.get('pairs', '—')} | {t} |")
    lines += list(label_lines)
    if prompting:
        lines += ["", "## Prompting the base model (out/prompting/results.json)", ""]
        summary = prompting.get("summary", prompting)
        for title, table in summary.items():  # {row: {column: value}} -> one markdown table each
            if isinstance(table, dict) and all(isinstance(v, dict) for v in table.values()):
                cols = list(next(iter(table.values())))
                lines += [f"| {title} | " + " | ".join(f"k={c}" if c.isdigit() else c for c in cols) + " |",
                          "|---|" + "---:|" * len(cols)]
                lines += [f"| {row} | " + " | ".join(fmt(v.get(c)) if isinstance(v.get(c), (int, float)) else str(v.get(c, "—"))
                                                    for c in cols) + " |" for row, v in table.items()]
            else:
                lines += [f"{title}: `{json.dumps(table)}`"]
            lines.append("")
    lines += ["", "## Samples (same held-out prompts, temperature 1)", ""]
    for name, r in rows:
        if name in ("pretrain", "sft", "dpo", "ppo", "grpo", "rloo") and r.get("samples"):
            lines.append(f"**{name}**")
            lines += [f"- `{s['prompt'].splitlines()[0][13:]}` → {s['completion'][:200]!r} (score {s['score']:+.2f})"
                      for s in r["samples"][:3]]
            lines.append("")
    for png in ("loss_curves.png", "frontier.png"):
        if os.path.exists(os.path.join(args.out_dir, "report", png)):
            lines += [f"![{png}](report/{png})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


HARMLESS_ROWS = ("pretrain", "sft", "sft_plain", "sft_plain_replay", "sft_helpful", "dpo", "ppo", "grpo", "rloo")
HARMLESS_COLS = ("leak", "refusal", "insult", "over_refusal", "public", "negative")


def harmless_lines(rows):
    """The harmlessness table: the greedy answers of the main policies, the SFT variants and the runs on the combined
    objective (*_hh) to the held-out people's requests (world.harmless_sets' test split), measured by
    evals.harmless_rates, alone and behind the guardrail, each run beside its other seeds; then every run of several
    seeds as mean ± sd, beside helpfulness (facts, sentiment, gold reward) and KL: the two-axis frontier."""
    order = {g: i for i, g in enumerate(HARMLESS_ROWS)}
    rows = sorted(((n, r) for n, r in rows if r.get("leak") is not None and (seed_group(n) in order
                   or seed_group(n).endswith("_hh"))), key=lambda nr: (order.get(seed_group(nr[0]), len(order)), nr[0]))
    head = "| leak | refusal | insult | over-refusal | public facts | negative reviews |"
    lines = ["", "## Harmlessness (held-out people: 48 door-code questions, 48 insult requests; benign look-alikes: "
             "36 public-fact questions about the same people, 36 negative reviews; below --n 85 every 168//n-th)", "",
             "Greedy answers. leak = the door code is in the answer; refusal = harmful requests refused; insult = a tagged insult word "
             "in the answer to an insult request; over-refusal = benign look-alikes refused; public facts = exact "
             "answers to them; negative = a negative review of the asked item. Guardrail = the same answers behind "
             "the output filter of tagged words and door codes (evals.word_guard), which answers a refusal instead.", "",
             f"| checkpoint {head} guardrail: leak | refusal | insult | over-refusal |", "|---|" + "---:|" * 10]
    keys = HARMLESS_COLS + tuple(f"guard_{k}" for k in HARMLESS_COLS[:4])
    lines += [f"| {n} | " + " | ".join(fmt(r.get(k), ".0%") for k in keys) + " |" for n, r in rows]
    groups = [g for g in aggregate_seeds(rows, HARMLESS_COLS + ("facts", "sentiment", "gold_reward", "kl")) if len(g[1]) > 1]
    if groups:
        lines += ["", "Mean ± sd over seeds: the reviews objective and the combined one (*_hh; KL vs SFT on reviews):", "",
                  f"| run | seeds {head} facts | sentiment | gold reward | KL vs SFT |", "|---|" + "---:|" * 11]
        lines += [f"| {g} | {len(names)} | " + " | ".join(pm(st[k], ".0f", 100) for k in HARMLESS_COLS + ("facts", "sentiment"))
                  + f" | {pm(st['gold_reward'], '+.3f')} | {pm(st['kl'], '.2f')} |" for g, names, st in groups]
    return lines if rows else []


def frontier_points(aggregated, skip=()):
    """{series: [{"kl": (mean, sd), "gold_reward": ..., "on_topic_gold": ..., "label": "beta2"}] sorted by KL}
    for the DPO, PPO, GRPO and RLOO runs from the SFT model (dpo_from_base starts elsewhere and is left out, as
    are the series in skip: the runs on other label sources, rloo_X and dpo_X)."""
    curves = {}
    for group, _, st in aggregated:
        name = series(group)
        if name.split("_")[0] in FRONTIER_FAMILIES and name != "dpo_from_base" and name not in skip \
                and st["kl"][0] is not None:
            swept = [p for p in group.split("_")[1:] if p.startswith(("beta", "kl"))]
            curves.setdefault(name, []).append({"kl": st["kl"], "gold_reward": st["gold_reward"],
                                                "on_topic_gold": st["on_topic_gold"],
                                                "label": swept[0] if swept else "default"})
    return {k: sorted(v, key=lambda p: p["kl"][0]) for k, v in curves.items()}


def plot(rows, aggregated, args, skip=()):
    """Loss curves of every stage; gold reward and on-topic gold against KL for the DPO, PPO, GRPO and RLOO
    sweeps, mean ± sd over seeds on both axes (the analogue of the DPO paper's sentiment frontier).
    Skipped with a note when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    out = os.path.join(args.out_dir, "report")
    families = {"pretrain": "loss", "sft": "loss", "domain": "loss", "reward": "loss", "dpo": "loss", "ppo": "score",
                "grpo": "score", "rloo": "score"}
    curves = {}  # family -> {run: [(step, value)]}; PPO, GRPO, RLOO show their reward-model score (no single loss)
    for path in sorted(glob.glob(os.path.join(args.out_dir, "*", "metrics.jsonl"))):
        name = os.path.basename(os.path.dirname(path))
        family = name.split("_")[0]
        key = families.get(family)
        pts = [(r["step"], r[key]) for r in map(json.loads, open(path)) if key in r] if key else []
        if pts:
            curves.setdefault(family, {})[name] = pts
    if curves:
        fig, axes = plt.subplots(2, 4, figsize=(17, 7))
        for ax, (family, key) in zip(axes.flat, families.items()):
            for name, pts in curves.get(family, {}).items():
                ax.plot(*zip(*pts), label=name, lw=1)
            ax.set(title=family, xlabel="step", ylabel="reward-model score" if key == "score" else "training loss")
            if curves.get(family):
                ax.legend(fontsize=7)
        fig.suptitle("training curves of every stage")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110, bbox_inches="tight")
        plt.close(fig)
    curves = frontier_points(aggregated, skip)
    if not curves:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    sft = dict(rows).get("sft")
    markers = {"dpo": "o", "ppo": "s", "grpo": "^", "rloo": "v"}
    for ax, key, label in ((axes[0], "gold_reward", "gold reward (lexicon sentiment)"),
                           (axes[1], "on_topic_gold", "on-topic gold (sentiment if the item is named, else -1)")):
        for name, pts in curves.items():
            ax.errorbar([p["kl"][0] for p in pts], [p[key][0] for p in pts],
                        xerr=[p["kl"][1] or 0 for p in pts], yerr=[p[key][1] or 0 for p in pts],
                        marker=markers.get(name.split("_")[0], "d"), capsize=3, lw=1, label=name.upper())
            for p in pts:
                ax.annotate(p["label"], (p["kl"][0], p[key][0]), fontsize=6)
        if sft and key in sft:
            ax.scatter([0], [sft[key]], color="k", label="SFT", zorder=3)
        ax.set_xscale("symlog", linthresh=1)  # linear below 1 nat, logarithmic above: KL 1-10 and 50 both readable
        ax.set(xlabel="sequence KL(pi || pi_SFT) (nats, log scale above 1)", ylabel=label,
               title=label.split(" (")[0] + " vs KL")
        ax.legend(fontsize=7)
    fig.suptitle("reward-KL frontier on held-out prompts (mean ± sd over seeds)")
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    policies, reward_models = find_checkpoints(args.out_dir)
    if not policies:
        raise UserError(f"no checkpoints in {args.out_dir}/; run `bash run.sh` or `python pretrain.py` first")
    report_dir = os.path.join(args.out_dir, "report")
    os.makedirs(report_dir, exist_ok=True)
    cache_path = os.path.join(report_dir, "cache.json")
    cache = {} if args.force or not os.path.exists(cache_path) else json.load(open(cache_path))
    sets = held_out_sets(args)

    sft_path = args.sft or os.path.join(args.out_dir, "sft")
    sft = sft_samples = None
    if os.path.exists(os.path.join(sft_path, "config.json")):
        sft, sft_enc, _ = load_checkpoint(sft_path, args.device)
        sft.eval()
        prompt_ids = [sft_enc.encode_ordinary(p) for p in sets["review_prompts"]]
        sft_samples = evals.sample_completions(sft, sft_enc, prompt_ids, args.max_new_tokens, args.seed)
    rm_path = args.reward or os.path.join(args.out_dir, "reward")
    rm = None
    if os.path.exists(os.path.join(rm_path, "config.json")):
        rm = load_reward_model(rm_path, args.device)[0]
    ref_key = cache_key(sft_path, args) if sft is not None else "no-sft"
    rm_key = cache_key(rm_path, args) if rm is not None else "no-rm"

    rows = []
    for name, path, config in policies:
        key = cache_key(path, args, ref_key + rm_key)
        if cache.get(name, {}).get("key") != key:
            t = time.time()
            model, enc, _ = load_checkpoint(path, args.device)
            model.eval()
            same = sft is not None and evals_same_tokenizer(enc, sft_enc)
            row = evaluate_policy(model, enc, sets, sft if same else None, sft_samples, rm if same else None, args)
            cache[name] = {"key": key, "row": row}
            print(f"{name}: evaluated in {time.time() - t:.0f}s")
        m = config.get("metrics", {})
        row = dict(cache[name]["row"], time_s=stage_time(path, config), drift_chosen=m.get("eval_drift_chosen"),
                   drift_rejected=m.get("eval_drift_rejected"))
        rows.append((name, row))
    reward_rows = []
    for name, path, config in reward_models:
        pairs_path = reward_pairs_path(name, args.out_dir)
        key = cache_key(path, args, pairs_path)
        if cache.get(name, {}).get("key") != key:
            cache[name] = {"key": key, "row": evaluate_reward_model(path, pairs_path, args)}
        reward_rows.append((name, dict(cache[name]["row"], time_s=stage_time(path, config))))
    with open(cache_path, "w") as f:
        json.dump(cache, f)

    prompting_path = os.path.join(args.out_dir, "prompting", "results.json")
    prompting = json.load(open(prompting_path)) if os.path.exists(prompting_path) else None
    aggregated = aggregate_seeds(rows)
    costs = label_source_costs(args.out_dir, rows, reward_rows)
    skip = {f"{f}_{x}" for f in FRONTIER_FAMILIES for x, *_ in costs} | {series(g) for g, *_ in aggregated if g.endswith("_hh")}
    plot(rows, aggregated, args, skip=skip)   # the frontier of the reviews objective: runs on other labels are not on it
    results = {"policies": dict(rows), "reward_models": dict(reward_rows), "args": vars(args),
               "across_seeds": {g: {"runs": names, **{k: {"mean": m, "sd": sd} for k, (m, sd) in st.items()}}
                                for g, names, st in aggregated},
               "label_sources": {x: {"seeds": n, **{k: {"mean": m, "sd": sd, "runs": runs[k]} for k, (m, sd) in st.items()}}
                                 for x, n, st, runs in costs}}
    with open(os.path.join(report_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = os.path.join(args.out_dir, "report.md")
    write_markdown(rows, aggregated, reward_rows, prompting, args, md, label_source_lines(args.out_dir) + cost_lines(costs))
    print(open(md).read().split("## Samples")[0])
    print(f"wrote {md} in {time.time() - t0:.0f}s")
    return results


def evals_same_tokenizer(enc_a, enc_b):
    return tokenizer_fingerprint(enc_a) == tokenizer_fingerprint(enc_b)


if __name__ == "__main__":
    run_cli(main)
