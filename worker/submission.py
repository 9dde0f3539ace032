"""A job's model names checked when a server takes the job, not only when a worker loads them.

`worker.plans.locate` confines each name to its root, as on the workers; here each located
model must also be a reidgen checkpoint of the kind the job needs, judged from the file's header
alone (`reidgen.core.checkpoint_peek.checkpoint_kind`: no weights loaded, nothing unpickled).
Without this, a job naming no model (``nope``, ``dgnet/config.json``) was taken and held one
of the server's active-job slots until a worker failed it.

A client gets the same line whether the file is missing, not a checkpoint or of another kind:
it learns nothing about the server's files beyond the name it sent. The data sets (``data``,
``target``) are checked at submission too, by the plan, which scans them (`make_plan`).

Finding a header walks the checkpoint's whole pickle (its structure, not its weights), work that
grows with the model and that every job on it would repeat in the api's one process; so what
was found is remembered per version of the file (`kind_of_file`: its resolved path and
`worker.stamps.Stamp`): jobs on one model parse it once, and a file replaced or rewritten since
is parsed anew. It is looked up only after the confinement checks, with the path they let through.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from api_schemas.jobs import JobSpec
from reidgen.core.checkpoint import resolve_checkpoint
from reidgen.core.checkpoint_peek import checkpoint_kind
from reidgen.core.errors import ReidgenError, public_error
from worker.plans import Located
from worker.stamps import Stamp, settled, stamp


def check_models(spec: JobSpec, located: Located, models_root: Path) -> None:
    """`ReidgenError` (400, naming the field) unless the spec's checkpoint, and its teacher when it
    names one, are reidgen checkpoints of the kinds the job needs under ``models_root``."""
    want = "crgan" if spec.kind == "crgan_render" else "dgnet"
    if _kind_of(located.checkpoint, models_root) != want:
        raise _no_model("spec.checkpoint", spec.checkpoint, want, f"a {spec.kind} job needs one",
                        "bad_checkpoint")
    if located.teacher is not None and _kind_of(located.teacher, models_root) != "reid":
        raise _no_model("spec.teacher", spec.teacher, "reid", "it gives the soft labels; leave teacher out to use "
                        "the one the generator was trained with", "bad_teacher")


def _kind_of(located: Path, models_root: Path) -> str | None:
    """The kind of the checkpoint a located name leads to (a file, or a run folder's latest), or
    None: nothing there, not a reidgen checkpoint, or a run folder whose checkpoint leads out of the root."""
    path = resolve_checkpoint(located)
    if not path.resolve().is_relative_to(Path(models_root).resolve()) or not path.is_file():
        return None
    return kind_of_file(path.resolve())


def kind_of_file(path: Path) -> str | None:
    """`checkpoint_kind` of the file at ``path`` (resolved, already confined), parsed once per
    version of the file; None when it is not a reidgen checkpoint or went away."""
    before = stamp(path)
    if before is None:
        return None
    if not settled(before):  # may still change without changing its stamp: not remembered
        return checkpoint_kind(path)
    kind = _kind_of_stamped(str(path), before)
    if stamp(path) != before:  # replaced while it was read: the answer may be the new file's,
        _kind_of_stamped.cache_clear()  # so none stays remembered under the old file's stamp
    return kind


@lru_cache(maxsize=64)
def _kind_of_stamped(path: str, found: Stamp) -> str | None:
    """``found`` only keys the cache: the same path with another stamp is parsed again."""
    return checkpoint_kind(path)


def _no_model(field: str, name: str, kind: str, why: str, code: str) -> ReidgenError:
    from generator_service.inference.kinds import KINDS  # only on a refusal: it loads the model code

    title = KINDS[kind].title
    return public_error(f"{field}: no reidgen {title} checkpoint named {name!r} on this server ({why}); give the "
                        f"name of a {title} checkpoint under its models root: NAME, NAME.pt or a run folder NAME",
                        code=code)
