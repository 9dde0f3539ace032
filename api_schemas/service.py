"""HTTP bodies of the generator service (``/v1``): every request, response and error.

The FastAPI app (`generator_service.http`) builds its OpenAPI document from these models and
the Python client (`generator_service.http.client`) speaks them, so both sides share one definition.
Images travel as base64 strings in JSON (or as files in multipart forms); generated images
come back as base64 PNGs, or as a single PNG/JPEG body when the request asks for one.

Static bounds (list lengths, steps) live here; the deployment's own limits (body bytes, images
per request, pixels per image) are settings of the server and are reported by ``GET /v1/models``.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Two 8×16 PNG "people" (a head, a shirt, trousers) used as examples in the OpenAPI document:
# small enough to read, real enough that the examples run end to end.
EXAMPLE_PNG_RED = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAQCAIAAACk6KkqAAAARUlEQVR42mOs6FnAgA2wQKg8I4TQpHMMDAwMTAw4ABUlWBgY"
    "GALmdDxCEgpgYNiQUkEPy/G6akNKxbJJu+BCUXlu1LUDAPiCDIgkgptIAAAAAElFTkSuQmCC"
)
EXAMPLE_PNG_BLUE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAQCAIAAACk6KkqAAAARUlEQVR42mOMygtgwAZYIFSekRFcaNK5cwwMDEwMOAAVJVgY"
    "GBjOvalI2IUs6GYk0kEPy/G6ykik49G5N3AhOSMR6toBAHyTDGwl9IvVAAAAAElFTkSuQmCC"
)

# Hard caps of the schema itself; a server's own limits (`LimitsInfo`) are usually lower.
MAX_LIST_IMAGES = 64
MAX_STEPS = 64
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# Base64 as the server decodes it (generator_service.http.parsing.b64_image, which applies this same
# expression): the standard alphabet in groups of four, the last group of 2 or 3 characters with its
# padding optional; after an optional data URL head. The decoder also skips whitespace; the
# document leaves it out, so a client that follows the document never sends any.
BASE64_BODY = r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{2}(?:==?)?|[A-Za-z0-9+/]{3}=?)"
DATA_URL_HEAD = r"data:[^,]*;base64,"
BASE64_IMAGE_PATTERN = rf"^(?:{DATA_URL_HEAD})?{BASE64_BODY}$"

ImageB64 = Annotated[str, Field(
    min_length=1,
    description="An image file (PNG, JPEG, WebP or BMP) encoded as base64 (standard alphabet; "
                "padding optional), or as a data URL ``data:image/png;base64,...``. Any size within "
                "the server's pixel limit; it is resized to the model's input size.",
    examples=[EXAMPLE_PNG_RED],
    json_schema_extra={"pattern": BASE64_IMAGE_PATTERN, "contentEncoding": "base64", "contentMediaType": "image/*"},
)]
OutputFormat = Literal["json", "png", "jpeg"]
ModelName = Annotated[str, Field(
    pattern=MODEL_NAME_PATTERN,
    description="A loaded model's name (see GET /v1/models); omitted: the default model of the needed kind.",
    examples=["dgnet-market"],
)]

_FORMAT_HELP = ("``json``: a JSON body with base64 PNGs; ``png`` / ``jpeg``: the generated image itself "
                "(several images are tiled without padding: rows = appearance, columns = structure)")


class _Strict(BaseModel):
    """Requests refuse unknown fields, so a misspelt option fails instead of being ignored."""

    model_config = ConfigDict(extra="forbid")


def check_swap_counts(n_appearance: int, n_structure: int, mode: str) -> None:
    """``pairs`` needs lists of equal length, or one list of one image (used with each of the other)."""
    if mode == "pairs" and n_appearance != n_structure and 1 not in (n_appearance, n_structure):
        raise ValueError(f"mode 'pairs' needs as many appearance as structure images, or one of either "
                         f"(got {n_appearance} appearance and {n_structure} structure); use mode 'grid' "
                         f"for every combination")


class SwapRequest(_Strict):
    """DG-Net: the appearance of some images dressed onto the structure (pose, shape) of others."""

    model: ModelName | None = None
    appearance: list[ImageB64] = Field(min_length=1, max_length=MAX_LIST_IMAGES,
                                       description="images whose appearance (clothes, colours) is kept")
    structure: list[ImageB64] = Field(min_length=1, max_length=MAX_LIST_IMAGES,
                                      description="images whose structure (pose, body shape, background) is kept")
    mode: Literal["pairs", "grid"] = Field(
        "pairs", description="``pairs``: the i-th appearance with the i-th structure (a single image on "
                             "either side is paired with every image of the other); ``grid``: every combination")
    format: OutputFormat = Field("json", description=_FORMAT_HELP)

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"appearance": [EXAMPLE_PNG_RED], "structure": [EXAMPLE_PNG_BLUE], "mode": "pairs", "format": "json"},
        {"appearance": [EXAMPLE_PNG_RED, EXAMPLE_PNG_BLUE], "structure": [EXAMPLE_PNG_BLUE], "mode": "grid",
         "format": "png"},
    ]})

    @model_validator(mode="after")
    def _counts(self) -> SwapRequest:
        check_swap_counts(len(self.appearance), len(self.structure), self.mode)
        return self


class SwapForm(_Strict):
    """The multipart/form-data variant of `SwapRequest`: image files instead of base64 strings."""

    model: ModelName | None = None
    appearance: list[bytes] = Field(min_length=1, max_length=MAX_LIST_IMAGES,
                                    description="image files (repeat the field for several)")
    structure: list[bytes] = Field(min_length=1, max_length=MAX_LIST_IMAGES,
                                   description="image files (repeat the field for several)")
    mode: Literal["pairs", "grid"] = "pairs"
    format: OutputFormat = Field("json", description=_FORMAT_HELP)

    @model_validator(mode="after")
    def _counts(self) -> SwapForm:
        check_swap_counts(len(self.appearance), len(self.structure), self.mode)
        return self


class GeneratedImage(BaseModel):
    """One generated image and the inputs it came from."""

    appearance: int = Field(ge=0, description="index into the request's appearance images")
    structure: int = Field(ge=0, description="index into the request's structure images")
    image: str = Field(description="the generated image, a base64 PNG")


class SwapResponse(BaseModel):
    model: str = Field(description="the model that generated the images")
    checkpoint: str = Field(description="identity (short sha256) of its checkpoint file")
    mode: Literal["pairs", "grid"]
    rows: int = Field(ge=1, description="grid: appearance images; pairs: 1")
    columns: int = Field(ge=1, description="grid: structure images; pairs: the number of pairs")
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    images: list[GeneratedImage] = Field(description="row-major (appearance-major in grid mode)")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "dgnet-market", "checkpoint": "3f2a9c0d1b7e4a65", "mode": "pairs", "rows": 1, "columns": 1,
        "width": 64, "height": 128, "images": [{"appearance": 0, "structure": 0, "image": EXAMPLE_PNG_RED}],
    }]})


class RenderRequest(_Strict):
    """CR-GAN: a source person rendered into the context (background, lighting) of a target image."""

    model: ModelName | None = None
    source: ImageB64 = Field(description="the person to render (a re-id crop)")
    target: ImageB64 = Field(description="an image of the target domain whose context is used")
    target_mask: ImageB64 | None = Field(
        None, description="optional person mask of the target (greyscale, white = person, any size); "
                          "omitted: the server segments the target with the model's mask provider")
    format: OutputFormat = Field("json", description="``json``: image and context mask as base64 PNGs; "
                                                     "``png`` / ``jpeg``: the rendered image alone")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"source": EXAMPLE_PNG_RED, "target": EXAMPLE_PNG_BLUE, "format": "json"},
    ]})


class RenderResponse(BaseModel):
    model: str
    checkpoint: str = Field(description="identity (short sha256) of the checkpoint file")
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    image: str = Field(description="the rendered image, a base64 PNG")
    context_mask: str = Field(description="where the context was changed (white) or the source kept (black), "
                                          "a base64 greyscale PNG")
    target_mask: str = Field(description="where the target's person mask came from: 'client' or the "
                                         "mask provider's name (pose, selfie, geometric)")


class InterpolateRequest(_Strict):
    """DG-Net: a linear walk between the appearance (or structure) codes of two images."""

    model: ModelName | None = None
    first: ImageB64 = Field(description="start image; its other code is kept along the walk")
    second: ImageB64 = Field(description="end image (only the interpolated code is taken from it)")
    what: Literal["appearance", "structure"] = "appearance"
    steps: int = Field(8, ge=2, le=MAX_STEPS, description="images generated, both ends included")
    format: OutputFormat = Field("json", description="``json``: base64 PNGs; ``png`` / ``jpeg``: one strip image")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"first": EXAMPLE_PNG_RED, "second": EXAMPLE_PNG_BLUE, "what": "appearance", "steps": 4},
    ]})


class InterpolateResponse(BaseModel):
    model: str
    checkpoint: str = Field(description="identity (short sha256) of the checkpoint file")
    what: Literal["appearance", "structure"]
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    images: list[str] = Field(description="base64 PNGs, from first to second")


class ModelInfo(BaseModel):
    """One loaded model."""

    name: str
    kind: Literal["dgnet", "crgan"]
    endpoints: list[str] = Field(description="the endpoints that use this kind of model")
    default: bool = Field(description="used when a request names no model")
    checkpoint: str = Field(description="the checkpoint file, relative to the models directory")
    identity: str = Field(description="short sha256 of the checkpoint file")
    step: int | None = Field(None, description="training step of the checkpoint")
    preset: str | None = Field(None, description="network preset the model was built from")
    image_size: list[int] = Field(min_length=2, max_length=2, description="input/output size [height, width]")
    masks: str | None = Field(None, description="CR-GAN: provider of the target person masks")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "dgnet-market", "kind": "dgnet", "endpoints": ["/v1/swap", "/v1/interpolate"], "default": True,
        "checkpoint": "dgnet-market/checkpoints/last.pt", "identity": "3f2a9c0d1b7e4a65", "step": 100000,
        "preset": "small", "image_size": [128, 64], "masks": None,
    }]})


class EngineInfo(BaseModel):
    device: str = Field(description="cpu, cuda, cuda:1, ...")
    amp: bool = Field(description="bf16 autocast on CUDA")
    max_batch: int = Field(ge=1, description="images generated per model call, at most")
    max_wait_ms: float = Field(ge=0, description="how long a batch waits for more requests")
    queue_size: int = Field(ge=1, description="images waiting at most; more get 503 with Retry-After")


class LimitsInfo(BaseModel):
    """The server's limits; requests beyond them get a 4xx error that names the limit."""

    max_body_bytes: int
    max_images: int = Field(description="input images per request")
    max_outputs: int = Field(description="generated images per request (a grid is appearance × structure)")
    max_pixels: int = Field(description="pixels (width × height) per input image")
    max_steps: int = Field(description="interpolation steps")
    request_timeout_s: float = Field(description="deadline of a request unless X-Timeout-Ms asks for less")
    auth: bool = Field(description="whether an API key is required")


class RefusedModelInfo(BaseModel):
    """A checkpoint of the models directory that failed to load when the server started: not
    served (a request naming it gets 503 not_ready) until the file is fixed and the server restarted."""

    name: str
    checkpoint: str = Field(description="the checkpoint file, relative to the models directory")
    reason: str = Field(description="why it was refused, in one line (the server log has the details)")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    refused: list[RefusedModelInfo] = Field(default_factory=list, description="checkpoints that failed to load")
    presets: dict[str, list[str]] = Field(description="network presets known to this server, per model kind")
    engine: EngineInfo
    limits: LimitsInfo


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    status: Literal["ready", "loading", "failed"]
    models: int = Field(ge=0, description="models loaded")
    detail: str | None = Field(None, description="why not ready")
    refused: list[str] = Field(default_factory=list, description="models not ready because their checkpoint was "
                                                                "refused at start (the others are served; reasons "
                                                                "in /v1/models)")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. bad_base64, unreadable_image, "
                                  "too_many_images, image_too_large, body_too_large, unsupported_media_type, "
                                  "invalid_request, unknown_model, unauthorized, queue_full, deadline_exceeded, "
                                  "not_ready, out_of_memory, internal_error; jobs: unknown_job, unknown_data, "
                                  "bad_checkpoint, bad_teacher, path_not_allowed, bad_request",
                      examples=["unreadable_image"])
    message: str = Field(description="what was wrong and what is expected, written for the client: it names "
                                     "the field but never a server path, a traceback or bytes of a file",
                         examples=["appearance[0]: not an image the server can read (PNG, JPEG, WebP or BMP expected)"])
    request_id: str | None = Field(None, description="the request's X-Request-ID (the client's, or one the server "
                                                     "made): the server log has the details under it",
                                   examples=["3f2a9c0d5e6b4a1c8d7e9f0a1b2c3d4e"])


class ErrorBody(BaseModel):
    """Every error response has this body; it never carries a stack trace."""

    error: ErrorDetail

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": {"code": "too_many_images", "message": "7 input images; this server takes at most 6 per request"}},
    ]})
