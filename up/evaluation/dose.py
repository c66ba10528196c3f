"""Dose-response: each weighted variant over its weight, and the weight chosen by a rule
declared before any test metric is read.

Runs are grouped by their settings (not their names): ``up`` by (reference, lambda_se)
over ``lambda_disp``, ``kd`` over ``lambda_kd``; a group with two or more positive
weights is a dose-response. Its selected weight has the lowest mean calibration-slice
NLL (train.json ``calib.nll``) over the seeds every weight ran: never val or test, so the
selection is fixed before the confirmatory comparison (seeds added at the selected weight
later do not move it). The selected run of a group is the one at that weight with the
most seeds; the other dose points and the ablations around it (``lambda_se`` 0 or
``lambda_disp`` 0 at its other weight) are exploratory: outside the Holm family.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from up.evaluation import frontier

WEIGHTS = {"up": "lambda_disp", "kd": "lambda_kd"}
# the figures shown against the weight: eval.json keys, then the matched diversity
FIGURES = [("ece", "ECE ↓"), ("nll", "NLL ↓"), ("fid", "FID ↓")]
MATCHED = ("class_accuracy", "diversity")  # within-class diversity at matched class accuracy


def group_of(settings: dict) -> str | None:
    """The dose group of a run's settings: ``up · teacher · lambda_se 0.1``, ``kd``;
    None for a loss without a weight or a weight <= 0 (an ablation, not a dose)."""
    loss = settings.get("loss")
    if loss not in WEIGHTS or not (settings.get(WEIGHTS[loss]) or 0) > 0:
        return None
    if loss == "kd":
        return "kd"
    return f"up · {settings.get('reference')} · lambda_se {settings.get('lambda_se'):g}"


def groups(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """The dose-response groups (two or more weights): per group its loss, reference,
    weight key and, per weight (ascending), the variants run at it."""
    out: dict[str, dict] = {}
    for variant, by_seed in runs.items():
        settings = next(iter(by_seed.values()))["settings"]
        label = group_of(settings)
        if label is None:
            continue
        key = WEIGHTS[settings["loss"]]
        entry = out.setdefault(label, {"loss": settings["loss"], "reference": settings.get("reference"),
                                       "lambda_se": settings.get("lambda_se"), "weight": key,
                                       "variants": {}})
        entry["variants"].setdefault(float(settings[key]), []).append(variant)
    return {label: {**g, "variants": dict(sorted(g["variants"].items()))}
            for label, g in out.items() if len(g["variants"]) > 1}


def _by_seed(runs: dict[str, dict[int, dict]], variants: Sequence[str]) -> dict[int, dict]:
    """The runs of several variants at one weight, by seed (equal settings: one run per seed)."""
    return {s: r for v in variants for s, r in runs[v].items()}


def _calib_nll(run: dict) -> float | None:
    return ((run.get("train") or {}).get("calib") or {}).get("nll")


def select(runs: dict[str, dict[int, dict]], group: dict) -> dict:
    """The declared rule: the weight with the lowest mean calibration NLL over the seeds
    every weight ran (all seeds when none is common). Returns the weights tried, per
    weight the NLL per seed and its mean, the seeds used, the selected weight and run."""
    per_weight = {w: _by_seed(runs, vs) for w, vs in group["variants"].items()}
    common = sorted(set.intersection(*(set(r) for r in per_weight.values())))
    table = {}
    for w, by_seed in per_weight.items():
        seeds = common or sorted(by_seed)
        values = [_calib_nll(by_seed[s]) for s in seeds]
        table[w] = {"seeds": seeds, "values": values,
                    "mean": None if None in values else statistics.fmean(values)}
    scored = {w: e["mean"] for w, e in table.items() if e["mean"] is not None}
    chosen = min(scored, key=scored.get) if scored else None
    run = None if chosen is None else max(group["variants"][chosen], key=lambda v: len(runs[v]))
    return {"rule": "lowest mean calibration-slice NLL (train.json calib.nll) over the seeds "
                    "every weight ran; never val or test",
            "loss": group["loss"], "reference": group["reference"], "lambda_se": group["lambda_se"],
            "weight": group["weight"], "weights": list(table), "seeds": common,
            "calib_nll": {f"{w:g}": e for w, e in table.items()},
            "variants": {f"{w:g}": vs for w, vs in group["variants"].items()},
            "selected": chosen, "selected_run": run}


ABLATIONS = ("full", "dispersion only", "semantic only")


def ablations(runs: dict[str, dict[int, dict]], selection: dict[str, dict]
              ) -> dict[str, dict[str, str]]:
    """Per ``up`` group with a selected run: that run (``full``) and those of its ablations
    present: the same reference with ``lambda_se`` 0 at the selected ``lambda_disp``
    (``dispersion only``) or ``lambda_disp`` 0 at the selected ``lambda_se`` (``semantic
    only``). Which term earns the gain is read here."""
    def settings(variant: str) -> dict:
        return next(iter(runs[variant].values()))["settings"]

    out = {}
    for label, chosen in selection.items():
        if chosen["loss"] != "up" or chosen["selected_run"] is None:
            continue
        picked, found = settings(chosen["selected_run"]), {"full": chosen["selected_run"]}
        for v in runs:
            s = settings(v)
            if s.get("loss") != "up" or s.get("reference") != picked.get("reference"):
                continue
            if s.get("lambda_se") == 0 and s.get("lambda_disp") == picked["lambda_disp"]:
                found["dispersion only"] = v
            elif s.get("lambda_disp") == 0 and s.get("lambda_se") == picked["lambda_se"]:
                found["semantic only"] = v
        if len(found) > 1:
            out[label] = {role: found[role] for role in ABLATIONS if role in found}
    return out


def exploratory(runs: dict[str, dict[int, dict]], selection: dict[str, dict]) -> list[str]:
    """The variants outside the confirmatory family: every dose point but the selected
    run, and the ablations of a selected ``up`` run."""
    out = [v for chosen in selection.values() for variants in chosen["variants"].values()
           for v in variants if v != chosen["selected_run"]]
    out += [v for found in ablations(runs, selection).values()
            for role, v in found.items() if role != "full"]
    return list(dict.fromkeys(out))


def choose(runs: dict[str, dict[int, dict]]) -> tuple[dict[str, dict], dict[str, dict[int, dict]],
                                                      list[str]]:
    """The study's choice, from the runs that have an evaluation: each dose group's
    selection (``select``), those runs (variant -> seed -> run) and the exploratory
    variants; every other run is in the confirmatory family."""
    with_eval = {v: kept for v, by_seed in runs.items()
                 if (kept := {s: r for s, r in by_seed.items() if r.get("eval") is not None})}
    selection = {label: select(with_eval, g) for label, g in groups(with_eval).items()}
    return selection, with_eval, exploratory(with_eval, selection)


def matched_diversity(runs: dict[str, dict[int, dict]], variants: Sequence[str]) -> dict:
    """Within-class diversity at one class accuracy for every run of ``variants``: the
    midpoint of the range all their guidance curves reach (frontier's rules). Returns the
    level and per variant its value per seed."""
    quality, other = MATCHED
    curves = {v: {s: frontier.curve(frontier.axis_rows(r["sweep"])["guidance"], quality, other)
                  for s, r in runs[v].items() if r["sweep"] is not None} for v in variants}
    level = frontier.match_level([frontier.reached(c[0]) for by_seed in curves.values()
                                  for c in by_seed.values()])["level"]
    values = {v: {s: None if level is None else frontier.value_at(*c, level)
                  for s, c in by_seed.items()} for v, by_seed in curves.items()}
    return {"level": level, "values": values}


def _figures(by_seed: dict[int, dict], diversity: dict[int, float | None]) -> dict[str, dict]:
    out = {}
    for key, _ in FIGURES:
        values = {s: (r["eval"] or {}).get(key) for s, r in by_seed.items()}
        out[key] = {"values": values, "mean": _mean_of(values)}
    out["diversity"] = {"values": diversity, "mean": _mean_of(diversity)}
    calib = {s: _calib_nll(r) for s, r in by_seed.items()}
    out["calib_nll"] = {"values": calib, "mean": _mean_of(calib)}
    return out


def _mean_of(values: dict[int, float | None]) -> float | None:
    kept = [v for v in values.values() if v is not None]
    return statistics.fmean(kept) if kept and len(kept) == len(values) else None


def response(runs: dict[str, dict[int, dict]], selection: dict[str, dict],
             references: Sequence[str]) -> dict:
    """Per group, per weight: ECE, NLL, FID (eval.json) and within-class diversity at the
    group's matched class accuracy, per seed and mean; the same for the ``references``
    (ce, ce+ts, kd at its selected weight ...) present, read at the same level."""
    out = {}
    for label, chosen in selection.items():
        refs = [r for r in references if r in runs and r not in
                (v for vs in chosen["variants"].values() for v in vs)]
        members = [v for vs in chosen["variants"].values() for v in vs] + refs
        diversity = matched_diversity(runs, members)
        points = {}
        for w, variants in chosen["variants"].items():
            div = {s: v for name in variants for s, v in diversity["values"].get(name, {}).items()}
            points[w] = _figures(_by_seed(runs, variants), div)
        out[label] = {"level": diversity["level"], "weight": chosen["weight"],
                      "selected": chosen["selected"], "points": points,
                      "references": {r: _figures(runs[r], diversity["values"].get(r, {}))
                                     for r in refs}}
    return out


def _cell(entry: dict) -> str:
    return "n/a" if entry["mean"] is None else f"{entry['mean']:.4g}"


def markdown(selection: dict[str, dict], curves: dict) -> list[str]:
    """One table per dose group: per weight its calibration NLL (the selection rule) and
    the figures, the selected weight in bold, then the references' rows."""
    lines = ["", "## Dose-response", "",
             "Selected weight: the lowest mean calibration-slice NLL over the seeds every "
             "weight ran (declared before any test metric is read; never val or test). "
             "Cells: mean over seeds; diversity: within-class diversity at the class accuracy "
             "stated (the midpoint of the range every run of the table reaches)."]
    for label, chosen in selection.items():
        data = curves[label]
        level = "n/a" if data["level"] is None else f"{data['level']:.3g}"
        head = [chosen["weight"], "seeds", "calib NLL"] + [t for _, t in FIGURES] + [
            f"diversity @ class acc {level}"]
        lines += ["", f"### {label}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for w, point in data["points"].items():
            nll = chosen["calib_nll"][w]
            name = f"**{w}** (selected)" if chosen["selected"] is not None and \
                f"{chosen['selected']:g}" == w else w
            seeds = sorted(point["fid"]["values"])
            row = [name, ",".join(map(str, seeds)), "n/a" if nll["mean"] is None else f"{nll['mean']:.4g}"]
            row += [_cell(point[key]) for key, _ in FIGURES] + [_cell(point["diversity"])]
            lines.append("| " + " | ".join(row) + " |")
        for ref, point in data["references"].items():
            seeds = sorted(point["fid"]["values"])
            row = [f"`{ref}`", ",".join(map(str, seeds)), _cell(point["calib_nll"])]
            row += [_cell(point[key]) for key, _ in FIGURES] + [_cell(point["diversity"])]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def ablation_response(runs: dict[str, dict[int, dict]], selection: dict[str, dict]) -> dict:
    """Per ``up`` group with ablations: per role (``ABLATIONS``) its variant and figures
    (``_figures``: ECE, NLL, FID, calibration NLL, diversity at the class accuracy every
    run of the group's table reaches), per seed and mean, over the seeds every row ran
    (the selected run has more: the confirmatory seeds)."""
    out = {}
    for label, found in ablations(runs, selection).items():
        seeds = set.intersection(*(set(runs[v]) for v in found.values()))
        common = {v: {s: r for s, r in runs[v].items() if s in seeds} for v in found.values()}
        diversity = matched_diversity(common, list(found.values()))
        out[label] = {"level": diversity["level"], "seeds": sorted(seeds), "rows": {
            role: {"variant": v, **_figures(common[v], diversity["values"].get(v, {}))}
            for role, v in found.items()}}
    return out


def ablation_markdown(response: dict) -> list[str]:
    """One table per group: the selected run and each ablation, the same columns as the
    dose tables."""
    if not response:
        return []
    lines = ["", "## Ablations at the selected weight", "",
             "Each reference's selected run beside its ablations: dispersion only "
             "(`lambda_se` 0) and semantic only (`lambda_disp` 0), the other weight as "
             "selected. Exploratory (outside the Holm family). Cells: mean over the seeds "
             "every row of the table ran; diversity at the class accuracy stated (the "
             "midpoint of the range every run of the table reaches)."]
    for label, data in response.items():
        level = "n/a" if data["level"] is None else f"{data['level']:.3g}"
        head = ["terms", "variant", "seeds", "calib NLL"] + [t for _, t in FIGURES] + [
            f"diversity @ class acc {level}"]
        lines += ["", f"### {label}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for role, point in data["rows"].items():
            row = [role, f"`{point['variant']}`", ",".join(map(str, sorted(point["fid"]["values"]))),
                   _cell(point["calib_nll"])]
            row += [_cell(point[key]) for key, _ in FIGURES] + [_cell(point["diversity"])]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def figure(curves: dict):
    """One row per dose group, one panel per figure against the weight (log x): per-seed
    points, the mean line, the selected weight (dotted), the references as horizontal
    lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*FIGURES, ("diversity", "within-class diversity @ matched class acc")]
    fig, axes = plt.subplots(len(curves), len(keys), figsize=(4 * len(keys), 3.2 * len(curves)),
                             squeeze=False)
    for row, (label, data) in zip(axes, curves.items(), strict=True):
        weights = [float(w) for w in data["points"]]
        for ax, (key, title) in zip(row, keys, strict=True):
            for w, point in zip(weights, data["points"].values(), strict=True):
                seeds = [v for v in point[key]["values"].values() if v is not None]
                ax.scatter([w] * len(seeds), seeds, s=12, color="C0", alpha=0.5)
            means = [p[key]["mean"] for p in data["points"].values()]
            if all(m is None for m in means):  # e.g. a weight that breaks the model
                ax.text(0.5, 0.5, "no level every weight reaches", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="0.4")
                ax.set_title(title, fontsize=9)
                ax.set_axis_off()
                continue
            ax.plot([w for w, m in zip(weights, means, strict=True) if m is not None],
                    [m for m in means if m is not None], color="C0", marker="o", label=label)
            for i, (ref, point) in enumerate(data["references"].items()):
                if point[key]["mean"] is not None:
                    ax.axhline(point[key]["mean"], color=f"C{i + 1}", ls="--", lw=1, label=ref)
            ax.set_xscale("log")
            ax.set_xticks(weights, [f"{w:g}" for w in weights])
            ax.minorticks_off()
            if data["selected"] is not None:
                ax.axvline(data["selected"], color="0.5", ls=":", lw=1)
            ax.set_xlabel(f"{data['weight']} (dotted: selected)")
            ax.set_title(f"{label}: {title}" if key == "ece" else title, fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
