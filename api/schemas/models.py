"""Schemas of ``/api/v1/models``: registered versions, live workers, evaluations, promotion."""

from __future__ import annotations

from apiflask import Schema
from apiflask.fields import Boolean
from apiflask.fields import DateTime
from apiflask.fields import Dict
from apiflask.fields import Float
from apiflask.fields import Integer
from apiflask.fields import List
from apiflask.fields import Nested
from apiflask.fields import String


class Int8GateOut(Schema):
    gate = String(
        required=True,
        metadata={
            "description": "passed: the version has an INT8 variant workers may serve; failed: "
            "it lost too much against fp32 on the test split and was not published; none: no "
            "variant was attempted (older versions, imports, int8.enabled=false)."
        },
    )
    accuracy_drop = Float(
        allow_none=True, metadata={"description": "fp32 minus INT8 test accuracy (fraction)."}
    )
    agreement = Float(
        allow_none=True, metadata={"description": "Share of test images with fp32's top-1."}
    )
    worst_recall_drop = Float(allow_none=True)
    failures = String(allow_none=True, metadata={"description": "Why the gate failed."})


class ModelVersionOut(Schema):
    version = Integer(required=True)
    aliases = List(String(), required=True)
    architecture = String(allow_none=True)
    image_size = Integer(allow_none=True)
    accuracy = Float(allow_none=True)
    weighted_f1 = Float(allow_none=True)
    macro_f1 = Float(allow_none=True)
    created_at = DateTime(allow_none=True)
    run_id = String(allow_none=True)
    int8 = Nested(Int8GateOut, required=True)


class WorkerOut(Schema):
    name = String(
        required=True, metadata={"description": "host:pid of the process (one row per process)."}
    )
    model_version = Integer(
        allow_none=True,
        metadata={
            "description": "Version the process has loaded; null while it has loaded none "
            "(a worker process loads its model with its first task)."
        },
    )
    device = String(
        allow_none=True,
        metadata={
            "description": "Device the process runs its model on: cpu, or cuda:N (a worker with "
            "several GPUs runs one pool process per GPU, round-robin), known as soon as the "
            "process reports; null for trainers and for a process that cannot have the "
            "device EMOTIONS_DEVICE asks for."
        },
    )
    backend = String(
        allow_none=True,
        metadata={
            "description": "Backend serving model_version: onnx, onnx-int8, torch or torch-bf16 "
            "(with EMOTIONS_BACKEND=auto, the fastest that agreed with fp32 when measured at "
            "load; see the worker's log for the table)."
        },
    )
    state = String(
        allow_none=True,
        metadata={
            "description": "idle or busy (inference processes, as of last_seen); null for trainers."
        },
    )
    images_processed = Integer(required=True)
    last_seen = DateTime(required=True)


class ModelsOut(Schema):
    model = String(required=True)
    champion = Integer(allow_none=True)
    versions = List(Nested(ModelVersionOut), required=True)
    workers = List(
        Nested(WorkerOut),
        required=True,
        metadata={
            "description": "Inference processes, idle or busy, that reported within "
            "worker_stale_seconds (they report every quarter of it, 15 s apart at most)."
        },
    )
    trainers = List(
        Nested(WorkerOut),
        required=True,
        metadata={"description": "Trainers consuming the training queue (none: runs wait)."},
    )
    worker_stale_seconds = Float(
        required=True,
        metadata={
            "description": "EMOTIONS_WORKER_STALE_SECONDS (default 60): a process silent this "
            "long (killed, host down) is no longer listed."
        },
    )


class ClassMetricsOut(Schema):
    precision = Float(required=True)
    recall = Float(required=True)
    f1 = Float(required=True)
    support = Integer(required=True, metadata={"description": "Test images of this class."})


class EvaluationOut(Schema):
    version = Integer(required=True)
    classes = List(String(), required=True, metadata={"description": "Row/column order."})
    confusion_matrix = List(
        List(Integer()),
        required=True,
        metadata={"description": "Rows: true class; columns: predicted class."},
    )
    num_images = Integer(required=True)
    accuracy = Float(required=True)
    weighted_f1 = Float(required=True)
    macro_f1 = Float(required=True)
    per_class = Dict(keys=String(), values=Nested(ClassMetricsOut), required=True)
    passed = Boolean(metadata={"description": "Whether it met the quality targets."})
    failures = List(String(), metadata={"description": "The targets it missed."})


class PromoteOut(Schema):
    version = Integer(required=True, metadata={"description": "The version now serving."})
    previous = Integer(
        allow_none=True, metadata={"description": "The version the alias pointed at before."}
    )
    alias = String(required=True, metadata={"description": "The serving alias that moved."})


class ImportOut(Schema):
    version = Integer(required=True, metadata={"description": "The new version."})
    source = String(required=True, metadata={"description": "Always `imported`."})
    label_mapping = Dict(
        keys=String(),
        values=String(allow_none=True),
        required=True,
        metadata={"description": "The model's labels -> classes; null: dropped (renormalised)."},
    )
    onnx_sha256 = String(required=True)
    evaluation = Dict(
        allow_none=True,
        metadata={
            "description": "Report on eval_folder (accuracy, weighted_f1, per_class, "
            "confusion_matrix), null without one."
        },
    )
    promoted = Boolean(required=True)
    promotion = String(required=True, metadata={"description": "Why it was (not) promoted."})
