"""A request's own LoRAs and textual-inversion embeddings: load, use, unload.

``request_adapters(pipe, params, settings)`` is a context manager: inside it the request's
LoRAs are active (each under a unique adapter name, weighted by its ``scale``) and its
embedding tokens are known to the tokenizer(s); on the way out, whatever happened, all LoRA
layers and added tokens are removed again, so nothing leaks into the next request. (The
model's own LCM-LoRA is fused into the base weights at load time and is not affected.)

Paths go through ``farm.inputs.refs.resolve_weights_path``: a file or folder under the allowed
files root, or an input the farm moved to storage (``farm-stored:<key>``: data URIs at submit,
URLs and hub ids by the fetch stage before the batch could be claimed), an upload or a data
URI, which ``farm.inputs.retrieve.materialise`` turns into a cached local file. diffusers is handed
absolute local paths only; a worker never downloads.

LoRA ``force``: a LoRA that does not fit this model (no matching layer, wrong shapes, an
unknown format) fails the request, unless ``force`` is true: then it is skipped with a
warning and the request renders without it. A file that is not weights at all (empty, truncated, not
safetensors nor a PyTorch checkpoint) is an input error naming the field and the file's problem, which
``force`` does not skip; like every input error it fails the batch at once, never retried.

Embedding files: a tensor ``[n, dim]`` (safetensors with one key, or the usual A1111 /
diffusers layouts) for ``n`` tokens, or one token expanded to ``n`` vectors. SDXL files
carry ``clip_l`` and ``clip_g`` tensors, loaded into the two text encoders; an SD1.5 model
takes ``clip_l`` from such a file.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from farm.config import Settings
from farm.errors import InvalidInputError, ModelNotFoundError
from farm.inputs.refs import WeightsRef, kind_of, resolve_weights_path
from farm.inputs.retrieve import materialise
from farm.schemas import Embedding, GenerateInput, LoraWeight

log = logging.getLogger(__name__)

_request_counter = itertools.count()


def _resolve(path: str, field: str, settings: Settings) -> WeightsRef:
    """The absolute local file of ``path``: under the files root, or read from storage (a stored input or
    an upload) or decoded (a data URI) into the local cache. Nothing is fetched over the network here: URLs
    and hub ids were fetched to storage before the batch could be claimed (farm.lifecycle.fetch)."""
    try:
        if kind_of(path) == "stored":
            return WeightsRef("local", str(materialise("stored", path, settings)))
        ref = resolve_weights_path(path, settings)
        if ref.kind in ("url", "hub"):
            raise ValueError("was not fetched before rendering (a worker never downloads): submit the request "
                             "again, through the farm's submit path")
        if ref.kind in ("data", "upload"):
            ref = WeightsRef("local", str(materialise(ref.kind, ref.value, settings)))
        return ref
    except ValueError as exc:
        raise InvalidInputError(field, str(exc)) from None


def _source(what: str, path: str, ref: WeightsRef) -> str:
    """What to hand to diffusers: always an absolute local path."""
    return str(Path(ref.value).resolve())


def _short(path: str) -> str:
    """``path`` for messages: a data URI can be megabytes long."""
    return path if len(path) <= 200 else f"{path[:60]}…({len(path)} characters)"


def _unreadable(what: str, field: str, path: str, ref: WeightsRef, exc: BaseException) -> ModelNotFoundError:
    """The error for weights that cannot be read. A file the user named is named; a copy the farm made
    (of a data URI, URL, hub file or upload) is named by its field, not by its storage key or local path."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    given = kind_of(path) is None
    first = first.replace(ref.value, path if given else field)
    where = f"the file {ref.value}" if given else "the copy the farm made of it"
    shown = _short(path) if given else field
    return ModelNotFoundError(f"{what} {shown!r} could not be read from {where}: {type(exc).__name__}: {first}")


def _file_problem(what: str, field: str, path: str, source: str) -> InvalidInputError | None:
    """After a loader failed on the local ``source``: the input error naming what is wrong with the file
    itself (not safetensors, truncated, empty), or None when the file reads
    (then the failure was not the file's: it stays an unreadable-weights error). Deterministic, so the
    batch fails once instead of being retried."""
    local = Path(source)  # a file: resolve_weights_path accepts no folder
    shown = f"{_short(path)!r} " if kind_of(path) is None else ""  # a copy the farm made is named by field
    if not local.is_file():
        return None  # gone meanwhile: not the file's content
    if local.stat().st_size == 0:
        return InvalidInputError(field, f"the {what} file {shown}is empty")
    from safetensors import safe_open

    try:
        with safe_open(str(local), framework="pt") as handle:
            handle.keys()
        return None
    except Exception as exc:
        not_safetensors = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if local.suffix != ".safetensors":
        try:
            torch.load(str(local), map_location="cpu", weights_only=True)
            return None
        except Exception as exc:
            return InvalidInputError(field, f"the {what} file {shown}is neither a valid safetensors file "
                                            f"({not_safetensors}) nor a PyTorch checkpoint ({type(exc).__name__})")
    return InvalidInputError(field, f"the {what} file {shown}is not a valid safetensors file ({not_safetensors})")


def _adapters_present(pipe: Any) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def load_loras(pipe: Any, loras: list[LoraWeight], settings: Settings) -> list[str]:
    """Load ``loras`` as adapters and activate them with their scales; return adapter names."""
    names: list[str] = []
    scales: list[float] = []
    request = next(_request_counter)
    for i, lora in enumerate(loras):
        field = f"loras.{i}.path"
        ref = _resolve(lora.path, field, settings)
        name = f"farm_r{request}_l{i}"
        source = _source("LoRA", lora.path, ref)
        try:
            pipe.load_lora_weights(source, adapter_name=name)
            if name not in _adapters_present(pipe):
                raise ValueError("no layer of this LoRA matches the model")
        except (ValueError, KeyError, RuntimeError) as exc:  # does not fit this model
            if not lora.force:
                raise InvalidInputError(field, f"does not fit this model (force=true skips it): {exc}") from exc
            log.warning("LoRA %s does not fit %s; skipped (force=true): %s",
                        _short(lora.path), type(pipe).__name__, exc)
            if name in _adapters_present(pipe):
                pipe.delete_adapters(name)
            continue
        except Exception as exc:  # OSError: a bad file, or one that could not be read
            problem = _file_problem("LoRA", field, lora.path, source)
            if problem is not None:
                raise problem from exc
            raise _unreadable("LoRA", field, lora.path, ref, exc) from exc
        names.append(name)
        scales.append(lora.scale)
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
    return names


def _embedding_tensors(state: Any, sdxl: bool, field: str) -> list[torch.Tensor]:
    """The tensor per text encoder (one, or two for SDXL) from a loaded embedding file."""
    if isinstance(state, torch.Tensor):
        found: dict[str, Any] = {"": state}
    elif "clip_l" in state or "clip_g" in state:
        found = {k: state[k] for k in ("clip_l", "clip_g") if k in state}
    elif "string_to_param" in state:  # A1111
        found = {"": state["string_to_param"]["*"]}
    elif "emb_params" in state:
        found = {"": state["emb_params"]}
    elif len(state) == 1:  # diffusers: {token: tensor}
        found = {"": next(iter(state.values()))}
    else:
        raise InvalidInputError(field, f"unrecognised embedding file (keys: {sorted(state)[:5]})")
    if sdxl:
        if "clip_l" not in found or "clip_g" not in found:
            raise InvalidInputError(field, "an SDXL embedding needs both clip_l and clip_g tensors")
        return [found["clip_l"], found["clip_g"]]
    tensor = found.get("clip_l", found.get(""))
    if tensor is None:
        raise InvalidInputError(field, "no clip_l tensor for this SD1.5-family model")
    return [tensor]


def _encoder_pairs(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs of the pipeline: one, or two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def load_embeddings(pipe: Any, embeddings: list[Embedding], settings: Settings) -> bool:
    """Add the embeddings' tokens to the tokenizer(s) and text encoder(s); True if any."""
    from diffusers.loaders.textual_inversion import load_textual_inversion_state_dicts

    pairs = _encoder_pairs(pipe)
    for i, emb in enumerate(embeddings):
        field = f"embeddings.{i}.path"
        ref = _resolve(emb.path, field, settings)
        source = _source("embedding", emb.path, ref)
        try:
            state = load_textual_inversion_state_dicts([source])[0]
        except Exception as exc:  # OSError: a bad file, or one that could not be read
            problem = _file_problem("embedding", field, emb.path, source)
            if problem is not None:
                raise problem from exc
            raise _unreadable("embedding", field, emb.path, ref, exc) from exc
        tensors = _embedding_tensors(state, sdxl=len(pairs) == 2, field=field)
        for (tokenizer, text_encoder), tensor in zip(pairs, tensors, strict=True):
            vectors = tensor if tensor.dim() == 2 else tensor.unsqueeze(0)
            if len(emb.tokens) == 1:
                token: str | list[str] = emb.tokens[0]  # one token, possibly several vectors
            elif vectors.shape[0] == len(emb.tokens):
                token = list(emb.tokens)
            else:
                raise InvalidInputError(
                    f"embeddings.{i}.tokens",
                    f"the embedding has {vectors.shape[0]} vectors but {len(emb.tokens)} tokens were given",
                )
            try:
                pipe.load_textual_inversion(vectors, token=token, tokenizer=tokenizer, text_encoder=text_encoder)
            except ValueError as exc:
                raise InvalidInputError(field, f"cannot be loaded into this model: {exc}") from exc
    return bool(embeddings)


def unload_all(pipe: Any, loras: bool, embeddings: bool) -> None:
    """Remove every request LoRA layer and every added (non-special) token."""
    if loras:
        pipe.unload_lora_weights()
    if embeddings:
        for tokenizer, text_encoder in _encoder_pairs(pipe):
            if any(not t.special for t in tokenizer.added_tokens_decoder.values()):
                pipe.unload_textual_inversion(tokenizer=tokenizer, text_encoder=text_encoder)


@contextmanager
def request_adapters(pipe: Any, params: GenerateInput, settings: Settings) -> Iterator[None]:
    """Apply the request's LoRAs and embeddings for the duration of the block."""
    try:
        load_loras(pipe, params.loras, settings)
        load_embeddings(pipe, params.embeddings, settings)
        yield
    finally:
        unload_all(pipe, loras=bool(params.loras), embeddings=bool(params.embeddings))
