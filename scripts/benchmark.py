"""Speed and memory of the denoiser: training step time and peak memory, sampling time and peak
memory per volume, and the wavelet transform.

    python scripts/benchmark.py train  --preset small --size 32 32 32 --batch 1
    python scripts/benchmark.py train  --preset medddpm --size 192 192 144 --precision bf16 --checkpointing
    python scripts/benchmark.py train  --preset wavelet --size 192 192 144 --precision bf16 --checkpointing
    python scripts/benchmark.py sample --preset small --size 32 32 32 --sampler ddim --steps 50
    python scripts/benchmark.py wavelet --size 192 192 144

`--wavelet` turns any preset into its wavelet-space variant (the `wavelet` preset is one already).

Needs only torch, diffusers and the package (no data: masks are synthetic), so it travels to a GPU
machine as is. Prints one JSON line per measurement and appends it to `--out` (JSON lines) if given.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext

import torch

from diffusion_glioma.models.unet3d import PRESETS, build_denoiser
from diffusion_glioma.pipeline import SAMPLERS, MaskToMRIPipeline, training_scheduler


def synthetic_batch(batch: int, size: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """A head-shaped label map with a tumour, so the one-hot input is realistic."""
    grids = torch.meshgrid(*[torch.linspace(-1, 1, n, device=device) for n in size], indexing="ij")
    r = torch.sqrt(sum(g ** 2 for g in grids))
    labels = torch.zeros(size, dtype=torch.long, device=device)
    labels[r < 0.85] = 1
    tumour = torch.sqrt((grids[0] - 0.3) ** 2 + grids[1] ** 2 + grids[2] ** 2)
    labels[tumour < 0.3] = 3
    labels[tumour < 0.2] = 4
    labels[tumour < 0.1] = 2
    labels = labels.expand(batch, *size).clone().to(torch.uint8)  # as the data loader ships them
    return torch.rand(batch, 4, *size, device=device) * 2 - 1, labels


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:  # CPU: the process's peak resident set (Linux reports KiB)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    except ImportError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(args, device):
    overrides = {"wavelet": True} if args.wavelet else {}
    model = build_denoiser(args.preset, **overrides).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def bench_train(args, device) -> dict:
    model = make_model(args, device)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = training_scheduler("v_prediction", value_range=model.value_range)
    volumes, labels = synthetic_batch(args.batch, tuple(args.size), device)
    x0 = model.encode(volumes)
    classes = torch.ones(args.batch, dtype=torch.long, device=device)
    scaler = torch.amp.GradScaler(enabled=args.precision == "fp16" and device.type == "cuda")
    forward = torch.compile(model) if args.compile else model
    times = []
    for i in range(args.warmup + args.repeats):
        sync(device)
        start = time.perf_counter()
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        with autocast(device, args.precision):
            prediction = forward(scheduler.add_noise(x0, noise, t), t, labels, classes).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), scheduler.get_velocity(x0, noise, t))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"seconds_per_step": sorted(times)[len(times) // 2], "volumes_per_second": args.batch / (sum(times) / len(times)),
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


@torch.no_grad()
def bench_sample(args, device) -> dict:
    model = make_model(args, device).eval()
    if args.precision != "fp32":
        # a plain cast: diffusers' `to` warns about keep-in-fp32 module lists this model does not have
        torch.nn.Module.to(model, torch.bfloat16 if args.precision == "bf16" else torch.float16)
    pipe = MaskToMRIPipeline(model, training_scheduler("v_prediction", value_range=model.value_range))
    pipe.use_sampler(args.sampler)
    pipe.to(device)
    _, labels = synthetic_batch(args.batch, tuple(args.size), device)
    times = []
    for i in range(args.warmup + args.repeats):
        sync(device)
        start = time.perf_counter()
        pipe(labels, 1, num_inference_steps=args.steps, guidance_scale=args.guidance,
             generator=torch.Generator(device=device).manual_seed(i), progress=False)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    return {"seconds_per_volume": median / args.batch, "seconds_per_batch": median}


def bench_wavelet(args, device) -> dict:
    """Forward + inverse 3D Haar transform of a 4-modality volume: ours against ptwt's, if installed."""
    from diffusion_glioma.models.wavelet import haar3d, inverse_haar3d

    volume = torch.rand(args.batch, 4, *args.size, device=device)

    def timed(fn) -> float:
        times = []
        for i in range(args.warmup + args.repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    result = {"seconds_ours": timed(lambda: inverse_haar3d(haar3d(volume)))}
    try:
        import ptwt
    except ImportError:
        return result
    flat = volume.flatten(0, 1)  # ptwt transforms the last three axes of (batch, x, y, z)
    result["seconds_ptwt"] = timed(lambda: ptwt.waverec3(ptwt.wavedec3(flat, "haar", level=1), "haar"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "sample", "wavelet"])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--size", type=int, nargs=3, default=[32, 32, 32])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (train)")
    parser.add_argument("--wavelet", action="store_true", help="the preset in wavelet space")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (train)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (sample)")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale; != 1 doubles the work")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="append the result as a JSON line to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    bench = {"train": bench_train, "sample": bench_sample, "wavelet": bench_wavelet}[args.what]
    try:
        result = bench(args, device)
    except torch.cuda.OutOfMemoryError:
        result = {"out_of_memory": 1}
    record = {
        "what": args.what, "preset": args.preset, "wavelet": args.wavelet or args.preset == "wavelet",
        "size": args.size, "batch": args.batch, "precision": args.precision, "checkpointing": args.checkpointing,
        "compile": args.compile, "channels_last": args.channels_last,
        **({"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance} if args.what == "sample" else {}),
        **{k: round(v, 4) for k, v in result.items()},
        "peak_memory_gib": round(peak_memory_gib(device) or float("nan"), 3),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
