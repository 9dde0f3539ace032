"""Batch generation: the job spec, shard manifests, record labels and job status.

A job spec says everything that decides the records of a job (model, data, kind of
generation, seed, shard size, encoding): the plan is a pure function of it and of the data
folders, so the same spec always gives the same records, wherever it runs (`reidgen generate`
in-process, a Celery worker, many of them). Where the shards go (``out``) is not part of it.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

JobKind = Literal["dgnet_all_pairs", "dgnet_random_structures", "crgan_render"]
Split = Literal["train", "query", "gallery"]
SHARD_FORMAT, SHARD_VERSION = "reidgen-shard", 1


def _no_nul(value: str) -> str:
    """A path or name with a NUL character names no file: every OS call on it fails with an
    error a client should not see, so it is refused where the spec is read (HTTP body, spec file,
    task arguments), with a message naming the field."""
    if "\0" in value:
        raise PydanticCustomError("nul_in_path", "must not contain a NUL character (\\0): give a file or folder path")
    return value


PathText = Annotated[str, AfterValidator(_no_nul)]


class _Strict(BaseModel):
    # A misspelt option must fail, not be silently ignored (it would change the plan).
    model_config = ConfigDict(extra="forbid")


class JobSpec(_Strict):
    """What to generate. Over HTTP (and on the workers) ``checkpoint`` and ``teacher`` are model
    names under the server's models root, ``data`` and ``target`` data set names under its data
    root; an absolute path is taken only inside that root. `reidgen generate` takes paths."""

    kind: JobKind = Field(description="dgnet_all_pairs: every appearance × structure pair of the subset; "
                                      "dgnet_random_structures: K random structures per image; "
                                      "crgan_render: sources rendered into target contexts")
    checkpoint: PathText = Field(min_length=1,
                                 description="DG-Net or CR-GAN checkpoint: a model name under the server's models "
                                             "root (NAME, NAME.pt or a run folder); in-process, a path")
    teacher: PathText | None = Field(None, description="re-id checkpoint giving the soft labels; default: the "
                                                       "teacher (DG-Net) or identity model (CR-GAN) the generator "
                                                       "was trained with")
    soft_labels: bool = Field(True, description="store the teacher's top-k soft label with every record")
    top_k: int = Field(10, ge=1, le=4096, description="classes kept of each soft label (renormalised to sum 1)")
    data: PathText = Field(min_length=1,
                           description="source data set: a Market-style data set name under the server's data "
                                       "root; in-process, a folder or a name under REIDGEN_DATA")
    split: Split = "train"
    subset: int | None = Field(None, ge=1, description="use this many source images, drawn with the seed; "
                                                        "default: all")
    structures_per_image: int = Field(4, ge=1, le=1024, description="K for dgnet_random_structures")
    cross_identity: bool = Field(True, description="only pairs whose two images show different people")
    target: PathText | None = Field(None, description="target data set (crgan_render)")
    target_split: Split = "train"
    targets_per_source: int | None = Field(1, ge=1, description="crgan_render: random target contexts per source; "
                                                                "null: every target (source × target)")
    seed: int = Field(0, ge=0, lt=2**63)
    shard_size: int = Field(256, ge=1, le=65_536, description="records per shard (a server may take fewer: "
                                                              "its max_shard_size)")
    batch_size: int = Field(16, ge=1, le=1024, description="images per device batch (a server may take fewer: its "
                                                           "max_batch_size)")
    encoding: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)

    @model_validator(mode="after")
    def _kind_rules(self) -> JobSpec:
        # The rules of each kind live in its own spec (below), the one HTTP clients are shown: the
        # flat form, which workers and `reidgen generate` read, is held to the same rules.
        if type(self) is JobSpec:
            SPEC_OF_KIND[self.kind].model_validate(self.model_dump(exclude_unset=True))
        return self


class _DgnetSpec(JobSpec):
    """A DG-Net job: its structures come from the source data set, so it has no target."""

    target: None = Field(None, description="not used by DG-Net jobs (crgan_render only)")

    @field_validator("target", mode="before")
    @classmethod
    def _no_target(cls, value, info: ValidationInfo):
        if value is not None:
            raise PydanticCustomError("target_unused", "is only used by crgan_render jobs; leave it out for {kind}",
                                      {"kind": info.data.get("kind", "DG-Net jobs")})
        return value


class DgnetAllPairsSpec(_DgnetSpec):
    """Every appearance × structure pair of the subset."""

    kind: Literal["dgnet_all_pairs"]


class DgnetRandomStructuresSpec(_DgnetSpec):
    """K random structures (``structures_per_image``) for every source image."""

    kind: Literal["dgnet_random_structures"]


class CrganRenderSpec(JobSpec):
    """Source persons rendered into the contexts of a target data set."""

    kind: Literal["crgan_render"]
    target: PathText = Field(min_length=1, description="target data set whose contexts the sources are rendered "
                                                       "into: a data set name under the server's data root")


SPEC_OF_KIND: dict[str, type[JobSpec]] = {"dgnet_all_pairs": DgnetAllPairsSpec,
                                          "dgnet_random_structures": DgnetRandomStructuresSpec,
                                          "crgan_render": CrganRenderSpec}


def _fields_of_flat(value):
    # A flat `JobSpec` given in Python (JobRequest(spec=JobSpec(...))) is read as its fields, as if
    # it had come over HTTP: the union takes only the spec of its kind.
    return value.model_dump() if type(value) is JobSpec else value


# A job spec as HTTP clients send it: one spec per kind, told apart by ``kind`` (the OpenAPI
# document shows it as a discriminated union). The value is still a `JobSpec`.
KindSpec = Annotated[DgnetAllPairsSpec | DgnetRandomStructuresSpec | CrganRenderSpec, Discriminator("kind"),
                     BeforeValidator(_fields_of_flat)]


class SourceRef(BaseModel):
    """One source image of a record: where it is (relative to its data set) and whose it is."""

    path: str
    pid: int
    camera: int
    domain: str
    label: int = Field(description="class index in the generator's label map; -1 if the person is not in it")


class SoftLabel(BaseModel):
    classes: list[int]
    probs: list[float]


class RecordMeta(BaseModel):
    """The labels stored with a generated image (DG-Net: L_prim uses ``soft_label``, L_fine
    ``structure_label``; CR-GAN: the source's identity is ``appearance.label``)."""

    index: int = Field(description="position in the job's plan")
    kind: JobKind
    appearance: SourceRef = Field(description="appearance source (CR-GAN: the person rendered)")
    structure: SourceRef = Field(description="structure source (CR-GAN: the target context)")
    soft_label: SoftLabel | None = None
    structure_label: int = Field(description="the fine-grained loss's class: the structure provider's identity")
    encoding: Literal["png", "jpeg"]
    height: int
    width: int


class ModelIdentity(BaseModel):
    checkpoint: str
    identity: str = Field(description="short sha256 of the checkpoint file")


class RecordEntry(BaseModel):
    index: int
    key: str
    sha256: str
    bytes: int


class FailedRecord(BaseModel):
    index: int
    error: str


class ShardManifest(BaseModel):
    format: Literal["reidgen-shard"] = SHARD_FORMAT
    version: int = SHARD_VERSION
    shard: int
    shards: int
    plan_hash: str
    spec: JobSpec
    models: dict[str, ModelIdentity]
    label_map: list[int] = Field(description="person id of each class index (soft labels, structure labels)")
    record_count: int
    records: list[RecordEntry]
    failed: list[FailedRecord]
    shard_sha256: str = Field(description="sha256 of the records' sha256 digests, in order")
    host: str | None = Field(None, description="the host name of the machine (or container) whose worker wrote "
                                               "the shard; none in shards written before it was recorded")


class JobManifest(BaseModel):
    """``job.json`` beside the shards: what the folder should hold once the job is done."""

    format: Literal["reidgen-job"] = "reidgen-job"
    spec: JobSpec
    plan_hash: str
    shards: int
    records_planned: int


class JobRequest(_Strict):
    spec: KindSpec
    out: PathText = Field(min_length=1, description="folder for the shards: a name under the server's shards root")


JobState = Literal["queued", "running", "done", "failed", "cancelled"]


class JobError(BaseModel):
    """One failure of a job, as its HTTP clients may read it: no traceback, server path or file
    bytes (those are in the worker log, tagged with the job id)."""

    shard: int | None = Field(None, description="the shard that failed, if the failure was one shard's")
    code: str = Field(description="stable machine-readable code: bad_checkpoint, bad_teacher, unknown_data, "
                                  "bad_request, shard_timeout, internal_error", examples=["bad_checkpoint"])
    message: str = Field(description="what was wrong, naming the field of the spec",
                         examples=["checkpoint: no readable reidgen dgnet checkpoint named 'g.pt' "
                                   "(a dgnet_random_structures job needs one)"])


class JobEvent(BaseModel):
    """Something that happened to a job on its way, not a failure: a shard redone after its worker
    was lost."""

    shard: int | None = Field(None, description="the shard concerned")
    code: str = Field(description="stable machine-readable code: worker_lost", examples=["worker_lost"])
    message: str = Field(description="what happened, for the user",
                         examples=["the worker making this shard stopped sending heartbeats for 30 s (killed or "
                                   "lost); the shard was queued again and its partial output discarded"])
    at: float = Field(description="when (Unix time)")


class JobStatus(BaseModel):
    id: str
    state: JobState
    out: str
    shards_total: int
    shards_done: int
    records_planned: int
    records_done: int
    records_failed: int
    images_per_s: float | None = Field(None, description="records written per second since the first shard started")
    errors: list[str] = Field(default_factory=list, description="the lines of error_details, as "
                                                               "'shard N: code: message' (for older clients)")
    error_details: list[JobError] = Field(default_factory=list)
    shards_redone: int = Field(0, description="shards queued again because their worker was lost")
    events: list[JobEvent] = Field(default_factory=list, description="shards redone, and why")
