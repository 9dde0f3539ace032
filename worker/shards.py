"""LMDB shards: the writer, the reader and the checks (one module, one format).

A job's output folder::

    OUT/job.json                 the spec, the plan hash, how many shards and records to expect
    OUT/shard-00000/data.mdb     one LMDB environment per shard, key = the record's plan index
    OUT/shard-00000/manifest.json  records (plan index, sha256, size), failed records, models
    OUT/.shard-00003.tmp-XXXX/   a shard being written (never read; discarded when redone)

A record's value is ``MAGIC | u32 length | RecordMeta JSON | encoded image``; its sha256 is in
the manifest. A shard is written under a temporary name and renamed when complete, so a
finished shard is never rewritten and a crash leaves nothing that looks finished. Two workers
writing the same shard (a redelivered task) race on the rename: the loser discards its copy.

The same rules make the output folder safe on a file system shared by many hosts (NFS, CephFS,
Lustre; docs/scaling/shards.md): each temporary folder has one writer, which opens its LMDB
environment without a lock file; everything in it is flushed to the disk or the file server
(fsync) before the rename; readers open finished shards read-only and without locks, so no host
ever shares an LMDB lock with another. The manifest names the host that wrote the shard.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import socket
import struct
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
from PIL import Image

from api_schemas.jobs import FailedRecord, JobManifest, RecordEntry, ShardManifest
from reidgen.core.confined import Folder, NotConfined
from reidgen.core.errors import ReidgenError, public_error

MAGIC = b"RGR1"
MANIFEST = "manifest.json"
JOB_FILE = "job.json"
_INITIAL_MAP = 64 << 20


class CorruptRecord(ReidgenError):
    """A record whose bytes do not match the checksum in its shard's manifest."""


def writer_host() -> str:
    """The name recorded as a shard's writer: the machine's host name (in a container, the
    container's, which Compose's ``hostname:`` sets)."""
    return socket.gethostname()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def record_key(index: int) -> bytes:
    return f"{index:010d}".encode()


def pack_record(meta: dict, image: bytes) -> bytes:
    # Sorted keys and no spaces: the same labels always give the same bytes (and checksum).
    header = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + image


def unpack_record(value: bytes) -> tuple[dict, bytes]:
    if value[:4] != MAGIC or len(value) < 8:
        raise CorruptRecord("not a reidgen record (bad magic)")
    (n,) = struct.unpack("<I", value[4:8])
    try:
        meta = json.loads(value[8:8 + n])
    except ValueError:
        raise CorruptRecord("record labels are not valid JSON") from None
    return meta, value[8 + n:]


# A record's image is the generator's output (128×64 for re-id crops, 256×128 for the paper's
# DG-Net): this bound leaves room for any real one, and is checked from the header, before decoding.
MAX_RECORD_PIXELS = 1024 * 1024


def decode_record(meta: dict, image: bytes, num_classes: int, max_pixels: int = MAX_RECORD_PIXELS) -> Image.Image:
    """A record's picture, checked as input: its size (from the header, bounded, and as its labels
    say), its soft label (classes in 0..K-1, as many probabilities, finite, in [0, 1]) and class
    labels (-1..K-1). `CorruptRecord` says what is wrong: a shard is data someone may have crafted."""
    from reidgen.core.images import decode_image_bytes

    if not isinstance(meta, dict):
        raise CorruptRecord("the record's labels are not a JSON object")
    try:
        size = (int(meta["height"]), int(meta["width"]))
        labels = (int(meta["structure_label"]), int(meta["appearance"]["label"]))
    except (KeyError, TypeError, ValueError):
        raise CorruptRecord("the record's labels lack height, width, structure_label or appearance.label") from None
    if any(not -1 <= label < num_classes for label in labels):
        raise CorruptRecord(f"a class label is outside -1..{num_classes - 1}")
    soft = meta.get("soft_label")
    if soft:
        classes, probs = soft.get("classes"), soft.get("probs")
        if not (isinstance(classes, list) and isinstance(probs, list) and len(classes) == len(probs) <= num_classes):
            raise CorruptRecord(f"the soft label must list as many classes as probabilities, at most {num_classes}")
        if not all(isinstance(c, int) and 0 <= c < num_classes for c in classes):
            raise CorruptRecord(f"a soft label class is outside 0..{num_classes - 1}")
        if not all(isinstance(q, (int, float)) and 0 <= q <= 1 for q in probs):  # NaN fails both comparisons
            raise CorruptRecord("a soft label probability is not a number in [0, 1]")
    try:
        picture = decode_image_bytes(image, "the record's image", max_pixels)
    except ReidgenError as exc:
        raise CorruptRecord(str(exc)) from None
    if (picture.height, picture.width) != size:
        raise CorruptRecord(f"the image is {picture.height}×{picture.width}; its labels say {size[0]}×{size[1]}")
    return picture


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_digest(entries: list[RecordEntry]) -> str:
    return sha256("".join(e.sha256 for e in entries).encode())


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
        raise


@dataclass(frozen=True)
class OutPlace:
    """Where a job's shards go: a root, the components below it, and the name the client gave.

    Every write opens the root once and each component below it without following a symlink
    (`reidgen.core.confined.Folder`), so a component swapped for a symlink after the name was
    checked is refused instead of followed. Unconfined (`reidgen generate` in the user's shell),
    the root is the folder itself, opened as the user named it."""

    root: Path
    parts: tuple[str, ...]
    shown: str

    @classmethod
    def of(cls, out: str | Path | OutPlace, root: str | Path | None = None, shown: str | None = None) -> OutPlace:
        """``out`` under the server's shards ``root`` (already confined and resolved:
        `reidgen.core.paths.confine`), or, without a root, the folder ``out`` itself. ``shown``: the
        name as the client gave it (what error messages quote)."""
        if isinstance(out, OutPlace):
            return out
        if root is None:
            return cls(Path(out), (), str(out) if shown is None else shown)
        base = Path(root).resolve()
        return cls(base, Path(out).relative_to(base).parts, str(out) if shown is None else shown)

    def open(self, create: bool = False) -> Folder:
        """The output folder, open (made, with its missing parents, when ``create``). A file at
        its place is ``EEXIST``, one above it ``ENOTDIR``, a symlink anywhere below the root ``ELOOP``."""
        if not self.parts:
            if create:
                self.root.mkdir(parents=True, exist_ok=True)
            return Folder.root(self.root)
        try:
            return self._walk(create)
        except NotConfined as exc:
            with Folder.below(self.root, self.parts[:-1]) as parent:
                last_is_file = exc.errno == errno.ENOTDIR and parent.kind(self.parts[-1]) == "file"
            if last_is_file:
                raise FileExistsError(errno.EEXIST, "exists and is not a folder") from None
            raise

    def _walk(self, create: bool) -> Folder:
        """`Folder.below`, refusing to enter a folder below the root that holds a ``job.json``: an
        ``out`` inside another job's folder (``ok1/shard-00000``) would mix its files with that
        job's. Each check is made through the descriptor of the folder it is about, the one the
        next part is then opened (or made) in: no name is looked up twice."""
        def not_inside_a_job(folder: Folder, depth: int) -> None:
            if depth and folder.kind(JOB_FILE) is not None:
                job = "/".join(self.parts[:depth])
                raise _bad_out(self.shown, f"it lies inside the folder of another job ({job!r} holds a {JOB_FILE})")

        return Folder.below(self.root, self.parts, create, before_entering=not_inside_a_job)


def _folder_of(out: str | Path | OutPlace | Folder) -> tuple[Folder, bool]:
    """An open folder for ``out`` and whether the caller must close it."""
    if isinstance(out, Folder):
        return out, False
    return OutPlace.of(out).open(create=True), True


def shard_done(out: str | Path | OutPlace | Folder, index: int) -> bool:
    folder, owned = _folder_of(out)
    try:
        with folder.sub(shard_name(index)) as shard:
            return shard.kind(MANIFEST) == "file"
    except (FileNotFoundError, NotConfined):
        return False
    finally:
        if owned:
            folder.close()


def read_shard_manifest(folder: Folder, index: int) -> ShardManifest:
    with folder.sub(shard_name(index)) as shard:
        return ShardManifest.model_validate_json(shard.read_bytes(MANIFEST))


# Why a path cannot be the output folder, when the path itself is the cause (the client chose
# it): these are a `ReidgenError` (HTTP 4xx, one CLI line). A full disk or an I/O error is not
# the client's mistake and stays an internal error.
_UNUSABLE_OUT = {errno.EEXIST: "it exists and is not a folder",
                 errno.ENOTDIR: "a part of it is a file, not a folder",
                 errno.EISDIR: f"its {JOB_FILE} is a folder",
                 errno.ELOOP: "a part of it is a symbolic link, which this server does not follow",
                 errno.EAGAIN: "it was renamed away again and again while it was being opened"}
_UNUSABLE_ERRNOS = set(_UNUSABLE_OUT) | {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG}


def _bad_out(out: str | Path, reason: str) -> ReidgenError:
    """``out`` is the name the client gave (never the server's root: a 4xx body holds no server path)."""
    return public_error(f"out: cannot use {str(out)!r} as the output folder: {reason}; give a new or empty folder "
                        f"that can be written, or the folder of an earlier run of the same spec")


def _unusable_out(out: str | Path, exc: OSError) -> ReidgenError | None:
    """The client's error for an OSError about ``out``, or None when it is the server's fault."""
    if exc.errno not in _UNUSABLE_ERRNOS:
        return None
    return _bad_out(out, _UNUSABLE_OUT.get(exc.errno) or (exc.strerror or "not usable").lower())


def _existing_job_manifest(folder: Folder, shown: str) -> JobManifest | None:
    """The ``job.json`` already in the folder, or None. Something else under that name (a folder,
    a symlink, another file) is refused, without quoting its contents."""
    kind = folder.kind(JOB_FILE)
    if kind is None:
        return None
    if kind != "file":
        raise _bad_out(shown, _UNUSABLE_OUT[errno.EISDIR] if kind == "folder" else
                       f"its {JOB_FILE} is not a regular file")
    try:
        return JobManifest.model_validate_json(folder.read_bytes(JOB_FILE))
    except ValueError:  # not JSON, or not a job manifest
        raise _bad_out(shown, f"it holds a {JOB_FILE} that is not a reidgen job manifest") from None


def ensure_job_manifest(out: str | Path | OutPlace, manifest: JobManifest) -> None:
    """Write ``job.json`` once; refuse an output folder that holds another job's shards.

    Every way ``out`` itself can be unusable (empty, a NUL character, a file or under one, a
    symlink below the shards root, not writable, a ``job.json`` that is not a job manifest) is a
    `ReidgenError` naming ``out`` as the client gave it, raised before ``job.json`` is written: over
    HTTP a 4xx, from the CLI one line, never a traceback."""
    with open_out(out) as folder:
        ensure_job_manifest_in(folder, manifest, OutPlace.of(out).shown)


def open_out(out: str | Path | OutPlace) -> Folder:
    """The output folder, made when missing and opened (through descriptors below a server's
    shards root); a folder the client named that cannot be used is its error (`_bad_out`)."""
    shown = out.shown if isinstance(out, OutPlace) else str(out)
    if not shown:
        raise public_error("out: is empty; give the folder for the shards")
    if "\0" in shown:
        raise public_error("out: must not contain a NUL character (\\0): give a folder path")
    try:
        return OutPlace.of(out).open(create=True)
    except OSError as exc:
        error = _unusable_out(shown, exc)
        if error is None:
            raise
        raise error from None


@contextmanager
def writing_in(folder: Folder, shown: str):
    """Writes in an open output folder; one that someone removed meanwhile (a folder renamed over
    it) is the client's error about ``out``, not an internal one."""
    try:
        yield folder
    except FileNotFoundError:
        if folder.removed():
            raise _bad_out(shown, "it was removed while the job was writing in it") from None
        raise


def ensure_job_manifest_in(folder: Folder, manifest: JobManifest, shown: str) -> None:
    """`ensure_job_manifest` in an output folder already open (``shown``: the client's name for it)."""
    try:
        existing = _existing_job_manifest(folder, shown)
        if existing is None:
            folder.write_atomic(JOB_FILE, manifest.model_dump_json(indent=2).encode())
            return
    except OSError as exc:
        error = _unusable_out(shown, exc)
        if error is None:
            raise
        raise error from None
    if existing.plan_hash != manifest.plan_hash:
        raise public_error(f"out: {shown!r} holds the shards of another job (plan {existing.plan_hash}, this one "
                           f"{manifest.plan_hash}); give another folder")


# -- writing --------------------------------------------------------------------------------------
class ShardWriter:
    """Builds one shard in a private temporary folder of the output folder; `commit` renames it
    into place. Every step goes through the output folder's descriptor: the temporary folder is
    made there (mode 0700, so only this worker's user can enter it), LMDB writes into it through
    its own descriptor (`Folder.path`), and the rename is relative to the output folder's."""

    def __init__(self, out: str | Path | OutPlace | Folder, index: int):
        self.folder, self._owned = _folder_of(out)
        self.index = index
        self.final = shard_name(index)
        self.tmp, self._tmp = self.folder.private(f".{shard_name(index)}.tmp-")
        # lock=False: this process is the only one that ever opens the temporary folder, so no lock
        # file is made (LMDB's locks are shared memory in lock.mdb, which does not work across the
        # hosts of a network file system). sync=False until `commit`, which flushes once.
        self.env = lmdb.open(self._tmp.path, map_size=_INITIAL_MAP, lock=False, metasync=False, sync=False)
        self.entries: list[RecordEntry] = []
        self.failed: list[FailedRecord] = []

    def add(self, records: list[tuple[int, bytes]]) -> None:
        """Write a batch of (plan index, value) in one transaction, growing the map when full."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for index, value in records:
                        txn.put(record_key(index), value, overwrite=False)
                break
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
        for index, value in records:
            self.entries.append(RecordEntry(index=index, key=record_key(index).decode(), sha256=sha256(value),
                                            bytes=len(value)))

    def fail(self, index: int, error: str) -> None:
        self.failed.append(FailedRecord(index=index, error=error))

    def commit(self, **manifest_fields) -> bool:
        """Finish the shard; False if another writer finished it first (ours is discarded).

        In this order, so that a reader on any host sees the shard whole or not at all, whatever
        crashes when: the records reach the disk or the file server (LMDB's fsync) and the
        environment is closed; the manifest is written and fsynced; the temporary folder is
        fsynced (its two names); then it is renamed to its final name, and the output folder is
        fsynced so that the rename itself lasts."""
        self.entries.sort(key=lambda e: e.index)
        self.failed.sort(key=lambda f: f.index)
        manifest_fields.setdefault("host", writer_host())
        manifest = ShardManifest(shard=self.index, record_count=len(self.entries), records=self.entries,
                                 failed=self.failed, shard_sha256=shard_digest(self.entries), **manifest_fields)
        try:
            self.env.sync(True)
            self.env.close()
            self._tmp.write_new(MANIFEST, manifest.model_dump_json(indent=1).encode(), durable=True)
            self._tmp.chmod(0o755)  # readable by the trainers, as a folder made by mkdir would be
            self._tmp.sync()
        except (OSError, lmdb.Error):
            # A duplicate that finished first removed our temporary folder (`_discard_stale`): on a
            # local disk that shows here (ENOENT), on NFS as ESTALE. Our copy was not needed.
            if not self.finished_elsewhere():
                raise
            self.abort()
            return False
        self._tmp.close()
        try:
            self.folder.rename(self.tmp, self.final)  # atomic; fails if the shard already exists
            won = True
        except OSError:
            self.folder.remove_tree(self.tmp)
            won = False
        if won:
            self.folder.sync()
        self._discard_stale()
        self._close()
        return won

    def abort(self) -> None:
        try:
            self.env.close()
        finally:
            self._tmp.close()
            self.folder.remove_tree(self.tmp)
            self._close()

    def finished_elsewhere(self) -> bool:
        """Whether another writer has finished this shard (its final name holds a manifest)."""
        return self.folder.fd >= 0 and shard_done(self.folder, self.index)

    def _close(self) -> None:
        if self._owned:
            self.folder.close()

    def _discard_stale(self) -> None:
        # Temporary copies of a finished shard are useless: a killed worker's half-written one,
        # or a duplicate still running (whose rename will fail and which then cleans up itself).
        prefix = f".{shard_name(self.index)}.tmp-"
        for stale in self.folder.names():
            if stale.startswith(prefix) and stale != self.tmp:
                self.folder.remove_tree(stale)


# -- reading --------------------------------------------------------------------------------------
# One read-only environment per shard path and process: py-lmdb refuses to open a path twice in
# a process, and handles inherited through fork (DataLoader workers) must not be used.
_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


def _read_env(path: Path) -> lmdb.Environment:
    key = str(path.resolve())
    pid, env = _ENVS.get(key, (None, None))
    if env is not None and pid == os.getpid():
        return env
    if env is not None:
        env.close()  # the parent's, inherited through fork: drop it, open our own
    # readonly: data.mdb is opened O_RDONLY and mapped read-only (a read-only mount will do).
    # lock=False: no lock.mdb is made or used; a finished shard never changes, so readers need no
    # lock, and LMDB's lock file cannot work across hosts anyway. readahead=False: training reads
    # records in random order, a few KiB each; with readahead each page fault reads around it a
    # whole window (128 KiB by default, often tuned to MiBs on NFS) over the network.
    env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
    _ENVS[key] = (os.getpid(), env)
    return env


def _close_env(path: Path) -> None:
    pid, env = _ENVS.pop(str(path.resolve()), (None, None))
    if env is not None and pid == os.getpid():
        env.close()


class ShardReader:
    """Read-only access to one finished shard. The LMDB environment opens lazily, once per
    process (a reader made before DataLoader workers fork opens its own in each worker),
    read-only and without locks: finished shards never change."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = ShardManifest.model_validate_json((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            raise ReidgenError(f"{self.path} is not a finished shard (no {MANIFEST})") from None
        except ValueError as exc:
            raise CorruptRecord(f"{self.path / MANIFEST} is not a valid shard manifest ({exc})") from None

    def __len__(self) -> int:
        return self.manifest.record_count

    def _txn(self):
        return _read_env(self.path).begin(buffers=False)

    def raw(self, i: int, verify: bool = True) -> bytes:
        """The value of the i-th record (manifest order), checked against its sha256."""
        entry = self.manifest.records[i]
        with self._txn() as txn:
            value = txn.get(entry.key.encode())
        if value is None:
            raise CorruptRecord(f"{self.path}: record {entry.index} is missing")
        if verify and sha256(value) != entry.sha256:
            raise CorruptRecord(f"{self.path}: record {entry.index} does not match its checksum")
        return value

    def record(self, i: int, verify: bool = True) -> tuple[dict, bytes]:
        meta, image = unpack_record(self.raw(i, verify))
        return meta, image

    def close(self) -> None:
        """Close this process's environment of the shard (other readers of it reopen on demand)."""
        _close_env(self.path)


def shard_paths(root: str | Path) -> list[Path]:
    """The finished shards under ``root`` (a job folder or a shard itself), sorted."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return [root]
    if not root.is_dir():
        raise ReidgenError(f"shard folder {root} not found")
    return sorted(p for p in root.glob("shard-*") if (p / MANIFEST).is_file())


# -- checks ---------------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    root: str
    shards_expected: int | None = None
    shards_found: int = 0
    records: int = 0
    records_expected: int | None = None
    failed_records: int = 0
    missing_shards: list[int] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    in_progress: int = 0
    hosts: Counter = field(default_factory=Counter)  # shards per writing host (as their manifests say)

    @property
    def ok(self) -> bool:
        complete = self.records_expected is None or self.records + self.failed_records == self.records_expected
        return not (self.missing_shards or self.corrupt or self.duplicates) and complete

    def summary(self) -> str:
        lines = [f"{self.root}: {self.shards_found}"
                 + (f"/{self.shards_expected}" if self.shards_expected is not None else "") + " shards, "
                 f"{self.records} records"
                 + (f" (planned {self.records_expected})" if self.records_expected is not None else "")
                 + f", {self.failed_records} failed at generation, {self.in_progress} shard(s) being written"]
        if self.hosts:
            lines.append("written on: " + ", ".join(f"{host} ({n} shard{'s' * (n != 1)})"
                                                     for host, n in sorted(self.hosts.items())))
        if self.missing_shards:
            lines.append(f"missing shards: {self.missing_shards[:20]}")
        if self.duplicates:
            lines.append(f"records in more than one shard: {self.duplicates[:20]}")
        lines += [f"corrupt: {c}" for c in self.corrupt[:50]]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def verify_shard(path: Path, report: VerifyReport, seen: set[int]) -> None:
    try:
        reader = ShardReader(path)
    except ReidgenError as exc:
        report.corrupt.append(str(exc))
        return
    m = reader.manifest
    if shard_digest(m.records) != m.shard_sha256 or m.record_count != len(m.records):
        report.corrupt.append(f"{path}: the manifest's shard checksum or count does not match its records")
    with reader._txn() as txn:
        stored = txn.stat()["entries"]
    if stored != len(m.records):
        report.corrupt.append(f"{path}: {stored} records stored, the manifest lists {len(m.records)}")
    for i, entry in enumerate(m.records):
        try:
            decode_record(*reader.record(i), num_classes=len(m.label_map))
        except CorruptRecord as exc:
            report.corrupt.append(f"{path}: record {entry.index}: {exc}" if str(path) not in str(exc) else str(exc))
        if entry.index in seen:
            report.duplicates.append(entry.index)
        seen.add(entry.index)
    reader.close()
    report.hosts[m.host or "(not recorded)"] += 1
    report.records += len(m.records)
    report.failed_records += len(m.failed)


def verify(root: str | Path) -> VerifyReport:
    """Check every record of every shard under ``root`` against the manifests and ``job.json``."""
    root = Path(root)
    paths = shard_paths(root)
    report = VerifyReport(str(root), shards_found=len(paths))
    job = root / JOB_FILE
    if job.is_file():
        jm = JobManifest.model_validate_json(job.read_text())
        report.shards_expected, report.records_expected = jm.shards, jm.records_planned
        found = {int(p.name.split("-")[1]) for p in paths}
        report.missing_shards = [i for i in range(jm.shards) if i not in found]
        for p in paths:
            plan_hash = ShardReader(p).manifest.plan_hash
            if plan_hash != jm.plan_hash:
                report.corrupt.append(f"{p}: made by another plan ({plan_hash}, job.json says {jm.plan_hash})")
    report.in_progress = len(list(root.glob(".shard-*.tmp-*"))) if root.is_dir() else 0
    seen: set[int] = set()
    for p in paths:
        verify_shard(p, report, seen)
    return report


def contact_sheet(root: str | Path, count: int = 32, columns: int = 8, pad: int = 2) -> Image.Image:
    """The first ``count`` records of the shards under ``root``, tiled (to check them by eye)."""
    images = []
    for path in shard_paths(root):
        reader = ShardReader(path)
        for i in range(min(len(reader), count - len(images))):
            images.append(Image.open(io.BytesIO(reader.record(i)[1])).convert("RGB"))
        reader.close()
        if len(images) >= count:
            break
    if not images:
        raise ReidgenError(f"no records under {root}")
    w, h = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (min(columns, len(images)) * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for k, im in enumerate(images):
        sheet.paste(im, (pad + (k % columns) * (w + pad), pad + (k // columns) * (h + pad)))
    return sheet
