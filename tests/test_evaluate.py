"""The evaluation job's parts: held-out cases, metrics, rows, the Ray fan-out (the demo test runs the whole job)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astra.config import ConfigError
from astra.evaluate.cases import make_case, world_seed
from astra.evaluate.config import load_eval_config
from astra.evaluate.metrics import nearest, psnr, ssim
from astra.evaluate.probe import ProbeScore, probe, probe_score
from astra.evaluate.rollouts import Evaluator, Job


def test_cases_are_deterministic_re_renderable_and_distinct():
    a = make_case("camera", 3, 11, latents=4, distractors=2, size=(64, 64), fps=16.0)
    b = make_case("camera", 3, 11, latents=4, distractors=2, size=(64, 64), fps=16.0)
    assert a.case_id == b.case_id and all(
        np.array_equal(x, y) for x, y in zip(a.truths, b.truths, strict=True)
    )
    assert a.rows.shape == (5, 12) and len(a.truths) == 3 and a.truths[0].shape == (17, 64, 64, 3)
    assert all(np.array_equal(t[0], a.truths[0][0]) for t in a.truths)  # one start frame
    assert not np.array_equal(a.truths[0][-1], a.truths[1][-1])  # different actions, different futures
    np.testing.assert_array_equal(a.rows[0], np.array([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]))  # at rest
    assert world_seed(11, "camera", 3) != world_seed(12, "camera", 3) != world_seed(11, "driving", 3)


def test_cases_can_start_from_a_shared_ground_truth_history():
    """history H: every truth shows the same first 1 + 4 (H - 1) frames and rows, then they branch;
    H = 1 is the plain case, bit for bit."""
    a = make_case("driving", 1, 11, latents=5, distractors=2, size=(64, 64), fps=16.0, history=3)
    assert a.history == 3 and a.history_frames == 9 and a.truths[0].shape == (21, 64, 64, 3)
    for truth, rows in zip(a.truths[1:], a.distractor_rows, strict=True):
        assert np.array_equal(truth[:9], a.truths[0][:9]) and np.array_equal(rows[:3], a.rows[:3])
        assert not np.array_equal(truth[9:], a.truths[0][9:]) and not np.array_equal(rows[3:], a.rows[3:])
    plain = make_case("driving", 1, 11, latents=5, distractors=2, size=(64, 64), fps=16.0)
    again = make_case("driving", 1, 11, latents=5, distractors=2, size=(64, 64), fps=16.0, history=1)
    assert plain.history == 1 and all(
        np.array_equal(x, y) for x, y in zip(plain.truths, again.truths, strict=True)
    )
    with pytest.raises(ValueError, match="history"):
        make_case("driving", 1, 11, latents=2, distractors=1, size=(64, 64), fps=16.0, history=3)


def test_metrics():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    noisy = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    assert psnr(x, x) > 90 and ssim(x, x) == pytest.approx(1.0)
    slight = np.clip(x.astype(int) + rng.integers(-5, 5, x.shape), 0, 255).astype(np.uint8)
    assert 10 < psnr(x, noisy) < psnr(x, slight) and ssim(x, noisy) < ssim(x, slight) < 1
    # flat frames: SSIM reduces to its luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = (
        np.full((1, 16, 16, 3), 100, np.uint8),
        np.full((1, 16, 16, 3), 150, np.uint8),
        (0.01 * 255) ** 2,
    )
    assert ssim(a, b) == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1), rel=1e-9)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 50**2))
    best, dists = nearest(noisy, [x[::-1].copy(), x, np.zeros_like(x)])
    assert best == 1 and dists[1] == min(dists)


def test_the_report_compares_each_row_with_the_no_action_baseline_case_by_case(tmp_path):
    """The paired section: wins / losses on the same cases and the exact one-sided McNemar p (checked
    against the binomial tail written out), for every row but the baseline, in report.md."""
    from math import comb

    from astra.evaluate.report import paired, write_report
    from astra.evaluate.rollouts import CaseResult

    def results(row, right):  # 20 camera cases, `right`: the indices rolled out right
        return [
            CaseResult(row, "camera", f"camera-{i:04d}", "accuracy", correct=i in right) for i in range(20)
        ]

    full, base = set(range(9)) | {15}, {0, 1, 15, 16, 17}  # full wins 7 (2..8), loses 2 (16, 17)
    rs = results("full", full) + results("w/o AFG", base) + results("no actions", base)
    got = paired(rs, "full", "no actions")["camera"]
    tail = sum(comb(9, k) for k in range(7, 10)) / 2**9  # P(X >= 7), X ~ Binomial(9, 1/2)
    assert (got.only_row, got.only_baseline, got.cases) == (7, 2, 20) and got.p_value == pytest.approx(tail)
    same = paired(rs, "w/o AFG", "no actions")["camera"]
    assert (same.only_row, same.only_baseline, same.p_value) == (0, 0, 1.0)
    config = load_eval_config(None, ["preset=tiny", "modalities=[camera]"])
    write_report(config, rs, tmp_path, {"model": "m"})
    report = (tmp_path / "report.md").read_text()
    section = report.split("## Against the no-action baseline, case by case ('no actions')", 1)[1]
    assert f"| full | 7 / 2, p = {tail:.2g} |" in section and "| w/o AFG | 0 / 0, p = 1 |" in section
    assert "| no actions |" not in section.split("\n## ", 1)[0]
    assert "| Euler 50 steps | - |" in section  # a row without cases: no tie invented
    assert "camera" not in paired(rs, "Euler 50 steps", "no actions")
    assert "not checked against a training store: set train_store" in report  # no store: no claim
    assert "## Ablations against the full model" not in report  # every row rolls out the same weights


def test_the_report_compares_each_ablation_with_the_full_model_two_sided(tmp_path):
    """Rows of other weights (ablations) against the first row, case by case: wins / losses and the
    two-sided exact McNemar p per modality and pooled over the modalities' cases."""
    import json
    from math import comb

    from astra.evaluate.report import write_report
    from astra.evaluate.rollouts import CaseResult

    def results(row, modality, right):
        return [
            CaseResult(row, modality, f"{modality}-{i:04d}", "accuracy", correct=i in right)
            for i in range(20)
        ]

    full, abl = set(range(9)) | {15}, {0, 1, 15, 16, 17}  # camera: the ablation wins 2, loses 7
    rs = results("full", "camera", full) + results("abl", "camera", abl)
    rs += results("full", "driving", {3}) + results("abl", "driving", {3, 4})  # driving: wins 1, loses 0
    rows = json.dumps([{"name": "full", "model": "model"}, {"name": "abl", "model": "other"}])
    config = load_eval_config(
        None,
        [
            "preset=tiny",
            "modalities=[camera,driving]",
            f"rows={rows}",
            "models.model.uri=m",
            "models.other.uri=o",
        ],
    )
    write_report(config, rs, tmp_path, {"model": "m", "other": "o"})
    section = (tmp_path / "report.md").read_text().split("## Ablations against the full model", 1)[1]
    two_sided = 2 * sum(comb(9, k) for k in range(0, 3)) / 2**9  # P(|X - 4.5| >= 2.5), X ~ Bin(9, 1/2)
    pooled = 2 * sum(comb(10, k) for k in range(0, 4)) / 2**10  # 3 wins, 7 losses of 10
    assert f"| abl | 2 / 7, p = {two_sided:.2g} | 1 / 0, p = 1 | 3 / 7, p = {pooled:.2g} |" in section
    assert "| full |" not in section.split("\n## ", 1)[0]


def test_rows_share_a_case_and_the_no_action_row_ignores_actions(acting_checkpoint):
    config = load_eval_config(
        None, ["preset=tiny", f"models.model.uri={acting_checkpoint}", "drift_chunks=2"]
    )
    evaluator = Evaluator(config)
    results = evaluator.run(Job("camera", 0, "drift"), preview=True)
    assert [r.row for r in results] == ["full", "w/o AFG", "no actions", "Euler 50 steps", "UniPC 4 steps"]
    assert all(len(r.chunk_psnr) == 2 and len(r.vae_psnr) == 2 for r in results)
    assert results[0].preview is not None and results[0].preview.shape == (2, 17, 64, 64, 3)
    assert results[0].chunk_psnr != results[2].chunk_psnr  # actions reach the full model's rollout

    # the no-action baseline sees the null action only: other commanded actions, the same rollout
    case = make_case("camera", 0, config.seed, 4, 1, (64, 64), 16.0)
    other = type(case)(case.case_id, case.modality, case.world_seed, case.prompt, case.rows * 0 + case.rows[::-1],
                       case.truths)  # fmt: skip
    rows = {r.name: r for r in config.rows}

    def frames(row: str, c) -> np.ndarray:
        generated, seconds = evaluator.rollout(rows[row], c, 2)
        assert seconds > 0  # sampling time per chunk, for the report's s/chunk column
        return generated

    assert np.array_equal(frames("no actions", case), frames("no actions", other))
    assert not np.array_equal(frames("full", case), frames("full", other))
    acc = evaluator.run(Job("robot", 1, "accuracy"))
    assert all(r.correct in (True, False) and len(r.distances) == 2 for r in acc)
    probes = {r.row: (r.probe_direction, r.probe_response) for r in acc}
    assert probes["full"][1] > 0 and probes["full"][1] > probes["w/o AFG"][1]  # AFG 3 amplifies the answer
    assert probes["no actions"] == (0.5, 0.0)  # the null action: equal estimates, chance exactly


def test_rollouts_from_a_shared_history_continue_it(acting_checkpoint):
    """history_latents 2: every row starts from the same 2 encoded latents (the same first 5 decoded
    frames), generates chunks after them and is scored on those; drift chunks too."""
    config = load_eval_config(
        None, ["preset=tiny", f"models.model.uri={acting_checkpoint}", "history_latents=2", "drift_chunks=2"]
    )
    evaluator = Evaluator(config)
    acc = evaluator.run(Job("camera", 0, "accuracy"), preview=True)
    t = evaluator.target_frames(config.rows[0])
    shown = acc[0].preview[0]
    assert shown.shape[0] == 5 + 4 * t * config.chunks  # the 5 history frames + the generated chunks
    full, again = (evaluator.rollout(config.rows[0], make_case("camera", 0, config.seed, 1 + config.chunks * t,
                                                               config.distractors, (64, 64), 16.0, 2), config.chunks)[0]
                   for _ in range(2))  # fmt: skip
    assert np.array_equal(full, shown) and np.array_equal(full, again)
    no_act = acc[[r.row for r in acc].index("no actions")]
    assert no_act.probe_direction == 1 / (1 + config.distractors) and no_act.probe_response == 0.0
    assert all(len(r.distances) == 1 + config.distractors and r.correct in (True, False) for r in acc)
    assert acc[0].probe_response > 0
    drift = evaluator.run(Job("camera", 0, "drift"))
    assert all(len(r.chunk_psnr) == 2 for r in drift)


def test_the_action_probe_scores_direction_and_response():
    g = torch.Generator().manual_seed(0)
    truths = torch.randn(4, 16, 2, 8, 8, generator=g)
    common = torch.randn(1, 16, 2, 8, 8, generator=g)
    half = common + 0.5 * (truths - truths.mean(0))  # follows every sequence, half as far
    assert probe_score(half, truths) == ProbeScore(1.0, pytest.approx(0.5))
    swapped = half[[1, 0, 3, 2]]  # answers each sequence with another's future
    assert probe_score(swapped, truths).direction == 0.0
    assert probe_score(common.expand(4, -1, -1, -1, -1), truths) == ProbeScore(0.25, 0.0)  # ignores actions


def test_the_probe_reads_the_models_answer_to_the_actions(acting_checkpoint):
    """The probe's estimates are the sampler's first step: a fresh model (zero experts) answers no
    action (chance, response 0), the acting checkpoint answers them, and the noise seed matters."""
    from astra.config import preset
    from astra.model import AstraTransformer, build_wan
    from astra.model.io import load_astra
    from astra.rollout import RolloutSession

    cfg = preset("tiny")
    t, raw = cfg.model.framepack.target_frames, cfg.model.actions.modality("camera").raw_dim
    case = make_case("camera", 2, 11, latents=t, distractors=3, size=(64, 64), fps=16.0)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, cfg.model.backbone.in_channels, 1 + t, 8, 8, generator=g)
    session = RolloutSession.start(
        "c", "camera", latents[0, :, :1], torch.zeros(4, cfg.model.backbone.text_dim), raw, 0
    )
    sequences = torch.from_numpy(np.stack([r[1 : 1 + t] for r in case.sequences]))
    assert len(case.sequences) == 4 and not torch.equal(sequences[0], sequences[1])

    torch.manual_seed(0)
    fresh = AstraTransformer.from_wan(build_wan(cfg.model.backbone), cfg.model).eval()
    assert probe(fresh, cfg, session, sequences, latents[:, :, 1:], seed=3) == ProbeScore(0.25, 0.0)
    acting = load_astra(acting_checkpoint, dtype=torch.float32).eval()
    score = probe(acting, cfg, session, sequences, latents[:, :, 1:], seed=3)
    assert score.response > 0 and score != probe(acting, cfg, session, sequences, latents[:, :, 1:], seed=4)


@pytest.mark.ray
def test_rows_must_name_models_and_cases_must_be_held_out(tmp_path, ray_local):
    with pytest.raises(ConfigError, match=r"rows: model\(s\) \['other'\] are not in models"):
        load_eval_config(None, ["rows=[{name: x, model: other}]"])
    from astra.data.manifest import write_manifest
    from astra.data.synthetic import initial_state, make_world, random_actions, rollout, write_clip
    from astra.encode.config import load_encode_config
    from astra.encode.pipeline import run_encode
    from astra.evaluate.run import check_held_out

    seed = world_seed(5, "camera", 1)  # a training clip of the very world of case camera-1
    world = make_world("camera", seed, dt=1 / 16)
    clip = rollout(world, initial_state(world), random_actions(world, 9, 0), (64, 64))
    manifest = write_manifest([write_clip(clip, world, tmp_path / "clips", f"camera-00000-w{seed}", 16.0)],
                              tmp_path / "clips" / "manifest.jsonl")  # fmt: skip
    store = tmp_path / "store"
    run_encode(load_encode_config(None, ["preset=tiny", f"manifest={manifest}", f"store.uri={store}"]))
    config = load_eval_config(
        None, ["preset=tiny", "seed=5", f"train_store.uri={store}", "modalities=[camera]"]
    )
    with pytest.raises(
        ConfigError, match=r"seed: the cases \['camera-1'\] use world seeds the training store"
    ):
        check_held_out(config)
    check_held_out(load_eval_config(None, ["preset=tiny", "seed=6", f"train_store.uri={store}"]))


@pytest.mark.ray
def test_the_cases_go_out_in_batches_and_all_come_back_with_progress(ray_local, caplog):
    """run_evaluation on Ray: every (case, row) once, progress logged as batches finish."""
    import logging

    from astra.evaluate.run import run_evaluation

    config = load_eval_config(None, ["preset=tiny", "cases=3", "drift_cases=1", "drift_chunks=2", "tasks=2",
                                     "modalities=[camera, robot]"])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="astra.evaluate"):
        results, _ = run_evaluation(config)
    got = sorted((r.row, r.modality, r.case_id, r.kind) for r in results)
    assert len(got) == len(set(got)) == 8 * len(config.rows)  # (3 accuracy + 1 drift) x 2 modalities
    progress = [m for m in caplog.messages if "cases done" in m]
    assert len(progress) == 8 and progress[-1].startswith("8/8 cases done")  # 4 x 2 tasks: one a case
