"""The broker client against the machine's Redis, as the API, the sweeper and the trainer use it."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from face_emotions.jobs.broker import BrokerClient
from face_emotions.jobs.protocol import CLASSIFY_TASK
from face_emotions.jobs.protocol import INFERENCE_QUEUE

pytestmark = pytest.mark.integration


def test_messages_reach_the_queue_whatever_bindings_redis_holds(redis_url: str) -> None:
    """A Redis restart without persistence drops kombu's binding keys; messages sent after it
    must still land in the queue (a cached declaration once routed them nowhere, silently)."""
    client = redis.Redis.from_url(redis_url)
    client.delete(INFERENCE_QUEUE)
    broker = BrokerClient(redis_url)
    try:
        broker.send_chunk("job-1", [1, 2])
        client.delete(f"_kombu.binding.{INFERENCE_QUEUE}")  # what a restart leaves behind
        broker.send_chunk("job-2", [3])
        queued = [json.loads(raw) for raw in client.lrange(INFERENCE_QUEUE, 0, -1)]
        assert sorted(m["headers"]["task"] for m in queued) == [CLASSIFY_TASK] * 2
        bodies = [json.loads(base64.b64decode(m["body"])) for m in queued]
        assert sorted(body[1]["job_id"] for body in bodies) == ["job-1", "job-2"]
    finally:
        client.delete(INFERENCE_QUEUE)
        broker.close()
