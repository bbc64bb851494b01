"""Child process of the allocator figure: runs a forward loop each time the parent asks.

The allocator is process-wide and can only be tuned before the first big allocation, so the
naive and the tuned configurations must live in separate processes. Each child builds its models
once, then waits on stdin; the parent alternates requests between the children so both see the
same machine load. Protocol: the child prints ``ready`` (one line of JSON with its variants);
each line ``<variant>`` on stdin answers one JSON line with the seconds that loop took and the
page faults it caused; ``quit`` ends it.

Usage: ``python -m bench.alloc_child --mode naive|tuned --bundle DIR --arrays FILE.npy``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["naive", "tuned"], required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--arrays", required=True, help=".npy of uint8 NHWC images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--backend", default="auto", help="the worker's EMOTIONS_BACKEND")
    args = parser.parse_args(argv)

    tuned = False
    if args.mode == "tuned":
        # First thing, before numpy or torch allocate: exactly what worker/app.py does.
        from face_emotions.ops.malloc_tuning import tune_glibc_malloc

        tuned = tune_glibc_malloc()

    import resource

    import numpy as np
    import torch

    from face_emotions.modeling.bundle import load_bundle
    from face_emotions.serving.model_holder import choose_backend
    from face_emotions.serving.predictor import Predictor

    torch.set_num_threads(args.threads)
    images = np.load(args.arrays)
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]

    # "eager": plain torch, contiguous NCHW, the same in both processes: the allocator alone.
    runners = {"eager": Predictor(load_bundle(args.bundle), backend="torch", channels_last=False)}
    backend = None
    if args.mode == "tuned":
        bundle = load_bundle(args.bundle)
        backend = choose_backend(args.backend, "cpu", bundle)
        runners["worker"] = Predictor(bundle, backend=backend, channels_last=True)  # type: ignore[arg-type]
    for runner in runners.values():
        runner.predict_array(batches[0])

    print(
        json.dumps({"ready": True, "variants": list(runners), "tuned": tuned, "backend": backend}),
        flush=True,
    )
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            break
        runner = runners[name]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        for batch in batches:
            runner.predict_array(batch)
        seconds = time.perf_counter() - started
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(json.dumps({"variant": name, "seconds": seconds, "faults": faults}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
