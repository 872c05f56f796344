"""The VAE wrapper: shapes, causality, normalisation."""

import pytest
import torch

from astra.config import VAEConfig, preset
from astra.model.vae import WanVAE, frames_to_video, video_to_frames


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE.from_config(preset("tiny").vae).eval()


def test_shapes_and_causal_prefix(vae):
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 4, 3, 4, 6) and vae.latent_frames(9) == 3
    # causal: encoding the first 1 + 4 frames gives the first 2 latents
    torch.testing.assert_close(vae.encode(video[:, :, :5]), z[:, :, :2])
    out = vae.decode(z)
    assert out.shape == video.shape and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.latent_frames(8)


def test_latents_are_normalised_with_the_vae_statistics():
    torch.manual_seed(0)
    cfg = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    vae = WanVAE.from_config(cfg).eval()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    raw = vae.vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(vae.encode(video), (raw - mean) / std)


def test_frame_conversions_round_trip():
    frames = torch.randint(0, 256, (2, 5, 8, 8, 3), dtype=torch.uint8)
    video = frames_to_video(frames)
    assert video.shape == (2, 3, 5, 8, 8) and video.min() >= -1 and video.max() <= 1
    assert torch.equal(video_to_frames(video), frames)


def test_pretrained_vae_folder(tmp_path, vae):
    vae.vae.save_pretrained(tmp_path / "vae")
    cfg = VAEConfig(pretrained_path=str(tmp_path), base_dim=8, z_dim=4)
    loaded = WanVAE.from_config(cfg)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.encode(video), vae.encode(video), atol=1e-5, rtol=1e-5)


def test_exported_vae_names_no_machine_path(tmp_path, vae):
    """A VAE loaded from a folder (a training stage's start) exports without diffusers' record of that
    folder (`_name_or_path`: a path of the machine that trained it), its latent statistics set."""
    import json

    import numpy as np
    from diffusers import AutoencoderKLWan

    from astra.train.vae import export_vae

    vae.vae.save_pretrained(tmp_path / "start")
    loaded = AutoencoderKLWan.from_pretrained(str(tmp_path / "start"))
    assert str(tmp_path) in loaded.config["_name_or_path"]
    clips = [np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)]
    fields = json.loads((export_vae(loaded, clips, 5, tmp_path / "out") / "config.json").read_text())
    assert "_name_or_path" not in fields and len(fields["latents_mean"]) == 4


def test_a_4x_spatial_vae_keeps_wan_time_and_names_its_levels():
    """Three levels with both temporal downsamplings (the demo VAE): 4x spatial, 4x temporal, causal."""
    cfg = VAEConfig(
        base_dim=8, z_dim=4, dim_mult=(1, 2, 2), temporal_downsample=(True, True), num_res_blocks=1
    )
    vae = WanVAE.from_config(cfg).eval()
    assert (vae.spatial_factor, vae.temporal_factor, cfg.spatial_factor) == (4, 4, 4)
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 4, 3, 8, 8) and vae.decode(z).shape == video.shape
    torch.testing.assert_close(vae.encode(video[:, :, :5]), z[:, :, :2])
    # the levels are part of a random VAE's identity; Wan's defaults keep their old one
    assert cfg.vae_id != VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1).vae_id
    assert VAEConfig().temporal_levels == (False, True, True) and "-t" not in VAEConfig().vae_id


@pytest.mark.parametrize(
    "levels, dim_mult",
    [((True, False), (1, 2, 2)), ((True, True, True), (1, 2, 2, 2)), ((True,), (1, 2, 2))],
)
def test_temporal_downsample_must_fit_the_levels(levels, dim_mult):
    from astra.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"vae: .*temporal_downsample"):
        build_config({"vae": {"z_dim": 16, "dim_mult": dim_mult, "temporal_downsample": levels}})
    with pytest.raises(ConfigError, match=r"vae: .*dim_mult"):
        build_config({"vae": {"dim_mult": (1, 2)}})


def test_the_still_scene_loss_is_what_the_vae_job_trains_and_training_on_it_lowers_it():
    """``still_loss`` (the VAE job's ``still_weight``): a still clip's latents pulled together over
    time, inside the DDP-wrapped forward; a few steps on it alone cut it, and it is scale-free."""
    from astra.train.vae import Reconstruction, still_loss

    torch.manual_seed(0)
    model = Reconstruction(WanVAE.from_config(preset("tiny").vae).vae)
    video = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    recon, kl, off = model(video)
    assert recon.shape == video.shape and kl.shape == (2,) and float(off) == 0.0
    before = float(model(video, still=True)[2])
    torch.testing.assert_close(torch.tensor(before), still_loss(model.vae, video).detach())
    assert before > 0.01  # a fresh VAE encodes a still scene differently at each latent index
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        loss = model(video, still=True)[2]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(model(video, still=True)[2]) < before / 2
    # scale-free: the encoder cannot lower it by shrinking its latents
    with torch.no_grad():
        trained = still_loss(model.vae, video)
        for p in model.vae.quant_conv.parameters():
            p.mul_(0.1)
        torch.testing.assert_close(still_loss(model.vae, video), trained, rtol=1e-3, atol=1e-6)
