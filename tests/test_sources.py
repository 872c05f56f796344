"""Video decode, pose sources and manifest builders for the SpatialVID and Sekai layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astra.data.actions import latent_actions, matrix_to_quat, rotvec_to_matrix
from astra.data.manifest import read_manifest
from astra.data.sources import build_sekai_manifest, build_spatialvid_manifest, load_poses
from astra.data.synthetic.dataset import encode_mp4
from astra.data.video import ClipError, decode_clip
from astra.encode.config import load_encode_config
from astra.encode.decode import decode_windows_of

FPS = 30.0
N_SRC = 60  # 2 s of source video


def _frames(n=N_SRC, h=48, w=80):
    """Frame i is uniformly grey-level 4 * i (so a decoded frame tells its index)."""
    return np.stack([np.full((h, w, 3), min(4 * i, 255), np.uint8) for i in range(n)])


def _gt_pose(t: np.ndarray) -> np.ndarray:
    """Camera-to-world (OpenGL) moving at constant velocity while turning about a fixed axis:
    linear + spherical interpolation reproduce it exactly."""
    out = np.tile(np.eye(4), (len(t), 1, 1))
    out[:, :3, :3] = rotvec_to_matrix(np.outer(t, [0.1, 0.6, 0.0]))
    out[:, :3, 3] = np.outer(t, [0.5, 0.1, -2.0])
    return out


def _opencv_w2c(c2w_gl: np.ndarray) -> np.ndarray:
    return np.linalg.inv(c2w_gl @ np.diag([1.0, -1.0, -1.0, 1.0]))


def test_decode_picks_frames_nearest_the_target_times(tmp_path):
    encode_mp4(_frames(), tmp_path / "v.mp4", FPS)
    clip = decode_clip(str(tmp_path / "v.mp4"), 17, (32, 32), 16.0)
    assert clip.frames.shape == (17, 32, 32, 3) and clip.frames.dtype == np.uint8
    want = np.arange(17) / 16.0 * FPS  # nearest frame: within half a frame (ties either way)
    np.testing.assert_allclose(clip.times * FPS, want, atol=0.51)
    got = clip.frames[:, 16, 16, 0].astype(float) / 4
    np.testing.assert_allclose(got, clip.times * FPS, atol=1.5)  # the pixels are those frames


def test_decode_resizes_and_centre_crops(tmp_path):
    frames = np.zeros((9, 64, 128, 3), np.uint8)
    frames[:, :, 48:80] = 255  # a white band in the middle third of a wide frame
    encode_mp4(frames, tmp_path / "wide.mp4", 16.0)
    clip = decode_clip(str(tmp_path / "wide.mp4"), 5, (32, 32), 16.0)
    row = clip.frames[0, 16, :, 0].astype(int)
    assert row[16] > 200 and row[0] < 50 and row[-1] < 50  # the band is centred, the sides cropped


def test_decode_errors(tmp_path):
    encode_mp4(_frames(8), tmp_path / "short.mp4", FPS)
    with pytest.raises(ClipError, match="too few frames"):
        decode_clip(str(tmp_path / "short.mp4"), 17, (32, 32), 16.0)
    (tmp_path / "text.mp4").write_text("hello")
    with pytest.raises(ClipError, match="not a readable video"):
        decode_clip(str(tmp_path / "text.mp4"), 5, (32, 32), 16.0)


def _spatialvid_tree(root, clip_id="0a1b2c3d-0000"):
    video = root / "videos" / "group_0001" / f"{clip_id}.mp4"
    video.parent.mkdir(parents=True)
    encode_mp4(_frames(), video, FPS)
    ann = root / "annotations" / "group_0001" / clip_id
    ann.mkdir(parents=True)
    idx = np.arange(0, N_SRC, 6)  # poses at 5 fps
    w2c = _opencv_w2c(_gt_pose(idx / FPS))
    q = matrix_to_quat(w2c[:, :3, :3])  # wxyz
    np.save(ann / "poses.npy", np.concatenate([w2c[:, :3, 3], q[:, [1, 2, 3, 0]]], 1))  # [t, qxyzw]
    (ann / "indexes.txt").write_text("".join(f"{i} {f}\n" for i, f in enumerate(idx)))
    (ann / "caption.json").write_text(
        json.dumps({"SceneSummary": "s", "SceneDescription": "a street at dusk"})
    )
    return clip_id


def _config():
    return load_encode_config(
        None, ["preset=tiny", "manifest=unused.jsonl", "video.max_frames=17", "video.min_frames=17"]
    )


def decode_row(record, config):
    """The first window of a record, through the encode job's own decode stage."""
    return next(decode_windows_of(record, config))


def _check_row_matches_ground_truth(row):
    assert row["error"] == "", row["error"]
    actions = np.frombuffer(row["actions"], np.float32).reshape(-1, 12)
    want = latent_actions("camera", _gt_pose(np.arange(17) / 16.0))
    # the decoder picks the nearest 30 fps frame to each 16 fps instant: poses follow the pixels
    assert actions.shape == want.shape
    np.testing.assert_allclose(actions, want, atol=0.05)


def test_spatialvid_layout(tmp_path):
    clip_id = _spatialvid_tree(tmp_path / "SpatialVID")
    manifest = build_spatialvid_manifest(tmp_path / "SpatialVID", tmp_path / "m.jsonl")
    records, rejects = read_manifest(manifest)
    assert not rejects and len(records) == 1
    rec = records[0]
    assert (
        rec.clip_id == f"spatialvid/{clip_id}"
        and rec.prompt == "a street at dusk"
        and rec.pose_format == "spatialvid"
    )
    times, states = load_poses(rec, FPS)
    np.testing.assert_allclose(times, np.arange(0, N_SRC, 6) / FPS)
    np.testing.assert_allclose(states, _gt_pose(times), atol=1e-9)  # back to OpenGL camera-to-world
    _check_row_matches_ground_truth(decode_row(rec.model_dump(), _config()))


def test_sekai_layout(tmp_path):
    root = tmp_path / "Sekai"
    (root / "videos").mkdir(parents=True)
    (root / "cameras").mkdir()
    encode_mp4(_frames(), root / "videos" / "walk_0001.mp4", FPS)
    w2c = _opencv_w2c(_gt_pose(np.arange(N_SRC) / FPS))  # one 4x4 per video frame
    (root / "cameras" / "walk_0001.txt").write_text(
        "".join(f"{i} " + " ".join(f"{v:.17g}" for v in m.ravel()) + "\n" for i, m in enumerate(w2c))
    )
    csv_path = root / "sekai-game-walking.csv"
    csv_path.write_text("videoFile,cameraFile,caption,fps\nwalk_0001.mp4,walk_0001.txt,a walk in a park,30\n")
    records, rejects = read_manifest(build_sekai_manifest(root, csv_path, tmp_path / "m.parquet"))
    assert not rejects and records[0].clip_id == "sekai/walk_0001" and records[0].fps == 30.0
    _check_row_matches_ground_truth(decode_row(records[0].model_dump(), _config()))
    with pytest.raises(ValueError, match="not a SpatialVID folder"):
        build_spatialvid_manifest(root, tmp_path / "x.jsonl")


def test_folder_builder_on_an_s3_prefix(tmp_path, s3_server):
    import boto3

    from astra.data.sources import folder_records
    from astra.data.storage import StorageConfig

    encode_mp4(_frames(9), tmp_path / "v.mp4", FPS)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for key in ("vids/a/one.mp4", "vids/b/two.MOV"):
        s3.upload_file(str(tmp_path / "v.mp4"), "astra", key)
    s3.put_object(Bucket="astra", Key="vids/a/one.txt", Body=b"a quiet lane\n")
    s3.put_object(Bucket="astra", Key="vids/notes.md", Body=b"not a video")
    storage = StorageConfig(s3_endpoint=s3_server)
    recs = folder_records("s3://astra/vids", "camera", "default prompt", None, storage)
    assert [(r.clip_id, r.uri, r.prompt, r.poses_uri) for r in recs] == [
        ("vids/a/one", "s3://astra/vids/a/one.mp4", "a quiet lane", None),
        ("vids/b/two", "s3://astra/vids/b/two.MOV", "default prompt", None),
    ]
    s3.put_object(Bucket="astra", Key="docs/readme.md", Body=b"no videos here")
    with pytest.raises(ValueError, match="no videos"):
        folder_records("s3://astra/docs", storage=storage)
    with pytest.raises(ValueError, match="not a folder or prefix"):
        folder_records("s3://astra/nothing-here", storage=storage)
