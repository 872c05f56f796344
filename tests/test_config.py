import pytest
from pydantic import ValidationError

from astra.config import AstraConfig, ConfigError, load_config, preset
from astra.config_base import parse_overrides


def test_presets_build_and_are_frozen():
    big = preset("wan2.1-1.3b")
    assert big.model.backbone.num_layers == 30 and big.model.backbone.dim == 1536
    assert big.model.backbone.text_dim == 4096 and big.model.backbone.in_channels == 16
    tiny = preset("tiny")
    assert tiny.model.backbone.dim == 24
    with pytest.raises(ValidationError, match="frozen"):
        tiny.model.backbone.num_layers = 3


def test_yaml_with_preset_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nsampler:\n  num_steps: 7\n")
    cfg = load_config(path, ["model.backbone.num_layers=3", "sampler.action_guidance=2.5"])
    assert isinstance(cfg, AstraConfig)
    assert cfg.model.backbone.num_layers == 3
    assert cfg.model.backbone.dim == 24  # the rest of the preset survives
    assert cfg.sampler.num_steps == 7 and cfg.sampler.action_guidance == 2.5


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError, match=r"model\.backbone\.num_layers"):
        load_config(None, ["model.backbone.num_layers=0"], preset="tiny")
    with pytest.raises(ConfigError, match=r"diffusion\.noise_as_mask_prob"):
        load_config(None, ["diffusion.noise_as_mask_prob=1.5"])
    with pytest.raises(ConfigError, match=r"framepack\.frames_4x|frames_4x"):
        load_config(None, ["model.framepack.frames_4x=6"])


def test_unknown_key_and_preset_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"sampler\.num_stepz"):
        load_config(None, ["sampler.num_stepz=3"])
    with pytest.raises(ConfigError, match="preset"):
        load_config(None, preset="huge")
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        parse_overrides(["sampler.num_steps"])


def test_modality_registry_validation():
    with pytest.raises(ConfigError, match="expert 9"):
        load_config(None, ["model.actions.modalities=[{name: cam, raw_dim: 12, expert: 9}]"])
    cfg = load_config(
        None,
        ["model.actions.modalities=[{name: cam, raw_dim: 12, expert: 0}, {name: kb, raw_dim: 4, expert: 1}]"],
    )
    assert cfg.model.actions.modality_id("kb") == 1 and cfg.model.actions.max_raw_dim == 12
    with pytest.raises(ConfigError, match="unknown modality 'robot'"):
        cfg.model.actions.modality("robot")


def test_every_field_is_documented():
    from pydantic import BaseModel

    from astra.config import AstraConfig, TextEncoderConfig
    from astra.encode.config import EncodeConfig

    seen = set()

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            ann = field.annotation
            for t in (ann, *getattr(ann, "__args__", ())):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    walk(t)

    from astra.train.config import TrainConfig

    for cls in (AstraConfig, EncodeConfig, TextEncoderConfig, TrainConfig):
        walk(cls)


def test_derive_revalidates_the_whole_config():
    from astra.config import derive

    tiny = preset("tiny")
    assert derive(tiny, ["sampler.num_steps=9"]).sampler.num_steps == 9
    assert derive(tiny, {"model": {"backbone": {"num_layers": 3}}}).model.backbone.num_layers == 3
    # a cross-field inconsistency model_copy would let through is refused, naming the fields
    with pytest.raises(ConfigError, match=r"vae\.z_dim \(8\) must equal model\.backbone\.in_channels \(4\)"):
        derive(tiny, ["vae.z_dim=8"])
    assert (
        tiny.model_copy(update={"vae": tiny.vae.model_copy(update={"z_dim": 8})}).vae.z_dim == 8
    )  # unchecked
    with pytest.raises(ConfigError, match=r"did you mean 'sampler\.num_steps'"):
        derive(tiny, ["sampler.num_step=3"])


def test_a_key_with_no_near_match_lists_the_section():
    from astra.train.config import load_train_config

    with pytest.raises(ConfigError, match=r"optim\.learning_rate: .*the fields here are lr, betas"):
        load_train_config(None, ["preset=tiny", "optim.learning_rate=1e-3"])
