"""Input and output schemas of ``fal-ai/fast-lcm-diffusion``, field by field.

A leaf: pure pydantic. The bounds (``FARM_MAX_NUM_IMAGES`` …) come from the settings object the
validation is given (``context={"settings": settings}``, see :func:`farm.admission.admit`); without
one, only the fixed rules are checked (types, ranges of the API itself). File-path policy (LoRA and
embedding paths) is admission's (``farm.admission``), not a validator's. A violation names the field
and the reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from farm.config import Settings
from models.registry import SDXL_BASE, all_models

ADMITTED = {"admitted": True}


def _admitted(info: ValidationInfo) -> bool:
    """Whether this is an input read back from the ledger (see :func:`admitted_input`)."""
    return bool(info.context and info.context.get("admitted"))


def _bounds(info: ValidationInfo) -> Settings | None:
    """The settings whose bounds apply (None: an input read back, or no settings given)."""
    if _admitted(info) or not info.context:
        return None
    s = info.context.get("settings")
    return s if isinstance(s, Settings) else None


class ImageSizeName(StrEnum):
    square_hd = "square_hd"
    square = "square"
    portrait_4_3 = "portrait_4_3"
    portrait_16_9 = "portrait_16_9"
    landscape_4_3 = "landscape_4_3"
    landscape_16_9 = "landscape_16_9"


NAMED_SIZES: dict[ImageSizeName, tuple[int, int]] = {
    ImageSizeName.square_hd: (1024, 1024),
    ImageSizeName.square: (512, 512),
    ImageSizeName.portrait_4_3: (768, 1024),
    ImageSizeName.portrait_16_9: (576, 1024),
    ImageSizeName.landscape_4_3: (1024, 768),
    ImageSizeName.landscape_16_9: (1024, 576),
}

REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Fixed ceilings of the API itself, checked before any item is: a framework that parses a body without
# the settings (FastAPI, on the event loop) stops at once on a list of 100,000 LoRAs or 100,000 unknown
# fields. ``FARM_MAX_LORAS`` / ``FARM_MAX_EMBEDDINGS`` (admission, with the settings) bound below them.
MAX_LIST_ITEMS = 64
MAX_FIELD_ERRORS = 20  # an answer names at most this many bad fields (then how many more there were)


class ImageSize(BaseModel):
    width: int = Field(512, description="The width of the generated image.")
    height: int = Field(512, description="The height of the generated image.")

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int, info: ValidationInfo) -> int:
        if _admitted(info):
            return v
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v})")
        s = _bounds(info)
        if s is not None and not s.min_image_side <= v <= s.max_image_side:
            raise ValueError(f"must be between {s.min_image_side} and {s.max_image_side} (got {v})")
        return v


def _size_kind(v: Any) -> str:
    return "named" if isinstance(v, str) else "custom"


ImageSizeField = Annotated[
    Annotated[ImageSizeName, Tag("named")] | Annotated[ImageSize, Tag("custom")],
    Discriminator(_size_kind),
]


def default_image_size(model_name: str) -> ImageSizeName | ImageSize:
    """The size a request for ``model_name`` gets when it names none: the model's own default
    (``models.registry``), as a named size when one matches (SDXL: ``square_hd``, SD1.5: ``square``).

    Not checked against ``FARM_MIN/MAX_IMAGE_SIDE``: those bound what a caller asks for. An unknown
    model (an input read back by a worker that does not know it) gets fal's default, ``square_hd``.
    """
    spec = all_models().get(model_name)
    size = spec.default_size if spec is not None else NAMED_SIZES[ImageSizeName.square_hd]
    for name, named in NAMED_SIZES.items():
        if named == size:
            return name
    return ImageSize.model_construct(width=size[0], height=size[1])


class LoraWeight(BaseModel):
    path: str = Field(..., description="URL or the path to the LoRA weights. Or HF model name.")
    scale: float = Field(1.0, ge=-4.0, le=4.0, description="The scale of the LoRA weight.")
    force: bool = Field(False, description="If set to true, the embedding will be forced to be used.")


class Embedding(BaseModel):
    path: str = Field(..., description="URL or the path to the embedding weights.")
    tokens: list[str] = Field(
        default_factory=lambda: ["<s0>", "<s1>"], min_length=1, max_length=16,
        description="The list of tokens to use for the embedding.",
    )

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if _admitted(info):
            return v
        for tok in v:
            if not tok or len(tok) > 64 or any(c.isspace() for c in tok):
                raise ValueError(f"each token must be 1-64 characters without spaces (got {tok!r})")
        if len(set(v)) != len(v):
            raise ValueError("tokens must be distinct")
        return v


class GenerateInput(BaseModel):
    """Input of ``fal-ai/fast-lcm-diffusion``."""

    model_config = ConfigDict(protected_namespaces=(), extra="forbid")

    model_name: str = Field(SDXL_BASE, description="The name of the model to use.")
    prompt: str = Field(..., description="The prompt to use for generating the image.")
    negative_prompt: str = Field("", description="The negative prompt to use.")
    image_size: ImageSizeField | None = Field(
        None, description="The size of the image. Default: the model's own (square_hd for SDXL, square for "
        "SD1.5, 64x64 for farm/tiny-lcm); the input recorded for a request holds the size resolved at submit.",
    )
    num_inference_steps: int = Field(6, description="The number of inference steps to perform.")
    seed: int | None = Field(None, description="The same seed and prompt give the same image.")
    guidance_scale: float = Field(1.5, description="The CFG (Classifier Free Guidance) scale.")
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0, description="The rescale factor for the CFG.")
    sync_mode: bool = Field(True, description="Return images as data URIs instead of URLs.")
    num_images: int = Field(1, description="The number of images to generate.")
    enable_safety_checker: bool = Field(True, description="If true, the safety checker is enabled.")
    safety_checker_version: Literal["v1", "v2"] = Field("v1", description="v1: CompVis; v2: a ViT classifier.")
    expand_prompt: bool = Field(False, description="If true, the prompt is expanded with additional prompts.")
    format: Literal["jpeg", "png"] = Field("jpeg", description="The format of the generated image.")
    request_id: str = Field("", description="An id bound to a request.")
    loras: list[LoraWeight] = Field(default_factory=list, max_length=MAX_LIST_ITEMS,
                                    description="LoRA weights to apply.")
    embeddings: list[Embedding] = Field(default_factory=list, max_length=MAX_LIST_ITEMS,
                                        description="Textual-inversion embeddings.")

    @model_validator(mode="before")
    @classmethod
    def _few_fields(cls, data: Any) -> Any:
        """More keys than the model has fields: refused as one error before any field is looked at (with
        ``extra="forbid"`` each unknown key would cost an error of its own)."""
        if isinstance(data, Mapping) and len(data) > len(cls.model_fields):
            unknown = [str(k)[:40] for k in data if k not in cls.model_fields]
            shown = ", ".join(repr(k) for k in unknown[:5])
            raise ValueError(f"{len(unknown)} unknown fields ({shown}{', …' if len(unknown) > 5 else ''})")
        return data

    @field_validator("model_name")
    @classmethod
    def _model(cls, v: str, info: ValidationInfo) -> str:
        if _admitted(info):
            return v
        models = all_models()
        if v not in models:
            raise ValueError(f"unknown model {v!r}; known models: {', '.join(sorted(models))}")
        return v

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _text(cls, v: str, info: ValidationInfo) -> str:
        if _admitted(info):
            return v
        if info.field_name == "prompt" and not v.strip():
            raise ValueError("must not be empty")
        s = _bounds(info)
        if s is None:
            return v
        limit = s.max_prompt_chars
        if len(v) > limit:
            raise ValueError(f"must be at most {limit} characters (got {len(v)})")
        return v

    @field_validator("num_inference_steps")
    @classmethod
    def _steps(cls, v: int, info: ValidationInfo) -> int:
        s = _bounds(info)
        if s is None:
            return v
        limit = s.max_inference_steps
        if not 1 <= v <= limit:
            raise ValueError(f"must be between 1 and {limit} (got {v})")
        return v

    @field_validator("num_images")
    @classmethod
    def _num_images(cls, v: int, info: ValidationInfo) -> int:
        s = _bounds(info)
        if s is None:
            return v
        limit = s.max_num_images
        if not 1 <= v <= limit:
            raise ValueError(f"must be between 1 and {limit} (got {v}); use a bulk job for more")
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v: float, info: ValidationInfo) -> float:
        s = _bounds(info)
        if s is None:
            return v
        limit = s.max_guidance_scale
        if not 0.0 <= v <= limit:
            raise ValueError(f"must be between 0 and {limit} (got {v})")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None, info: ValidationInfo) -> int | None:
        if _admitted(info):
            return v
        if v is not None and not 0 <= v < 2**62:
            raise ValueError(f"must be between 0 and 2**62 - 1 (got {v})")
        return v

    @field_validator("request_id")
    @classmethod
    def _request_id(cls, v: str, info: ValidationInfo) -> str:
        if _admitted(info):
            return v
        if v and not REQUEST_ID.match(v):
            raise ValueError("must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")
        return v

    @field_validator("loras")
    @classmethod
    def _loras(cls, v: list[LoraWeight], info: ValidationInfo) -> list[LoraWeight]:
        s = _bounds(info)
        if s is None:
            return v
        limit = s.max_loras
        if len(v) > limit:
            raise ValueError(f"at most {limit} LoRAs (got {len(v)})")
        return v

    @field_validator("embeddings")
    @classmethod
    def _embeddings(cls, v: list[Embedding], info: ValidationInfo) -> list[Embedding]:
        s = _bounds(info)
        if s is None:
            return v
        limit = s.max_embeddings
        if len(v) > limit:
            raise ValueError(f"at most {limit} embeddings (got {len(v)})")
        return v

    @model_validator(mode="after")
    def _model_size(self) -> GenerateInput:
        """No ``image_size`` given: the model's own default, resolved now (at admission), so the input
        recorded in the ledger names the size a worker renders. Not marked as set: a client that
        sends only the fields it was given (``exclude_unset``) leaves the choice to the farm."""
        if self.image_size is None:
            self.__dict__["image_size"] = default_image_size(self.model_name)
        return self

    @model_validator(mode="after")
    def _tokens_unique(self, info: ValidationInfo) -> GenerateInput:
        if _admitted(info):
            return self
        tokens = [t for e in self.embeddings for t in e.tokens]
        if len(set(tokens)) != len(tokens):
            raise ValueError("embeddings: tokens must be distinct across embeddings")
        return self

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        size = self.image_size if self.image_size is not None else default_image_size(self.model_name)
        if isinstance(size, ImageSize):
            return size.width, size.height
        return NAMED_SIZES[size]


class Image(BaseModel):
    url: str
    width: int
    height: int
    content_type: str = "image/jpeg"


class GenerateOutput(BaseModel):
    """Output of ``fal-ai/fast-lcm-diffusion``."""

    images: list[Image] = Field(..., description="The generated image files info.")
    timings: dict[str, float] = Field(..., description="Seconds spent per stage, e.g. inference.")
    seed: int = Field(..., description="Seed of the generated image (the first; image i used seed + i).")
    has_nsfw_concepts: list[bool] = Field(..., description="Whether each image contains NSFW concepts.")
    prompt: str = Field(..., description="The prompt used for generating the image.")


FieldError = Annotated[tuple[str, str], "field, reason"]


# pydantic's bound errors ("Input should be less than or equal to 1"): their reason gets the value given
_NUMBER_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of")
_LENGTH_BOUNDS = ("string_too_short", "string_too_long")


def _shown(value: Any) -> str:
    """A number as the user would write it: 2, not 2.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def error_reason(err: Mapping[str, Any]) -> str:
    """The reason of one pydantic error, as the CLI, the API and bulk all say it: pydantic's bound
    messages end with the value given, "(got 2)", like the farm's own bound messages."""
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    if "(got " in msg or "input" not in err:
        return msg
    if err.get("type") in _NUMBER_BOUNDS:
        return f"{msg} (got {_shown(err['input'])})"
    if err.get("type") in _LENGTH_BOUNDS and isinstance(err["input"], str):
        return f"{msg} (got {len(err['input'])})"
    return msg


def field_errors(exc: ValidationError) -> list[FieldError]:
    """(field, reason) pairs of a ValidationError, with dotted field paths: at most ``MAX_FIELD_ERRORS``,
    then one ``("input", "… more")`` pair saying how many were left out."""
    out: list[FieldError] = []
    for err in exc.errors(include_url=False)[:MAX_FIELD_ERRORS]:
        # drop the union's branch tags ("named", "custom") from the location
        loc = [str(p) for p in err["loc"] if p not in ("named", "custom")]
        field = ".".join(loc) or "input"
        out.append((field, error_reason(err)))
    if exc.error_count() > MAX_FIELD_ERRORS:
        out.append(("input", more_errors(exc.error_count() - MAX_FIELD_ERRORS)))
    return out


def more_errors(n: int) -> str:
    return f"{n} more invalid field{'s' if n != 1 else ''} not listed (at most {MAX_FIELD_ERRORS} are)"


def admitted_input(data: dict[str, Any]) -> GenerateInput:
    """An input read back from the ledger: admitted once at submit, so not checked again.

    No bounds of this process's settings (a worker may run with lower ones than the submitter)
    and no file-system checks of LoRA paths (checked where the request was admitted).
    """
    return GenerateInput.model_validate(data, context=ADMITTED)
