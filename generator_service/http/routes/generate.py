"""`/v1/swap`, `/v1/render`, `/v1/interpolate`: handlers parse, bound and encode; the engine generates."""
from __future__ import annotations

import torch
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from api_schemas.service import (
    GeneratedImage,
    InterpolateRequest,
    InterpolateResponse,
    RenderRequest,
    RenderResponse,
    SwapForm,
    SwapRequest,
    SwapResponse,
)
from generator_service.http.errors import ApiError
from generator_service.http.openapi import (
    GENERATE_ERRORS,
    IMAGE_CONTENT,
    TIMEOUT_MS_MAX,
    TIMEOUT_MS_MIN,
    error_docs,
    request_body,
)
from generator_service.http.parsing import (
    Service,
    image_response,
    media_type,
    named,
    png_b64,
    read_form,
    require_json,
    swap_outputs,
    unsupported,
    validate,
)
from generator_service.inference.kinds import InterpolateItem, RenderItem, SwapItem
from reidgen.core.images import image_grid, mask_to_pil, to_pil


def add_generate_routes(app: FastAPI, service: Service) -> None:
    engine, settings = service.engine, service.settings
    # Typed int, not int | None: absent is the server's deadline, and the document then says what
    # a client may send (an integer in bounds), not that it may send null.
    timeout_header = Header(None, alias="X-Timeout-Ms", ge=TIMEOUT_MS_MIN, le=TIMEOUT_MS_MAX,
                            description="deadline of this request in milliseconds (capped by the server's; a "
                                        "deadline that passes before the images are made: 504)")

    @app.post("/v1/swap", response_model=SwapResponse, tags=["generate"],
              responses={200: {"content": IMAGE_CONTENT, "description": "generated images"},
                         **error_docs(*GENERATE_ERRORS)},
              openapi_extra=request_body(SwapRequest, SwapForm))
    async def swap(request: Request, x_timeout_ms: int = timeout_header) -> Response:
        """DG-Net appearance × structure swap: pairs, or every combination as a grid."""
        media = media_type(request)
        if media == "application/json":
            req = await service.parse(SwapRequest, request)
        elif media == "multipart/form-data":
            engine.admit(1)  # 503 before the files are read
            req = validate(SwapForm, await read_form(request, settings, ("appearance", "structure")))
        else:
            raise unsupported(media)
        service.check_counts(len(req.appearance) + len(req.structure), swap_outputs(req))
        model = engine.model_for("swap", req.model)
        a, s = await run_in_threadpool(lambda: (service.decode(model, named("appearance", req.appearance)),
                                                service.decode(model, named("structure", req.structure))))
        item = SwapItem(a, s, grid=req.mode == "grid")
        out = await service.generate("swap", model, item, service.timeout(x_timeout_ms))
        ia, is_ = item.pairs()
        rows, cols = (len(a), len(s)) if item.grid else (1, item.size)
        flat = out.flatten(0, 1) if item.grid else out
        if req.format != "json":
            cells = [[flat[r * cols + c] for c in range(cols)] for r in range(rows)]
            return await run_in_threadpool(lambda: image_response(image_grid(cells, pad=0), req.format, model,
                                                                  rows, cols))

        def encode() -> SwapResponse:
            images = [GeneratedImage(appearance=int(i), structure=int(j), image=png_b64(to_pil(x)))
                      for i, j, x in zip(ia, is_, flat)]
            h, w = model.image_size
            return SwapResponse(model=model.name, checkpoint=model.identity, mode=req.mode, rows=rows, columns=cols,
                                width=w, height=h, images=images)
        return JSONResponse((await run_in_threadpool(encode)).model_dump())

    @app.post("/v1/render", response_model=RenderResponse, tags=["generate"],
              responses={200: {"content": IMAGE_CONTENT, "description": "the rendered image"},
                         **error_docs(*GENERATE_ERRORS)},
              openapi_extra=request_body(RenderRequest))
    async def render(request: Request, x_timeout_ms: int = timeout_header) -> Response:
        """CR-GAN: render the source person into the target image's context."""
        require_json(media_type(request), "/v1/render")
        req = await service.parse(RenderRequest, request)
        model = engine.model_for("render", req.model)

        def prepare():
            source, target = service.picture(req.source, "source"), service.picture(req.target, "target")
            mask, mask_source = service.decode_mask(model, req.target_mask, target)
            return torch.stack([model.image_tensor(source), model.image_tensor(target)]), mask, mask_source
        images, mask, mask_source = await run_in_threadpool(prepare)
        rendered, context = await service.generate("render", model, RenderItem(images[:1], images[1:], mask[None]),
                                                   service.timeout(x_timeout_ms))
        if req.format != "json":
            return await run_in_threadpool(lambda: image_response(to_pil(rendered[0]), req.format, model))

        def encode() -> RenderResponse:
            h, w = model.image_size
            return RenderResponse(model=model.name, checkpoint=model.identity, width=w, height=h,
                                  image=png_b64(to_pil(rendered[0])), context_mask=png_b64(mask_to_pil(context[0])),
                                  target_mask=mask_source)
        return JSONResponse((await run_in_threadpool(encode)).model_dump())

    @app.post("/v1/interpolate", response_model=InterpolateResponse, tags=["generate"],
              responses={200: {"content": IMAGE_CONTENT, "description": "the interpolated images"},
                         **error_docs(*GENERATE_ERRORS)},
              openapi_extra=request_body(InterpolateRequest))
    async def interpolate(request: Request, x_timeout_ms: int = timeout_header) -> Response:
        """DG-Net: images along a line between two images' appearance (or structure) codes."""
        require_json(media_type(request), "/v1/interpolate")
        req = await service.parse(InterpolateRequest, request)
        if req.steps > settings.max_steps:
            raise ApiError(413, "too_many_outputs", f"steps={req.steps}; this server interpolates at most "
                                                    f"{settings.max_steps} steps")
        service.check_counts(2, req.steps)
        model = engine.model_for("interpolate", req.model)
        x = await run_in_threadpool(service.decode, model, [("first", req.first), ("second", req.second)])
        out = await service.generate("interpolate", model, InterpolateItem(x[:1], x[1:], req.steps, req.what),
                                     service.timeout(x_timeout_ms))
        if req.format != "json":
            return await run_in_threadpool(lambda: image_response(image_grid([list(out)], pad=0), req.format, model,
                                                                  1, len(out)))

        def encode() -> InterpolateResponse:
            h, w = model.image_size
            return InterpolateResponse(model=model.name, checkpoint=model.identity, what=req.what, width=w,
                                       height=h, images=[png_b64(to_pil(t)) for t in out])
        return JSONResponse((await run_in_threadpool(encode)).model_dump())
