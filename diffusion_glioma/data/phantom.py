"""The synthetic phantom cohort: the embedded default data for the demo, the tests and the benchmarks.

Each subject is the ICBM152 2009 template (shipped inside nilearn's wheel, so nothing is downloaded)
warped into a new head: brain volume from age, sex and individual variation, ventricle size,
smooth deformations at three scales, and the displacement (mass effect) of the tumour drawn from one
of two disease profiles. Four contrasts are mixed from the tissue maps (partial volume), then a bias
field and Rician noise. Subjects are written in BraTS 2023 layout (`BraTS-GLI-…` adult, `BraTS-PED-…`
pediatric) with each challenge's own label values and an LPS-like voxel order, so reading the phantom
exercises the same code as real data.

Head size does not give the disease away: children with diffuse midline glioma are 4-12 years old
(brain 86-100% of the young-adult volume) and adults with glioblastoma are around 62 (brain shrinks
about 0.25% a year after 30), so the two brain-volume distributions overlap almost completely, as in
real cohorts. How the cohort differs from real data is written in docs/data_format.md.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from .layouts import write_label_schemes
from ..io import atomic_path, save_volume, write_json

MODALITIES = ("t1n", "t1c", "t2w", "t2f")

# Relative signal per tissue (DESIGN.md), columns in MODALITIES order.
TISSUE_SIGNAL: dict[str, tuple[float, float, float, float]] = {
    "wm": (0.85, 0.85, 0.35, 0.40),
    "gm": (0.60, 0.62, 0.50, 0.55),
    "csf": (0.15, 0.15, 1.00, 0.10),
    "oedema": (0.50, 0.52, 0.80, 0.90),
    "necrosis": (0.25, 0.25, 0.90, 0.50),
    "enhancing": (0.55, 1.00, 0.60, 0.70),
    "net": (0.45, 0.48, 0.85, 0.85),
    "cyst": (0.15, 0.15, 1.00, 0.20),
}
TUMOUR_TISSUES = ("oedema", "necrosis", "enhancing", "net", "cyst")


@dataclass(frozen=True)
class DiseaseProfile:
    """What differs between the two phantom diseases, in one place."""

    disease: str
    brats_prefix: str  # BraTS 2023 challenge code in the case id
    label_scheme: str  # the scheme (diffusion_glioma.labels) of the values below, stated in the cohort
    label_values: dict[str, int]  # tissue -> this challenge's segmentation value
    age_years: tuple[float, float, float]  # triangular distribution: low, mode, high
    mass_effect: tuple[float, float]  # how far the tumour pushes tissue aside (see _radial_push)


GLIOBLASTOMA = DiseaseProfile(
    "glioblastoma", "GLI", "brats_gli", {"necrosis": 1, "oedema": 2, "enhancing": 3}, (35.0, 62.0, 85.0), (0.3, 0.6)
)
PEDIATRIC_DMG = DiseaseProfile(
    "pediatric_diffuse_glioma", "PED", "brats_peds_2024", {"enhancing": 1, "net": 2, "cyst": 3, "oedema": 4},
    (4.0, 7.0, 12.0), (0.3, 0.6),
)
PROFILES = {p.disease: p for p in (GLIOBLASTOMA, PEDIATRIC_DMG)}

LATERAL_VENTRICLES_MM = np.array([0.0, -15.0, 13.0])  # centre of the template's ventricular CSF (MNI)


def brain_volume_fraction(age: float) -> float:
    """Brain volume relative to the young-adult template: about 86% at 4, 90% at 6 and the adult
    volume by 11 (Giedd 1999, Lenroot & Giedd 2006), then about 0.25% less a year after 30 (Scahill 2003)."""
    if age < 30.0:
        return float(min(1.0, 0.86 + 0.02 * (age - 4.0)))
    return float(1.0 - 0.0025 * (age - 30.0))


def draw_anatomy(profile: DiseaseProfile, rng: np.random.Generator) -> dict:
    """Age, sex and the head's linear scale per axis; women's brains are about 11% smaller, and
    individuals vary by about 7% in volume."""
    age = rng.triangular(*profile.age_years)
    female = bool(rng.random() < 0.5)
    volume = brain_volume_fraction(age) * (0.89 if female else 1.0) * np.exp(rng.normal(0.0, 0.07))
    aspect = np.exp(rng.normal(0.0, 0.03, size=3))
    aspect /= np.cbrt(aspect.prod())  # head shape varies, volume kept
    return {"age_years": float(age), "female": female, "brain_volume": float(volume),
            "scale": (np.cbrt(volume) * aspect).tolist()}


def _radial_push(points: np.ndarray, centre: np.ndarray, amount: float, reach: float) -> np.ndarray:
    """Map subject coordinates to template coordinates so that template tissue around `centre` is
    pushed outward (amount > 0) or pulled in (amount < 0): r -> r (1 - amount exp(-(r/reach)^2)).
    One-to-one for -2 < amount < 1; leaves points far from the centre where they are."""
    rel = points - centre[:, None, None, None]
    shrink = 1.0 - amount * np.exp(-(rel**2).sum(0) / reach**2)
    return centre[:, None, None, None] + rel * shrink


@dataclass
class Template:
    tissues: dict[str, np.ndarray]  # wm, gm, csf probabilities in [0, 1]
    brain: np.ndarray  # float mask
    affine: np.ndarray  # voxel -> RAS mm


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """ICBM152 2009 grey/white matter maps from nilearn's package data (no download)."""
    import nilearn

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    names = {"t1": "t1", "gm": "gm", "wm": "wm"}
    maps = {}
    affine = None
    for key, name in names.items():
        path = folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ICBM152 template missing from the installed nilearn")
        img = nib.load(str(path))
        maps[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        affine = img.affine
    brain = ndimage.binary_fill_holes(ndimage.binary_closing((maps["t1"] > 0.02) | (maps["gm"] + maps["wm"] > 0.1), iterations=2))
    brain = brain.astype(np.float32)
    gm, wm = maps["gm"] * brain, maps["wm"] * brain
    total = np.maximum(gm + wm, 1.0)  # the two maps overlap slightly at edges
    gm, wm = gm / total, wm / total
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return Template({"wm": wm, "gm": gm, "csf": csf}, brain, np.asarray(affine, dtype=np.float64))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 5) -> np.ndarray:
    """A smooth random field in about [-1, 1]: coarse Gaussian noise upsampled with cubic splines."""
    grid = rng.standard_normal((coarse,) * len(shape)).astype(np.float32)
    factors = [s / coarse for s in shape]
    field = ndimage.zoom(grid, factors, order=3, mode="nearest")
    return field[tuple(slice(0, s) for s in shape)] / 1.5


def _random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_subject(profile: DiseaseProfile, spacing: float, seed: int | np.random.SeedSequence, draw: int = 0) -> dict:
    """One phantom subject on an RAS grid at `spacing` mm.

    `seed` fixes the mask: head outline, tumour and its labels. `draw` picks one of the subjects that
    share that mask exactly and differ in all the mask leaves free (interior anatomy, tissue signal,
    tumour texture, bias field, noise): draws of one seed are the truth's conditional draws, what a
    perfect mask-conditioned sampler would produce. Draw 0 is the cohort's subject.

    Returns `images` (modality -> float32 array, background 0), `seg` (this profile's label values),
    `affine` (voxel -> RAS mm) and a `record` of the random choices made.
    """
    rng = np.random.default_rng(seed)
    tpl = load_template()
    fov_mm = np.array(tpl.brain.shape, dtype=float)  # the template is 1 mm
    shape = tuple(int(n) for n in np.ceil(fov_mm / spacing))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = tpl.affine[:3, 3]

    # 1. Subject -> template coordinates: head scale per axis, small rotation, smooth deformations at
    #    three scales (lobes, gyri, small folds), ventricle size.
    anatomy = draw_anatomy(profile, rng)
    rotation = _random_rotation(rng, 4.0)
    centre = np.array([0.0, -18.0, 6.0])  # middle of the brain in MNI mm
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=0)
    world = np.tensordot(affine[:3, :3], ijk, axes=1) + affine[:3, 3, None, None, None]
    rel = np.tensordot(rotation.T, world - centre[:, None, None, None], axes=1)
    rel /= np.asarray(anatomy["scale"], dtype=np.float32)[:, None, None, None]
    warps = {coarse: rng.uniform(low, high) for coarse, (low, high) in {3: (2.0, 5.0), 6: (1.5, 3.0), 12: (0.5, 1.5)}.items()}
    for coarse, amplitude_mm in warps.items():
        for axis in range(3):
            rel[axis] += amplitude_mm * _smooth_noise(rng, shape, coarse=coarse)
    template_world = rel + centre[:, None, None, None]
    # Ventricles widen with age after 30 (atrophy) and vary between people at any age.
    ventricles = rng.uniform(-0.25, 0.3) + 0.008 * max(0.0, anatomy["age_years"] - 30.0)
    template_world = _radial_push(template_world, LATERAL_VENTRICLES_MM, ventricles, 22.0)
    inv = np.linalg.inv(tpl.affine)

    def warp(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
        tpl_ijk = np.tensordot(inv[:3, :3], coords, axes=1) + inv[:3, 3, None, None, None]
        return ndimage.map_coordinates(volume, tpl_ijk, order=1, mode="constant", cval=0.0).astype(np.float32)

    # 2. Tumour, placed and drawn in template coordinates so that it follows the subject's anatomy; the
    #    healthy tissue around it is pushed aside (mass effect) rather than replaced.
    place, draw_tumour = TUMOUR_MODELS[profile.disease]
    white_matter = {"wm": warp(tpl.tissues["wm"], template_world)}  # all that placement looks at
    tumour_centre, radii = place(rng, template_world, warp(tpl.brain, template_world), white_matter)
    push = rng.uniform(*profile.mass_effect)
    displaced = _radial_push(template_world, tumour_centre, push, 1.3 * float(radii.mean()))
    brain = warp(tpl.brain, displaced)
    tumour, record = draw_tumour(rng, template_world, brain, {"wm": warp(tpl.tissues["wm"], displaced)},
                                 tumour_centre, radii)
    head = brain > 0.5
    seg = np.zeros(shape, dtype=np.uint8)
    # Hard labels by the dominant tumour tissue where tumour dominates the voxel; order sets precedence.
    for tissue in ("oedema", "net", "necrosis", "cyst", "enhancing"):
        if tissue in tumour:
            seg[(tumour[tissue] >= 0.5) & head] = profile.label_values[tissue]
    # Everything above is the mask; everything below is drawn from a stream of its own per draw.
    free = np.random.default_rng([int(rng.integers(0, 2**62)), int(draw)])

    # 3. Interior anatomy: a smooth displacement of grey/white/CSF that fades to nothing at the brain's
    #    edge and around the tumour, so the head outline and the labels stay as they are.
    tumour_total = sum(tumour.values())
    edge_mm = ndimage.distance_transform_edt(head) * spacing
    tumour_mm = ndimage.distance_transform_edt(tumour_total < 0.05) * spacing
    taper = (np.clip(edge_mm / 12.0, 0.0, 1.0) * np.clip(tumour_mm / 8.0, 0.0, 1.0)).astype(np.float32)
    interior = free.uniform(3.0, 6.0)
    moved = displaced.copy()
    for axis in range(3):
        moved[axis] += interior * taper * _smooth_noise(free, shape, coarse=6)
    fractions = {name: warp(v, moved) for name, v in tpl.tissues.items()}
    for name in fractions:
        fractions[name] *= 1.0 - np.clip(tumour_total, 0.0, 1.0)
    fractions.update(tumour)

    # 4. Contrasts: partial-volume mix with per-subject signal jitter, tumour texture, bias field, Rician noise.
    texture = 1.0 + 0.06 * _smooth_noise(free, shape, coarse=12)
    snr = free.uniform(20.0, 30.0)
    images = {}
    for m, modality in enumerate(MODALITIES):
        signal = np.zeros(shape, dtype=np.float32)
        for tissue, fraction in fractions.items():
            level = TISSUE_SIGNAL[tissue][m] * (1.0 + free.normal(0.0, 0.03))
            if tissue in TUMOUR_TISSUES:
                fraction = fraction * texture
            signal += level * fraction
        signal *= np.exp(0.12 * _smooth_noise(free, shape, coarse=3))
        sigma = TISSUE_SIGNAL["wm"][m] / snr
        noisy = np.hypot(signal + free.normal(0.0, sigma, shape), free.normal(0.0, sigma, shape))
        images[modality] = np.where(head, noisy, 0.0).astype(np.float32)  # skull-stripped like BraTS

    record.update(disease=profile.disease, label_scheme=profile.label_scheme, **anatomy,
                  ventricles=float(ventricles), mass_effect=float(push),
                  warp_mm={str(k): round(float(v), 2) for k, v in warps.items()}, snr=float(snr),
                  draw=int(draw), interior_warp_mm=round(float(interior), 2))
    return {"images": images, "seg": seg, "affine": affine, "record": record}


def _ellipsoid_distance(world: np.ndarray, centre: np.ndarray, radii: np.ndarray, rng: np.random.Generator,
                        roughness: float) -> np.ndarray:
    """Normalised distance to an irregular ellipsoid (1 on its surface)."""
    rel = world - centre[:, None, None, None]
    rot = _random_rotation(rng, 180.0)
    rel = np.tensordot(rot.T, rel, axes=1)
    dist = np.sqrt(sum((rel[a] / radii[a]) ** 2 for a in range(3)))
    return dist * (1.0 + roughness * _smooth_noise(rng, dist.shape, coarse=8))


def _soft(mask: np.ndarray, sigma_vox: float = 0.6) -> np.ndarray:
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma_vox)


def _pick_centre(rng, fractions, world, brain, low, high, tissue="wm", min_fraction=0.5, tries=200):
    """A centre in [low, high] (MNI mm) that lands in `tissue`, looked up on the subject grid."""
    flat_world = world.reshape(3, -1)
    low, high = np.minimum(low, high), np.maximum(low, high)
    for _ in range(tries):
        c = rng.uniform(low, high)
        nearest = np.argmin(((flat_world - c[:, None]) ** 2).sum(0))
        if fractions[tissue].ravel()[nearest] >= min_fraction and brain.ravel()[nearest] > 0.5:
            return c
    return (low + high) / 2.0


def _place_glioblastoma(rng, world, brain, fractions):
    """Hemispheric, centred in white matter."""
    side = rng.choice([-1.0, 1.0])
    centre = _pick_centre(rng, fractions, world, brain, [side * 18, -50, 0], [side * 42, 35, 40])
    radius = rng.uniform(9.0, 18.0)
    return centre, radius * rng.uniform(0.8, 1.2, size=3)


def _glioblastoma(rng, world, brain, fractions, centre, radii):
    """Ring-enhancing rim around necrosis, wide oedema mostly in white matter."""
    u = _ellipsoid_distance(world, centre, radii, rng, roughness=0.2)
    inside = brain > 0.5
    rim = rng.uniform(0.5, 0.65)
    oedema_extent = rng.uniform(1.8, 2.8)
    white = fractions["wm"] > 0.3
    tumour = {
        "necrosis": _soft((u < rim) & inside),
        "enhancing": _soft((u >= rim) & (u < 1.0) & inside),
        "oedema": _soft((u >= 1.0) & (u < oedema_extent) & inside & (white | (u < 1.3))),
    }
    return tumour, {"centre_mm": centre.round(1).tolist(), "radius_mm": float(radii.mean())}


def _place_pediatric_dmg(rng, world, brain, fractions):
    """Pons-centred and expansile."""
    centre = np.array([0.0, -26.0, -32.0]) + rng.normal(0.0, 2.0, size=3)
    return centre, rng.uniform(13.0, 18.0) * np.array([1.0, 0.9, 1.25]) * rng.uniform(0.9, 1.1, size=3)


def _pediatric_dmg(rng, world, brain, fractions, centre, radii):
    """Mostly non-enhancing; sometimes an enhancing focus or a cyst; little oedema."""
    u = _ellipsoid_distance(world, centre, radii, rng, roughness=0.12)
    inside = brain > 0.5
    core = (u < 1.0) & inside
    tumour = {"net": core.astype(np.float32)}
    record = {"centre_mm": centre.round(1).tolist(), "radius_mm": float(radii.mean())}
    if rng.random() < 0.4:  # a small enhancing focus
        focus = centre + rng.normal(0.0, 3.0, size=3)
        tumour["enhancing"] = _soft((_ellipsoid_distance(world, focus, radii * 0.25, rng, 0.1) < 1.0) & core)
        record["enhancing_focus"] = True
    if rng.random() < 0.3:  # a cyst
        cyst = centre + rng.normal(0.0, 3.0, size=3)
        tumour["cyst"] = _soft((_ellipsoid_distance(world, cyst, radii * 0.35, rng, 0.05) < 1.0) & core)
        record["cyst"] = True
    if rng.random() < 0.5:  # a thin rim of oedema
        tumour["oedema"] = _soft((u >= 1.0) & (u < rng.uniform(1.1, 1.25)) & inside)
    tumour["net"] = _soft(core) * 1.0
    for other in ("enhancing", "cyst"):  # sub-regions replace the non-enhancing tumour they sit in
        if other in tumour:
            tumour["net"] = np.clip(tumour["net"] - tumour[other], 0.0, 1.0)
    return tumour, record


# disease -> (place: centre and radii, draw: tissue fractions and a record)
TUMOUR_MODELS = {
    GLIOBLASTOMA.disease: (_place_glioblastoma, _glioblastoma),
    PEDIATRIC_DMG.disease: (_place_pediatric_dmg, _pediatric_dmg),
}


def to_brats_orientation(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip x and y so the voxel order is LPS-like, as in the BraTS releases; the affine follows."""
    nx, ny = array.shape[:2]
    flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    return np.ascontiguousarray(array[::-1, ::-1, :]), affine @ flip


def case_id(profile: DiseaseProfile, index: int) -> str:
    return f"BraTS-{profile.brats_prefix}-{index:05d}-000"


def write_cohort(out: str | Path, *, n_adult: int = 16, n_pediatric: int = 4, spacing: float = 2.0,
                 seed: int = 0, first_index: int = 0, truth_draws: int = 0, truth_out: str | Path | None = None,
                 progress: bool = True) -> list[Path]:
    """Write a phantom cohort in BraTS 2023 layout under `out`; returns the case folders.

    Case numbers start at `first_index`, and each subject follows from (seed, disease, number), so
    `first_index=100` gives held-out subjects that no cohort numbered from 0 contains.

    With `truth_draws` K, `truth_out` receives K more subjects per case that share the case's mask bit
    for bit (draws 1..K of `make_subject`), as a set in `generate`'s pairs layout with a manifest whose
    records pair each draw with its case: the references of what a perfect sampler scores.

    Resumable: a case whose files are all present is kept (each file is written atomically), and
    the same seed always gives the same subjects.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if truth_draws and truth_out is None:
        raise ValueError("truth_draws needs truth_out, the folder the draws go to")
    plan = [(GLIOBLASTOMA, first_index + i) for i in range(n_adult)]
    plan += [(PEDIATRIC_DMG, first_index + i) for i in range(n_pediatric)]
    folders, records, truth_records = [], [], []
    for profile, index in tqdm(plan, desc="phantom cohort", unit="case", disable=not progress):
        cid = case_id(profile, index)
        folder = out / cid
        names = [folder / f"{cid}-{m}.nii.gz" for m in (*MODALITIES, "seg")]
        subject_seed = np.random.SeedSequence([seed, list(PROFILES).index(profile.disease), index])
        if not all(p.is_file() for p in names):
            subject = make_subject(profile, spacing, subject_seed)
            _write_subject(subject, names)
            records.append({"case": cid, "seed": seed, **subject["record"]})
        folders.append(folder)
        for k in range(1, truth_draws + 1):
            oid = f"{cid}_syn{k:03d}"
            files = {m: f"{oid}/{m}.nii.gz" for m in MODALITIES} | {"mask": f"{oid}/mask.nii.gz"}
            targets = [Path(truth_out) / files[m] for m in (*MODALITIES, "mask")]
            if not all(p.is_file() for p in targets):
                _write_subject(make_subject(profile, spacing, subject_seed, draw=k), targets)
            truth_records.append({"output": oid, "case_id": cid, "k": k, "derived_from": cid, "files": files,
                                  "source_mask": str(names[-1].resolve()), "label_scheme": profile.label_scheme,
                                  "disease": profile.disease, "model": None,
                                  "generator": "phantom same-mask truth draw"})
    cohort_file = out / "phantom_cohort.json"
    previous = []
    if cohort_file.is_file():
        previous = json.loads(cohort_file.read_text()).get("subjects", [])
    known = {r["case"]: r for r in previous}
    known.update({r["case"]: r for r in records})
    write_json(cohort_file, {
        "generator": "diffusion_glioma.data.phantom", "seed": seed, "spacing_mm": spacing,
        "layout": "BraTS 2023 (GLI adult, PED pediatric)",
        "subjects": [known[k] for k in sorted(known)],
    })
    # BraTS-PED label values alone cannot tell 2023 from 2024: the writer states the scheme.
    write_label_schemes(out, {"brats_gli": GLIOBLASTOMA.label_scheme, "brats_peds": PEDIATRIC_DMG.label_scheme})
    if truth_draws:
        with atomic_path(Path(truth_out) / "manifest.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in truth_records))
    return folders


def _write_subject(subject: dict, paths: list[Path]) -> None:
    """The four contrasts (scaled to integers like scanner data) and the segmentation, in BraTS order."""
    arrays = [subject["images"][m] * 1000.0 for m in MODALITIES] + [subject["seg"]]
    for path, array in zip(paths, arrays):
        data, affine = to_brats_orientation(array, subject["affine"])
        is_seg = path.name.endswith(("-seg.nii.gz", "mask.nii.gz"))
        save_volume(path, np.rint(data), affine, dtype=np.uint8 if is_seg else np.int16)
