"""Mask consistency, downstream utility and a synthetic-trained disease classifier, with a small in-package segmenter (MONAI's UNet,
Dice + BCE on the three BraTS regions, bf16 autocast where the CPU or GPU supports it). nnU-Net on the `generate --format nnunet` export is the
path for the real thing; this keeps the loop small, fast and repeatable.

- Mask consistency: a segmenter trained on the real training cases segments the synthetic volumes
  made from the held-out cases' masks (masks it never saw; a volume of a training mask would let it
  answer from memory); Dice against the mask each was conditioned on, per region. Beside it, a
  negative control: mean-fill volumes (each modality's mean inside the head) of the held-out cases,
  which have the right outline and no tumour appearance, and should score near 0.
- Utility: the same segmenter trained on (a) real, (b) synthetic, (c) real + synthetic, (d) half the
  real + synthetic, (e) that half of the real alone, each tested on held-out real cases (Dice and HD95
  per region). Synthetic volumes made from the held-out cases' masks are never trained on.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PreprocessConfig
from ..data.layouts import Case
from ..data.preprocess import prepare_case
from ..io import atomic_path, chmod_like_open
from ..labels import BRATS_REGIONS
from ..precision import fast_bf16
from ..provenance import check_no_leak
from .fidelity import inception_score, mean_and_sd

REGIONS = ("WT", "TC", "ET")
GRID = PreprocessConfig(shape=(32, 32, 32), spacing=(6.0, 6.0, 6.0))
# The coarsest grid on which ET is scored (a thin enhancing rim is a few mm); on a coarser one it is computed
# but not reported: at the study's 6 mm the rim is a voxel or two, and a segmenter trained on real cases reaches
# WT 0.91 and TC 0.87 at its plateau (12800 steps) while ET sits at 0.37-0.43 and then jumps to 0.74 +- 0.10
# at 25600, still rising (docs/results/segmentation_learning_curve_long.md): no budget a study affords scores it stably.
RESOLVES_RIM_MM = 3.0
SCHEDULES = ("constant", "poly")
# The power a ranking needs (below it the report says the study is indicative): test cases, training seeds.
POWERED_TEST_CASES, POWERED_SEEDS = 30, 5


def resolved_regions(spacing: tuple[float, ...]) -> tuple[str, ...]:
    """The regions a segmentation study on this grid reports: WT and TC always, ET from 3 mm down (on a
    coarser grid the segmenter learns the rim too slowly and unstably to score it)."""
    return REGIONS if max(spacing) <= RESOLVES_RIM_MM else ("WT", "TC")


def regions_of(labels: torch.Tensor) -> torch.Tensor:
    """(…, x, y, z) common labels -> (…, 3, x, y, z) float WT/TC/ET masks."""
    return torch.stack([torch.isin(labels, torch.tensor(BRATS_REGIONS[r])) for r in REGIONS], dim=-4).float()


def prepare_items(items, grid: PreprocessConfig = GRID) -> list[dict]:
    """Items (real or synthetic) on one small grid: image (c, x, y, z) in [-1, 1], common labels."""
    out = []
    for item in items:
        case = Case(item.item_id, dict(item.images), item.mask, item.labels or "common", item.disease or "unknown", "eval")
        prepared = prepare_case(case, grid)
        out.append({"id": item.item_id, "key": item.key, "source": item.source or item.key,
                    "image": torch.from_numpy(prepared.image),
                    "labels": torch.from_numpy(prepared.labels.astype(np.int64)), "disease": case.disease})
    return out


def prepare_segmented(items, grid: PreprocessConfig = GRID) -> list[dict]:
    """`prepare_items` of the items that have a mask and a label scheme (the ones a segmenter can use)."""
    return prepare_items([i for i in items if i.mask is not None and i.labels is not None], grid)


def _bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 (12x faster here) and on GPUs."""
    return fast_bf16("cuda" if torch.cuda.is_available() else "cpu")


def segmenter_network(in_channels: int) -> torch.nn.Module:
    """The study's segmenter, untrained: MONAI's UNet (16-32-64) with one sigmoid output per region."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=len(REGIONS), channels=(16, 32, 64),
                strides=(2, 2), num_res_units=1)


def train_segmenter(cases: list[dict], steps: int, seed: int = 0, batch_size: int = 2, *,
                    schedule: str = "constant", after_step=None) -> torch.nn.Module:
    """MONAI's UNet on the three regions; `after_step(step, model)`, if given, runs after each step
    (a learning curve reads the model there, in eval mode, without touching the training's RNG).
    `schedule`: "constant" learning rate, or "poly", nnU-Net's decay to 0 over `steps` ((1 - step/steps)^0.9)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"segmenter schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    from monai.losses import DiceLoss

    torch.manual_seed(seed)
    model = segmenter_network(cases[0]["image"].shape[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=0.9) if schedule == "poly" else None
    dice = DiceLoss(sigmoid=True)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, steps + 1):
        picks = torch.randint(len(cases), (batch_size,), generator=generator).tolist()
        image = torch.stack([cases[i]["image"] for i in picks])
        flips = [d for d in (2, 3, 4) if torch.rand(1, generator=generator) < 0.5]  # cheap augmentation
        target = regions_of(torch.stack([cases[i]["labels"] for i in picks]))
        if flips:
            image, target = image.flip(flips), target.flip(flips)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16()):
            logits = model(image).float()
        loss = dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if decay is not None:
            decay.step()
        if after_step is not None:
            model.eval()
            with torch.no_grad():
                after_step(step, model)
            model.train()
    return model.eval()


class TrainedModels:
    """The study's trained segmenters and classifiers, found again by what made them: a hash of the
    training tensors in order (dtype, shape and values of images and labels, diseases), the trainer's
    arguments (defaults included), its source, its untrained network, whether it trains in bf16, and
    the torch and MONAI versions. Kept in `folder` as safetensors when one is given, so an interrupted
    study, or one run again with another synthetic set, trains nothing it already has (the real regime
    and the half alone, shared by every set, above all); in memory otherwise. A change to code the
    trainer calls (the loss, say) is not in the key: start a new folder then."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = None if folder is None else Path(folder)
        self.memory: dict[str, torch.nn.Module] = {}
        self._trained: set[str] = set()  # keys this store trained; a second look-up of one is not a find
        self._found: set[str] = set()

    @property
    def trained(self) -> int:
        """How many distinct models this store trained."""
        return len(self._trained)

    @property
    def found(self) -> int:
        """How many distinct models it found trained before it (however often each was looked up)."""
        return len(self._found - self._trained)

    def key(self, trainer, untrained, cases: list[dict], arguments: dict) -> str:
        import monai

        bound = inspect.signature(trainer).bind(cases, **arguments)
        bound.apply_defaults()
        recipe = {name: value for name, value in bound.arguments.items() if name != "cases"}
        digest = hashlib.sha256(inspect.getsource(trainer).encode())
        digest.update(repr((sorted(recipe.items(), key=str), str(untrained()), _bf16(), torch.__version__,
                            monai.__version__)).encode())
        for case in cases:
            for tensor in (case["image"], case["labels"]):
                digest.update(f"{tensor.dtype} {tuple(tensor.shape)};".encode())
                digest.update(tensor.numpy().tobytes())
            digest.update(f"{case.get('disease')};".encode())
        return digest.hexdigest()[:32]

    def get(self, trainer, untrained, cases: list[dict], **arguments) -> torch.nn.Module:
        """`trainer(cases, **arguments)`, or the model it made before; `untrained()` is its network."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model, save_model

        key = self.key(trainer, untrained, cases, arguments)
        if key in self.memory:
            self._found.add(key)
            return self.memory[key]
        path = None if self.folder is None else self.folder / f"{key}.safetensors"
        if path is not None and path.exists():
            model = untrained()
            try:
                load_model(model, path)
                self._found.add(key)
                return model.eval()
            except (SafetensorError, RuntimeError, OSError):  # damaged outside this store: train it again
                pass
        model = trainer(cases, **arguments)
        self._trained.add(key)
        if path is None:
            self.memory[key] = model
        else:
            with atomic_path(path) as tmp:  # a killed write leaves no file under the model's name
                save_model(model, str(tmp))
                chmod_like_open(tmp)
        return model


def learning_curve(train: list[dict], test: list[dict], budgets: list[int], seed: int = 0,
                   spacing: tuple[float, ...] = GRID.spacing, schedule: str = "constant") -> list[dict]:
    """Dice per region (with its bootstrap 95% interval over test cases) on `test` of the segmenter
    trained on `train` for each budget (steps). At a constant learning rate one run is read at each
    budget: the score a run of that many steps would get (same seed, same batches). A decaying schedule
    ends at its budget, so each budget is a run of its own."""
    budgets = sorted(set(budgets))
    target = regions_of(torch.stack([c["labels"] for c in test]))
    curve = []

    def read(step, model):
        if step in budgets:
            scores = dice_and_hd95(predict(model, test), target, spacing, seed=seed)
            curve.append({"steps": step, **{region: scores[region]["dice"] for region in REGIONS},
                          **{f"{region}_ci95": scores[region]["dice_ci95"] for region in REGIONS}})

    if schedule == "constant":
        train_segmenter(train, budgets[-1], seed, after_step=read)
    else:
        for budget in budgets:
            model = train_segmenter(train, budget, seed, schedule=schedule)
            with torch.no_grad():
                read(budget, model)
    return curve


def plateau_budget(curve: list[dict], region: str = "WT", tolerance: float = 0.01) -> dict:
    """The smallest budget whose Dice is within `tolerance` of the plateau (the largest budget's), and
    whether the curve has reached one (its last two budgets within `tolerance` of each other)."""
    plateau = curve[-1][region]
    steps = next(point["steps"] for point in curve if point[region] >= plateau - tolerance)
    flat = len(curve) >= 2 and abs(curve[-1][region] - curve[-2][region]) <= tolerance
    return {"region": region, "tolerance": tolerance, "plateau": plateau, "steps": steps, "flat": flat}


@torch.no_grad()
def mean_filled(case: dict) -> dict:
    """The case with each modality replaced by its mean inside the head: the outline and nothing else."""
    head = case["labels"] > 0
    image = case["image"].clone()
    for channel in image:
        channel[head] = channel[head].mean()
    return {**case, "image": image}


def predict(model: torch.nn.Module, cases: list[dict]) -> torch.Tensor:
    return torch.cat([(torch.sigmoid(model(c["image"][None])) > 0.5).float() for c in cases])


# The BraTS challenge's HD95 for a region predicted empty where it exists, or predicted where it does
# not (the diagonal of its 240x240x155 1 mm volume).
EMPTY_HD95_MM = 373.13


def dice_and_hd95(prediction: torch.Tensor, target: torch.Tensor, spacing: tuple[float, ...], *,
                  bootstrap: int = 1000, seed: int = 0) -> dict:
    """Per region (WT/TC/ET), Dice and HD95 (mm) by the BraTS convention, averaged over every case,
    with bootstrap 95% intervals over cases.

    The convention: a region absent from both prediction and truth scores Dice 1 and HD95 0; absent
    from one of them, Dice 0 and HD95 373.13 mm. So false-positive enhancing tumour in an ET-free
    pediatric case costs what it costs in the challenge, and an empty prediction is not dropped."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    results = {}
    for r, region in enumerate(REGIONS):
        p, t = prediction[:, r:r + 1].float(), target[:, r:r + 1].float()
        p_any, t_any = p.flatten(1).any(dim=1), t.flatten(1).any(dim=1)
        dice = torch.zeros(len(t), dtype=torch.float64)
        hd95 = torch.full((len(t),), EMPTY_HD95_MM, dtype=torch.float64)
        both_empty = ~p_any & ~t_any
        dice[both_empty], hd95[both_empty] = 1.0, 0.0
        both = p_any & t_any
        if both.any():
            dice[both] = DiceMetric(include_background=True, reduction="none")(p[both], t[both]).flatten().double()
            hd95[both] = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
                p[both], t[both], spacing=list(spacing)).flatten().double()
        results[region] = {"dice": float(dice.mean()), "hd95": float(hd95.mean()),
                           "dice_ci95": bootstrap_interval(dice, bootstrap, seed),
                           "hd95_ci95": bootstrap_interval(hd95, bootstrap, seed),
                           "dice_per_case": dice.tolist(), "hd95_per_case": hd95.tolist(),
                           "n": len(t), "empty_truth": int((~t_any).sum()), "empty_predictions": int((~p_any & t_any).sum()),
                           "false_positives_on_empty": int((p_any & ~t_any).sum())}
    return results


def bootstrap_interval(values: torch.Tensor, resamples: int, seed: int) -> list[float]:
    """The 2.5 and 97.5 percentiles of the mean over cases resampled with replacement."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(values), (resamples, len(values)), generator=generator)
    means = values[picks].mean(dim=1)
    return [float(means.quantile(0.025)), float(means.quantile(0.975))]


def classifier_network(in_shape: tuple[int, ...], classes: int) -> torch.nn.Module:
    """The study's disease classifier, untrained: MONAI's Classifier (8-16-32)."""
    from monai.networks.nets import Classifier

    return Classifier(in_shape=in_shape, classes=classes, channels=(8, 16, 32), strides=(2, 2, 2))


def train_classifier(cases: list[dict], classes: list[str], steps: int, seed: int = 0) -> torch.nn.Module:
    """A small 3D CNN (MONAI's Classifier) that tells the disease from the four contrasts."""
    torch.manual_seed(seed)
    model = classifier_network(tuple(cases[0]["image"].shape), len(classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    targets = torch.tensor([classes.index(c["disease"]) for c in cases])
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(cases), (4,), generator=generator)
        image = torch.stack([cases[i]["image"] for i in picks.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16()):
            logits = model(image).float()
        loss = F.cross_entropy(logits, targets[picks])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def classification_scores(model: torch.nn.Module, cases: list[dict], classes: list[str]) -> dict:
    """Accuracy and balanced accuracy (the mean recall over the classes present)."""
    predicted = torch.cat([model(c["image"][None]).argmax(dim=1) for c in cases])
    return label_scores([classes[k] for k in predicted.tolist()], [c["disease"] for c in cases])


def label_scores(predicted: list[str], truth: list[str]) -> dict:
    """Accuracy and balanced accuracy (the mean recall over the classes present) of a baseline's labels."""
    recalls = [np.mean([p == k for p, t in zip(predicted, truth) if t == k]) for k in sorted(set(truth))]
    return {"accuracy": float(np.mean([p == t for p, t in zip(predicted, truth)])),
            "balanced_accuracy": float(np.mean(recalls)), "n": len(truth)}


def head_size_scores(train: list[dict], test: list[dict], classes: list[str]) -> dict | None:
    """The trivial baseline for the disease task: each test case gets the class whose training cases'
    mean head size (voxels inside the head) is nearest. A classifier that does no better has learnt
    nothing head size does not tell."""
    size = lambda c: float((c["image"] > -1).any(dim=0).sum())  # noqa: E731
    means = {k: np.mean([size(c) for c in train if c["disease"] == k]) for k in classes
             if any(c["disease"] == k for c in train)}
    if len(means) < 2:
        return None
    predicted = [min(means, key=lambda k: abs(means[k] - size(c))) for c in test]
    return label_scores(predicted, [c["disease"] for c in test])


def tumour_location(case: dict) -> np.ndarray:
    """Where the tumour sits in the head: its centre minus the head's, in units of the head's extent
    (sd of its voxel coordinates) per axis, the left-right axis folded (a left and a right tumour are
    the same place to a disease)."""
    head = (case["labels"] > 0).numpy()
    tumour = regions_of(case["labels"])[0].numpy() > 0
    if not tumour.any():
        return np.zeros(3)
    head_xyz, tumour_xyz = np.argwhere(head), np.argwhere(tumour)
    offset = (tumour_xyz.mean(axis=0) - head_xyz.mean(axis=0)) / head_xyz.std(axis=0).clip(min=1e-6)
    offset[0] = abs(offset[0])
    return offset


def tumour_location_scores(train: list[dict], test: list[dict], classes: list[str]) -> dict | None:
    """The baseline every mask-conditioned generator passes for free: each test case gets the class
    whose training cases' mean tumour location is nearest. A synthetic-trained classifier that does no
    better learnt only what the masks it copied already tell."""
    means = {k: np.mean([tumour_location(c) for c in train if c["disease"] == k], axis=0) for k in classes
             if any(c["disease"] == k for c in train)}
    if len(means) < 2 or not test:
        return None
    predicted = [min(means, key=lambda k: float(np.linalg.norm(means[k] - tumour_location(c)))) for c in test]
    return label_scores(predicted, [c["disease"] for c in test])


def classification_study(train_real: list[dict], train_synthetic: list[dict], test: list[dict], steps: int,
                         seed: int = 0, synthetic_test: list[dict] = (), store: TrainedModels | None = None) -> dict:
    """The disease classifier (glioblastoma vs pediatric diffuse glioma) in the regimes the research
    proposals use: real -> real (the reference), synthetic -> real, real + synthetic -> real, and
    real -> synthetic (a realism check: does the synthetic set carry the features that tell the
    diseases apart in real scans?), the last on `synthetic_test`, the synthetic volumes of the test
    cases' masks only: a volume of a training case's mask would be recognised by its tumour location.
    Head size alone cannot solve the task on the phantom (its brain volume depends on age, sex and
    individual variation, not on the disease); tumour location can, and every mask-conditioned
    generator copies it from its mask: the two baseline rows show how far each gets on these cases."""
    classes = sorted({c["disease"] for c in train_real + train_synthetic + test})
    if len(classes) < 2:
        return {"note": f"only one disease ({classes[0] if classes else 'none'}): no classification to test"}
    out = {"classes": classes, "regimes": {}}
    store = TrainedModels() if store is None else store
    untrained = lambda: classifier_network(tuple(train_real[0]["image"].shape), len(classes))  # noqa: E731
    trained = {}
    for name, cases in (("real", train_real), ("synthetic", train_synthetic),
                        ("real+synthetic", train_real + train_synthetic)):
        if len({c["disease"] for c in cases}) >= 2:  # a classifier needs both diseases in its training data
            trained[name] = store.get(train_classifier, untrained, cases, classes=classes, steps=steps, seed=seed)
    for regime, model, test_cases in (("real -> real", "real", test), ("synthetic -> real", "synthetic", test),
                                      ("real+synthetic -> real", "real+synthetic", test),
                                      ("real -> synthetic", "real", list(synthetic_test))):
        usable = model in trained and test_cases
        out["regimes"][regime] = classification_scores(trained[model], test_cases, classes) if usable else None
    out["regimes"]["head size only -> real"] = head_size_scores(train_real, test, classes)
    out["regimes"]["tumour location only -> real"] = tumour_location_scores(train_real, test, classes)
    if "real" in trained:  # the StyleGAN2 study's domain Inception score, under the real-trained classifier
        # Better is closer to the held-out real cases' score (not higher: above it, the synthetic set
        # tells the diseases apart more confidently than real scans do). Test-case masks only, as above.
        out["domain_inception_score"] = {
            "real (held out)": inception_score(predicted_probabilities(trained["real"], test)),
            "synthetic": inception_score(predicted_probabilities(trained["real"], list(synthetic_test)))
            if synthetic_test else None, "n_synthetic": len(synthetic_test)}
    return out


@torch.no_grad()
def predicted_probabilities(model: torch.nn.Module, cases: list[dict]) -> torch.Tensor:
    return torch.cat([torch.softmax(model(c["image"][None]).float(), dim=1) for c in cases])


def held_out_split(real: list[dict], synthetic: list[dict], seed: int, generator_cases: set[str] = frozenset()):
    """(test, train_real, train_synthetic), or a note saying why no honest split exists. A third of
    the real cases is held out, drawn only from cases outside the generator's training record; no
    real case or synthetic volume descending from a held-out case (through augmentation too) is
    trained on."""
    rng = np.random.default_rng(seed)
    unseen = [i for i in range(len(real)) if real[i]["source"] not in generator_cases]
    if not unseen:
        return (f"all {len(real)} real cases are in the generator's training record: no leak-free test set "
                "(evaluate against real cases the generator never trained on)")
    order = list(rng.permutation(unseen))
    test = [real[i] for i in order[: max(1, len(real) // 3)]]
    held_out = {c["source"] for c in test}
    train_real = [c for c in real if c["source"] not in held_out]
    if not train_real:
        return f"{len(real)} real cases are too few to hold some out for testing"
    train_synthetic = [c for c in synthetic if c["source"] not in held_out]
    check_no_leak({c["id"]: c["source"] for c in train_real + train_synthetic}, held_out, "segmentation study")
    return test, train_real, train_synthetic


def fixed_split(real: list[dict], synthetic: list[dict], test: list[dict], generator_cases: set[str] = frozenset()):
    """(test, train_real, train_synthetic) around a test set the user fixed (a separate folder of real
    cases), or a note saying why it is not leak-free: no real case or synthetic volume descending from
    a test case is trained on, and no test case may be in the generator's training record."""
    held_out = {c["source"] for c in test}
    seen = sorted(held_out & set(generator_cases))
    if seen:
        return (f"{len(seen)} of the {len(held_out)} test cases are in the generator's training record "
                f"(e.g. {seen[0]}): test on cases the generator never trained on")
    train_real = [c for c in real if c["source"] not in held_out]
    if not train_real:
        return f"all {len(real)} real cases are test cases: none left to train the real regime on"
    train_synthetic = [c for c in synthetic if c["source"] not in held_out]
    check_no_leak({c["id"]: c["source"] for c in train_real + train_synthetic}, held_out, "segmentation study")
    return list(test), train_real, train_synthetic


# The names of training_mixes, in the order of the nnU-Net export's dataset ids ("half real" came last).
MIXES = ("real", "synthetic", "real+synthetic", "half real+synthetic", "half real")
SYNTHETIC_MIXES = tuple(m for m in MIXES if "synthetic" in m)  # the mixes with a set's volumes: they rank sets
# The paired comparisons, as {real-only mix: the mixes paired with it}: every mix against all the real cases
# (can the volumes stand in for them? for the half alone: what losing half the real cases costs), and the half
# mix against its half alone (do the volumes help where half the real cases are missing? the scarce-data
# question the package is for).
PAIRED_WITH = {"real": MIXES[1:], "half real": ("half real+synthetic",)}


def paired_key(reference: str) -> str:
    """The results' key of the comparisons with `reference`: paired_to_real, paired_to_half_real."""
    return "paired_to_" + reference.replace(" ", "_")


def labelled_comparisons(block: dict) -> list[tuple[str, dict]]:
    """The comparisons of `PAIRED_WITH` a results block holds, as ("MIX - REFERENCE", per-region values)."""
    return [(f"{mix} - {reference}", values) for reference in PAIRED_WITH
            for mix, values in (block.get(paired_key(reference)) or {}).items()]


def check_regimes(regimes) -> None:
    """Refuse a training mix `training_mixes` does not make, before any work is done."""
    unknown = sorted(set(regimes or ()) - set(MIXES))
    if unknown:
        raise ValueError(f"segmentation regimes {', '.join(unknown)}: choose among {', '.join(MIXES)}")


def chosen_mixes(regimes) -> tuple[str, ...]:
    """The mixes a study trains for the `regimes` a user named (None: all): the real one always, and the
    half alone with the half mix, the comparisons that give each its meaning."""
    check_regimes(regimes)
    wanted = set(MIXES if regimes is None else regimes) | {"real"}
    if "half real+synthetic" in wanted:
        wanted.add("half real")
    return tuple(m for m in MIXES if m in wanted)


def training_mixes(train_real: list, train_synthetic: list, seed: int = 0) -> dict[str, list]:
    """The data mixes GliomaGen trained segmenters on (the in-package study and the nnU-Net export), and the
    half of the real cases alone. The half is a random half of each disease's real cases (sorted order would
    take one disease first), the same one in both half mixes."""
    half = stratified_half(train_real, seed)
    return dict(zip(MIXES, (train_real, train_synthetic, train_real + train_synthetic, half + train_synthetic, half)))


def stratified_half(cases: list, seed: int) -> list:
    """Half of each disease's cases (at least one of each), drawn at random by `seed`, in their order."""
    rng = np.random.default_rng(seed)
    picked = set()
    for disease in sorted({c["disease"] for c in cases}):
        group = [i for i, c in enumerate(cases) if c["disease"] == disease]
        picked |= set(rng.permutation(group)[: max(1, len(group) // 2)].tolist())
    return [c for i, c in enumerate(cases) if i in picked]


def paired_difference(first: list[float], second: list[float], resamples: int = 1000, seed: int = 0) -> dict:
    """The mean over cases of (first - second) on the same case, with a bootstrap 95% interval over
    cases: the comparison with the power a paired design has (the case-to-case spread, most of either
    score's interval, cancels)."""
    difference = torch.tensor(first, dtype=torch.float64) - torch.tensor(second, dtype=torch.float64)
    return {"mean_difference": float(difference.mean()), "ci95": bootstrap_interval(difference, resamples, seed),
            "n": len(difference)}


def paired_differences(utility: dict, regime: str, resamples: int = 1000, seed: int = 0,
                       reference: str = "real") -> dict:
    """Per region, `paired_difference` of the regime's Dice and the reference regime's on the same cases."""
    return {region: paired_difference(utility[regime][region]["dice_per_case"],
                                      utility[reference][region]["dice_per_case"], resamples, seed)
            for region in REGIONS}


def all_paired_differences(utility: dict, resamples: int = 1000, seed: int = 0) -> dict:
    """Every comparison of `PAIRED_WITH` whose two regimes were scored, under `paired_key`."""
    out = {}
    for reference, regimes in PAIRED_WITH.items():
        if utility.get(reference):
            out[paired_key(reference)] = {regime: paired_differences(utility, regime, resamples, seed, reference)
                                          for regime in regimes if utility.get(regime)}
    return out


def between_sets(studies: dict[str, dict], resamples: int = 1000, seed: int = 0) -> dict:
    """The ranking of generators: for each mix with a set's volumes (`SYNTHETIC_MIXES`) and each pair of sets
    (first named minus second), `paired_difference` of a case's Dice (its mean over the training seeds),
    where both studies tested on the same cases. Every set's regime shares the test cases and seeds, so
    what differs is the data."""
    out = {}
    for regime in SYNTHETIC_MIXES:
        per_case = {}
        for name, study in studies.items():
            spread = (study.get("across_seeds") or {}).get("utility", {}).get(regime)
            scores = (study.get("utility") or {}).get(regime)
            if spread:
                per_case[name] = {r: spread[r]["dice_per_case_mean"] for r in REGIONS}
            elif scores and "across_seeds" not in study:
                per_case[name] = {r: scores[r]["dice_per_case"] for r in REGIONS}
        for first, second in itertools.combinations(per_case, 2):
            comparable = (studies[first]["test_cases"] == studies[second]["test_cases"]
                          and all(per_case[n][r] is not None for n in (first, second) for r in REGIONS))
            if comparable:
                out.setdefault(regime, {})[f"{first} - {second}"] = {
                    r: paired_difference(per_case[first][r], per_case[second][r], resamples, seed) for r in REGIONS}
    return out


def difference_text(difference: dict) -> str:
    """One region's paired difference as a table cell: `+0.012 [-0.031, +0.054]` (three decimals: a
    difference of a few thousandths must not print as [+0.00, +0.00])."""
    low, high = difference["ci95"]
    return f"{difference['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}]"


def segmentation_study(real: list[dict], synthetic: list[dict], steps: int, seed: int = 0,
                       spacing: tuple[float, ...] = GRID.spacing, generator_cases: set[str] = frozenset(),
                       anomaly_steps: int | None = None, split_seed: int | None = None,
                       store: TrainedModels | None = None, test: list[dict] | None = None,
                       schedule: str = "constant", regimes: tuple[str, ...] | None = None,
                       classification_steps: int | None = None) -> dict:
    """Mask consistency and the training regimes of `training_mixes`, tested on held-out real cases.

    Test cases come only from real cases outside the generator's training record (`generator_cases`),
    and no synthetic volume descending from a test case (through augmentation too) is trained on.
    `split_seed` (default `seed`) draws the split and `seed` the training, so several seeds on one split
    measure the training's luck alone; `store`, shared across calls, keeps every trained model, so the
    real regime is trained once per split and seed however many synthetic sets are studied on it.
    `test`, real cases of their own (a fixed test set, as large as the question needs: inference is
    cheap), replaces the held-out third of `real`. `regimes` picks the training mixes beside the real
    one (default: all of `training_mixes`; see `chosen_mixes`); `classification_steps` (default `steps`;
    0 skips it) trains the disease classifiers."""
    split = (fixed_split(real, synthetic, test, generator_cases) if test is not None else
             held_out_split(real, synthetic, seed if split_seed is None else split_seed, generator_cases))
    if isinstance(split, str):
        return {"note": split}
    test, train_real, train_synthetic = split
    test_target = regions_of(torch.stack([c["labels"] for c in test]))
    chosen = chosen_mixes(regimes)
    regimes = {name: cases for name, cases in training_mixes(train_real, train_synthetic, seed).items()
               if name in chosen}
    out = {"seed": seed, "schedule": schedule, "test_cases": [c["id"] for c in test], "train_real": len(train_real),
           "spacing_mm": list(spacing), "regions_resolved": list(resolved_regions(spacing)),
           "generator_cases": len(generator_cases),
           "train_synthetic": len(train_synthetic), "utility": {}, "paired_to_real": {}}
    models = {}
    store = TrainedModels() if store is None else store
    untrained = lambda: segmenter_network(train_real[0]["image"].shape[0])  # noqa: E731
    for name, cases in regimes.items():
        if not cases:
            out["utility"][name] = None
            continue
        models[name] = store.get(train_segmenter, untrained, cases, steps=steps, seed=seed, schedule=schedule)
        out["utility"][name] = dice_and_hd95(predict(models[name], test), test_target, spacing)
    out.update(all_paired_differences(out["utility"], seed=seed))
    held_out = {c["source"] for c in test}
    unseen_masks = [c for c in synthetic if c["source"] in held_out]
    if unseen_masks:
        target = regions_of(torch.stack([c["labels"] for c in unseen_masks]))
        out["mask_consistency"] = dice_and_hd95(predict(models["real"], unseen_masks), target, spacing)
    out["mask_consistency_control"] = dice_and_hd95(predict(models["real"], [mean_filled(c) for c in test]),
                                                    test_target, spacing)
    classification_steps = steps if classification_steps is None else classification_steps
    if classification_steps > 0:
        out["classification"] = classification_study(train_real, train_synthetic, test, classification_steps, seed,
                                                     unseen_masks, store)
    if anomaly_steps is None or anomaly_steps > 0:  # the VAE anomaly-score classifier, same split
        from .anomaly import anomaly_study

        out["anomaly"] = anomaly_study({"real": train_real, "synthetic": train_synthetic,
                                        "real+synthetic": train_real + train_synthetic}, test,
                                       steps if anomaly_steps is None else anomaly_steps, seed)
    return out


def _mean_per_case(scores: list[dict], same_cases: bool) -> list[float] | None:
    """A case's Dice averaged over the seeds' runs, when they all tested the same cases: what
    `between_sets` compares."""
    per_case = [s.get("dice_per_case") for s in scores]
    if not same_cases or not all(per_case) or len({len(p) for p in per_case}) != 1:
        return None
    return np.mean(per_case, axis=0).tolist()


def across_seeds(runs: list[dict], seeds: list[int]) -> dict:
    """Mean and sd over segmentation-study runs with different training seeds (on one split, or each
    its own), per regime and region, the paired differences of `PAIRED_WITH` (their mean and sd over the
    seeds, and pooled where every run tested the same cases: each case's Dice averaged over the seeds, then
    paired), and the classifiers' balanced accuracy per regime (over the seeds whose training split held
    both diseases): how much of a difference between regimes is luck."""
    out = {"seeds": list(seeds), "utility": {}}
    same_cases = len({tuple(r.get("test_cases") or ()) for r in runs}) == 1  # else no case is paired over seeds
    for regime in runs[0].get("utility", {}):
        scores = [r["utility"].get(regime) for r in runs if "utility" in r]
        if not all(scores):
            out["utility"][regime] = None
            continue
        out["utility"][regime] = {region: {"dice_mean": float(np.mean([s[region]["dice"] for s in scores])),
                                           "dice_sd": float(np.std([s[region]["dice"] for s in scores], ddof=1)),
                                           "hd95_mean": float(np.mean([s[region]["hd95"] for s in scores])),
                                           "dice_per_case_mean": _mean_per_case([s[region] for s in scores], same_cases)}
                                  for region in REGIONS}
    for reference, regimes in PAIRED_WITH.items():
        key = paired_key(reference)
        out[key] = {}
        for regime in runs[0].get(key, {}):
            differences = [r.get(key, {}).get(regime) for r in runs]
            if all(differences):
                out[key][regime] = {region: mean_and_sd([d[region]["mean_difference"] for d in differences])
                                    for region in REGIONS}
        # Pooled: each case's Dice averaged over the seeds first (one fixed test set), then paired with the
        # reference regime's, as `between_sets` pairs two sets: one interval for the study rather than one per seed.
        out[f"{key}_pooled"] = {}
        base = out["utility"].get(reference)
        for regime in regimes:
            scores = out["utility"].get(regime)
            if not (scores and base):
                continue
            pairs = {r: (scores[r]["dice_per_case_mean"], base[r]["dice_per_case_mean"]) for r in REGIONS}
            if all(None not in pair for pair in pairs.values()):
                out[f"{key}_pooled"][regime] = {r: paired_difference(*pair) for r, pair in pairs.items()}
    out["classification"] = {}
    for regime in runs[0].get("classification", {}).get("regimes", {}):
        scores = [r.get("classification", {}).get("regimes", {}).get(regime) for r in runs]
        accuracy = [s["balanced_accuracy"] for s in scores if s]
        out["classification"][regime] = ({"balanced_accuracy": mean_and_sd(accuracy), "runs": len(accuracy)}
                                         if len(accuracy) >= 2 else None)
    return out
