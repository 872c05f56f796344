"""Rollout sessions: serialisation round trip and resuming a restored session."""

import pytest
import torch

from astra.rollout import RolloutSession, generate_chunk


def _session(tiny_config, seed=5):
    g = torch.Generator().manual_seed(0)
    return RolloutSession.start(
        "s-1",
        "driving",
        torch.randn(4, 1, 8, 8, generator=g),
        torch.randn(6, 384, generator=g),
        raw_dim=7,
        seed=seed,
        null_prompt=torch.zeros(6, 384),
    )


def test_round_trip_is_bitwise(tiny_config, tiny_model):
    s = _session(tiny_config)
    for _ in range(3):
        s, _ = generate_chunk(tiny_model, s, torch.randn(2, 7), tiny_config)
    restored = RolloutSession.from_bytes(s.to_bytes())
    assert restored.step == s.step == 3 and restored.session_id == "s-1" and restored.modality == "driving"
    for name in ("history", "actions", "prompt", "rng_state", "null_prompt"):
        assert torch.equal(getattr(restored, name), getattr(s, name)), name


def test_restored_session_continues_bitwise(tiny_config, tiny_model):
    s = _session(tiny_config)
    s, _ = generate_chunk(tiny_model, s, torch.randn(2, 7), tiny_config)
    restored = RolloutSession.from_bytes(s.to_bytes())
    plan = [torch.randn(2, 7) for _ in range(4)]
    a, b = s, restored
    for acts in plan:
        a, ca = generate_chunk(tiny_model, a, acts, tiny_config)
        b, cb = generate_chunk(tiny_model, b, acts, tiny_config)
        assert torch.equal(ca, cb)
    assert torch.equal(a.history, b.history) and a.step == b.step == 5
    assert a.history.shape[1] == 1 + 5 * 2  # start frame + 5 chunks of 2 latents
    assert torch.equal(a.actions[1:3], plan[0] * 0 + a.actions[1:3])  # rows appended in order
    assert torch.equal(a.actions[-2:], plan[-1])


def test_same_seed_same_rollout_different_seed_differs(tiny_config, tiny_model):
    acts = torch.randn(2, 7)
    _, c1 = generate_chunk(tiny_model, _session(tiny_config, 1), acts, tiny_config)
    _, c2 = generate_chunk(tiny_model, _session(tiny_config, 1), acts, tiny_config)
    _, c3 = generate_chunk(tiny_model, _session(tiny_config, 2), acts, tiny_config)
    assert torch.equal(c1, c2) and not torch.equal(c1, c3)


def test_bad_inputs_are_clear_errors(tiny_config, tiny_model):
    s = _session(tiny_config)
    with pytest.raises(ValueError, match=r"actions: expected shape \(2, 7\)"):
        generate_chunk(tiny_model, s, torch.randn(3, 7), tiny_config)
    with pytest.raises(ValueError, match="NaN"):
        generate_chunk(tiny_model, s, torch.full((2, 7), float("nan")), tiny_config)
    with pytest.raises(ValueError, match="session: not a serialised"):
        RolloutSession.from_bytes(b"garbage bytes")


def test_start_row_is_the_rest_action_as_stored_by_the_encode_job():
    from astra.data.actions import actions_from_states

    s = RolloutSession.start("c", "camera", torch.zeros(4, 1, 8, 8), torch.zeros(2, 384), raw_dim=12, seed=0)
    stored_first_row = actions_from_states("camera", torch.eye(4)[None].numpy())[0]
    assert torch.equal(s.actions[0], torch.from_numpy(stored_first_row))
    other = RolloutSession.start(
        "k", "keyboard", torch.zeros(4, 1, 8, 8), torch.zeros(2, 384), raw_dim=5, seed=0
    )
    assert torch.equal(other.actions, torch.zeros(1, 5))


def test_a_session_can_start_from_a_clip_with_its_action_rows(tiny_config, tiny_model):
    """A start clip of 3 latents with its own action rows: the session keeps them, and the next
    chunk's packed history carries them; the wrong number of rows is a clear error."""
    from astra.rollout.engine import session_inputs

    g = torch.Generator().manual_seed(0)
    latents, prompt = torch.randn(4, 3, 8, 8, generator=g), torch.randn(6, 384, generator=g)
    rows = torch.randn(3, 7, generator=g)
    s = RolloutSession.start("c", "driving", latents, prompt, raw_dim=7, seed=1, start_actions=rows)
    assert torch.equal(s.actions, rows) and s.num_frames == 3
    rest = RolloutSession.start("c", "driving", latents, prompt, raw_dim=7, seed=1)
    nxt = torch.randn(2, 7, generator=g)
    packed, packed_rest = (session_inputs(x, nxt, tiny_config, tiny_model).history[-1] for x in (s, rest))
    assert torch.equal(packed.latents, packed_rest.latents) and not torch.equal(
        packed.actions, packed_rest.actions
    )
    assert torch.equal(packed.actions[0, -1, :7], rows[-1])  # the newest history latent reads its own row
    assert generate_chunk(tiny_model, s, nxt, tiny_config)[0].num_frames == 5
    with pytest.raises(ValueError, match=r"start_actions: expected \(3, 7\) rows"):
        RolloutSession.start("c", "driving", latents, prompt, raw_dim=7, seed=1, start_actions=rows[:2])
