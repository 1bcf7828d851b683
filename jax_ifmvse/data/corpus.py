"""Speech corpora with arousal / valence / dominance labels: MSP-Podcast and a generic manifest.

Attributes are on the MSP-Podcast 1..7 scale everywhere; NaN means unknown (e.g. the
challenge's unlabeled test sets). Every audio path is kept relative to the corpus root and
refused if it escapes that root (`..`, an absolute path elsewhere, a symlink pointing out).

The official release lists Train and Development (and the labelled test sets) in
`Labels/labels_consensus.csv`; its held-out test set is the audio under `Audios/` whose name
contains `test3` and that has no label row, as the challenge baseline builds it from the folder.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np

from featurestore.summary import SPLIT_ORDER
from jax_ifmvse.config import ATTRIBUTES, LABEL_MAX, LABEL_MIN
from jax_ifmvse.data.audio import audio_formats
from jax_ifmvse.data.demo_corpus import MARKER, default_demo_corpus, make_demo_corpus
from jax_ifmvse.errors import IfmvseError

SPLITS = SPLIT_ORDER  # Train, Development, Test1..3: one list for corpus and store summary
UNLABELED_SPLITS = ("Test1", "Test2", "Test3")  # the challenge ships some test sets unlabeled
MSP_LABELS = Path("Labels") / "labels_consensus.csv"
MSP_AUDIO = "Audios"
# The columns the reader needs; the release also has EmoClass, SpkrID, Gender (read if present).
MSP_COLUMNS = ("FileName", "EmoAct", "EmoVal", "EmoDom", "Split_Set")
UNLABELED_TEST = {"test3": "Test3"}  # file-name marker -> split, for audio without a label row
MSP_ATTRIBUTE_COLUMNS = {"arousal": "EmoAct", "valence": "EmoVal", "dominance": "EmoDom"}
# Manifest split spellings accepted besides the MSP names (case-insensitive).
_SPLIT_ALIASES = {"dev": "Development", "valid": "Development", "test": "Test1"}


class CorpusError(IfmvseError, ValueError):
    """A corpus or label file that cannot be used; the message names the file (and line)."""


class UnsafePathError(CorpusError):
    """An audio path that escapes the corpus root."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One labeled (or unlabeled) audio file of a corpus."""

    id: str
    path: str  # POSIX path relative to the corpus root
    split: str
    arousal: float = math.nan
    valence: float = math.nan
    dominance: float = math.nan
    speaker: str | None = None
    gender: str | None = None
    emo_class: str | None = None

    def labels(self) -> np.ndarray:
        """The attributes in `ATTRIBUTES` order, shape (3,), NaN where unknown."""
        return np.array([getattr(self, a) for a in ATTRIBUTES], np.float32)

    @property
    def labeled(self) -> bool:
        """Whether all three attributes are known."""
        return not np.isnan(self.labels()).any()


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A root folder plus its utterances, in label-file order."""

    root: Path
    utterances: tuple[Utterance, ...]
    source: str = ""  # the label file or manifest it came from
    unlisted: tuple[str, ...] = ()  # audio files under the root in no split (reported, unused)

    def __len__(self) -> int:
        return len(self.utterances)

    def abspath(self, u: Utterance) -> Path:
        """Absolute path of an utterance's audio (checked to stay inside the root)."""
        return safe_join(self.root, u.path, where=self.source or str(self.root))

    def splits(self) -> tuple[str, ...]:
        """Split names present, in canonical order."""
        present = {u.split for u in self.utterances}
        return tuple(s for s in SPLITS if s in present)

    def split(self, name: str) -> Corpus:
        """The sub-corpus of one split."""
        return dataclasses.replace(
            self, utterances=tuple(u for u in self.utterances if u.split == name)
        )

    def labels(self) -> np.ndarray:
        """All attributes, shape (N, 3) in `ATTRIBUTES` order, NaN where unknown."""
        if not self.utterances:
            return np.zeros((0, len(ATTRIBUTES)), np.float32)
        return np.stack([u.labels() for u in self.utterances])

    def durations(self) -> np.ndarray:
        """Durations in seconds from file headers, shape (N,); NaN where unreadable."""
        import soundfile as sf

        out = np.full(len(self.utterances), np.nan, np.float64)
        for i, u in enumerate(self.utterances):
            try:
                info = sf.info(str(self.abspath(u)))
            except Exception:  # unreadable files are reported when decoded
                continue
            if info.samplerate > 0:
                out[i] = info.frames / info.samplerate
        return out


def to_unit(y):
    """1..7 attribute -> [0, 1] training target (the challenge baseline's (y - 1) / 6)."""
    return (np.asarray(y, np.float32) - LABEL_MIN) / (LABEL_MAX - LABEL_MIN)


def from_unit(y, clip: bool = True):
    """[0, 1] prediction -> 1..7 attribute, clipped to the scale unless `clip=False`; a JAX
    array stays one (`inference` differentiates the heads' scores through it)."""
    y = y.astype(np.float32, copy=False) if hasattr(y, "astype") else np.asarray(y, np.float32)
    y = y * (LABEL_MAX - LABEL_MIN) + LABEL_MIN
    return y.clip(LABEL_MIN, LABEL_MAX) if clip else y


def safe_join(root: str | os.PathLike, rel: str, *, where: str = "") -> Path:
    """Resolve `rel` under `root`, refusing anything that lands outside it (symlinks followed)."""
    root_real = Path(root).resolve()
    p = Path(rel)
    full = p if p.is_absolute() else root_real / p
    real = full.resolve()  # follows symlinks, so a link pointing out is caught too
    if not real.is_relative_to(root_real):
        prefix = f"{where}: " if where else ""
        raise UnsafePathError(f"{prefix}audio path {rel!r} escapes the corpus root {root_real}")
    return real


def _relative(root: Path, rel: str, where: str) -> str:
    """The POSIX path of `rel` relative to `root`, after the escape check."""
    safe_join(root, rel, where=where)
    p = Path(rel)
    if p.is_absolute():
        p = Path(os.path.normpath(p))
        # Relative to the root as given when the path is spelled that way (a symlinked root such
        # as /data -> /mnt/data), else to the resolved root.
        base = Path(os.path.normpath(root.absolute()))
        if not p.is_relative_to(base):
            base = root.resolve()
        return Path(os.path.relpath(p, base)).as_posix()
    return Path(os.path.normpath(p)).as_posix()


def _attribute(raw: str | None, *, name: str, where: str, required: bool) -> float:
    """Parse one 1..7 attribute cell; empty -> NaN unless required."""
    raw = (raw or "").strip()
    if not raw or raw.lower() == "nan":
        if required:
            raise CorpusError(f"{where}: missing {name}")
        return math.nan
    try:
        v = float(raw)
    except ValueError:
        raise CorpusError(f"{where}: {name} {raw!r} is not a number") from None
    if not math.isfinite(v) or not LABEL_MIN <= v <= LABEL_MAX:
        raise CorpusError(f"{where}: {name} {raw!r} is outside {LABEL_MIN:g}..{LABEL_MAX:g}")
    return v


def _rows(path: Path, delimiter: str) -> Iterable[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a delimited file with a header on line 1."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            raise CorpusError(f"{path}: empty file, expected a header line")
        reader.fieldnames = [c.strip() for c in reader.fieldnames]
        for row in reader:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # blank line
            yield reader.line_num, row


def _require_columns(path: Path, fieldnames: Iterable[str], needed: Iterable[str]) -> None:
    missing = [c for c in needed if c not in set(fieldnames)]
    if missing:
        raise CorpusError(f"{path}:1: missing column(s) {', '.join(missing)}")


def _header(path: Path, delimiter: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        first = next(csv.reader(f, delimiter=delimiter), None)
    if not first:
        raise CorpusError(f"{path}: empty file, expected a header line")
    return [c.strip() for c in first]


def _optional(row: dict[str, str], key: str) -> str | None:
    v = (row.get(key) or "").strip()
    return v or None


def load_msp_podcast(root: str | os.PathLike) -> Corpus:
    """Read the challenge layout: `Labels/labels_consensus.csv` and audio under `Audios/`."""
    root = Path(root).expanduser()
    labels = root / MSP_LABELS
    if not labels.is_file():
        raise CorpusError(f"{labels}: label file not found (expected the MSP-Podcast layout)")
    _require_columns(labels, _header(labels, ","), MSP_COLUMNS)
    seen: dict[str, int] = {}
    utts = []
    for line, row in _rows(labels, ","):
        where = f"{labels}:{line}"
        name = (row.get("FileName") or "").strip()
        if not name:
            raise CorpusError(f"{where}: empty FileName")
        if name in seen:
            raise CorpusError(f"{where}: duplicate FileName {name!r} (first on line {seen[name]})")
        seen[name] = line
        split = (row.get("Split_Set") or "").strip()
        if split not in SPLITS:
            raise CorpusError(
                f"{where}: unknown split {split!r} (expected one of {', '.join(SPLITS)})"
            )
        values = {
            a: _attribute(
                row.get(col), name=col, where=where, required=split not in UNLABELED_SPLITS
            )
            for a, col in MSP_ATTRIBUTE_COLUMNS.items()
        }
        rel = _relative(root, f"{MSP_AUDIO}/{name}", where)
        utts.append(
            Utterance(
                id=Path(name).stem,
                path=rel,
                split=split,
                speaker=_optional(row, "SpkrID"),
                gender=_optional(row, "Gender"),
                emo_class=_optional(row, "EmoClass"),
                **values,
            )
        )
    unlabeled, unlisted = _unlabeled_audio(root, set(seen))
    ids = {u.id: u.path for u in utts}
    for name, split in unlabeled:
        uid = Path(name).stem
        if uid in ids:  # x.wav labelled and x.flac not: one id would name two files
            raise CorpusError(
                f"{root / MSP_AUDIO / name}: same stem as the labelled {ids[uid]!r};"
                " rename one of them"
            )
        ids[uid] = name
        rel = _relative(root, f"{MSP_AUDIO}/{name}", str(root / MSP_AUDIO))
        utts.append(Utterance(id=uid, path=rel, split=split))
    return Corpus(
        root=root.resolve(), utterances=tuple(utts), source=str(labels), unlisted=unlisted
    )


def _audio_suffixes() -> set[str]:
    return {f".{f}" for f in audio_formats()}


def _unlabeled_audio(
    root: Path, labelled: set[str]
) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """Audio under Audios/ with no label row: (name, split) of the official unlabelled test sets
    (name contains `test3`, as the baseline lists them), and the names of all the others."""
    folder = root / MSP_AUDIO
    if not folder.is_dir():
        return [], ()
    suffixes = _audio_suffixes()
    test, other = [], []
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if p.name in labelled or p.name.startswith(".") or p.suffix.lower() not in suffixes:
            continue
        split = next((sp for mark, sp in UNLABELED_TEST.items() if mark in p.name), None)
        if split is None:
            other.append(p.name)
        else:
            test.append((p.name, split))
    return test, tuple(other)


def _split_name(raw: str, where: str) -> str:
    s = raw.strip()
    by_lower = {x.lower(): x for x in SPLITS} | _SPLIT_ALIASES
    if s.lower() not in by_lower:
        raise CorpusError(f"{where}: unknown split {s!r} (expected one of {', '.join(SPLITS)})")
    return by_lower[s.lower()]


def load_manifest(path: str | os.PathLike, audio_root: str | os.PathLike | None = None) -> Corpus:
    """Read a CSV/TSV manifest: path, split, optional arousal/valence/dominance/id/speaker/gender
    and emo_class (the task 1 code A, S, H, U, F, D, C, N; also spelled EmoClass).

    `audio_root` (default: the manifest's folder) is the corpus root: relative paths resolve
    against it, absolute ones must lie inside it. The default id is the path relative to the
    root (unique by construction); an `id` column wins. Split names are the MSP ones
    (case-insensitive) or the aliases dev/valid -> Development and test -> Test1.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorpusError(f"{path}: manifest not found")
    with open(path, encoding="utf-8-sig") as f:
        head = f.readline()
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in head else ","
    columns = _header(path, delimiter)
    _require_columns(path, columns, ("path", "split"))
    if audio_root is None:
        root = path.parent.resolve()
    else:
        root = Path(audio_root).expanduser()
        if not root.is_dir():
            raise CorpusError(f"{root}: --audio-root is not a directory")
        root = root.absolute()
    seen: dict[str, int] = {}
    utts = []
    for line, row in _rows(path, delimiter):
        where = f"{path}:{line}"
        rel_raw = (row.get("path") or "").strip()
        if not rel_raw:
            raise CorpusError(f"{where}: empty path")
        split = _split_name(row.get("split") or "", where)
        values = {
            a: _attribute(row.get(a), name=a, where=where, required=False)
            for a in ATTRIBUTES
            if a in columns
        }
        rel = _relative(root, rel_raw, where)
        uid = _optional(row, "id") or rel
        if uid in seen:
            raise CorpusError(f"{where}: duplicate id {uid!r} (first on line {seen[uid]})")
        seen[uid] = line
        utts.append(
            Utterance(
                id=uid,
                path=rel,
                split=split,
                speaker=_optional(row, "speaker"),
                gender=_optional(row, "gender"),
                emo_class=_optional(row, "emo_class") or _optional(row, "EmoClass"),
                **values,
            )
        )
    return Corpus(root=root.resolve(), utterances=tuple(utts), source=str(path))


def submission_name(path: str, uid: str) -> str:
    """The `FileName` a submission row carries: the official file name (with its extension)
    for MSP-Podcast-layout audio (`Audios/<name>` whose stem is the id), else the id."""
    p = PurePosixPath(path)
    if p.parts[:1] == (MSP_AUDIO,) and len(p.parts) > 1 and p.stem == uid:
        return PurePosixPath(*p.parts[1:]).as_posix()
    return uid


def load_corpus(
    kind: str, path: str | os.PathLike = "", audio_root: str | os.PathLike | None = None
) -> Corpus:
    """Load a corpus: `msp` (root folder), `manifest` (file), `demo` (folder, else the cache)."""
    if kind == "msp":
        return load_msp_podcast(path)
    if kind == "manifest":
        return load_manifest(path, audio_root)
    if kind == "demo":
        if not path:
            return load_msp_podcast(default_demo_corpus())
        if (Path(path).expanduser() / MARKER).is_file():  # already generated, any n / seed
            return load_msp_podcast(path)
        return load_msp_podcast(make_demo_corpus(path))
    raise CorpusError(f"unknown corpus kind {kind!r} (expected msp, manifest or demo)")
