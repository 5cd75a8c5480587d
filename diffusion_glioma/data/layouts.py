"""Case discovery: which files of a folder belong to which case, for each supported dataset layout.

A layout is data, not code: a pattern that picks the case id and a key out of each file's path, a
table from key to role (a modality or the segmentation), the source's label scheme and its disease.
The built-in layouts cover BraTS 2021, BraTS 2023-24 adult glioma, BraTS-PEDs, UPENN-GBM and
UCSF-PDGM; anything else is described in a small YAML file (see `load_layout_file`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import DataError
from ..io import is_nifti, nifti_stem, write_json
from ..labels import PEDS_UNSTATED, SCHEMES
from ..modalities import MODALITIES, MODALITY_ALIASES, canonical_modality  # noqa: F401  (read from here too)

SEG = "seg"
HEAD = "head"  # optional binary head mask: the head label for a mask that has no images beside it


@dataclass
class Case:
    """The files of one case. `seg` is None for images-only cases."""

    case_id: str
    images: dict[str, Path]
    seg: Path | None
    labels: str | dict  # label scheme name or {source value: common value}
    disease: str
    layout: str
    head: Path | None = None

    def missing(self, modalities: tuple[str, ...] | list[str]) -> list[str]:
        return [m for m in modalities if m not in self.images]


@dataclass(frozen=True)
class Layout:
    """How one dataset names its files.

    `rules` are (regex, role) pairs tried in order on each NIfTI file's path relative to the root,
    without its extension; the regex's `case` group is the case id and the role is a modality or
    "seg". When a case has several files for one role the earlier rule wins (UPENN-GBM's manual
    `_segm` over `_automated_approx_segm`); two files for the same rule are an error.
    """

    name: str
    rules: tuple[tuple[re.Pattern, str], ...]
    labels: str | dict
    disease: str
    description: str = ""

    def discover(self, root: Path) -> list[Case]:
        found: dict[str, dict[str, tuple[int, Path]]] = {}
        for path in _nifti_files(root):
            rel = path.relative_to(root).as_posix()
            rel_stem = rel[: len(rel) - len(path.name)] + nifti_stem(path)
            for rank, (regex, role) in enumerate(self.rules):
                match = regex.fullmatch(rel_stem)
                if not match:
                    continue
                slots = found.setdefault(match.group("case"), {})
                if role in slots and slots[role][0] == rank:
                    raise DataError(f"{path}: case {match.group('case')} has two {role} files ({slots[role][1]} too)")
                if role not in slots or rank < slots[role][0]:
                    slots[role] = (rank, path)
                break
        cases = []
        for cid in sorted(found):
            slots = {role: p for role, (_, p) in found[cid].items()}
            seg, head = slots.pop(SEG, None), slots.pop(HEAD, None)
            cases.append(Case(cid, dict(sorted(slots.items())), seg, self.labels, self.disease, self.name, head))
        return cases


def _nifti_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(folder) / n for n in sorted(names) if is_nifti(Path(n)) and not n.startswith("."))
    return files


def _named_files(case_regex: str, separator: str, keys: dict[str, str], suffix: str = "") -> tuple:
    """Rules for the common `<case><sep><key>` naming, in any folder below the root; every layout also
    reads `<case><sep>head` (written by `augment-masks` beside masks that have no images)."""
    keys = {**keys, HEAD: HEAD} if not suffix else keys
    return tuple(
        (re.compile(rf"(?:.*/)?(?P<case>{case_regex}){re.escape(separator)}{re.escape(key)}{suffix}"), role)
        for key, role in keys.items()
    )


_BRATS23 = {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f", "seg": SEG}

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in [
        Layout(
            "brats2021",
            _named_files(r"BraTS(?:2021|20_Training|20_Validation)_\d+", "_",
                         {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": SEG}),
            "brats2021", "glioblastoma", "BraTS 2020/2021: BraTS2021_00000_{t1,t1ce,t2,flair,seg}",
        ),
        Layout(
            "brats_gli", _named_files(r"BraTS-GLI-\d+-\d+", "-", _BRATS23),
            "brats_gli", "glioblastoma", "BraTS 2023-24 adult glioma: BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}",
        ),
        Layout(
            "brats_peds", _named_files(r"BraTS-PED-\d+-\d+", "-", _BRATS23),
            PEDS_UNSTATED, "pediatric_diffuse_glioma",
            "BraTS-PEDs: BraTS-PED-00000-000-{t1n,t1c,t2w,t2f,seg}; a mask with label 4 is read as 2024, "
            "one with only 1-3 needs --labels brats_peds_2023 or brats_peds_2024",
        ),
        Layout(
            "upenn_gbm",
            _named_files(r"UPENN-GBM-\d+_\d+", "_", {"T1": "t1n", "T1GD": "t1c", "T2": "t2w", "FLAIR": "t2f",
                                                     "segm": SEG, "automated_approx_segm": SEG}),
            "brats2021", "glioblastoma",
            "UPENN-GBM: UPENN-GBM-00001_11_{T1,T1GD,T2,FLAIR}; _segm preferred over _automated_approx_segm",
        ),
        Layout(
            "ucsf_pdgm",
            _named_files(r"UCSF-PDGM-\d+", "_", {"T1": "t1n", "T1c": "t1c", "T2": "t2w", "FLAIR": "t2f"}, "_bias")
            + _named_files(r"UCSF-PDGM-\d+", "_", {"T1": "t1n", "T1c": "t1c", "T2": "t2w", "FLAIR": "t2f",
                                                    "tumor_segmentation": SEG}),
            "brats2021", "adult_diffuse_glioma",
            "UCSF-PDGM: UCSF-PDGM-0004_{T1,T1c,T2,FLAIR}[_bias] (bias-corrected preferred), _tumor_segmentation",
        ),
    ]
}


def load_layout_file(path: str | Path) -> Layout:
    """A layout described in YAML by one filename pattern per role, e.g. Med-DDPM's folders::

        name: medddpm_brats
        labels: brats2021          # a scheme name, or a table {source value: common value}
        disease: glioblastoma
        files:                     # paths relative to the data folder; {case} is the case id
          t1n: t1/{case}.nii.gz    # .nii and .nii.gz both match; * matches within a folder name
          t1c: t1ce/{case}.nii.gz
          t2w: t2/{case}.nii.gz
          t2f: flair/{case}.nii.gz
          seg: seg/{case}.nii.gz
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read layout file ({exc})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("files"), dict):
        raise DataError(f"{path}: a layout file needs a 'files' table (role: pattern with {{case}})")
    unknown = set(spec) - {"name", "labels", "disease", "files", "description"}
    if unknown:
        raise DataError(f"{path}: unknown keys {sorted(unknown)} in layout file")
    rules = []
    for role, pattern in spec["files"].items():
        role = role if role in (SEG, HEAD) else canonical_modality(str(role))
        if str(pattern).count("{case}") != 1:
            raise DataError(f"{path}: pattern for {role} needs exactly one {{case}} placeholder: {pattern!r}")
        rules.append((re.compile(_pattern_to_regex(str(pattern))), role))
    return Layout(
        name=str(spec.get("name", path.stem)),
        rules=tuple(rules),
        labels=spec.get("labels", "common"),
        disease=str(spec.get("disease", "unknown")),
        description=str(spec.get("description", f"patterns from {path}")),
    )


def _pattern_to_regex(pattern: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if pattern.endswith(suffix):
            pattern = pattern[: -len(suffix)]
    parts = re.split(r"(\{case\}|\*)", pattern)
    translate = {"{case}": "(?P<case>[^/]+?)", "*": "[^/]*"}
    return "".join(translate.get(part, re.escape(part)) for part in parts)


def resolve_layout(spec: str | Path | None) -> list[Layout]:
    """`auto`/None: every built-in layout; a built-in name; or a path to a layout YAML."""
    if spec is None or str(spec) == "auto":
        return list(LAYOUTS.values())
    if str(spec) in LAYOUTS:
        return [LAYOUTS[str(spec)]]
    if str(spec).endswith((".yaml", ".yml")):
        return [load_layout_file(spec)]
    raise DataError(f"unknown layout {spec!r}; choose auto, one of {sorted(LAYOUTS)}, or a layout .yaml file")


LABEL_SCHEMES_FILE = "label_schemes.json"


def write_label_schemes(root: str | Path, schemes: dict[str, str]) -> Path:
    """State, beside the data, which label scheme each layout's masks use ({layout: scheme})."""
    return write_json(Path(root) / LABEL_SCHEMES_FILE, schemes)


def read_label_schemes(root: Path) -> dict[str, str]:
    path = root / LABEL_SCHEMES_FILE
    if not path.is_file():
        return {}
    try:
        schemes = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if not isinstance(schemes, dict) or not all(isinstance(v, str) and v in SCHEMES for v in schemes.values()):
        raise DataError(f"{path}: expected {{layout: label scheme}} with schemes from {sorted(SCHEMES)}")
    return schemes


def discover_cases(root: str | Path, layout: str | Path | None = "auto", *, labels: str | dict | None = None,
                   disease: str | None = None) -> list[Case]:
    """Every case under `root`. With `auto`, all built-in layouts are tried and their cases pooled
    (a folder may hold, say, adult and pediatric BraTS cases side by side). Label schemes come from
    `labels` if given, else from a `label_schemes.json` in `root` ({layout: scheme}), else the layout."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    cases: list[Case] = []
    for candidate in resolve_layout(layout):
        cases.extend(candidate.discover(root))
    if not cases:
        if not _nifti_files(root):
            raise DataError(f"{root}: no NIfTI files (.nii, .nii.gz) found")
        names = ", ".join(LAYOUTS) if layout in (None, "auto") else str(layout)
        raise DataError(f"{root}: NIfTI files found but none matches the layout(s) {names}; "
                        "describe the naming in a layout YAML (see docs/data_format.md)")
    stated = read_label_schemes(root) if labels is None else {}
    seen: dict[str, Case] = {}
    for case in cases:
        case.labels = stated.get(case.layout, case.labels)
        if case.case_id in seen:
            raise DataError(f"{root}: case id {case.case_id} found in layouts {seen[case.case_id].layout} and {case.layout}")
        seen[case.case_id] = case
        if labels is not None:
            case.labels = labels
        if disease is not None:
            case.disease = disease
    return cases
