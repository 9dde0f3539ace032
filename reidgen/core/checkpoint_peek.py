"""What a checkpoint file says it is, read from its opcodes: nothing in it is unpickled.

Unpickling runs code, so a file is judged by what `pickletools.genops` parses (opcodes and
their arguments; it executes nothing). Two callers need that:

- a refusal (`reidgen.core.checkpoint.read_plain`) offers ``convert-checkpoint --trust`` only
  for a file an older reidgen wrote (`older_reidgen_layout`): torch's archive, whose pickle is a
  dict opening with reidgen's header (``format``, ``version``, ``kind``, as `save_checkpoint`
  always writes it) and names no global but those an older reidgen stored (numpy arrays and
  numbers, paths, sets, its own configuration dataclasses). A file that merely holds the words
  ``format``, ``kind`` and ``reidgen`` somewhere is no such file.
- a server checks at submission that a job names a reidgen checkpoint of the kind the job
  needs (`checkpoint_kind`), without loading its weights.
"""
from __future__ import annotations

import dataclasses
import io
import pickletools
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

HEADER_KEYS = ("format", "version", "kind")
# A torch archive's pickle holds the structure only (tensors are members beside it): a few MB at
# most. A larger one is not a checkpoint of ours, and is not read into memory to find out.
MAX_PICKLE_BYTES = 64 << 20

# The globals a reidgen checkpoint of today names: torch's tensor and storage rebuilders, dtypes
# and OrderedDict (state dicts). `torch.load(weights_only=True)` reads these.
_TENSOR_GLOBALS = frozenset({"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                             "torch._utils._rebuild_parameter", "torch._tensor._rebuild_from_type_v2",
                             "torch.device", "torch.Size"})
# ...and what an older reidgen also stored, which `convert_checkpoint` turns into plain data.
_OLDER_GLOBALS = frozenset({
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "_codecs.encode",  # how pickle protocol 2 stores the bytes of a numpy number
    "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
    "__builtin__.set", "builtins.set", "__builtin__.frozenset", "builtins.frozenset",
})
_OWN_PACKAGES = ("reidgen.", "trainer.", "generator_service.", "api_schemas.")

_STRING_OPS = frozenset({"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_INT_OPS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


@dataclass(frozen=True)
class Peek:
    """A pickle's opening entries (while they are strings and numbers) and the globals it names."""

    opening: tuple[tuple[Any, Any], ...]   # the first key/value pairs of its top-level dict
    globals: tuple[str, ...]               # ``module.name`` of each global, in order, repeats kept

    @property
    def header(self) -> dict[str, Any] | None:
        """``format``/``version``/``kind``, when the dict opens with them as reidgen writes them."""
        first = self.opening[:len(HEADER_KEYS)]
        if tuple(key for key, _ in first) != HEADER_KEYS:
            return None
        header = dict(first)
        if header["format"] != "reidgen" or not isinstance(header["version"], int) \
                or not isinstance(header["kind"], str):
            return None
        return header


def torch_pickle(path: str | Path) -> bytes | None:
    """The pickle of a file `torch.save` wrote (a zip archive: ``NAME/data.pkl`` beside the
    tensors, every member in one folder), or None for any other file."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            folders = {m.filename.split("/", 1)[0] for m in members}
            if len(folders) != 1 or any("/" not in m.filename for m in members):
                return None
            data = f"{folders.pop()}/data.pkl"
            info = next((m for m in members if m.filename == data), None)
            if info is None or info.file_size > MAX_PICKLE_BYTES:
                return None
            return archive.read(info)
    except (OSError, zipfile.BadZipFile, ValueError):  # unreadable, or a broken archive
        return None


def peek_pickle(stream: IO[bytes]) -> Peek:
    """Parse one pickle up to its STOP (or up to where it stops parsing: what came before is kept)."""
    opening: list[Any] = []
    names: list[str] = []
    pushed: list[Any] = []  # what each op pushed, enough to name protocol 4's STACK_GLOBAL
    memo: dict[int, Any] = {}
    phase = "start"  # start → dict (its EMPTY_DICT seen) → items (its MARK seen) → done
    try:
        for op, arg, _ in pickletools.genops(stream):
            name = op.name
            if name in ("GLOBAL", "INST"):
                names.append(".".join(arg.split(" ", 1)))
            elif name == "STACK_GLOBAL":
                module, attr = pushed[-2:] if len(pushed) >= 2 else (None, None)
                names.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "?")
            value = _scalar(name, arg, memo)
            if name in _MEMO_PUTS:
                memo[len(memo) if name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
            else:
                pushed.append(value)
            phase = _opening_step(phase, name, value, opening)
    except Exception:  # noqa: BLE001 - the rest is not a pickle: keep what was found before it
        pass
    pairs = tuple(zip(opening[0::2], opening[1::2]))
    return Peek(pairs, tuple(names))


def _scalar(name: str, arg: Any, memo: dict[int, Any]) -> Any:
    """The string or number an op pushes (fetched from the memo too); None for anything else."""
    if name in _STRING_OPS:
        return arg if isinstance(arg, str) else None
    if name in _INT_OPS:
        return arg if isinstance(arg, int) and not isinstance(arg, bool) else None
    if name in _MEMO_GETS:
        return memo.get(arg)
    return None


def _opening_step(phase: str, name: str, value: Any, opening: list[Any]) -> str:
    """Follow the top-level dict's first entries: PROTO/FRAME, EMPTY_DICT, MARK, then keys and
    values while each is a string or a number (memo stores between them are skipped)."""
    if phase == "done" or name in _MEMO_PUTS or name in ("PROTO", "FRAME"):
        return phase
    if phase == "start":
        return "dict" if name == "EMPTY_DICT" else "done"
    if phase == "dict":
        return "items" if name == "MARK" else "done"
    if value is None:
        return "done"
    opening.append(value)
    return "items"


def peek(path: str | Path) -> Peek | None:
    """The `Peek` of a torch archive's pickle; None for a file that is not one."""
    data = torch_pickle(path)
    return None if data is None else peek_pickle(io.BytesIO(data))


def checkpoint_kind(path: str | Path) -> str | None:
    """The kind a reidgen checkpoint file says it holds (``dgnet``, ``reid``...), or None for a
    file that is not a reidgen checkpoint (nothing is unpickled: the weights are not checked)."""
    found = peek(path)
    header = found.header if found is not None else None
    return header["kind"] if header is not None else None


def older_reidgen_layout(path: str | Path) -> bool:
    """Whether the file is a checkpoint of an older reidgen: reidgen's header, and no global but
    torch's tensors and the values an older reidgen stored (so converting it runs nothing else)."""
    found = peek(path)
    if found is None or found.header is None:
        return False
    return all(name in _TENSOR_GLOBALS or name in _OLDER_GLOBALS or _torch_plain(name) or _own_dataclass(name)
               for name in found.globals)


def _torch_plain(name: str) -> bool:
    """A storage class or dtype of torch (``torch.FloatStorage``, ``torch.float32``)."""
    import torch

    module, _, attr = name.rpartition(".")
    if module != "torch":
        return False
    value = vars(torch).get(attr)  # not getattr: torch imports submodules on demand, named by the file
    return attr.endswith("Storage") and isinstance(value, type) or isinstance(value, torch.dtype)


def _own_dataclass(name: str) -> bool:
    """A configuration dataclass of reidgen's own packages. Only modules this process has already
    imported are looked in: a file's names never make it import (and so run) a module."""
    module, _, attr = name.rpartition(".")
    if not (module + ".").startswith(_OWN_PACKAGES):
        return False
    loaded = sys.modules.get(module)
    value = vars(loaded).get(attr) if loaded is not None else None  # no module __getattr__ runs either
    return isinstance(value, type) and dataclasses.is_dataclass(value)
