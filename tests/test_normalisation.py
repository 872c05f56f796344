"""Action normalisation: the store's statistics inside the model, the null action kept distinct."""

from __future__ import annotations

import numpy as np
import torch

from astra.config import ActionConfig
from astra.data.actions import ActionStats, latent_actions, normalise, rest_action
from astra.model.actions import ActionEncoder
from astra.model.io import load_astra, save_astra


def _camera_stats(seed: int = 0) -> ActionStats:
    rng = np.random.default_rng(seed)
    rows = rng.normal(0.0, 0.01, (500, 12)) + rest_action("camera")  # small motions about identity
    rows[:, 5] = 0.0  # a dimension that never varies: only centred
    return ActionStats.empty(12).update(rows)


def test_model_normalises_like_the_data_plane():
    enc = ActionEncoder(ActionConfig())
    stats = _camera_stats()
    enc.set_statistics({"camera": stats})
    rows = np.random.default_rng(1).normal(0, 0.01, (1, 7, 12)) + rest_action("camera")
    got = enc.normalized(torch.tensor(rows, dtype=torch.float32), torch.tensor([0]), torch.ones(1, 7))
    np.testing.assert_allclose(got[0].numpy(), normalise(rows[0], stats), rtol=1e-4, atol=1e-4)
    # a modality without statistics stays raw; null rows are zero whatever the statistics
    robot = torch.randn(1, 7, 12)
    assert torch.equal(enc.normalized(robot, torch.tensor([2]), torch.ones(1, 7)), robot)
    null = enc.normalized(torch.zeros(1, 7, 12), torch.tensor([0]), torch.zeros(1, 7))
    assert torch.equal(null, torch.zeros(1, 7, 12))


def test_null_action_stays_distinct_from_the_average_action():
    stats = _camera_stats()
    mean_row = torch.tensor(stats.mean, dtype=torch.float32).expand(1, 3, 12)
    target = torch.zeros(1, 3)  # target frames carry flag 0, like the null action
    for presence, distinct in ((True, True), (False, False)):
        torch.manual_seed(0)
        enc = ActionEncoder(ActionConfig(presence_bit=presence))
        enc.set_statistics({"camera": stats})
        average = enc.project(mean_row, target, torch.tensor([0]), torch.ones(1, 3))
        null = enc.project(torch.zeros(1, 3, 12), target, torch.tensor([0]), torch.zeros(1, 3))
        # without the presence input, average motion and "no action" look the same: AFG does nothing
        assert (not torch.allclose(average, null)) is distinct, presence


def test_statistics_travel_with_checkpoints(tmp_path, tiny_wan, tiny_model):
    stats = _camera_stats()
    tiny_model.action_encoder.set_statistics({"camera": stats})
    want = {k: v.clone() for k, v in tiny_model.action_encoder.named_buffers()}
    assert want["action_count"][0] == stats.count
    save_astra(tiny_model, tmp_path / "full")
    save_astra(tiny_model, tmp_path / "adapter", adapter_only=True)
    # a custom whitelist without the action encoder: its statistics still come along
    save_astra(tiny_model, tmp_path / "attn", adapter_only=True, patterns=(r"^blocks\.\d+\.attn1\.",))
    loaded_all = (load_astra(tmp_path / "full"), load_astra(tmp_path / "adapter", base=tiny_wan),
                  load_astra(tmp_path / "attn", base=tiny_wan))  # fmt: skip
    for loaded in loaded_all:
        for name, value in loaded.action_encoder.named_buffers():
            assert torch.equal(value, want[name]), name


def test_real_actions_of_a_rest_start_are_normalised_consistently():
    """A session starts with the rest row; the store's first row of every clip is the rest row too:
    both land on the same normalised vector."""
    enc = ActionEncoder(ActionConfig())
    stats = _camera_stats()
    enc.set_statistics({"camera": stats})
    states = np.tile(np.eye(4), (5, 1, 1))
    stored_first = latent_actions("camera", states)[:1]  # what encode writes for frame 0
    session_first = rest_action("camera")[None]  # what RolloutSession.start writes
    a, b = (
        enc.normalized(torch.tensor(r[None], dtype=torch.float32), torch.tensor([0]), torch.ones(1, 1))
        for r in (stored_first, session_first)
    )
    assert torch.equal(a, b)
