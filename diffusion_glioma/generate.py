"""Synthetic datasets from a folder of masks: the job users run most.

    diffusion-glioma generate --model runs/demo/pipeline --masks MASKS --out OUT --format nnunet --per-mask 4

Every mask is read in its own layout, mapped to the common scheme, put on the model's grid, sampled
K times, and each volume is written back on the exact grid and affine of its mask. One output is
one (mask, k) pair; its files are written under temporary names and renamed, and its manifest
record is written last, so an output is done exactly when its record exists. Re-running skips the
done ones, redoes the partial ones and deletes the temporaries a killed run left; an output's name
depends on its own mask and draw only, so a grown mask folder adds outputs and renames none. Under
`accelerate launch` the masks are split between processes and each output is owned by exactly one of
them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, nnunet
from .config import PreprocessConfig
from .data.layouts import SEG, Case, Layout, discover_cases, write_label_schemes
from .data.preprocess import GeometryRecord, check_tumour_inside, load_case, plan_geometry, to_model, to_source
from .errors import DataError, DiffusionGliomaError
from .figures import FigureRow, axial_row, to_ras, write_draws_figure, write_slices_figure
from .io import is_temporary, load_volume, remove_stale_temporaries, save_volume, write_json, write_text
from .provenance import read_sources
from .pipeline import load_pipeline
from .precision import resolve_dtype
from .labels import (BACKGROUND, COMMON_LABELS, HEAD, SCHEMES,
                     add_head, get_scheme)

FORMATS = ("pairs", "brats", "nnunet")
BRATS_WRITTEN_SCHEMES = {"brats_gli": "brats_gli", "brats_peds": "brats_peds_2024"}  # layout -> scheme written
SAMPLES_IN_FIGURE = 6
PLAIN_MASKS = Layout("masks", ((re.compile(r"(?P<case>[^/]+)"), SEG),), "common", "unknown",
                     "plain label maps in the common scheme, one file per case at the top of the folder")


@dataclass
class MaskJob:
    """One mask on the model grid, and how to go back."""

    case: Case
    labels_model: np.ndarray  # (x, y, z) common scheme on the model grid
    source_labels: np.ndarray  # the mask's own values on its own grid (written beside the volumes)
    source_common: np.ndarray  # common scheme on the source grid
    geometry: GeometryRecord
    disease: str


@dataclass(frozen=True)
class GenerateOptions:
    format: str = "pairs"
    per_mask: int = 1
    sampler: str = "dpm++"
    steps: int = 25
    guidance_scale: float = 1.0
    seed: int = 0
    batch_size: int = 1
    disease: str | None = None
    limit: int | None = None
    dataset_id: int = 501
    dataset_name: str = "SyntheticGlioma"
    precision: str = "auto"  # bf16 where the hardware has it (precision.resolve_dtype)
    revision: str | None = None  # a hub model's branch, tag or commit (recorded as the commit it resolved to)
    shard: tuple[int, int] | None = None  # (i, n): this job writes every n-th output from the i-th (job arrays)
    device: str | None = None  # default: this process's accelerator device, else the CPU


def find_masks(folder: str | Path, layout: str | Path | None = "auto", labels: str | dict | None = None) -> list[Case]:
    """Cases with a segmentation, in any supported layout; a folder of plain label maps (common scheme,
    or `labels` as a mapping) is read when no dataset layout matches."""
    folder = Path(folder)
    try:
        cases = discover_cases(folder, layout, labels=labels)
    except DataError:
        if layout not in (None, "auto", "masks"):
            raise
        cases = PLAIN_MASKS.discover(folder) if folder.is_dir() else []
        if not cases:
            raise
        if labels is not None:
            for case in cases:
                case.labels = labels
    with_masks = [c for c in cases if c.seg is not None]
    if not with_masks:
        raise DataError(f"{folder}: no masks found ({len(cases)} cases, none with a segmentation)")
    return with_masks


def load_mask(case: Case, preprocess: PreprocessConfig, known_labels: set[int], disease: str) -> MaskJob:
    """Read a mask, give it a head label, and put it on the model grid. Errors name the file."""
    seg = load_volume(case.seg, kind="label")
    scheme = get_scheme(case.labels)
    if not case.missing(preprocess.modalities):
        common = load_case(case, preprocess).labels  # the head from the images, and every grid check
    else:
        common = scheme.to_common(seg.array, case.seg)
        if case.head is not None:  # a head mask written beside the segmentation (augment-masks does)
            head_volume = load_volume(case.head, kind="label")
            if head_volume.shape != seg.shape or not np.allclose(head_volume.affine, seg.affine, atol=1e-3):
                raise DataError(f"{case.head}: head mask is not on the grid of {case.seg.name}")
            common = add_head(common, head_volume.array > 0)
        if not (common == HEAD).any():
            raise DataError(f"{case.seg}: the mask has no head label and the case has no "
                            f"{'/'.join(preprocess.modalities)} images to take the head from; add the images, "
                            "or give masks in the common scheme with the head as label 1")
    unknown = sorted(set(np.unique(common).tolist()) - known_labels)
    if unknown:
        names = [COMMON_LABELS[v] for v in unknown]
        raise DataError(f"{case.seg}: labels {names} were never seen by the model (it knows "
                        f"{[COMMON_LABELS[v] for v in sorted(known_labels)]})")
    head = common != BACKGROUND
    record = plan_geometry(seg.affine, seg.shape, head, tuple(preprocess.shape), tuple(preprocess.spacing),
                           seg.qform_code, seg.sform_code)
    check_tumour_inside(common, record, case)
    model_labels = to_model(common.astype(np.uint8), record, label=True)
    return MaskJob(case, model_labels, seg.array, common, record, disease)


def output_id(case_id: str, k: int) -> str:
    return f"{case_id}_syn{k:03d}"


def output_seed(seed: int, case_id: str, k: int) -> int:
    """Each output's seed depends on the run seed, its mask and k only (not on batching or processes)."""
    digest = hashlib.sha256(f"{seed}/{case_id}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def model_fingerprint(model_dir: Path) -> str:
    weights = Path(model_dir) / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        return "unknown"
    h = hashlib.sha256()
    with weights.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class Writer:
    """Where the files of one output go, for each format."""

    def __init__(self, out: Path, options: GenerateOptions, modalities: list[str], tumour_labels: list[int],
                 sources: dict[str, str] | None = None, brats_numbers: dict[str, int] | None = None):
        self.sources = sources or {}  # mask case id -> the real case it descends from (augment-masks' manifest)
        self.brats_numbers = brats_numbers or {}  # mask case id -> its BraTS case number (BRATS_NAMES)
        self.out, self.options, self.modalities = out, options, modalities
        self.nnunet_values = nnunet.label_values(tumour_labels)
        self.root = out / f"Dataset{options.dataset_id:03d}_{options.dataset_name}" if options.format == "nnunet" else out

    def files(self, case_id: str, k: int, disease: str) -> dict[str, Path]:
        fmt, oid = self.options.format, output_id(case_id, k)
        if fmt == "pairs":
            return {**{m: self.root / oid / f"{m}.nii.gz" for m in self.modalities},
                    "mask": self.root / oid / "mask.nii.gz"}
        if fmt == "brats":
            prefix = "PED" if disease.startswith("pediatric") else "GLI"
            # 9xxxx is never a real BraTS case number; the draw takes the time-point field, so a
            # patient-wise split keeps every draw of one mask together.
            name = f"BraTS-{prefix}-{90000 + self.brats_numbers[case_id]:05d}-{k:03d}"
            return {**{m: self.root / name / f"{name}-{m}.nii.gz" for m in self.modalities},
                    "mask": self.root / name / f"{name}-seg.nii.gz"}
        return {**{m: self.root / "imagesTr" / f"{oid}_{c:04d}.nii.gz" for c, m in enumerate(self.modalities)},
                "mask": self.root / "labelsTr" / f"{oid}.nii.gz"}

    def mask_array(self, job: MaskJob) -> np.ndarray:
        fmt = self.options.format
        if fmt == "pairs":
            return job.source_labels  # the source's own label values
        if fmt == "brats":
            scheme = SCHEMES[BRATS_WRITTEN_SCHEMES["brats_peds" if job.disease.startswith("pediatric") else "brats_gli"]]
            try:
                return scheme.from_common(job.source_common)
            except DataError as exc:
                raise DataError(f"{job.case.seg}: {exc}; use --format pairs or nnunet") from None
        return nnunet.to_nnunet(job.source_common, self.nnunet_values)

    def finish(self, records: list[dict]) -> None:
        if self.options.format != "nnunet":
            return
        nnunet.write_dataset_json(self.root, self.modalities, self.nnunet_values, len(records),
                                  self.options.dataset_name, "synthetic MRI from diffusion_glioma")


def generate_dataset(model_dir: str | Path, masks: str | Path, out: str | Path, options: GenerateOptions, *,
                     layout: str | Path | None = "auto", labels: str | dict | None = None, dry_run: bool = False,
                     progress: bool = True, pipeline=None) -> list[dict]:
    """Write the dataset; returns the manifest records of the outputs this process is responsible for
    (all of them when single-process)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if options.format not in FORMATS:
        raise DiffusionGliomaError(f"unknown format {options.format!r}; choose one of {list(FORMATS)}")
    if options.per_mask < 1 or options.batch_size < 1:
        raise DiffusionGliomaError("--per-mask and --batch-size must be at least 1")
    from .hub import fetch_model

    source = fetch_model(model_dir, options.revision)  # a hub model: downloaded once, then a local folder
    model_dir, out = source.path, Path(out)
    if pipeline is None:
        pipeline = load_pipeline(model_dir)
    limit = pipeline.max_steps
    if limit is None:  # the cGAN: one generator pass, no sampler
        options = replace(options, sampler="gan", steps=1, guidance_scale=1.0)
    elif not 1 <= options.steps <= limit:
        raise DiffusionGliomaError(f"--steps must be between 1 and {limit} for this model, got {options.steps}")
    pipeline.use_sampler(options.sampler)
    preprocess = pipeline.grid
    known = set(_labels_seen(model_dir)) | {BACKGROUND, HEAD}
    modalities = pipeline.modalities

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it
    device = torch.device(options.device) if options.device else state.device  # own GPU per process
    pipeline.to(device)
    # A plain cast (diffusers' `to(dtype)` warns about keep-in-fp32 lists these models do not have).
    torch.nn.Module.to(pipeline._model, resolve_dtype(options.precision, device))
    cases = find_masks(masks, layout, labels)
    sources = read_sources(masks)
    if options.limit is not None:
        cases = cases[: options.limit]
    if options.format == "brats" and options.per_mask > 1000:
        raise DiffusionGliomaError("--format brats names a draw by its 3-digit time point: at most 1000 per mask")
    tumour_labels = sorted(v for v in known if v not in (BACKGROUND, HEAD))
    # The model by its absolute path (for a hub model, its snapshot: training.json and all), so the
    # folder's provenance reads the same from any directory; a hub model also by id and commit.
    identity = {
        "generator": f"diffusion_glioma {__version__}", "model": str(model_dir.resolve()),
        "model_hub_id": source.hub_id, "model_revision": source.revision, "model_hash": model_fingerprint(model_dir),
        "masks": str(Path(masks).resolve()), "format": options.format, "sampler": options.sampler,
        "steps": options.steps, "guidance_scale": options.guidance_scale, "seed": options.seed,
        "per_mask": options.per_mask, "precision": str(pipeline._model.dtype).removeprefix("torch."),
    }
    shard, shards = options.shard or (0, 1)
    if not 0 <= shard < shards:
        raise DiffusionGliomaError(f"--shard {shard}/{shards}: the shard index must be between 0 and {shards - 1}")
    sharded = shards > 1
    _claim_output_folder(out, identity, state, dry_run, sharded)
    # A shard writes outputs and their records only; the folder-wide files (manifest, dataset.json,
    # BraTS names, the figure) come from the same command without --shard once all shards are done.
    numbers = (_brats_numbers(out, [c.case_id for c in cases], state, write=not dry_run and not sharded)
               if options.format == "brats" else {})
    writer = Writer(out, options, modalities, tumour_labels, sources, numbers)

    # Outputs in a fixed order; each worker (a process of a shard) takes every workers-th output, so 4
    # masks x 16 draws keep 8 GPUs busy, and each output has exactly one writer.
    plan = [(i, case, k) for i, case in enumerate(cases) for k in range(options.per_mask)]
    workers, worker = shards * state.num_processes, shard * state.num_processes + state.process_index
    mine = [entry for position, entry in enumerate(plan) if position % workers == worker]
    records_dir = out / ".records"
    todo, done = [], []
    for position, (i, case, k) in enumerate(mine):
        record = _read_record(records_dir / f"{output_id(case.case_id, k)}.json")
        if record is not None:
            done.append(record)
        else:
            todo.append((position // options.batch_size, i, case, k))
    if dry_run:
        for _, i, case, k in todo:
            disease = resolve_disease(case, options, pipeline.disease_classes)
            for path in writer.files(case.case_id, k, disease).values():
                print(path)
        print(f"{len(todo)} outputs to write, {len(done)} already done")
        return done

    jobs: dict[str, MaskJob] = {}
    bar = tqdm(total=len(todo), desc="generate", unit="volume", disable=not (progress and state.is_local_main_process))
    # Batches follow the fixed plan, so a resumed run batches (and so rounds) as the first run did.
    chunks: dict[int, list] = {}
    for chunk_id, i, case, k in todo:
        chunks.setdefault(chunk_id, []).append((i, case, k))
    for chunk in chunks.values():
        jobs = {case.case_id: jobs.get(case.case_id) or _mask_job(case, options, preprocess, known, pipeline)
                for _, case, _ in chunk}  # only the masks of this batch stay in memory
        batch_jobs = [jobs[case.case_id] for _, case, _ in chunk]
        began = time.perf_counter()
        generators = [torch.Generator().manual_seed(output_seed(options.seed, case.case_id, k)) for _, case, k in chunk]
        labels_batch = torch.from_numpy(np.stack([j.labels_model for j in batch_jobs]).astype(np.int64))
        volumes = pipeline(labels_batch, [j.disease for j in batch_jobs], guidance_scale=options.guidance_scale,
                           num_inference_steps=options.steps, generator=generators, progress=False).volumes
        seconds = (time.perf_counter() - began) / len(chunk)
        for (i, case, k), job, volume in zip(chunk, batch_jobs, volumes.cpu().numpy()):
            record = _write_output(writer, job, volume, k, options, identity, seconds)
            record["process"] = state.process_index
            write_json(records_dir / f"{output_id(case.case_id, k)}.json", record)
            done.append(record)
            bar.update(1)
    bar.close()

    state.wait_for_everyone()
    if sharded:
        if state.is_main_process:
            print(f"shard {shard}/{shards}: {len(done)} outputs done; when every shard has finished, run the same "
                  "command without --shard to write the manifest", file=sys.stderr)
        return done
    if state.is_main_process:
        all_records = [r for p in sorted(records_dir.glob("*.json")) if (r := _read_record(p)) is not None]
        with_order = sorted(all_records, key=lambda r: (r["case_id"], r["k"]))
        manifest = out / "manifest.jsonl"
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in with_order)
        write_text(manifest, text)
        writer.finish(with_order)
        if options.format == "brats":  # PED label values alone cannot say which release they follow
            write_label_schemes(out, BRATS_WRITTEN_SCHEMES)
        _samples_figure(out, with_order, writer.modalities, options)
    state.wait_for_everyone()
    return done


# Dataset naming that says which disease a mask comes from, for folders whose layout does not.
DISEASE_FROM_NAME = [
    (re.compile(r"BraTS-PED", re.IGNORECASE), "pediatric_diffuse_glioma"),
    (re.compile(r"BraTS-GLI|BraTS20\d\d_|UPENN-GBM|UCSF-PDGM", re.IGNORECASE), "glioblastoma"),
]
_told: set[str] = set()


def resolve_disease(case: Case, options: GenerateOptions, classes: list[str]) -> str:
    """`--disease`, else the layout's disease, else what the file name says (BraTS-GLI, BraTS 2021,
    UPENN-GBM, UCSF-PDGM: adult glioma; BraTS-PED: pediatric), else the model's unconditional class
    "none", said once on the console."""
    if options.disease:
        disease = options.disease
    elif case.disease not in (None, "", "unknown"):
        disease = case.disease
    else:
        name = f"{case.case_id} {Path(case.seg).name if case.seg else ''}"
        disease = next((d for pattern, d in DISEASE_FROM_NAME if pattern.search(name)), "none")
        if disease == "none" and "none" not in _told:
            _told.add("none")
            print(f"{case.seg}: the disease is not known from the layout or the name; sampling with the "
                  "model's unconditional class 'none' (pass --disease to choose one)", file=sys.stderr)
    if disease not in classes:
        raise DataError(f"{case.seg}: disease {disease!r} is not one of the model's classes "
                        f"{classes}; pass --disease with one of them")
    return disease


def _mask_job(case: Case, options: GenerateOptions, preprocess: PreprocessConfig, known: set[int],
              pipeline) -> MaskJob:
    return load_mask(case, preprocess, known, resolve_disease(case, options, pipeline.disease_classes))


def _samples_figure(out: Path, records: list[dict], modalities: list[str], options: GenerateOptions) -> None:
    """samples.png from the written files, whichever process or earlier run wrote them: two draws of each
    of the first masks side by side when there are several per mask, else one row per output. One
    volume is read at a time and one axial slice of it kept."""
    chosen: dict[str, list[dict]] = {}
    for record in records:
        case_id = record["case_id"]
        if record["k"] < min(options.per_mask, 2) and (case_id in chosen or len(chosen) < SAMPLES_IN_FIGURE):
            chosen.setdefault(case_id, []).append(record)
    rows = {case_id: [_figure_row(out, r, modalities, options.per_mask) for r in group]
            for case_id, group in chosen.items()}
    title = f"{options.sampler} {options.steps} steps, guidance {options.guidance_scale:g}"
    pairs = [tuple(group) for group in rows.values() if len(group) == 2]
    if pairs:
        write_draws_figure(out / "samples.png", pairs, modalities, title=title)
    elif rows:
        write_slices_figure(out / "samples.png", [group[0] for group in rows.values()], modalities, title=title)


def _figure_row(out: Path, record: dict, modalities: list[str], per_mask: int) -> FigureRow:
    seg = load_volume(record["source_mask"], kind="label")
    labels = to_ras(get_scheme(record["label_scheme"]).to_common(seg.array, record["source_mask"]), seg.affine)
    images = {}
    for modality in modalities:
        volume = load_volume(out / record["files"][modality])
        images[modality] = to_ras(volume.array, volume.affine)
    name = record["case_id"] if per_mask > 1 else record["output"]
    return axial_row(FigureRow(f"{name} ({record['disease']})", images, labels, value_range=(0.0, 1.0)))


def _write_output(writer: Writer, job: MaskJob, volume: np.ndarray, k: int, options: GenerateOptions,
                  identity: dict, seconds: float) -> dict:
    """Model-space volume in [-1, 1] -> [0, 1] on the mask's grid, background 0, float32."""
    oid = output_id(job.case.case_id, k)
    files = writer.files(job.case.case_id, k, job.disease)
    outside_head = job.source_common == BACKGROUND
    for channel, modality in enumerate(writer.modalities):
        image = to_source((volume[channel] + 1.0) / 2.0, job.geometry)
        image = np.clip(image, 0.0, 1.0)
        image[outside_head] = 0.0
        save_volume(files[modality], image, job.geometry.source_affine_array, qform_code=job.geometry.qform_code,
                    sform_code=job.geometry.sform_code)
    save_volume(files["mask"], writer.mask_array(job), job.geometry.source_affine_array,
                qform_code=job.geometry.qform_code, sform_code=job.geometry.sform_code, dtype=np.int16)
    return {
        "output": oid, "source_mask": str(job.case.seg), "case_id": job.case.case_id, "k": k,
        "derived_from": writer.sources.get(job.case.case_id, job.case.case_id),  # the real case, through augmentation
        "label_scheme": job.case.labels,
        "disease": job.disease, "seed": output_seed(options.seed, job.case.case_id, k),
        "model": identity["model"], "model_revision": identity["model_revision"], "model_hash": identity["model_hash"],
        "sampler": options.sampler,
        "steps": options.steps, "guidance_scale": options.guidance_scale, "precision": identity["precision"],
        "seconds": round(seconds, 3),
        "files": {name: str(path.relative_to(writer.out)) for name, path in files.items()},
    }


def _claim_output_folder(out: Path, identity: dict, state, dry_run: bool, sharded: bool = False) -> None:
    """An output folder holds one dataset: refuse one made with other settings or holding other files.
    The main process checks and writes the marker; the others check it after a barrier (no race)."""
    if state.is_main_process:
        _check_or_claim(out, identity, write=not dry_run, sharded=sharded)
    state.wait_for_everyone()
    if not state.is_main_process and not dry_run:
        _check_or_claim(out, identity, write=False, sharded=sharded)


def _check_or_claim(out: Path, identity: dict, write: bool, sharded: bool = False) -> None:
    marker = out / "generation.json"
    if marker.is_file():
        previous = json.loads(marker.read_text())
        # Known weights are the same model wherever they lie; the path decides only without a hash.
        where = ("model", "model_hub_id", "model_revision")
        compared = [k for k in identity if not (k in where and identity["model_hash"] != "unknown")]
        differing = sorted(k for k in compared if previous.get(k) != identity[k])
        if differing:
            raise DataError(f"{out}: holds a dataset generated with other settings ({', '.join(differing)}); "
                            "choose another --out")
        # What a killed run left can go, unless other shards may be writing now (the unsharded run that
        # writes the manifest clears it).
        if write and not sharded:
            remove_stale_temporaries(out)
        return
    others = [p for p in out.iterdir() if not is_temporary(p)] if out.exists() else []
    if others and not marker.is_file():  # (a shard starting beside this one may have claimed it just now)
        raise DataError(f"{out}: folder is not empty and holds no diffusion_glioma dataset; choose another --out")
    if write:
        _claim_exclusively(marker, identity)
    if marker.is_file():  # another shard's claim, with these settings or not
        _check_or_claim(out, identity, write=False)


def _claim_exclusively(marker: Path, identity: dict) -> None:
    """Write the folder's marker unless another job just did (shards of a job array start together):
    a hard link of a finished temporary either creates it whole or fails."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(identity, indent=2) + "\n"
    # A temporary's name as atomic_path gives it, unique across the nodes of a job array too.
    tmp = marker.with_name(f".{marker.stem}.tmp{os.getpid()}{secrets.randbelow(10**8):08d}{marker.suffix}")
    tmp.write_text(text)
    try:
        os.link(tmp, marker)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: an exclusive create instead
        try:
            with open(marker, "x") as f:
                f.write(text)
        except FileExistsError:
            pass
    finally:
        tmp.unlink()


def _read_record(path: Path) -> dict | None:
    """A finished output's record, or None: absent, a temporary, or unreadable (then it is removed and
    its output is redone, since the record is what marks an output as done)."""
    if is_temporary(path) or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and {"output", "case_id", "k", "files"} <= set(record):
            return record
    except ValueError:
        pass
    print(f"{path}: unreadable output record; that output is written again", file=sys.stderr)
    path.unlink(missing_ok=True)
    return None


BRATS_NAMES = "brats_names.json"


def _brats_numbers(out: Path, case_ids: list[str], state, write: bool) -> dict[str, int]:
    """{mask case id: BraTS case number}, kept in the output folder: a mask keeps its number when
    masks are added, and a new mask takes the next free one (in sorted order within a run)."""
    path = out / BRATS_NAMES
    # Every process assigns the same numbers from the same file (a rename makes it whole or absent).
    numbers: dict[str, int] = json.loads(path.read_text()) if path.is_file() else {}
    for case_id in sorted(set(case_ids) - set(numbers)):
        numbers[case_id] = max(numbers.values(), default=-1) + 1
    if max(numbers.values(), default=0) > 9999:
        raise DiffusionGliomaError(f"{out}: more than 10,000 masks do not fit BraTS' 5-digit case numbers")
    if write and state.is_main_process:
        write_json(path, numbers)
    state.wait_for_everyone()
    return numbers


def _labels_seen(model_dir: Path) -> list[int]:
    facts = Path(model_dir) / "training.json"
    if facts.is_file():
        seen = json.loads(facts.read_text()).get("labels_seen")
        if seen:
            return seen
    return list(COMMON_LABELS)
