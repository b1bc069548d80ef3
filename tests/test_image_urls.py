"""Source images given as URLs (issue 21): the fetch stage gets them into storage through the SSRF guard
(a real TLS server on an allow-listed host), and the worker's step (``tasks.sources.sources_of``) checks and
sizes the fetched bytes: a URL that serves no image fails with an error naming the field. Also fal's own
rule, rendered by the tiny model on the CPU: a 1024x1024 input with no image_size gives 1024x1024.
"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from farm import inputs
from farm.config import Settings, reset_settings
from farm.errors import InvalidInputError
from farm.image_schemas import admitted_input
from farm.lifecycle.claim import Claimed
from models.registry import TINY_MODEL
from models.rendered import RenderItem
from models.renderer import DiffusersRenderer
from tasks.sources import sources_of
from tests.receivers import Receiver
from tests.test_inputs import renderer as tiny_renderer  # noqa: F401
from tests.test_inputs import settings, tls_receiver  # noqa: F401  (module fixtures: data dir, TLS server)


def picture(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(out, "PNG")
    return out.getvalue()


def claimed(fields: dict[str, object], owner: str = "ann") -> Claimed:
    base = {"model_name": TINY_MODEL, "prompt": "a red fox", "num_inference_steps": 2, "strength": 0.5,
            "image_size": None, "format": "png"}
    return Claimed(batch_id=1, token=1, job_id="j", k=0, indices=[0], todo=[0], params=admitted_input(base | fields),
                   seed=1, owner=owner, total=1, attempts=1, source="api", lane="queue", webhook=False)


def test_a_url_image_is_fetched_then_checked_by_the_worker(settings: Settings, tls_receiver: Receiver,  # noqa: F811
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rx = tls_receiver
    allowed = settings.model_copy(update={"webhook_allowlist": [f"localhost:{rx.port}"]})
    monkeypatch.setenv("FARM_WEBHOOK_ALLOWLIST", json.dumps([f"localhost:{rx.port}"]))
    reset_settings()
    try:
        rx.script = [(200, {"Content-Type": "image/png"}, picture((120, 88))), (200, {}, b"<html>not an image</html>")]
        good = inputs.fetch_one("image_url", rx.url("/photo.png", host="localhost"), "ann", allowed)
        bad = inputs.fetch_one("image_url", rx.url("/page.html", host="localhost"), "ann", allowed)
        assert good.startswith("farm-stored:ann/inputs/") and bad.startswith("farm-stored:ann/inputs/")
        params, source = sources_of(claimed({"image_url": good}), allowed)
        assert source is not None and source.image.size == (120, 88) and params.size == (120, 88)
        with pytest.raises(InvalidInputError, match="^image_url: is not an image"):
            sources_of(claimed({"image_url": bad}), allowed)
        with pytest.raises(InvalidInputError, match="^image_url: no such upload for this owner"):
            sources_of(claimed({"image_url": good}, owner="ben"), allowed)  # another owner's stored input
        assert [r.path for r in rx.requests] == ["/photo.png", "/page.html"]
    finally:
        monkeypatch.delenv("FARM_WEBHOOK_ALLOWLIST")
        reset_settings()


def test_a_1024_input_with_no_size_renders_1024(settings: Settings, tiny_renderer: DiffusersRenderer) -> None:  # noqa: F811
    from farm.inputs.refs import STORED
    from farm.inputs.staging import store_blob
    from farm.storage import get_storage

    key, _ = store_blob("ann", picture((1024, 1024)), get_storage(settings), settings)
    params, source = sources_of(claimed({"image_url": STORED + key}), settings)
    assert params.size == (1024, 1024)
    with inputs.owner_scope("ann"):
        result = tiny_renderer.render_items([RenderItem(params, 3, 0, source=source)])
    assert result.images[0].image.size == (1024, 1024)


def test_source_images_count_against_the_caps_and_quota_of_file_inputs(settings: Settings) -> None:  # noqa: F811
    """The caps LoRA files have: FARM_FILE_INPUT_MAX_BYTES per data URI (at admission), FARM_INLINE_INPUT_MAX_BYTES
    per request (at staging), and the owner's FARM_UPLOAD_QUOTA_BYTES when the blob is stored."""
    import base64

    from farm.admission import admit
    from farm.inputs import UploadQuotaError
    from farm.inputs.staging import stage_inline, store_blob
    from farm.storage import get_storage

    data = picture((256, 256))
    fields = {"model_name": TINY_MODEL, "prompt": "a red fox",
              "image_url": "data:image/png;base64," + base64.b64encode(data).decode()}
    with pytest.raises(InvalidInputError, match="^image_url: data URI holds"):
        admit(fields, "ann", settings.model_copy(update={"file_input_max_bytes": len(data) - 1}))
    inp = admit(fields, "ann", settings)
    with pytest.raises(InvalidInputError, match="^image_url: the request's data URIs hold"):
        stage_inline(inp, "ann", settings.model_copy(update={"inline_input_max_bytes": len(data) - 1}))
    staged, blobs = stage_inline(inp, "ann", settings)
    assert staged.model_dump()["image_url"].startswith("farm-stored:ann/inputs/") and list(blobs.values()) == [data]
    with pytest.raises(UploadQuotaError):
        store_blob("quota-owner", data, get_storage(settings),
                   settings.model_copy(update={"upload_quota_bytes": len(data) - 1}))
