"""MTCNN's three stages, with facenet-pytorch's networks and weights, cut for throughput.

facenet-pytorch's ``detect_face`` crops every candidate box for the second and third network
with its own resize call: on photos with texture that is ~100 candidates and ~100 calls per
image, about a third of the detector's time on two CPU cores. Here each stage's candidates are
cut in one batched ``roi_align`` (averaging over each output cell as the original's "area"
resize does), and the networks run channels-last, the layout PyTorch's CPU kernels are fastest
in. Everything else (pyramid, thresholds, box regression, non-maximum suppression, landmarks)
is the package's own code, so the boxes are the ones MTCNN is known for: the real-photo tests
check them against hand-measured faces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.nn.functional import interpolate
from torchvision.ops import roi_align
from torchvision.ops.boxes import batched_nms

#: Faces per stage-2/3 forward pass (bounds memory on a photo with thousands of candidates).
STAGE_BATCH = 512
#: MTCNN's defaults (Zhang et al. 2016, as facenet-pytorch ships them).
THRESHOLDS = (0.6, 0.7, 0.7)
#: Bilinear samples per crop cell and axis: 2x2 averages a cell as smoothly as MTCNN's "area"
#: resize needs for candidates up to ~4x the network's input, at a fraction of its cost.
SAMPLES = 2
PYRAMID_FACTOR = 0.709


class Mtcnn(torch.nn.Module):
    """P-Net, R-Net and O-Net with their pretrained weights (loaded from the wheel, no network)."""

    def __init__(self, *, min_face: int, device: str = "cpu") -> None:
        super().__init__()
        from facenet_pytorch.models.mtcnn import ONet
        from facenet_pytorch.models.mtcnn import PNet
        from facenet_pytorch.models.mtcnn import RNet

        self.min_face = min_face
        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        self.eval()
        self.to(self.device)
        self.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image (all of one size, RGB): boxes ``(n, 5)`` (x0, y0, x1, y1, score) and
        landmarks ``(n, 5, 2)``."""
        from facenet_pytorch.models.utils.detect_face import batched_nms_numpy
        from facenet_pytorch.models.utils.detect_face import bbreg
        from facenet_pytorch.models.utils.detect_face import rerec

        pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
        raw = torch.as_tensor(pixels, device=self.device).permute(0, 3, 1, 2)  # uint8 NHWC view
        boxes, image_inds = self._proposals(raw)
        imgs = raw.float()

        # Stage 2: refine the proposals.
        if len(boxes):
            scores, regression = self._stage(self.rnet, imgs, boxes, image_inds, 24)[:2]
            keep = scores > THRESHOLDS[1]
            boxes = torch.cat((boxes[keep, :4], scores[keep].unsqueeze(1)), dim=1)
            image_inds, regression = image_inds[keep], regression[keep]
            pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
            boxes = rerec(bbreg(boxes[pick], regression[pick]))
            image_inds = image_inds[pick]

        # Stage 3: final boxes, scores and landmarks.
        points = torch.zeros(0, 5, 2, device=self.device)
        if len(boxes):
            scores, regression, marks = self._stage(self.onet, imgs, boxes, image_inds, 48)
            keep = scores > THRESHOLDS[2]
            boxes = torch.cat((boxes[keep, :4], scores[keep].unsqueeze(1)), dim=1)
            image_inds, regression, marks = image_inds[keep], regression[keep], marks[keep]
            box_w = boxes[:, 2] - boxes[:, 0] + 1
            box_h = boxes[:, 3] - boxes[:, 1] + 1
            points_x = box_w[:, None] * marks[:, :5] + boxes[:, 0:1] - 1
            points_y = box_h[:, None] * marks[:, 5:10] + boxes[:, 1:2] - 1
            points = torch.stack((points_x, points_y), dim=2)
            boxes = bbreg(boxes, regression)
            pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
            boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]

        boxes_np, points_np, inds_np = boxes.cpu().numpy(), points.cpu().numpy(), image_inds.cpu()
        return [
            (boxes_np[(inds_np == i).numpy()], points_np[(inds_np == i).numpy()])
            for i in range(len(images))
        ]

    def _proposals(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: P-Net over the image pyramid, as the original, except that the levels are
        resized from the 8-bit pixels with an antialiased bilinear filter (five times faster on
        a CPU than the original's "area" resize of float pixels, and as smooth)."""
        from facenet_pytorch.models.utils.detect_face import generateBoundingBox
        from facenet_pytorch.models.utils.detect_face import rerec

        height, width = raw.shape[2:4]
        # The 8-bit antialiased resize is a CPU kernel; a GPU resizes floats.
        source = raw if raw.device.type == "cpu" else raw.float()
        scale = 12.0 / self.min_face
        side = min(height, width) * scale
        boxes, image_inds, picks, offset = [], [], [], 0
        while side >= 12:
            size = (int(height * scale + 1), int(width * scale + 1))
            level = interpolate(source, size=size, mode="bilinear", antialias=True)
            data = (level.float() - 127.5) * 0.0078125
            regression, probabilities = self.pnet(
                data.contiguous(memory_format=torch.channels_last)
            )
            found, inds = generateBoundingBox(regression, probabilities[:, 1], scale, THRESHOLDS[0])
            boxes.append(found)
            image_inds.append(inds)
            picks.append(batched_nms(found[:, :4], found[:, 4], inds, 0.5) + offset)
            offset += found.shape[0]
            scale *= PYRAMID_FACTOR
            side *= PYRAMID_FACTOR
        if not boxes:
            return torch.zeros(0, 9, device=self.device), torch.zeros(0, dtype=torch.long)
        pick = torch.cat(picks)
        all_boxes, all_inds = torch.cat(boxes)[pick], torch.cat(image_inds)[pick]
        pick = batched_nms(all_boxes[:, :4], all_boxes[:, 4], all_inds, 0.7)
        all_boxes, all_inds = all_boxes[pick], all_inds[pick]
        box_w = all_boxes[:, 2] - all_boxes[:, 0]
        box_h = all_boxes[:, 3] - all_boxes[:, 1]
        refined = torch.stack(
            [
                all_boxes[:, 0] + all_boxes[:, 5] * box_w,
                all_boxes[:, 1] + all_boxes[:, 6] * box_h,
                all_boxes[:, 2] + all_boxes[:, 7] * box_w,
                all_boxes[:, 3] + all_boxes[:, 8] * box_h,
                all_boxes[:, 4],
            ],
            dim=1,
        )
        return rerec(refined), all_inds

    def _stage(
        self,
        net: torch.nn.Module,
        imgs: torch.Tensor,
        boxes: torch.Tensor,
        image_inds: torch.Tensor,
        size: int,
    ) -> tuple[torch.Tensor, ...]:
        """Every candidate cut to ``size`` x ``size`` in one ``roi_align`` and scored by ``net``:
        (score, box regression[, landmarks]) per candidate."""
        height, width = imgs.shape[2:4]
        # The original's crop: integer box, clipped to the image, pixels [x-1, ex) x [y-1, ey).
        whole = boxes[:, :4].trunc()
        x0 = whole[:, 0].clamp(min=1) - 1
        y0 = whole[:, 1].clamp(min=1) - 1
        x1 = whole[:, 2].clamp(max=width)
        y1 = whole[:, 3].clamp(max=height)
        rois = torch.stack([image_inds.to(imgs.dtype), x0, y0, x1, y1], dim=1)
        crops = roi_align(
            imgs, rois, (size, size), spatial_scale=1.0, sampling_ratio=SAMPLES, aligned=True
        )
        crops = ((crops - 127.5) * 0.0078125).contiguous(memory_format=torch.channels_last)
        outputs = [net(crops[i : i + STAGE_BATCH]) for i in range(0, len(crops), STAGE_BATCH)]
        merged = [torch.cat(parts) for parts in zip(*outputs, strict=True)]
        # R-Net: (regression, probabilities); O-Net: (regression, landmarks, probabilities).
        scores = merged[-1][:, 1]
        return (scores, merged[0], *merged[1:-1])
