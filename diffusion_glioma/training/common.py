"""What every training loop here shares: run folders, data order, checkpoints, figures."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, Sampler

from ..errors import DiffusionGliomaError, first_line
from ..io import atomic_path, chmod_like_open

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
PREPARE_TIMEOUT_HOURS = 12


class TrainingError(DiffusionGliomaError):
    """Training cannot go on (diverged, incompatible checkpoint, run folder in use)."""


class StepSampler(Sampler):
    """Dataset indices for a run, as a pure function of (seed, position in the run).

    Epoch e visits the cases in a permutation seeded by (seed, e). Starting at `start` (in samples,
    counted over all processes) gives exactly the indices the uninterrupted run would have drawn,
    which is what makes resume exact without saving data-loader state.
    """

    def __init__(self, num_cases: int, seed: int, start: int, count: int):
        self.num_cases, self.seed, self.start, self.count = num_cases, seed, start, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        epoch, permutation = -1, None
        for k in range(self.start, self.start + self.count):
            e, position = divmod(k, self.num_cases)
            if e != epoch:
                epoch = e
                permutation = torch.randperm(self.num_cases, generator=torch.Generator().manual_seed(
                    self.seed * 100_003 + e)).tolist()
            yield permutation[position]


def step_generator(device: torch.device, seed: int, micro_step: int, process: int) -> torch.Generator:
    """The random stream of one micro-step on one process (noise, timesteps, class dropout). Torch's
    global generator (dropout layers) is reseeded from the same numbers, so that nothing random
    depends on what happened before the step: a resumed run draws exactly what the first run drew."""
    step_seed = (seed * 1_000_003 + micro_step) * 64 + process
    torch.manual_seed(step_seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed)
    return generator


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


TRAINED_SECONDS = "trained_seconds.json"


class TrainingClock:
    """Wall-clock spent training, carried across resumes: each checkpoint records it
    (`trained_seconds.json`), so a wall-clock budget and steps per second count the whole run."""

    def __init__(self, resumed_from: Path | None = None):
        before = 0.0
        record = resumed_from / TRAINED_SECONDS if resumed_from is not None else None
        if record is not None and record.is_file():
            try:
                before = float(json.loads(record.read_text())["seconds"])
            except (ValueError, KeyError, TypeError):
                before = 0.0  # a damaged record: count from here rather than refuse the checkpoint
        self._started = time.perf_counter() - before

    def seconds(self) -> float:
        return time.perf_counter() - self._started


def save_checkpoint(accelerator, folder: Path, step: int, total_limit: int, clock: TrainingClock | None = None) -> Path:
    """`accelerator.save_state` into a temporary folder renamed into place, then prune old ones."""
    target = folder / f"checkpoint-{step}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".checkpoint-{step}.partial"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        chmod_like_open(tmp)
        if clock is not None:
            (tmp / TRAINED_SECONDS).write_text(json.dumps({"seconds": clock.seconds()}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for _, old in checkpoints(folder)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator, path: Path) -> None:
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # torch, safetensors and accelerate raise many kinds
        reason = first_line(exc)
        raise TrainingError(f"{path}: checkpoint cannot be loaded into this model ({reason}); "
                            "it is damaged or was made with another config") from None


def write_run_config(output_dir: Path, config, resume: bool) -> None:
    """Keep the resolved config beside the run; resuming with a different one is refused."""
    path = output_dir / "config.yaml"
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if path.is_file() and resume:
        previous = yaml.safe_load(path.read_text())
        try:  # through today's config class: a setting added since the run began takes its default
            previous = json.loads(type(config).model_validate(previous).model_dump_json())
        except ValueError:
            pass  # a config this version cannot read: compared as written, so refused below
        current = yaml.safe_load(text)
        for settings in (previous, current):
            for key in ("steps", "max_minutes"):
                settings.get("optim", {}).pop(key, None)
        if previous != current:
            raise TrainingError(f"{path}: the run was started with another config; resume with the same one "
                                "(only optim.steps and optim.max_minutes may change) or start a new output_dir")
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def effective_mixed_precision(asked: str) -> str:
    """bf16 autocast on a CPU without native bf16 (AVX-512 BF16 or AMX) is emulated: measured 36x
    slower than fp32 on an AMD EPYC here, while 2x faster on a CPU that has it (docs/benchmarks.md).
    A config written on one machine should not crawl on another, so such a run trains in fp32."""
    from ..precision import fast_bf16

    if asked == "bf16" and not torch.cuda.is_available() and not fast_bf16("cpu"):
        warnings.warn("optim.mixed_precision bf16: this CPU has no native bf16 (emulated bf16 is ~36x slower "
                      "here); training in fp32 instead", stacklevel=2)
        return "no"
    return asked


def start_run(config, resume: bool):
    """The Accelerator, the run folder (refused without `resume` when it holds checkpoints), the
    resolved config beside it, the seed, and the prepared data."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

    output_dir = Path(config.output_dir)
    if config.optim.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(
        mixed_precision=effective_mixed_precision(config.optim.mixed_precision),
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        log_with=choose_tracker(config.tracker),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dynamo_backend="inductor" if config.optim.compile else "no",
        # The other processes wait while the main one prepares a raw folder (hours for BraTS-GLI on
        # few cores); NCCL's default 10-minute timeout would end the run.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=PREPARE_TIMEOUT_HOURS))],
    )
    existing = checkpoints(output_dir / "checkpoints")
    if existing and not resume:
        raise TrainingError(f"{output_dir}: holds checkpoints up to step {existing[-1][0]}; pass --resume to "
                            "continue the run, or choose another output_dir")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(output_dir, config, resume)
    set_seed(config.seed)
    prepare_data(config, accelerator)
    return accelerator


def prepare_data(config, accelerator) -> None:
    """Prepare `data.raw` into `data.cache` on the main process (resumable), others wait."""
    if config.data.raw is not None and accelerator.is_main_process:
        from ..config import DataConfig, load_config
        from ..data.cache import prepare_dataset

        data_config = load_config(DataConfig, config.data.config) if config.data.config else DataConfig()
        prepare_dataset(config.data.raw, config.data.cache, data_config, progress=True,
                        workers=config.data.prepare_workers)
    accelerator.wait_for_everyone()



def stop_if_diverged(accelerator, losses: dict, step: int, output_dir: Path) -> None:
    """Stop on a NaN or infinite loss on any process, naming the last good checkpoint."""
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()]).float().min().reshape(1)
    if accelerator.gather(finite).min() < 1:
        kept = checkpoints(output_dir / "checkpoints")
        last = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
        values = ", ".join(f"{name} became {float(v.detach())}" for name, v in losses.items())
        raise TrainingError(f"{values} at step {step + 1}; {last}. Lower the learning rate, or use bf16 "
                            "rather than fp16")


def check_ranks_agree(accelerator, model, output_dir: Path, step: int) -> None:
    """Data parallelism keeps one model on every process; a process whose weights drifted (a skipped
    all-reduce, a non-deterministic op outside DDP) would train something else unnoticed. Each
    process records a fingerprint of its weights in `logs/weights_rank<r>.json`, and the run stops
    if they differ."""
    unwrapped = accelerator.unwrap_model(model)
    total = torch.stack([p.detach().double().sum() for p in unwrapped.parameters()]).sum()
    squares = torch.stack([p.detach().double().square().sum() for p in unwrapped.parameters()]).sum()
    fingerprint = torch.stack([total, squares]).reshape(1, 2)
    path = output_dir / "logs" / f"weights_rank{accelerator.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, "sum": float(total), "sum_of_squares": float(squares)}))
    every = accelerator.gather(fingerprint)
    if not torch.equal(every, every[:1].expand_as(every)):
        raise TrainingError(f"the processes' weights differ at step {step} ({every.tolist()}); data-parallel "
                            "training is out of step: check that every process runs the same code and config")


def collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([i["image"] for i in items]),
        "labels": torch.stack([i["labels"] for i in items]),
        "disease": torch.stack([i["disease"] for i in items]),
        "case_id": [i["case_id"] for i in items],
    }


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def choose_tracker(asked: str) -> str | None:
    """The accelerate tracker for `tracker:` (auto: TensorBoard when installed). A tracker that is
    asked for and not installed is a warning, not silence; logs/metrics.jsonl is written either way."""
    import importlib.util

    if asked == "none":
        return None
    wanted = "tensorboard" if asked == "auto" else asked
    if importlib.util.find_spec(TRACKER_PACKAGES[wanted]) is None:
        warnings.warn(f"tracker {wanted}: not installed (pip install {TRACKER_PACKAGES[wanted]}); logging to "
                      "logs/metrics.jsonl only" + ("; set tracker: none to silence this" if asked == "auto" else ""),
                      stacklevel=2)
        return None
    return wanted


def flat_config(config) -> dict:
    """The whole config as dotted keys with scalar values (what TensorBoard's hparams accept)."""
    out = {}

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            out[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config.model_dump(mode="json"))
    return out


def start_trackers(accelerator, config, project: str) -> None:
    if accelerator.is_main_process:
        accelerator.init_trackers(project, config=flat_config(config))


def log_figure(accelerator, path: Path, step: int, name: str = "validation") -> None:
    """A written PNG figure to every tracker that takes images."""
    if not accelerator.is_main_process or not accelerator.trackers or not Path(path).is_file():
        return
    from matplotlib.image import imread

    image = (imread(str(path))[..., :3] * 255).astype("uint8")  # (h, w, 3)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step=step)




def training_facts(config, index: dict, dataset, steps_done: int) -> dict:
    """What a trained pipeline folder records about its training (`training.json`); `steps` is the
    optimizer steps taken, fewer than `optim.steps` when a wall-clock budget stopped the run."""
    seen = {v for e in dataset.entries for v in e.get("labels_present", [])}
    if not seen:  # a cache made before label lists were recorded: look at the cases
        seen = {int(v) for i in range(len(dataset)) for v in dataset[i]["labels"].unique().tolist()}
    trained = {e["disease"] for e in dataset.entries}
    finetune = getattr(config, "finetune", None)
    if finetune is not None:  # what the source learnt is still in the weights
        trained |= set(trained_classes(finetune.source, []))
    return {"config": config.model_dump(mode="json"), "label_scheme": index["labels"], "labels_seen": sorted(seen),
            "cases": dataset.case_ids, "disease_classes_trained": sorted(trained), "steps": steps_done}


def trained_classes(source: str, classes: list[str]) -> list[str]:
    """The disease classes of a pipeline folder that saw data in its training run (`training.json`).
    A folder without that record (an older run) counts every declared class as trained."""
    from ..hub import fetch_model

    facts = fetch_model(source).path / "training.json"  # a hub id: the snapshot load_pipeline downloaded
    if not facts.is_file():
        return list(classes)
    record = json.loads(facts.read_text())
    return list(record.get("disease_classes_trained", classes))



def ema_copy(model, ema):
    """A copy of a (diffusers) model carrying the EMA weights; the training model is untouched."""
    copy = type(model).from_config(model.config)
    copy.load_state_dict(model.state_dict())
    if ema is not None:
        ema.copy_to(copy.parameters())
    return copy.to(model.device).eval()


def with_classes(model, classes: list[str], trained: list[str]):
    """The same network (any model with a `class_embedding` and `disease_classes` in its config) with
    the classes `classes`; every disease class that never saw data (new
    here, or declared by the source run but not trained) starts from the mean embedding of the
    diseases that did, so fine-tuning begins from "a tumour of some kind" rather than from noise.
    "none" (index 0) keeps its own row: it was trained by class dropout."""
    old_classes = list(model.config.disease_classes)
    extended = type(model).from_config({**model.config, "disease_classes": tuple(classes)})
    state = model.state_dict()
    old = state["class_embedding.weight"]
    seen = [i for i, name in enumerate(old_classes) if i > 0 and name in trained]
    start = old[seen].mean(dim=0) if seen else old[0]
    rows = [old[old_classes.index(name)] if name in old_classes and (i == 0 or name in trained) else start
            for i, name in enumerate(classes)]
    state["class_embedding.weight"] = torch.stack(rows)
    extended.load_state_dict(state)
    return extended


def source_drift(model, source_weights: dict) -> torch.Tensor:
    """Mean over every weight of (theta - theta_source)^2: what the L2-SP penalty multiplies."""
    params = dict(model.named_parameters())
    penalty = sum(((params[k] - w) ** 2).sum() for k, w in _prefixed(source_weights, params).items())
    return penalty / sum(w.numel() for w in source_weights.values())


def _prefixed(weights: dict, params: dict) -> dict:
    """Match source weight names to (possibly DDP-wrapped, `module.`-prefixed) parameter names."""
    out = {}
    for name in params:
        key = name[len("module."):] if name.startswith("module.") else name
        if key in weights:
            out[name] = weights[key]
    return out


def budget_spent(accelerator, config, step: int, clock: TrainingClock) -> bool:
    """Whether the run has trained `optim.max_minutes` of wall-clock (resumes included), asked at log
    steps only (the loops keep the host from waiting on the device in between); the answer is agreed
    across processes (any one over the budget stops all), so all stop at the same step."""
    if config.optim.max_minutes is None or step % config.log_every:
        return False
    spent = torch.tensor(float(clock.seconds() >= 60 * config.optim.max_minutes), device=accelerator.device)
    return bool(accelerator.reduce(spent, reduction="max") > 0)


def step_bookkeeping(accelerator, config, step: int, output_dir: Path, progress, make_logs, validate,
                     postfix: tuple[str, ...], clock: TrainingClock) -> bool:
    """What the baseline loops do after every step: logs (trackers and logs/metrics.jsonl) every
    `log_every` steps, a checkpoint every `checkpoints.every`, a validation figure every
    `validation.every` (`validate(path)`), and always at the last step, which is also the step at
    which the wall-clock budget ran out (then it returns True: stop). `make_logs` is only called when
    a log is due (some logs cost a forward pass)."""
    out_of_time = budget_spent(accelerator, config, step, clock)
    last = step == config.optim.steps or out_of_time
    if step % config.log_every == 0 or last:
        logs = make_logs()
        accelerator.log(logs, step=step)
        if accelerator.is_main_process:
            with (output_dir / "logs" / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
        progress.set_postfix({key: f"{logs[key]:.4f}" for key in postfix})
    if step % config.checkpoints.every == 0 or last:
        save_checkpoint(accelerator, output_dir / "checkpoints", step, config.checkpoints.total_limit, clock)
    if (step % config.validation.every == 0 or last) and accelerator.is_main_process:
        figure = output_dir / "validation" / f"step-{step:07d}.png"
        validate(figure)
        log_figure(accelerator, figure, step)
    return out_of_time


def rewind_log(path: Path, key: str, last: int) -> None:
    """Keep the lines of a JSON-lines log up to `last` (by `key`) and drop the rest: a resumed run
    repeats the steps after its checkpoint, and a killed one can leave a half-written last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)[key] <= last:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def resume_and_loader(accelerator, config, dataset, existing: list):
    """(step, data loader, clock) for the baseline loops: the newest of `existing` checkpoints restored
    (none: step 0), the loader that serves exactly the batches of the remaining steps, in the order an
    uninterrupted run would have seen them, and the training clock carried on from the checkpoint."""
    step, path = 0, None
    if existing:
        step, path = existing[-1]
        load_checkpoint(accelerator, path)
        accelerator.print(f"resumed from {path} (step {step})", file=sys.stderr)
    if accelerator.is_main_process:
        rewind_log(Path(config.output_dir) / "logs" / "metrics.jsonl", "step", step)
    per_step = config.optim.batch_size * accelerator.num_processes
    loader = accelerator.prepare_data_loader(DataLoader(
        dataset, batch_size=config.optim.batch_size, num_workers=config.data.num_workers, collate_fn=collate,
        sampler=StepSampler(len(dataset), config.seed, step * per_step, max(config.optim.steps - step, 0) * per_step)))
    return step, loader, TrainingClock(path)
