"""The headline of a comparison: which run learned most, which forgot least, which sit on the Pareto
front, what to pick for a budget, and whether the differences stand out from the seed-to-seed noise.

Text is Markdown (`**name**`); the HTML report escapes it and turns the bold into `<b>`.
"""

from __future__ import annotations

import math

from tuneforge.formatting import decimals_for, fixed, percent, si_count, significant

COST_WORDS = {"params": "trainable parameters", "time": "training time", "memory": "peak memory"}
COST_FIELDS = {"params": "trainable_params", "time": "train_seconds", "memory": "peak_memory_mb"}


def cost_text(value: float | None, cost: str) -> str:
    if cost == "params":
        return si_count(value)
    return significant(value) + (" s" if cost == "time" else " MiB")


def names(rows: list[dict]) -> str:
    """`**a**, **b** and **c**`."""
    bold = [f"**{row['run']}**" for row in rows]
    return bold[0] if len(bold) == 1 else ", ".join(bold[:-1]) + " and " + bold[-1]


def budget_guide(rows: list[dict], cost: str) -> list[dict]:
    """The trained runs on the Pareto front, cheapest first: each is the best trade-off at its cost."""
    field = COST_FIELDS[cost]
    front = [row for row in rows if row.get("pareto") and row["steps"] and row[field] is not None]
    keys = ("run", "task_gain", "task_change", "task_change_pct", "forgetting_pct")
    return [{"cost": row[field], **{key: row[key] for key in keys}}
            for row in sorted(front, key=lambda row: row[field])]


def lead(trained: list[dict], key: str, sign: float) -> tuple[dict, dict, float, float | None] | None:
    """The best and runner-up of `key` (sign +1: higher is better, -1: lower), the lead, and the
    spread of that lead over seeds (None with one seed)."""
    ranked = sorted((r for r in trained if r[key] is not None), key=lambda r: -sign * r[key])
    if len(ranked) < 2:
        return None
    first, second = ranked[:2]
    spreads = [first["spread"].get(key), second["spread"].get(key)]
    spread = None if None in spreads else math.sqrt(sum(s * s for s in spreads))
    return first, second, sign * (first[key] - second[key]), spread


def verdict(lead_value: float, spread: float) -> str:
    return ("more than twice the seed-to-seed spread, so it is a real difference" if lead_value > 2 * spread
            else "within twice the seed-to-seed spread, so treat the two as tied")


def noise_sentence(trained: list[dict], decimals: int) -> str:
    """Whether the leads in task gain and in forgetting are larger than the spread across seeds."""
    gain, forgetting = lead(trained, "task_gain", 1.0), lead(trained, "forgetting_pct", -1.0)
    if gain is None:
        return ""
    first, second, ahead, spread = gain
    if spread is None:
        return ("Each row is one seed, so how noisy these numbers are is unknown: rerun with "
                "`--seeds 0,1,2` before trusting small differences.")
    text = (f"Noise: **{first['run']}** leads **{second['run']}** in task gain by "
            f"{fixed(ahead, decimals)} ± {fixed(spread, decimals)}, {verdict(ahead, spread)}.")
    if forgetting is not None and forgetting[3] is not None:
        first, second, ahead, spread = forgetting
        text += (f" In forgetting, **{first['run']}** is ahead of **{second['run']}** by "
                 f"{fixed(ahead, 1)} ± {fixed(spread, 1)} percentage points, {verdict(ahead, spread)}.")
    return text


def bargain_sentence(trained: list[dict], learned: dict | None, guide: list[dict], cost: str) -> str:
    """When the cheapest run on the front learns as much as the leader within the noise, say so."""
    if learned is None or not guide or guide[0]["run"] == learned["run"]:
        return ""
    cheapest = next(row for row in trained if row["run"] == guide[0]["run"])
    spreads = [learned["spread"].get("task_gain"), cheapest["spread"].get("task_gain")]
    field = COST_FIELDS[cost]
    if None in spreads or not cheapest[field]:
        return ""
    if learned["task_gain"] - cheapest["task_gain"] > 2 * math.sqrt(sum(s * s for s in spreads)):
        return ""
    ratio = learned[field] / cheapest[field]
    return (f"So **{cheapest['run']}** learns as much as **{learned['run']}** within the noise and costs "
            f"{significant(ratio, 2)}× less ({COST_WORDS[cost]}: {cost_text(cheapest[field], cost)} vs "
            f"{cost_text(learned[field], cost)}).")


def summarize(rows: list[dict], cost: str) -> dict:
    """The summary paragraph (Markdown) and its parts, for the report and comparison.json."""
    trained = [row for row in rows if row["steps"]]
    metric = rows[0]["task_metric"]
    decimals = decimals_for([r["task"] for r in rows] + [r["task_before"] for r in rows], 4)
    seeds = max((len(row["seeds"]) for row in rows), default=0)
    steps = sorted({row["steps"] for row in trained})
    scope = (f"Over {seeds} seeds per run" if seeds > 1 else "With one seed per run") + (
        f", {steps[0]:g} steps each" if len(steps) == 1 else "")
    parts, learned, forgot = [], None, None
    if trained and all(r["task_gain"] is not None for r in trained):
        learned = max(trained, key=lambda r: r["task_gain"])
        parts.append(f"**{learned['run']}** learned most (task {metric} "
                     f"{fixed(learned['task_before'], decimals)} → {fixed(learned['task'], decimals)}, "
                     f"{percent(learned['task_change_pct'])})")
    if trained and all(r["forgetting_pct"] is not None for r in trained):
        forgot = min(trained, key=lambda r: r["forgetting_pct"])
        who = "also" if learned is forgot else f"**{forgot['run']}**"
        parts.append(f"{who} forgot least (retain perplexity {percent(forgot['forgetting_pct'])})")
    text = [f"{scope}: " + " and ".join(parts) + "." if parts else f"{scope}."]
    guide = budget_guide(rows, cost)
    axes = "task gain, forgetting and " if trained and trained[0]["forgetting_pct"] is not None \
        else "task gain and "
    if guide:
        members = [{"run": f"{g['run']} ({cost_text(g['cost'], cost)})"} for g in guide]
        text.append(f"On the Pareto front of {axes}{COST_WORDS[cost]}: {names(members)}; for each, no other "
                    "run learns more, forgets less and costs less at once, so pick the cheapest one on the "
                    "front that learns enough for you.")
    dominated = [row for row in trained if not row.get("pareto")]
    if dominated:
        text.append(f"Dominated (another run is at least as good on every axis): {names(dominated)}.")
    baseline = [row for row in rows if not row["steps"]]
    if baseline:
        text.append(f"{names(baseline)} is the untrained baseline: it costs and changes nothing.")
    noise = noise_sentence(trained, decimals)
    if noise:
        text.append(noise)
    bargain = bargain_sentence(trained, learned, guide, cost)
    if bargain:
        text.append(bargain)
    return {"text": " ".join(text), "learned_most": learned and learned["run"],
            "forgot_least": forgot and forgot["run"], "front": [r["run"] for r in rows if r.get("pareto")],
            "budget": guide, "seeds": seeds}
