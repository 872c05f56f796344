"""Training samples: history-length distribution, segments of stored clips, buckets, the engine's layout."""

from __future__ import annotations

import numpy as np
import torch

from astra.data.actions import rest_action
from astra.data.store import LatentRecord
from astra.rollout.engine import session_inputs
from astra.rollout.session import RolloutSession
from astra.train.config import HistoryConfig, load_train_config
from astra.train.samples import Bucketer, collate, draw_sample, history_length


def _config(*extra: str):
    return load_train_config(None, ["preset=tiny", *extra])


def _record(num_latents: int = 12, actions: bool = True, cid: str = "clip") -> LatentRecord:
    # latent frame i holds the value i everywhere; action row i is (i, i, ...): segments are legible
    latents = torch.arange(num_latents, dtype=torch.float32).view(1, -1, 1, 1).expand(4, -1, 8, 8).clone()
    rows = torch.arange(num_latents, dtype=torch.float32)[:, None].expand(-1, 12).clone()
    return LatentRecord(
        clip_id=cid,
        dataset="synthetic",
        modality="camera",
        latents=latents,
        actions=rows if actions else torch.zeros(0, 12),
        prompt_key="p",
        source_uri="/x.mp4",
        vae_id="random:test",
        encode_hash="h",
        num_frames=4 * num_latents - 3,
        fps=16.0,
        height=64,
        width=64,
    )


def test_history_lengths_follow_the_reference_distribution():
    rng = np.random.default_rng(0)
    draws = np.array([history_length(20, HistoryConfig(), rng) for _ in range(40_000)])
    assert abs((draws == 1).mean() - 0.4) < 0.01
    assert abs((draws == 20).mean() - (0.1 + 0.5 / 19)) < 0.01
    assert abs((draws == 7).mean() - 0.5 / 19) < 0.006
    assert draws.min() == 1 and draws.max() == 20
    assert history_length(1, HistoryConfig(), rng) == 1


def test_a_sample_is_a_consecutive_segment_starting_at_rest():
    config = _config()  # target 2 latents, window 1 + 1 + 2 + 4 = 8
    rng = np.random.default_rng(1)
    for _ in range(200):
        s = draw_sample(_record(), config, rng)
        frames = torch.cat([s.history, s.target], 1)[0, :, 0, 0]
        start = int(frames[0])
        assert torch.equal(frames, torch.arange(start, start + len(frames), dtype=torch.float32))
        assert 1 <= s.num_history <= 8 and s.target.shape[1] == 2
        np.testing.assert_array_equal(s.actions[0].numpy(), rest_action("camera"))  # the anchor is at rest
        assert torch.equal(s.actions[1:, 0], frames[1:])  # every other row is the clip's own
    free = draw_sample(_record(actions=False), config, rng)
    assert not free.has_actions and torch.equal(free.actions[1], free.actions[0])  # rest rows only
    assert draw_sample(_record(2), config, rng) is None  # shorter than 1 history + 2 target latents


def _with_history(n: int, actions: bool = True):
    """A sample with exactly ``n`` history latents (history length forced to its maximum)."""
    forced = ["data.history.p_single=0", "data.history.p_uniform=0", "data.history.p_max=1"]
    config = _config(*forced, f"data.history.max_latents={n}")
    return draw_sample(_record(n + 2, actions), config, np.random.default_rng(n))


def test_buckets_batch_mixed_history_lengths():
    config = _config()  # the tiny window: anchor 1 + recent 1 + 2x 2 + 4x 4 = 8 latents
    bucketer = Bucketer(2, config)
    assert bucketer.add(_with_history(1)) is None and bucketer.add(_with_history(3)) is None  # other shapes
    assert bucketer.add(_with_history(9)) is None
    batch = bucketer.add(_with_history(12))  # both fill the window: the same packed shapes
    assert batch is not None and [s.num_history for s in batch] == [9, 12] and len(bucketer) == 2
    target, inputs = collate(batch, {"p": torch.randn(5, 384)}, config)
    assert target.shape == (2, 4, 2, 8, 8) and inputs.batch_size == 2
    assert inputs.context.shape == (2, 64, 384)  # padded to model.context_length


def test_collate_matches_the_engine_and_nulls_action_free_clips():
    """The packed inputs of a training sample are those the chunk engine builds for a session with
    the same history: same frames, same RoPE positions (the slid anchor included), same rows."""
    config = _config()
    sample = _with_history(11)  # 11 history latents: the window has slid
    prompt = torch.randn(5, 384)
    _, train = collate([sample], {"p": prompt}, config)
    session = RolloutSession(
        session_id="s", modality="camera", history=sample.history, actions=sample.actions[:11],
        prompt=prompt, seed=0, rng_state=torch.Generator().get_state(),
    )  # fmt: skip

    class _Model:  # session_inputs only asks where tensors go
        device, dtype = torch.device("cpu"), torch.float32

    engine = session_inputs(session, sample.actions[11:], config.astra, _Model())
    for a, b in zip((*train.history, train.target), (*engine.history, engine.target), strict=True):
        assert torch.equal(a.frames, b.frames) and torch.equal(a.positions, b.positions)
        assert torch.equal(a.actions, b.actions) and torch.equal(a.flags, b.flags)
    assert train.history[-1].positions[0, 0] > 0  # the anchor moved with the window
    assert torch.equal(train.context, engine.context)

    free = _with_history(11, actions=False)
    _, mixed = collate([sample, free], {"p": prompt}, config)
    for g in (*mixed.history, mixed.target):
        assert torch.all(g.present[1] == 0) and torch.all(g.actions[1] == 0) and torch.all(g.present[0] == 1)


def test_a_rank_whose_clips_never_fill_a_batch_fails_instead_of_hanging(tmp_path):
    """One clip and batch_size 2: every epoch gives one sample, no batch ever fills. The rank must say
    so (the other ranks would wait for it in their all-reduce forever)."""
    import pytest

    from astra.train.dataset import DataPlan
    from astra.train.stream import EMPTY_EPOCHS, Position, SampleStream

    class Rows:  # what ray.train.get_dataset_shard gives: something with iter_rows()
        def iter_rows(self):
            return iter([_record(cid="only").to_row()])

    config = _config(f"data.store.uri={tmp_path}", "batch_size=2")
    plan = DataPlan("h", ((),), True, (), 1, 12, {})
    stream = SampleStream(Rows(), config, plan, 0, 1, Position())
    with pytest.raises(
        ValueError, match=rf"batch_size: worker 0's clips filled no batch of 2 .* in {EMPTY_EPOCHS}"
    ):
        next(iter(stream))


def test_pretraining_samples_are_text_to_video_segments():
    """stage=pretrain: a segment of target latents alone (no history, null actions), the Wan weights
    trainable and Astra's additions frozen; the collated batch is what Wan itself sees."""
    from astra.model.trainable import is_trainable

    config = _config("stage=pretrain", "data.target_latents=5")
    assert is_trainable("blocks.0.ffn.net.0.proj.weight", config.trainable)
    assert is_trainable("patch_embedding.weight", config.trainable)
    for key in ("blocks.1.moe.experts.0.weight", "blocks.0.projector.weight", "action_encoder.router.weight",
                "clean_x_embedder.proj.weight"):  # fmt: skip
        assert not is_trainable(key, config.trainable), key
    rng = np.random.default_rng(2)
    starts = set()
    for _ in range(100):
        s = draw_sample(_record(), config, rng)
        assert s.num_history == 0 and s.target.shape[1] == 5 and not s.has_actions
        starts.add(int(s.target[0, 0, 0, 0]))
    assert starts == set(range(12 - 5 + 1))  # every start, the clip's first latent included
    target, inputs = collate([s, s], {"p": torch.randn(3, 384)}, config)
    assert target.shape == (2, 4, 5, 8, 8) and not inputs.history
    assert draw_sample(_record(4), config, rng) is None  # shorter than the target
    # an explicit whitelist still wins
    assert _config("stage=pretrain", "trainable=['^proj_out']").trainable == ("^proj_out",)


def test_later_epochs_replay_the_cached_clips_bitwise(tmp_path):
    """data.cache_bytes: after the first pass a rank replays its clips from memory; the batches of
    every epoch (and of a stream resumed mid-epoch) are those of a stream that re-reads each epoch."""
    from astra.data.store import LatentStore
    from astra.train.dataset import DataPlan
    from astra.train.stream import Position, SampleStream

    class Rows:  # what ray.train.get_dataset_shard gives; counts the passes over the store
        passes = 0

        def iter_rows(self):
            Rows.passes += 1
            return iter([_record(cid=f"c{i}").to_row() for i in range(6)])

    LatentStore(str(tmp_path)).write_prompts([("p", "a prompt", "test", torch.randn(3, 384))])
    plan = DataPlan("h", ((),), True, (), 6, 12, {})

    def batches(cache_bytes: int, position: Position, count: int) -> tuple[list, int]:
        Rows.passes = 0
        config = _config(f"data.store.uri={tmp_path}", "batch_size=2", f"data.cache_bytes={cache_bytes}")
        stream = iter(SampleStream(Rows(), config, plan, 0, 1, position))
        out = [next(stream) for _ in range(count)]
        return [(t, pos.to_dict()) for t, _, pos in out], Rows.passes

    streamed, passes = batches(0, Position(), 10)  # a few batches per epoch: several epochs
    cached, cached_passes = batches(1 << 20, Position(), 10)
    assert [p for _, p in cached] == [p for _, p in streamed]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(cached, streamed, strict=True))
    assert passes == streamed[-1][1]["epoch"] + 1 >= 3 and cached_passes == 1
    _, too_small = batches(1000, Position(), 10)  # the clips do not fit: every epoch reads again
    assert too_small == passes
    at = [p for _, p in streamed].index({"epoch": 1, "batches": 1})
    resumed, _ = batches(1 << 20, Position(epoch=1, batches=1), 10 - at - 1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, streamed[at + 1 :], strict=True))
