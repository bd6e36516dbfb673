"""The baseline: the data pipeline of transformers'
``examples/pytorch/image-classification/run_image_classification.py``, copied faithfully.

``load_dataset("imagefolder")`` + ``set_transform`` with per-sample PIL RandomResizedCrop / flip /
ToTensor / Normalize, and the example's ``collate_fn``. torchvision is not importable here, so its
transforms are written with PIL + torch, with torchvision's defaults and parameter sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


class ExampleRandomResizedCrop:
    """torchvision ``RandomResizedCrop(size)`` on PIL images: same defaults (scale (0.08, 1), ratio
    (3/4, 4/3), bilinear with antialias), same ``get_params``."""

    def __init__(self, size: tuple[int, int], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio

    def get_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Top, left, height, width of a random crop (torchvision's sampling: 10 tries, then a fallback)."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = round(math.sqrt(target_area * aspect_ratio))
            h = round(math.sqrt(target_area / aspect_ratio))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        in_ratio = float(width) / float(height)  # fallback: whole image, ratio clamped
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Any) -> Any:
        from PIL import Image

        i, j, h, w = self.get_params(*img.size)
        # torchvision F.resized_crop on PIL: crop, then resize((w, h), BILINEAR) (PIL antialiases)
        return img.crop((j, i, j + w, i + h)).resize((self.size[1], self.size[0]), Image.BILINEAR)


def example_train_transforms(image_processor: Any) -> Callable[[dict[str, list]], dict[str, list]]:
    """The example's ``train_transforms`` for ``Dataset.set_transform``, written with PIL + torch.

    Mirrors run_image_classification.py::

        if "shortest_edge" in image_processor.size: size = image_processor.size["shortest_edge"]
        else: size = (image_processor.size["height"], image_processor.size["width"])
        normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
        _train_transforms = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
        def train_transforms(example_batch):
            example_batch["pixel_values"] = [_train_transforms(pil_img.convert("RGB"))
                                             for pil_img in example_batch["image"]]
            return example_batch
    """
    from PIL import Image

    if "shortest_edge" in image_processor.size:
        edge = image_processor.size["shortest_edge"]
        size = (edge, edge)
    else:
        size = (image_processor.size["height"], image_processor.size["width"])
    crop = ExampleRandomResizedCrop(size)
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(-1, 1, 1)

    def _train_transforms(img: Any) -> torch.Tensor:
        img = crop(img)  # RandomResizedCrop(size)
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip()
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        # ToTensor(): HWC uint8 -> CHW float in [0, 1]
        tensor = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
        tensor = tensor.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        return tensor.sub_(mean).div_(std)  # Normalize(mean, std) (on a copy, as F.normalize)

    def train_transforms(example_batch: dict[str, list]) -> dict[str, list]:
        example_batch["pixel_values"] = [
            _train_transforms(pil_img.convert("RGB")) for pil_img in example_batch["image"]
        ]
        return example_batch

    return train_transforms


def example_collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The example's ``collate_fn`` (label column ``label``, its default ``--label_column_name``)."""
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.tensor([example["label"] for example in examples])
    return {"pixel_values": pixel_values, "labels": labels}


def load_example_dataset(folder: Path, image_processor: Any, cache_dir: Path) -> Any:
    """``load_dataset("imagefolder", ...)["train"]`` with the example's train transforms set."""
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(cache_dir))["train"]
    dataset.set_transform(example_train_transforms(image_processor))
    return dataset
