"""Queue names, in one import-light place.

Each base model has its own queues, one per priority lane: ``render.<key>.<lane>``.
A worker consumes its model's lanes in priority order (Redis ``queue_order_strategy =
priority``), so it always takes from the highest non-empty lane. Plain ``farm.generate``
tasks arrive on the dispatch queue (Celery's default, ``celery``), which every worker
also consumes: the task only records the job and fans it out to the model's queue.
"""

from __future__ import annotations

from farm.status import LANES_BY_PRIORITY, Lane


def render_queue(model_key: str, lane: Lane | str) -> str:
    return f"render.{model_key}.{Lane(lane).value}"


def model_queues(model_key: str) -> list[str]:
    """The model's lanes, highest priority first."""
    return [render_queue(model_key, lane) for lane in LANES_BY_PRIORITY]
