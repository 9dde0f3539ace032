"""Checkpoint files: one format for every model kind, written atomically, refused clearly.

A checkpoint is a dict, in one layout for every kind (`trainer.loop` writes it)::

    {"format": "reidgen", "version": 1, "kind": "reid" | "dgnet" | "crgan" | ...,
     "model_config": {...}, "train_config": {...}, "label_map": [pid, ...], "lineage": {...},
     "models": {name: state_dict}, "optimizers": {name: state_dict}, "step": int, "rng": [per rank],
     ...extra}

The network inference builds is ``models["model"]`` (CR-GAN's generator: ``models["gen"]``).
Older files are still read (`Checkpoint.models`, `optimizer_states`, `rng_states`): a single
``model`` (re-id also ``fine_head``), ``optimizer`` or a list ``optimizers``, one RNG state.
Imports and inference exports keep the ``model`` form.

Every value in it is a tensor or plain data (numbers, strings, None, lists, tuples, dicts), so
it is read with ``torch.load(weights_only=True)``: a checkpoint or teacher file someone hands
over cannot run code when it is loaded. A file that holds anything else is refused without
being unpickled; a checkpoint of one's own from an older reidgen is converted once, knowingly,
with `convert_checkpoint` (``reidgen convert-checkpoint``).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import os
import pickle
import warnings
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from reidgen.core.checkpoint_peek import older_reidgen_layout, peek_pickle, torch_pickle
from reidgen.core.errors import ReidgenError

FORMAT, VERSION = "reidgen", 1

# What `torch.load(weights_only=True)` rebuilds; a checkpoint holds nothing else.
PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
PLAIN_CONTAINERS = (dict, collections.OrderedDict, list, tuple)
# Modules of the globals a weights-only pickle names anyway (tensor and storage rebuilders,
# dtypes, OrderedDict): left out when a refusal lists what a file refers to.
_PLAIN_GLOBAL_MODULES = frozenset({"torch", "torch._utils", "torch._tensor", "collections"})


def save_checkpoint(path: str | Path, kind: str, payload: dict) -> Path:
    """Write to a temporary name and rename, so a crash never leaves a half-written file.

    The payload is checked to be tensors and plain data first: anything else would make a file
    that `load_checkpoint` refuses, found out only when someone resumes or serves it."""
    path = Path(path)
    checkpoint = {"format": FORMAT, "version": VERSION, "kind": kind, **payload}
    require_plain(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def require_plain(value: Any, where: str = "checkpoint") -> None:
    """Raise TypeError (a bug in the caller) naming the first value that is not a tensor or plain data.

    Exact types, not isinstance: a numpy float is a ``float`` subclass, yet it pickles as numpy."""
    if isinstance(value, torch.Tensor) or type(value) in PLAIN_SCALARS:
        return
    if type(value) not in PLAIN_CONTAINERS:
        raise TypeError(f"{where} is a {_type_name(value)}; checkpoints hold only tensors, numbers, strings, "
                        "None, lists, tuples and dicts")
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has a key of type {_type_name(key)}; keys must be str or int")
            require_plain(item, f"{where}[{key!r}]")
    else:
        for i, item in enumerate(value):
            require_plain(item, f"{where}[{i}]")


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


CHECKPOINTS_DIR, LAST = "checkpoints", "last.pt"


def run_checkpoint(run: str | Path, name: str = LAST) -> Path:
    """Where a run folder keeps a checkpoint: ``RUN/checkpoints/last.pt`` (or ``step_N.pt``)."""
    return Path(run) / CHECKPOINTS_DIR / name


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint file or a run folder (its latest checkpoint)."""
    p = Path(path)
    return run_checkpoint(p) if p.is_dir() else p


def run_folder(checkpoint: str | Path) -> Path:
    """The run folder of a checkpoint argument: the folder itself, or RUN for RUN/checkpoints/x.pt
    (a file elsewhere: its own folder)."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A reidgen checkpoint file, read and checked once.

    Every reader of a model file starts here: the kind, the model configuration, the label map,
    the lineage (the files it was trained from, by path and content hash) and the weights come
    from this one parse, and each model class builds itself from it (``from_checkpoint``).
    ``contents`` is the whole dict, for the trainers' resume state."""

    path: Path
    contents: dict

    @classmethod
    def read(cls, path: str | Path, kinds: str | tuple[str, ...]) -> "Checkpoint":
        """Read a checkpoint file or a run folder's latest one, refusing another kind clearly."""
        path = resolve_checkpoint(path)
        kinds = (kinds,) if isinstance(kinds, str) else kinds
        if not path.is_file():
            raise ReidgenError(f"checkpoint {path} not found")
        ckpt = read_plain(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ReidgenError(f"{path} is not a reidgen checkpoint (expected one written by reidgen train-*)")
        if ckpt.get("version") != VERSION:
            raise ReidgenError(f"checkpoint {path} has format version {ckpt.get('version')}, this reidgen reads "
                               f"{VERSION}")
        if ckpt.get("kind") not in kinds:
            expected = " or ".join(map(repr, kinds))
            raise ReidgenError(f"checkpoint {path} holds a {ckpt.get('kind')!r} model; expected {expected}")
        return cls(path, ckpt)

    def __getitem__(self, key: str):
        return self.contents[key]

    def get(self, key: str, default=None):
        return self.contents.get(key, default)

    @property
    def kind(self) -> str:
        return self.contents["kind"]

    @property
    def model_config(self) -> dict:
        return self.contents["model_config"]

    @property
    def label_map(self) -> tuple[int, ...]:
        return tuple(self.contents["label_map"])

    @property
    def models(self) -> dict[str, dict]:
        """Every network's weights by name; an older file's ``model`` (and ``fine_head``) under those names."""
        if "models" in self.contents:
            return self.contents["models"]
        return {name: self.contents[name] for name in ("model", "fine_head") if name in self.contents}

    @property
    def state(self) -> dict:
        """The weights of the network inference builds (``models["model"]``)."""
        models = self.models
        if "model" not in models:
            raise ReidgenError(f"checkpoint {self.path} holds no single model (it has {', '.join(sorted(models))})")
        return models["model"]

    def optimizer_states(self, names: tuple[str, ...]) -> dict[str, dict]:
        """Optimiser states by name; an older file's list (or single ``optimizer``) is named in
        ``names``' order, the order its trainer kept them in."""
        saved = self.contents.get("optimizers", self.contents.get("optimizer"))
        if saved is None:
            return {}
        if isinstance(saved, dict) and "param_groups" in saved:  # one optimiser's own state
            saved = [saved]
        if isinstance(saved, (list, tuple)):
            return dict(zip(names, saved))
        return dict(saved)

    @property
    def rng_states(self) -> list[dict]:
        """Every rank's RNG state (an older file of one process: one state)."""
        rng = self.contents.get("rng")
        if not rng:
            return []
        return [rng] if isinstance(rng, dict) else list(rng)

    @property
    def train_config(self) -> dict:
        return self.contents.get("train_config") or {}

    @property
    def step(self) -> int | None:
        step = self.contents.get("step")
        return int(step) if isinstance(step, int) else None

    @property
    def lineage(self) -> dict[str, dict]:
        """The files this model was trained from: ``{"teacher": {"path": ..., "sha256_16": ...}}``."""
        return self.contents.get("lineage") or {}

    @functools.cached_property
    def identity(self) -> str:
        return file_identity(self.path)

    def load_into(self, module: torch.nn.Module, prefix: str = "") -> torch.nn.Module:
        """Load the weights (those under ``prefix``, with it stripped) into ``module``, strictly."""
        state = self.state if not prefix else {k[len(prefix):]: v for k, v in self.state.items()
                                               if k.startswith(prefix)}
        load_state(module, state, f"checkpoint {self.path}")
        return module


def load_checkpoint(path: str | Path, kind: str | tuple[str, ...]) -> dict:
    """The contents of a checkpoint file or run folder (`Checkpoint.read`), of the expected kind(s)."""
    return Checkpoint.read(path, kind).contents


def lineage_entry(path: str | Path) -> dict:
    """How a checkpoint records a file it was trained from: the path given and its content hash, so
    that a later reader can tell when the file at that path is no longer the one used."""
    return {"path": str(path), "sha256_16": file_identity(resolve_checkpoint(path))}


def read_plain(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain data only, so reading a file runs no code.

    A file that needs more is refused unread, in one line that says why and, for what looks like
    a checkpoint of an older reidgen (judged from its opcodes), how to convert it. ``what`` names the
    file in the message."""
    try:
        with warnings.catch_warnings():  # torch's note on a plain pickle's protocol: the refusal says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's refusal, or no pickle at all: the opcodes tell which
        names = _scan_pickles(path)
        foreign = [n for n in dict.fromkeys(names) if n.rpartition(".")[0] not in _PLAIN_GLOBAL_MODULES]
        if foreign:
            # The hint to convert is advice to unpickle the file fully: given only for a file an
            # older reidgen wrote (judged from its opcodes), never for one that just looks like it.
            raise ReidgenError(_refusal(what, path, foreign, older_reidgen_layout(path))) from None
        raise ReidgenError(f"{what} {path} cannot be read ({_reason(exc)})") from None
    except Exception as exc:  # a truncated or foreign file: not a checkpoint we can read
        raise ReidgenError(f"{what} {path} cannot be read ({_reason(exc)})") from None


def _refusal(what: str, path: Path, foreign: list[str], ours: bool) -> str:
    message = (f"{what} {path} holds objects other than tensors and plain data ({', '.join(foreign[:3])}); "
               "reidgen will not unpickle it, because unpickling such a file can run any code it contains")
    if ours:
        return (f"{message}. If it is a checkpoint you made yourself with an older reidgen, convert it once: "
                f"reidgen convert-checkpoint {path} NEW.pt --trust")
    return f"{message}. reidgen reads only files of tensors, numbers, strings, lists and dicts"


def _reason(exc: Exception) -> str:
    """What went wrong, on one line; of torch's weights-only error only the part that says what
    was wrong (the rest is advice about loading it anyway)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _scan_pickles(path: Path) -> list[str]:
    """The ``module.name`` globals a file's pickles refer to, read from their opcodes (nothing is
    executed: `reidgen.core.checkpoint_peek`). Empty for a file that is no pickle."""
    data = torch_pickle(path)
    if data is not None:  # torch's format: the objects are NAME/data.pkl, tensors are files beside it
        return list(peek_pickle(io.BytesIO(data)).globals)
    names: list[str] = []
    try:  # torch's legacy format (magic number, protocol, system info, objects) or a plain pickle
        with open(path, "rb") as f:
            for _ in range(4):
                names += peek_pickle(f).globals
    except OSError:
        pass
    return names


def convert_checkpoint(old: str | Path, new: str | Path, *, trust: bool) -> list[str]:
    """Rewrite a checkpoint of an older reidgen as tensors and plain data; returns what was converted.

    This is the one place reidgen unpickles a file fully, which runs whatever code the file holds,
    so it takes ``trust=True``: the user says the file is their own. The result is checked to
    load with ``weights_only=True`` before it is written (atomically, to a new file)."""
    if not trust:
        raise ReidgenError(f"converting {old} unpickles it, which runs whatever code the file contains; do it only "
                           "for a checkpoint you made yourself, and say so with --trust")
    old, new = resolve_checkpoint(old), Path(new)
    if not old.is_file():
        raise ReidgenError(f"checkpoint {old} not found")
    if new.resolve() == old.resolve():
        raise ReidgenError(f"write the converted checkpoint to a new file, not over {old} (keep the old one until "
                           "the new one works)")
    if not older_reidgen_layout(old):
        # Judged from the opcodes, before anything runs: a file that names other globals would run
        # them when unpickled, and could not be converted to plain data afterwards anyway.
        raise ReidgenError(f"{old} is not a checkpoint of an older reidgen (torch's archive of a dict opening with "
                           "reidgen's format, version and kind, holding only tensors, numpy values, paths, sets and "
                           "reidgen's configurations); it is not unpickled, even with --trust")
    try:
        ckpt = torch.load(old, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler raises, the file is not usable
        raise ReidgenError(f"checkpoint {old} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ReidgenError(f"{old} is not a reidgen checkpoint (expected one written by reidgen train-*)")
    if ckpt.get("version") != VERSION:
        raise ReidgenError(f"checkpoint {old} has format version {ckpt.get('version')}, this reidgen reads {VERSION}")
    changes: list[str] = []
    plain = to_plain(ckpt, "checkpoint", changes)
    _require_weights_only(plain, old)
    save_checkpoint(new, plain["kind"], {k: v for k, v in plain.items() if k not in ("format", "version", "kind")})
    return changes


def to_plain(value: Any, where: str, changes: list[str]) -> Any:
    """``value`` as tensors and plain data: numpy arrays become tensors, numpy scalars numbers, paths
    strings, sets lists, dataclasses (configurations) dicts; each conversion is noted in ``changes``."""
    if isinstance(value, torch.Tensor) or type(value) in PLAIN_SCALARS:
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ReidgenError(f"{where} is a numpy array of Python objects; it cannot become a tensor")
        changes.append(f"{where}: numpy array → tensor")
        return torch.from_numpy(np.array(value))  # a copy: owns its (writable) memory
    if isinstance(value, np.generic):
        changes.append(f"{where}: numpy {value.dtype} → number")
        return value.item()
    if isinstance(value, PurePath):
        changes.append(f"{where}: path → string")
        return str(value)
    if isinstance(value, (set, frozenset)):
        changes.append(f"{where}: set → list")
        return [to_plain(v, f"{where}[{i}]", changes) for i, v in enumerate(sorted(value, key=repr))]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes.append(f"{where}: {type(value).__name__} → dict")
        return to_plain(dataclasses.asdict(value), where, changes)
    if isinstance(value, dict):
        return _plain_dict(value, where, changes)
    if isinstance(value, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]", changes) for i, v in enumerate(value)]
        if type(value) not in (list, tuple):  # a namedtuple or a list subclass
            changes.append(f"{where}: {type(value).__name__} → {'tuple' if isinstance(value, tuple) else 'list'}")
        return tuple(items) if isinstance(value, tuple) else items
    raise ReidgenError(f"{where} is a {_type_name(value)}, which reidgen cannot convert to tensors and plain data")


def _plain_dict(value: dict, where: str, changes: list[str]) -> dict:
    """Dicts stay dicts; an OrderedDict (a state dict) keeps its type and its ``_metadata``, which
    `load_state_dict` reads (module versions)."""
    out: dict = collections.OrderedDict() if isinstance(value, collections.OrderedDict) else {}
    for key, item in value.items():
        if isinstance(key, np.generic):
            key = key.item()
        if type(key) not in (str, int):
            raise ReidgenError(f"{where} has a key of type {_type_name(key)}; keys must be str or int")
        out[key] = to_plain(item, f"{where}[{key!r}]", changes)
    if hasattr(value, "_metadata"):
        out._metadata = to_plain(value._metadata, f"{where}._metadata", changes)  # type: ignore[attr-defined]
    if type(value) not in (dict, collections.OrderedDict):
        changes.append(f"{where}: {type(value).__name__} → dict")
    return out


def _require_weights_only(checkpoint: dict, source: Path) -> None:
    """Round-trip in memory through ``weights_only=True``, so a file that would be refused is never written."""
    require_plain(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ReidgenError(f"{source} could not be converted to tensors and plain data ({_reason(exc)})") from None


def load_state(module: torch.nn.Module, state: dict, what: str) -> None:
    """Load a state dict strictly, turning a mismatch into a clear refusal."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: another class count or architecture
        first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)
        raise ReidgenError(f"{what} does not match this model: {first.strip()}") from None
    if missing or unexpected:
        raise ReidgenError(
            f"{what} does not match this model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


def file_identity(path: str | Path) -> str:
    """Short content hash, to name which checkpoint produced something."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
