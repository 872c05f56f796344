"""The evaluation report: tables (Markdown) — with each row's paired test against the no-action
baseline — plots (PNG, matplotlib's Agg backend) and results.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astra.config import derive
from astra.evaluate.cases import history_frames
from astra.evaluate.config import EvalConfig
from astra.evaluate.rollouts import CaseResult


@dataclass(frozen=True)
class Summary:
    accuracy: dict[tuple[str, str], tuple[float, int]]  # (row, modality) -> (accuracy, cases)
    probe: dict[tuple[str, str], tuple[float, float]]  # (row, modality) -> (direction, response)
    psnr: dict[tuple[str, str], list[float]]  # (row, modality) -> mean PSNR per chunk
    ssim: dict[tuple[str, str], list[float]]
    vae_psnr: dict[str, list[float]]  # modality -> the VAE's own PSNR per chunk
    seconds: dict[str, float]  # row -> mean sampling seconds per chunk


def summarise(results: list[CaseResult]) -> Summary:
    acc: dict[tuple[str, str], list[bool]] = {}
    probe: dict[tuple[str, str], list[tuple[float, float]]] = {}
    ps: dict[tuple[str, str], list[list[float]]] = {}
    ss: dict[tuple[str, str], list[list[float]]] = {}
    vae: dict[str, list[list[float]]] = {}
    secs: dict[str, list[float]] = {}
    for r in results:
        key = (r.row, r.modality)
        secs.setdefault(r.row, []).append(r.chunk_seconds)
        if r.kind == "accuracy":
            acc.setdefault(key, []).append(bool(r.correct))
            if r.probe_direction is not None:
                probe.setdefault(key, []).append((r.probe_direction, r.probe_response))
        else:
            ps.setdefault(key, []).append(r.chunk_psnr)
            ss.setdefault(key, []).append(r.chunk_ssim)
            vae.setdefault(r.modality, []).append(r.vae_psnr)
    return Summary(
        accuracy={k: (float(np.mean(v)), len(v)) for k, v in acc.items()},
        probe={k: tuple(float(x) for x in np.mean(v, axis=0)) for k, v in probe.items()},
        psnr={k: np.mean(v, axis=0).tolist() for k, v in ps.items()},
        ssim={k: np.mean(v, axis=0).tolist() for k, v in ss.items()},
        vae_psnr={k: np.mean(v, axis=0).tolist() for k, v in vae.items()},
        seconds={k: float(np.mean(v)) for k, v in secs.items()},
    )


@dataclass(frozen=True)
class Paired:
    """One row against a baseline row (the no-action one, or the full model) on the same cases of one
    modality."""

    only_row: int  # cases the row gets right and the baseline wrong
    only_baseline: int  # the reverse
    cases: int
    p_value: float  # exact McNemar test; one-sided ("greater"): P(only_row this large | no better)


def _mcnemar(wins: int, losses: int, alternative: str) -> float:
    """The exact McNemar p-value: a binomial test on the discordant cases (scipy's ``binomtest``)."""
    from scipy.stats import binomtest

    return (
        float(binomtest(wins, wins + losses, 0.5, alternative=alternative).pvalue) if wins + losses else 1.0
    )


def paired(
    results: list[CaseResult], row: str, baseline: str, alternative: str = "greater"
) -> dict[str, Paired]:
    """Per modality, ``row`` against ``baseline`` case by case (the accuracy cases both rolled out):
    the exact McNemar test, i.e. a binomial test on the discordant cases (scipy's ``binomtest``;
    ``alternative``: "greater" = the row is better, "two-sided" = no direction assumed)."""
    correct: dict[tuple[str, str, str], bool] = {
        (r.row, r.modality, r.case_id): bool(r.correct) for r in results if r.kind == "accuracy"
    }
    out: dict[str, Paired] = {}
    for m in sorted({mod for (_, mod, _) in correct}):
        cases = [c for (r, mod, c) in correct if r == row and mod == m and (baseline, m, c) in correct]
        if not cases:  # the row or the baseline has no cases here: shown as "-", not as a tie
            continue
        a = sum(correct[(row, m, c)] and not correct[(baseline, m, c)] for c in cases)
        b = sum(correct[(baseline, m, c)] and not correct[(row, m, c)] for c in cases)
        out[m] = Paired(a, b, len(cases), _mcnemar(a, b, alternative))
    return out


def _paired_table(
    title: str,
    text: str,
    results: list[CaseResult],
    rows: list[str],
    baseline: str,
    mods: list[str],
    pooled: bool,
) -> list[str]:
    """A report section: ``rows`` against ``baseline`` case by case, per modality (and pooled over the
    modalities' cases when ``pooled``: then two-sided, else one-sided "the row is better")."""
    alternative = "two-sided" if pooled else "greater"
    extra = " | all: wins / losses, p" if pooled else ""
    lines = ["", title, "", text, "", "| row | " + " | ".join(f"{m}: wins / losses, p" for m in mods) + extra + " |",
             "|---|" + "---|" * (len(mods) + pooled)]  # fmt: skip
    for row in rows:
        pairs = paired(results, row, baseline, alternative)
        cells = [f"{q.only_row} / {q.only_baseline}, p = {q.p_value:.2g}" if (q := pairs.get(m)) else "-"
                 for m in mods]  # fmt: skip
        if pooled:
            a, b = sum(q.only_row for q in pairs.values()), sum(q.only_baseline for q in pairs.values())
            cells.append(f"{a} / {b}, p = {_mcnemar(a, b, alternative):.2g}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def _paired_section(config: EvalConfig, results: list[CaseResult]) -> list[str]:
    """The report's lines comparing every row with the no-action row (AFG 0) case by case; none
    without such a row."""
    base = next((r for r in config.rows if r.action_guidance == 0), None)
    if base is None or not any(r.kind == "accuracy" for r in results):
        return []
    mods = list(config.modalities)
    text = (f"Each row against '{base.name}' on the same cases: cases right only with the row's actions / "
            f"right only without them, and the one-sided exact McNemar p-value (a binomial test on those "
            f"cases: how likely so many wins if the actions did not help). Judging {len(mods)} modalities "
            f"at once, compare p with 0.05 / {len(mods)} (Bonferroni). Rows of other weights (ablations) "
            f"face the same baseline: their gap includes their weights' difference.")  # fmt: skip
    rows = [r.name for r in config.rows if r.name != base.name]
    title = f"## Against the no-action baseline, case by case ('{base.name}')"
    return _paired_table(title, text, results, rows, base.name, mods, pooled=False)


def _ablation_section(config: EvalConfig, results: list[CaseResult]) -> list[str]:
    """The report's lines comparing each row of other weights (an ablation) with the first row (the
    full model) case by case, two-sided (an ablation may help or hurt), per modality and pooled; none
    without such rows."""
    full = config.rows[0]
    others = [r.name for r in config.rows if r.model != full.model]
    if not others or not any(r.kind == "accuracy" for r in results):
        return []
    text = (f"Each row of other weights against '{full.name}' on the same cases: cases right only with the "
            f"ablation / right only with '{full.name}', and the two-sided exact McNemar p-value (no direction "
            f"assumed); 'all' pools the modalities' cases. With {len(others)} ablations, compare the pooled p "
            f"with 0.05 / {len(others)} (Bonferroni).")  # fmt: skip
    title = f"## Ablations against the full model, case by case ('{full.name}')"
    return _paired_table(title, text, results, others, full.name, list(config.modalities), pooled=True)


def _plots(config: EvalConfig, s: Summary, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    rows, mods = [r.name for r in config.rows], list(config.modalities)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(mods), 3.2))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        vals = [s.accuracy.get((row, m), (np.nan, 0))[0] for m in mods]
        ax.bar(np.arange(len(mods)) + i * width, vals, width, label=row)
    ax.axhline(1 / (config.distractors + 1), color="k", ls="--", lw=1, label="chance")
    ax.set_xticks(np.arange(len(mods)) + width * (len(rows) - 1) / 2, mods)
    ax.set_ylim(0, 1)
    ax.set_ylabel("action-following accuracy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars: never over them
    fig.savefig(out / "accuracy.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    names.append("accuracy.png")
    if s.psnr:  # a colour per modality, a line style per row (the same in both panels), the legend beside
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        styles = ["-", "--", "-."]
        for c, m in enumerate(mods):
            colour = f"C{c}"
            shown = [r for r in rows if (r, m) in s.psnr][:3]  # the first rows rolled out for the drift
            for row, ls in zip(shown, styles, strict=False):
                x = np.arange(1, len(s.psnr[(row, m)]) + 1)
                axes[0].plot(x, s.psnr[(row, m)], color=colour, ls=ls, marker="o", ms=3, label=f"{m} {row}")
                axes[1].plot(x, s.ssim[(row, m)], color=colour, ls=ls, marker="o", ms=3)
            if m in s.vae_psnr:
                x = np.arange(1, len(s.vae_psnr[m]) + 1)
                axes[0].plot(x, s.vae_psnr[m], color=colour, ls=":", label=f"{m} VAE round trip")
        axes[0].set(xlabel="chunk", ylabel="PSNR (dB)")
        axes[1].set(xlabel="chunk", ylabel="SSIM")
        axes[1].legend(
            *axes[0].get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1)
        )
        fig.tight_layout()
        fig.savefig(out / "drift.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        names.append("drift.png")
    return names


def _sampler(config: EvalConfig, row) -> str:
    """The row's sampler, e.g. 'euler 10, AFG 3'."""
    sampler = derive(config.astra, {"sampler": row.sampler_overrides()}).sampler
    return f"{sampler.solver} {sampler.num_steps}, AFG {sampler.action_guidance:g}"


def _previews(results: list[CaseResult], out: Path) -> list[str]:
    from PIL import Image

    names = []
    for r in results:
        if r.preview is None:
            continue
        gen, truth = r.preview  # (F, H, W, 3) each; every 4th frame, generated over ground truth
        strip = np.concatenate([np.concatenate(list(x[::4]), axis=1) for x in (gen, truth)], axis=0)
        name = f"rollout-{r.modality}.png"
        Image.fromarray(strip).save(out / name)
        names.append(name)
    return names


def write_report(config: EvalConfig, results: list[CaseResult], out: Path, models: dict[str, str]) -> Summary:
    """report.md + plots + results.json into ``out``; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    s = summarise(results)
    plots = _plots(config, s, out)
    previews = _previews(results, out)
    mods = list(config.modalities)
    chance = 1 / (config.distractors + 1)
    h = config.history_latents
    start = (
        "the same start frame"
        if h == 1
        else f"the same ground-truth start ({history_frames(h)} frames, {h} latents, shared by every sequence)"
    )
    held_out = (  # run.check_held_out refused the run if train_store held one of the cases' worlds
        "none of their worlds in the training store"
        if config.train_store is not None
        else "not checked against a training store: set train_store"
    )
    lines = [
        "# Evaluation report",
        "",
        f"Held-out synthetic worlds (seed {config.seed}, {held_out}): {config.cases} cases per modality, "
        f"{config.chunks} chunk(s) each, {config.distractors} distractor action sequence(s) from {start} "
        f"(chance = {chance:.0%}). A rollout counts as following its actions when its frames after the start are "
        "nearer (pixel MSE) to the re-rendered ground truth of its commanded actions than to every distractor's.",
        "",
        "Models: " + ", ".join(f"`{k}` = {v}" for k, v in models.items()),
        "",
        "## Action-following accuracy",
        "",
        "| row | sampler | " + " | ".join(mods) + " | mean | s/chunk |",
        "|---|---|" + "---|" * (len(mods) + 2),
    ]
    for row in config.rows:
        vals = [s.accuracy.get((row.name, m)) for m in mods]
        cells = [f"{a:.1%} (n={n})" if a is not None else "-" for a, n in (v or (None, 0) for v in vals)]
        mean = np.mean([v[0] for v in vals if v is not None]) if any(vals) else float("nan")
        lines.append(f"| {row.name} | {_sampler(config, row)} | " + " | ".join(cells)
                     + f" | {mean:.1%} | {s.seconds.get(row.name, float('nan')):.3f} |")  # fmt: skip
    lines += _paired_section(config, results)
    lines += _ablation_section(config, results)
    if s.probe:
        lines += ["", "## Action probe: the first chunk's estimate from pure noise (sigma = 1)", "",
                  "Per case, the model's x0 estimate at the first sampling step for each of the case's action "
                  "sequences (one noise, the row's action guidance) against the sequences' VAE-encoded truths: "
                  f"*direction* = share of estimates whose deviation from the estimates' mean points most to their "
                  f"own truth's deviation (chance {chance:.0%}; a model that ignores actions scores exactly chance), "
                  "*response* = how far the actions move the estimate, as a fraction of how far they move the "
                  "truth (0 = not at all). See astra/evaluate/probe.py.", "",
                  "| row | " + " | ".join(f"{m} direction / response" for m in mods) + " |",
                  "|---|" + "---|" * len(mods)]  # fmt: skip
        for row in config.rows:
            vals = [s.probe.get((row.name, m)) for m in mods]
            lines.append(
                f"| {row.name} | "
                + " | ".join("-" if v is None else f"{v[0]:.1%} / {v[1]:.3f}" for v in vals)
                + " |"
            )
    if s.psnr:
        n = config.drift_chunks
        picks = sorted({1, max(1, n // 2), n})
        lines += ["", f"## Drift: PSNR / SSIM per chunk ({config.drift_cases} cases per modality)", "",
                  "| row | modality | " + " | ".join(f"chunk {k}" for k in picks) + " |",
                  "|---|---|" + "---|" * len(picks)]  # fmt: skip
        for row in config.rows:
            for m in mods:
                if (row.name, m) in s.psnr:
                    p, q = s.psnr[(row.name, m)], s.ssim[(row.name, m)]
                    cells = [f"{p[k - 1]:.2f} dB / {q[k - 1]:.3f}" for k in picks]
                    lines.append(f"| {row.name} | {m} | " + " | ".join(cells) + " |")
        for m in mods:
            if m in s.vae_psnr:
                v = s.vae_psnr[m]
                lines.append(
                    f"| (VAE ceiling) | {m} | " + " | ".join(f"{v[k - 1]:.2f} dB" for k in picks) + " |"
                )
    lines += ["", *[f"![{p}]({p})" for p in plots + previews], ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps([r.to_dict() for r in results]))
    return s
