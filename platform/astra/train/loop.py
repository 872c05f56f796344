"""What each Ray Train worker runs: build, resume, train, evaluate, sample, checkpoint, export.

The order of a step: micro-batches from this rank's ``SampleStream`` -> ``training_loss`` (noise-as-mask
and action dropout happen there, with a generator seeded by (seed, rank, step, micro-batch)) ->
backward -> clip -> AdamW -> schedule. Every random draw of a step is a function of the seed and the
step, and the data stream's position is checkpointed, so a resumed run repeats the uninterrupted one.
Rank 0 alone talks to MLflow; metrics reach the driver through ``ray.train.report``.
"""

from __future__ import annotations

import math
import os
import re
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from astra.model.io import save_astra, save_wan
from astra.model.trainable import count_params, is_trainable
from astra.train import checkpoint as ckpt
from astra.train.config import TrainConfig
from astra.train.dataset import DataPlan
from astra.train.flops import peak_flops, train_step_flops
from astra.train.objective import fixed_sigma_loss, training_loss
from astra.train.parallelize import build, sharded
from astra.train.samples import collate
from astra.train.stream import Position, Prefetch, PromptCache, SampleStream, fixed_samples


def lr_factor(step: int, config: TrainConfig) -> float:
    """Warm-up then decay, as a multiple of the peak lr (``step`` counts from 1)."""
    o = config.optim
    if step <= o.warmup_steps:
        return step / max(o.warmup_steps, 1)
    if o.decay == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(config.max_steps - o.warmup_steps, 1))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.decay == "cosine" else 1 - progress
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """The trainable parameters as AdamW groups by ``optim.lr_scale`` (each group's ``lr_scale`` is the
    multiple of the scheduled lr it trains at), in the model's parameter order."""
    scales = config.optim.lr_scale
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((f for pattern, f in scales.items() if re.search(pattern, name)), 1.0)
            groups.setdefault(scale, []).append(p)
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


def _tokens(inputs, target_shape, patch: tuple[int, int, int]) -> int:
    """Tokens of one sample: packed history + target (what attention and the MLPs see)."""
    _, ph, pw = patch
    (_, _, t, h, w) = target_shape
    count = t * math.ceil(h / ph) * math.ceil(w / pw)
    for g in inputs.history:
        f = g.factor
        count += (g.frames.shape[1] // f) * math.ceil(h / (ph * f)) * math.ceil(w / (pw * f))
    return count


def _mean(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks."""
    value = value.detach().float().reshape(1).clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak)


class Worker:
    """One rank's training state."""

    def __init__(self, config: TrainConfig, plan: DataPlan, tags: dict[str, str]):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.config, self.plan = config, plan
        self.device = ray.train.torch.get_device()
        torch.manual_seed(config.seed)

        def prepare(full):  # rank 0: the store's action statistics into the model (new runs)
            enc = full.action_encoder
            if config.astra.model.actions.normalize and int(enc.action_count.sum()) == 0:
                enc.set_statistics(plan.stats)

        self.model, self.full = build(config, self.device, prepare)
        # unsharded (one worker): bf16 compute through autocast, as FSDP2's policy gives it when sharded
        dtype = getattr(torch, config.parallel.param_dtype)
        use_autocast = not sharded(config) and dtype != torch.float32
        self.autocast = lambda: torch.autocast(self.device.type, dtype=dtype, enabled=use_autocast)
        o = config.optim
        groups = param_groups(self.model, config)
        self.optimizer = torch.optim.AdamW(
            groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )
        self.trainable = [p for g in groups for p in g["params"]]
        self.step, self.position, run_id = 0, Position(), None
        resumed = ray.train.get_checkpoint()
        if resumed is not None:
            with resumed.as_directory() as folder:
                state = ckpt.load(folder, self.model, self.optimizer, config.trainable)
            self.step, run_id = state["step"], state.get("mlflow_run_id")
            self.position = Position(**state["positions"][self.rank])
            if self.rank == 0:
                print(f"resumed from the checkpoint at step {self.step} ({resumed.path})", flush=True)
        self.tracker = None
        if self.rank == 0:
            from astra.train.tracking import Tracker

            self.tracker = Tracker(config, run_id, tags)
        self.stream_obj = SampleStream(self._shard(), config, plan, self.rank, self.world, self.position)
        self.stream = Prefetch(iter(self.stream_obj), depth=2)
        self.consumed = self.position  # the stream's position after the last batch trained on
        self.val = fixed_samples(config, plan, count=len(plan.val_ids))  # one per held-out clip
        self.prompts = PromptCache(self._store())
        self.peak = peak_flops(
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            config.parallel.peak_tflops,
        )

    def _store(self):
        from astra.data.store import LatentStore

        return LatentStore(self.config.data.store)

    def _shard(self):
        return ray.train.get_dataset_shard(f"rank{self.rank}")

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        losses, flows, routers, usage, tokens, samples, data_seconds = [], [], [], [], 0, 0, 0.0
        for micro in range(cfg.grad_accum):
            waited = time.perf_counter()
            target, inputs, self.consumed = next(self.stream)
            data_seconds += time.perf_counter() - waited
            seed = int(np.random.SeedSequence((cfg.seed, self.rank, self.step, micro)).generate_state(1)[0])
            g = torch.Generator().manual_seed(seed)
            with self.autocast():
                out = training_loss(
                    self.model,
                    target.to(self.device),
                    inputs.to(self.device, torch.float32),
                    cfg.astra.diffusion,
                    cfg.astra.model.actions,
                    g,
                )
            (out.loss / cfg.grad_accum).backward()
            losses.append(out.loss.detach())
            flows.append(out.flow_loss)
            routers.append(out.router_loss)
            usage.append(out.expert_usage)
            tokens += _tokens(inputs, target.shape, cfg.astra.model.backbone.patch_size) * target.shape[0]
            samples += target.shape[0]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.optim.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        lr = cfg.optim.lr * lr_factor(self.step + 1, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.optimizer.step()
        self.step += 1
        seconds = time.perf_counter() - start
        flops = train_step_flops(
            cfg.astra.model.backbone,
            tokens // max(samples, 1),
            cfg.astra.model.context_length,
            samples,
            cfg.trainable,
        )
        metrics = {
            "loss": _mean(torch.stack(losses).mean()),
            "flow_loss": _mean(torch.stack(flows).mean()),
            "router_loss": _mean(torch.stack(routers).mean()),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "samples_per_s": samples * self.world / seconds,
            "tokens_per_s": tokens * self.world / seconds,
            "peak_memory_gib": _peak_memory_gib(self.device),
            "step_seconds": seconds,
            "data_wait_seconds": data_seconds,  # of which waiting for the next batch
        }
        if self.peak:
            metrics["mfu"] = flops / seconds / self.peak
        if cfg.astra.model.actions.routing == "learned":
            for e, share in enumerate(torch.stack(usage).mean(0).tolist()):
                metrics[f"expert_usage_{e}"] = share
        return metrics

    # ------------------------------------------------------------------ evaluation and samples

    def val_loss(self) -> dict[str, float]:
        """Fixed-sigma loss over every held-out sample (one per held-out clip), batched by packed shape
        in groups of at most ``batch_size``; the mean over samples. Also the same loss with the actions
        nulled, and ``val_action_gain`` = that minus ``val_loss``: how much the actions tell the model
        about the chunk (0 for a model that ignores them, as a fresh adapter does; the first number to
        watch when a fine-tune does not follow actions)."""
        if not self.val:
            return {}
        self.model.eval()
        groups: dict[tuple, list] = {}
        for sample in self.val:
            groups.setdefault(sample.shape_key(self.config), []).append(sample)
        total, null, count = 0.0, 0.0, 0
        for same in groups.values():
            for i in range(0, len(same), self.config.batch_size):
                part = same[i : i + self.config.batch_size]
                target, inputs = collate(part, self.prompts.get([s.prompt_key for s in part]), self.config)
                target, inputs = target.to(self.device), inputs.to(self.device, torch.float32)
                total = total + fixed_sigma_loss(self.model, target, inputs) * len(part)
                null = null + fixed_sigma_loss(self.model, target, inputs.without_actions()) * len(part)
                count += len(part)
        per_sigma, loss, null_loss = total / count, _mean(total.mean() / count), _mean(null.mean() / count)
        return {"val_loss": loss, "val_loss_no_actions": null_loss, "val_action_gain": null_loss - loss} | {
            f"val_loss_sigma_{i}": float(v) for i, v in enumerate(per_sigma)
        }

    def sample_video(self, folder: Path) -> Path | None:
        """Roll the model out from a held-out clip's start frame under its real actions; rank 0 writes
        generated | ground truth side by side as an MP4 (every rank runs the forwards: FSDP)."""
        from astra.rollout import RolloutSession, generate_chunk

        cfg, store = self.config, self._store()
        if cfg.stage == "pretrain":  # no history, no actions: nothing to roll out
            return None
        t = cfg.astra.model.framepack.target_frames
        record = None
        for cid in self.plan.val_ids:
            r = store.get(cid, self.plan.encode_hash)
            if (
                r is not None
                and r.latents.shape[1] >= 1 + t
                and (record is None or r.latents.shape[1] > record.latents.shape[1])
            ):
                record = r
        if record is None:
            return None
        chunks = min(cfg.sample_chunks, (record.latents.shape[1] - 1) // t)
        raw_dim = cfg.astra.model.actions.modality(record.modality).raw_dim
        prompt = self.prompts.get([record.prompt_key])[record.prompt_key]
        session = RolloutSession.start(
            "sample", record.modality, record.latents[:, :1].float(), prompt, raw_dim, seed=cfg.seed
        )
        self.model.eval()
        for k in range(chunks):
            rows = (
                record.actions[1 + k * t : 1 + (k + 1) * t] if record.has_actions else torch.zeros(t, raw_dim)
            )
            session, _ = generate_chunk(self.model, session, rows.float(), cfg.astra)
        if self.rank != 0:
            return None
        from astra.data.video import encode_mp4
        from astra.model.vae import WanVAE, video_to_frames

        vae = WanVAE.from_config(cfg.astra.vae).eval()
        n = session.history.shape[1]
        generated = video_to_frames(vae.decode(session.history[None]))[0]
        truth = video_to_frames(vae.decode(record.latents[None, :, :n].float()))[0]
        path = folder / f"sample-step{self.step:07d}.mp4"
        encode_mp4(torch.cat([generated, truth], dim=2).numpy(), path, fps=16.0)
        return path

    # ------------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self, metrics: dict) -> None:
        positions = [None] * self.world
        if dist.is_initialized():
            dist.all_gather_object(positions, self.stream_position())
        else:
            positions = [self.stream_position()]
        state = {
            "step": self.step,
            "positions": positions,
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
        }
        with tempfile.TemporaryDirectory() as folder:
            ckpt.save(folder, self.model, self.optimizer, state, self.rank, self.config.trainable)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def stream_position(self) -> dict:
        return self.consumed.to_dict()

    def export(self, folder: Path) -> Path | None:
        """The consolidated adapter (safetensors + config) on rank 0 — when pretraining, the backbone as a
        diffusers Wan folder (a collective on every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if dist.is_initialized():
            full_state = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            full_state = None
        if self.rank != 0:
            return None
        if full_state is not None:
            # the frozen weights must have come through training bitwise unchanged: check, and say so
            initial = self.full.state_dict()
            frozen = [k for k in initial if not is_trainable(k, self.config.trainable)]
            self.frozen_unchanged = all(
                torch.equal(initial[k], full_state[k].to(initial[k].dtype)) for k in frozen
            )
            self.full.load_state_dict(full_state)
        if self.config.stage == "pretrain":
            return save_wan(self.full, folder)
        return save_astra(self.full, folder, adapter_only=True, patterns=self.config.trainable)


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker function (``TorchTrainer(train_loop, train_loop_config=...)``)."""
    config: TrainConfig = loop_config["config"]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from astra.runtime import quiet_ray_logs

    quiet_ray_logs()
    worker = Worker(config, loop_config["plan"], loop_config["tags"])
    if worker.step >= config.max_steps and _exported(worker):  # a finished run re-run: nothing to do
        return
    if worker.rank == 0 and worker.step == 0:
        counts = count_params(worker.full)
        worker.tracker.metrics({"params_trainable": counts.trainable, "params_total": counts.total}, 0)
    scratch = Path(tempfile.mkdtemp(prefix="astra-train-"))
    while worker.step < config.max_steps:
        _maybe_fail(config, worker)
        metrics = worker.train_step()
        step, last = worker.step, worker.step == config.max_steps
        if step % config.eval_every == 0 or last:
            metrics |= worker.val_loss()
        if step % config.sample_every == 0 or last:
            video = worker.sample_video(scratch)
            if video is not None:
                worker.tracker.artifact(video, "samples")
        metrics["step"] = step
        if worker.tracker is not None and (step % config.log_every == 0 or last or "val_loss" in metrics):
            worker.tracker.metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        if step % config.checkpoint.every_steps == 0 or last:
            worker.save_checkpoint(metrics)
        elif step % config.log_every == 0:
            ray.train.report(metrics)
    exported = worker.export(scratch / export_name(config))
    if worker.rank == 0:
        unchanged = getattr(worker, "frozen_unchanged", None)
        if unchanged is not None:
            worker.tracker.client.set_tag(
                worker.tracker.run_id, "astra.frozen_unchanged", str(unchanged).lower()
            )
        worker.tracker.artifact(exported, "export")
        register = config.tracking.register_as and config.stage == "finetune"  # an adapter to serve
        uri = worker.tracker.register(exported) if register else None
        if uri:
            worker.tracker.client.set_tag(worker.tracker.run_id, "astra.registered_model", uri)
        worker.tracker.client.set_tag(worker.tracker.run_id, "astra.exported", "true")
        worker.tracker.finish()


def export_name(config: TrainConfig) -> str:
    """The exported folder's name under the run's ``export`` artifacts: ``runs:/<id>/export/<name>``."""
    return "wan" if config.stage == "pretrain" else "adapter"


def _exported(worker: Worker) -> bool:
    """Whether this run's export (adapter artifact + registration) completed; a run that died after its
    last checkpoint but before that redoes only the export when re-run. Rank 0 asks MLflow, all agree."""
    done = [False]
    if worker.tracker is not None:
        tags = worker.tracker.client.get_run(worker.tracker.run_id).data.tags
        done = [tags.get("astra.exported") == "true"]
    if dist.is_initialized():
        dist.broadcast_object_list(done, src=0)
    return done[0]


def _maybe_fail(config: TrainConfig, worker: Worker) -> None:
    """Fault injection (``fail_at_step``): the last rank dies once, the first time it reaches the step."""
    if (
        config.fail_at_step is None
        or worker.step + 1 != config.fail_at_step
        or worker.rank != worker.world - 1
    ):
        return
    from astra.data.storage import write_atomic

    fs, root = config.storage()
    marker = f"{root}/{config.run_name}/fault-injected"
    if fs.get_file_info(marker).type.name != "NotFound":
        return
    write_atomic(fs, marker, b"1")
    os._exit(1)
