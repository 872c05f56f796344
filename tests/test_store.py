"""The latent store, on a local folder and on a real S3-protocol server (moto) on loopback."""

import pyarrow.fs as pafs
import pytest
import torch

from astra.data.store import LATENTS, LatentRecord, LatentStore, tensor_from_bytes, tensor_to_bytes

BOTH = pytest.mark.parametrize("store_config", ["local", "s3"], indirect=True)


def _record(cid, dtype=torch.float32, modality="camera"):
    g = torch.Generator().manual_seed(hash(cid) % 1000)
    return LatentRecord(
        clip_id=cid,
        dataset="synthetic",
        modality=modality,
        latents=torch.randn(4, 5, 8, 8, generator=g).to(dtype),
        actions=torch.randn(5, 12, generator=g),
        prompt_key="k" + cid,
        source_uri=f"{cid}.mp4",
        vae_id="random:test",
        encode_hash="h1",
        num_frames=17,
        fps=16.0,
        height=64,
        width=64,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_codec_round_trip(dtype):
    t = torch.randn(3, 4, 5).to(dtype)
    data, shape, name = tensor_to_bytes(t)
    back = tensor_from_bytes(data, shape, name)
    assert back.dtype == dtype and torch.equal(back, t)


@BOTH
def test_round_trip_random_access_and_counts(store_config):
    store = LatentStore(store_config)
    recs = [_record(f"c{i}", torch.bfloat16 if i % 2 else torch.float32) for i in range(5)]
    store.write_latents(recs[:3])
    store.write_latents(recs[3:])
    assert len(store.files(LATENTS)) == 2
    assert store.clip_ids() == {f"c{i}" for i in range(5)} and store.clip_ids("other-hash") == set()
    for r in recs:
        got = store.get(r.clip_id)
        assert got.latents.dtype == r.latents.dtype and torch.equal(got.latents, r.latents)
        assert torch.equal(got.actions, r.actions) and got.prompt_key == r.prompt_key and got.num_frames == 17
    assert store.get("missing") is None
    assert store.count_rows() == {f"c{i}": 1 for i in range(5)}


@BOTH
def test_same_clips_rewrite_the_same_shard(store_config):
    """A retried writer overwrites its own shard: no duplicate rows."""
    store = LatentStore(store_config)
    a = store.write_latents([_record("x"), _record("y")])
    b = store.write_latents([_record("y"), _record("x")])
    assert a == b and store.count_rows() == {"x": 1, "y": 1}


@BOTH
def test_prompts_quarantine_and_json(store_config):
    store = LatentStore(store_config)
    e = torch.randn(7, 384)
    store.write_prompts([("k1", "a prompt", "minilm:test", e)])
    assert store.prompt_keys() == {"k1"}
    assert torch.equal(store.prompt_embeddings(["k1"])["k1"], e)
    store.quarantine(
        [
            {
                "clip_id": "bad",
                "source_uri": "bad.mp4",
                "stage": "decode",
                "reason": "empty file",
                "encode_hash": "h1",
            }
        ]
    )
    assert store.quarantined("h1") == {"bad": "empty file"} and store.quarantined("h2") == {}
    store.write_json("stats/h1.json", {"a": 1})
    assert store.read_json("stats/h1.json") == {"a": 1} and store.read_json("stats/none.json") is None


def test_partial_files_are_invisible(tmp_path):
    store = LatentStore(str(tmp_path / "s"))
    store.write_latents([_record("a")])
    # a writer killed mid-way leaves a temp file: readers must not see it
    (tmp_path / "s" / "latents" / ".tmp-deadbeef").write_bytes(b"PAR1 half a file")
    assert store.clip_ids() == {"a"} and len(store.files(LATENTS)) == 1


def test_s3_uri_resolution(s3_server):
    from astra.data.storage import StorageConfig, resolve

    fs, path = resolve("s3://astra/some/prefix/", s3_server)
    assert isinstance(fs, pafs.S3FileSystem) and path == "astra/some/prefix"
    fs, path = StorageConfig(uri="relative/store").filesystem()
    assert isinstance(fs, pafs.LocalFileSystem) and path.endswith("relative/store")
    with pytest.raises(ValueError, match="unsupported scheme 'gs'"):
        resolve("gs://bucket/x")
