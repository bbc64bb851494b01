"""``int8``: the INT8 variant vs fp32 ONNX Runtime (and bf16 vs fp32 torch where the CPU has
it) on the same pre-decoded batches at the worker's batch size, with top-1 agreement.

The variant is made as registration makes it (:func:`face_emotions.modeling.int8.quantize`,
static QDQ, per-channel weights), calibrated on 64 of the benchmark's faces and compared on the
others. The benchmark's model has an untrained head, so there is no accuracy to lose here: the
accuracy drop is the gate's figure at registration (a trained version's test split); this
figure reports the speed and how often the top-1 class stays the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.context import Context
from bench.figures import Figure
from bench.figures import unavailable
from bench.figures import verdict_text
from bench.stats import interleave
from bench.stats import paired_ratios
from bench.stats import speedup

#: Faces the variant is calibrated on (registration's default), never compared on.
CALIBRATION_IMAGES = 64
#: CPU features that decide whether INT8 and bf16 pay.
FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")


def int8_figure(context: Context, bundle_dir: Path, paths: list[Path]) -> None:
    import shutil

    import numpy as np
    import torch

    from bench import assets
    from bench import inprocess
    from face_emotions.modeling.bundle import load_bundle
    from face_emotions.modeling.int8 import INT8_ONNX_FILE
    from face_emotions.modeling.int8 import quantize
    from face_emotions.serving import backend_tuning
    from face_emotions.serving.predictor import Predictor

    if context.args.device != "cpu":
        context.record(unavailable("int8", "INT8 QDQ is a CPU optimisation; GPUs run torch"))
        return
    flags = sorted(set(FLAGS) & backend_tuning.cpu_flags())
    work = bundle_dir.parent / "int8-bundle"
    if not work.exists():
        shutil.copytree(bundle_dir, work)
    bundle = load_bundle(work)
    size = context.args.image_size
    if bundle.onnx_path is None:
        raise RuntimeError("the benchmark bundle has no ONNX model to quantise")
    fp32 = Predictor(bundle, backend="onnx")
    calibration = assets.preprocessed(paths[:CALIBRATION_IMAGES], size, CALIBRATION_IMAGES)
    int8_path = work / INT8_ONNX_FILE
    quantize(bundle.onnx_path, int8_path, fp32.model_input(calibration))
    bundle.int8_onnx_path = int8_path
    runners: dict[str, Any] = {
        "onnx fp32": fp32,
        "onnx int8": Predictor(bundle, backend="onnx-int8"),
    }
    bf16 = backend_tuning.bf16_supported(torch.device("cpu"))
    if bf16:
        runners["torch fp32"] = Predictor(bundle, backend="torch", precision="fp32")
        runners["torch bf16"] = Predictor(bundle, backend="torch-bf16")
    compared = paths[CALIBRATION_IMAGES:] or paths
    count = max(context.plan.backend_images, context.batch_size)
    images = assets.preprocessed(compared, size, count)
    batch = context.batch_size
    arrays = [images[i : i + batch] for i in range(0, len(images), batch)]
    top1 = {n: inprocess.probabilities(r, arrays).argmax(axis=1) for n, r in runners.items()}
    agreement = {
        "onnx int8": float(np.mean(top1["onnx int8"] == top1["onnx fp32"])),
        **(
            {"torch bf16": float(np.mean(top1["torch bf16"] == top1["torch fp32"]))} if bf16 else {}
        ),
    }
    loops = {name: inprocess.forward_loop(r, arrays) for name, r in runners.items()}
    samples = interleave(loops, len(images), context.plan.inproc_reps)
    ratio = speedup(samples["onnx int8"], samples["onnx fp32"])
    rows = [
        {
            "backend": name,
            "img/s": f"{sample.rate:.1f}",
            "top-1 agreement": f"{100 * agreement[name]:.1f} %" if name in agreement else "ref",
        }
        for name, sample in samples.items()
    ]
    vnni = any("vnni" in f or f == "amx_int8" for f in flags)
    line = (
        f"int8: onnx int8 {ratio:.2f}x onnx fp32 (batch {batch}, top-1 agreement "
        f"{100 * agreement['onnx int8']:.1f} %, CPU {' '.join(flags) or 'without VNNI/BF16'})"
    )
    bf16_ratio = None
    if bf16:
        bf16_ratio = speedup(samples["torch bf16"], samples["torch fp32"])
        line += f"; torch bf16 {bf16_ratio:.2f}x torch fp32"
    if vnni:
        line += f" ({verdict_text('int8', ratio)})"
    context.record(
        Figure(
            "int8",
            round(ratio, 2),
            f"onnx int8 {ratio:.2f}x onnx fp32; agreement {100 * agreement['onnx int8']:.1f} %",
            line,
            # The target is for CPUs with VNNI; elsewhere the figure is information only.
            check=ratio if vnni else float("nan"),
            details={
                "cpu_flags": flags,
                "agreement": agreement,
                "bf16_vs_fp32_torch": None if bf16_ratio is None else round(bf16_ratio, 2),
                "paired_ratios": paired_ratios(samples["onnx int8"], samples["onnx fp32"]),
                "samples": {n: v.as_dict() for n, v in samples.items()},
                "table": rows,
                "notes": [
                    f"static QDQ INT8 (per-channel weights, UINT8 activations, MinMax), "
                    f"calibrated on {CALIBRATION_IMAGES} faces, compared on {len(images)} others",
                    "accuracy drop: the INT8 gate's figure at registration (a trained version's "
                    "test split); this model's head is untrained, so only agreement is shown",
                    f"{context.threads} threads, {size} px, interleaved, "
                    f"{context.plan.inproc_reps} repetitions",
                ],
            },
        )
    )
