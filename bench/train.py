"""Training throughput: the Ray Train job (1 worker) vs a plain single-process loop; activation memory
with and without activation checkpointing.

    python bench/train.py [--steps 30] [--size 128x128]

Both variants train the same model (a small Astra: 4 blocks of width 128, bigger than the tiny preset
so a step is compute, not overhead) from the same synthetic store with the same sample builder and
batch size. The loop builds batches from the store's records in-process and runs ``training_loss``,
backward and AdamW; the job is ``run_training`` with one CPU worker (unsharded: FSDP2 over a single
rank only costs time; MLflow, checkpoints at the end only). Ray gives a 1-CPU worker one torch thread
(OMP_NUM_THREADS), so the loop computes with one thread too: the ratio is the job's overhead. Both report the median step time after warm-up. Activation memory is the
bytes autograd keeps for backward during one forward (``saved_tensors_hooks``), exact and
machine-independent, with ``parallel.activation_checkpointing`` off and on; and the peak resident
memory a training step adds above the step before it, each variant in a fresh process.
The last line is the ratio of steps per second, Ray Train / loop (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from astra.data.store import LatentRecord, LatentStore
from astra.data.synthetic import write_dataset
from astra.encode.config import load_encode_config
from astra.encode.pipeline import run_encode
from astra.model import mark_trainable
from astra.runtime import RayConfig, connect
from astra.train.config import load_train_config, resolve_paths
from astra.train.dataset import plan_data
from astra.train.objective import training_loss
from astra.train.parallelize import initial_model
from astra.train.run import run_training
from astra.train.samples import Bucketer, collate, draw_sample
from astra.train.tracking import find_run

MODEL = [
    "astra.model.backbone.num_layers=4",
    "astra.model.backbone.num_attention_heads=4",
    "astra.model.backbone.attention_head_dim=32",
    "astra.model.backbone.ffn_dim=512",
]


def loop_batches(config, store: LatentStore):
    """Batches from the store, built in-process with the job's own sample builder (a generator: the
    loop pays for its data inside the timed step, as the job does)."""
    rows = store.read_table("latents").to_pylist()
    rng = np.random.default_rng(0)
    bucketer = Bucketer(config.batch_size, config)
    prompts = store.prompt_embeddings()
    while True:
        sample = draw_sample(LatentRecord.from_row(rows[int(rng.integers(len(rows)))]), config, rng)
        batch = bucketer.add(sample) if sample is not None else None
        if batch:
            yield collate(batch, prompts, config)


def loop_step_seconds(config, batches, steps: int) -> list[float]:
    model = initial_model(config)
    mark_trainable(model, config.trainable)
    model.gradient_checkpointing = config.parallel.activation_checkpointing
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        target, inputs = next(batches)
        opt.zero_grad(set_to_none=True)
        out = training_loss(model, target, inputs, config.astra.diffusion, config.astra.model.actions,
                            torch.Generator().manual_seed(step))  # fmt: skip
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def saved_activation_bytes(config, batch, checkpointing: bool) -> int:
    model = initial_model(config).train()
    mark_trainable(model, config.trainable)
    model.gradient_checkpointing = checkpointing
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    target, inputs = batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = training_loss(model, target, inputs, config.astra.diffusion, config.astra.model.actions,
                            torch.Generator().manual_seed(0))  # fmt: skip
    out.loss.backward()
    return total


def _peak_step_memory(config, batch, checkpointing: bool, queue) -> None:
    """In a fresh process: one warm-up step (lazy library set-up), then the resident memory before a
    second step and its peak during it, sampled every millisecond. Large tensors are their own
    mappings (see ``peak_step_memory``), returned to the system when freed, so the peak above the
    start is the step's own."""
    model = initial_model(config).train()
    mark_trainable(model, config.trainable)
    model.gradient_checkpointing = checkpointing
    target, inputs = batch

    def step():
        out = training_loss(model, target, inputs, config.astra.diffusion, config.astra.model.actions,
                            torch.Generator().manual_seed(0))  # fmt: skip
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    before, peak, done = resident_mib(), 0.0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    done.set()
    sampler.join()
    queue.put((before, peak))


def resident_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_step_memory(config, batch, checkpointing: bool) -> float:
    """MiB a training step adds to the process at its peak (a fresh process per variant, so the high-water
    mark is this step's)."""
    # glibc keeps freed memory in its arenas (the warm-up step's would hide this step's): with a fixed
    # 64 KiB mmap threshold every tensor of size is its own mapping, returned when freed
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_step_memory, args=(config, batch, checkpointing, queue))
    proc.start()
    before, peak = queue.get(timeout=600)
    proc.join()
    return peak - before


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", default="128x128")
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be at least 4 (the first steps are warm-up, timed apart)")
    h, w = (int(v) for v in args.size.split("x"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        connect(RayConfig(), dashboard=True)
        manifest = write_dataset(tmp / "clips", 16, "mixed", size=(h, w), num_frames=33, fps=16.0, seed=0)
        enc = load_encode_config(None, ["preset=tiny", f"manifest={manifest}", f"store.uri={tmp / 'store'}",
                                        f"video.height={h}", f"video.width={w}"])  # fmt: skip
        run_encode(enc)
        config = resolve_paths(load_train_config(None, [
            "preset=tiny", *MODEL, f"data.store.uri={tmp / 'store'}", f"storage_path={tmp / 'runs'}",
            f"max_steps={args.steps}", f"checkpoint.every_steps={args.steps}", "eval_every=100000",
            "sample_every=100000", "log_every=1", "tracking.register_as=null", "data.val_clips=1",
        ]))  # fmt: skip
        warm = max(3, args.steps // 5)

        batches = loop_batches(config, LatentStore(config.data.store))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the 1-CPU Ray Train worker computes (see the module docstring)
        loop = statistics.median(loop_step_seconds(config, batches, args.steps)[warm:])
        torch.set_num_threads(threads)
        print(f"loop:      median step {loop * 1e3:.1f} ms ({1 / loop:.2f} steps/s)")

        run_training(config, plan_data(config, 1))
        run = find_run(config)  # points MLflow at the run's store first
        history = MlflowClient().get_metric_history(run.info.run_id, "step_seconds")
        ray_step = statistics.median([m.value for m in sorted(history, key=lambda m: m.step)][warm:])
        print(f"ray train: median step {ray_step * 1e3:.1f} ms ({1 / ray_step:.2f} steps/s), 1 worker")

        batch = next(batches)
        full = saved_activation_bytes(config, batch, checkpointing=False)
        ckpt = saved_activation_bytes(config, batch, checkpointing=True)
        print(f"activations kept for backward: {full / 2**20:.1f} MiB without checkpointing, "
              f"{ckpt / 2**20:.1f} MiB with ({full / max(ckpt, 1):.1f}x less)")  # fmt: skip
        peak_full = peak_step_memory(config, batch, checkpointing=False)
        peak_ckpt = peak_step_memory(config, batch, checkpointing=True)
        print(f"peak memory of a training step (resident, above the process before it): {peak_full:.0f} MiB "
              f"without checkpointing, {peak_ckpt:.0f} MiB with")  # fmt: skip
        print(f"throughput ratio ray/loop steps per second: {loop / ray_step:.2f}")


if __name__ == "__main__":
    main()
