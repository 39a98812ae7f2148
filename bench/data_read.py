"""Read and pack speed of the packed format on real JPEGs (CIFAR-10 from ../shared/data).

    .venv/bin/python bench/data_read.py [--data ../shared/data/cifar10-jpg.tar.gz] [--passes 5]

1. Packs the 50,000-image train split with `--workers 2` (`hat pack imagenet`, in process,
   listing included) and reports images per second. Target: at least 5,000. Interpreter
   start-up and imports are not included: `hat pack` adds about 5 s of them once per run
   (importing torchvision imports torch._dynamo).
2. Reads the 10,000-image test split three ways, in one process, in the same shuffled order,
   producing the same output (a uint8 CHW tensor per image):
   (a) torchvision `ImageFolder` with PIL and `PILToTensor`;
   (b) our packed reader (`ClassificationDataset` over `hat pack` output);
   (c) the in-memory limit: encoded bytes already in RAM, decode only (`decode_image`).
   One untimed pass warms the page cache; then the three readers take turns for `--passes`
   rounds and each reader's median rate is used, so machine noise hits all three alike.
   Targets: (b)/(a) >= 3.0 and (b)/(c) >= 0.6.

The last line printed is one JSON object with `packed_vs_imagefolder`, `packed_vs_decode_limit`
and `pack_images_per_s`, plus the raw rates and whether each target is met.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"
TARGETS = {"packed_vs_imagefolder": 3.0, "packed_vs_decode_limit": 0.6, "pack_images_per_s": 5000.0}


def _rate(read_one: Callable[[int], object], order: list[int]) -> float:
    tic = time.perf_counter()
    for index in order:
        read_one(index)
    return len(order) / (time.perf_counter() - tic)


def main() -> int:
    """Run the benchmark; return the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cifar10-jpg.tar.gz")
    parser.add_argument("--passes", type=int, default=5, help="timed rounds per reader")
    parser.add_argument("--workers", type=int, default=2, help="pack workers")
    args = parser.parse_args()
    if not args.data.is_file():
        print(f"error: {args.data} not found: this benchmark needs CIFAR-10 as JPEGs "
              f"(../shared/data/cifar10-jpg.tar.gz); pass --data", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="The image decoding and encoding")
    torch.set_num_threads(1)

    from torchvision.datasets import ImageFolder
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    from hatcli.data.datasets import ClassificationDataset
    from hatcli.data.lmdb_format import open_packed
    from hatcli.data.packers.imagenet import pack_imagenet_split

    with tempfile.TemporaryDirectory(prefix="hat-bench-") as tmp:
        work = Path(tmp)
        with tarfile.open(args.data) as tar:
            tar.extractall(work, filter="data")
        src = work / "cifar10_jpg"

        tic = time.perf_counter()
        summary, _ = pack_imagenet_split(src, work / "packed", "train", workers=args.workers)
        pack_seconds = time.perf_counter() - tic
        pack_rate = summary.count / pack_seconds
        test_summary, _ = pack_imagenet_split(src, work / "packed", "test", workers=args.workers)

        folder = ImageFolder(str(src / "test"), transform=v2.PILToTensor())
        packed = ClassificationDataset(work / "packed" / "test_lmdb")
        reader = open_packed(work / "packed" / "test_lmdb")
        in_memory = [bytearray(reader[i]["image"]) for i in range(len(reader))]
        assert len(folder) == len(packed) == len(in_memory) == test_summary.count

        def decode_only(index: int) -> torch.Tensor:
            return decode_image(torch.frombuffer(in_memory[index], dtype=torch.uint8), mode=ImageReadMode.RGB)

        readers: dict[str, Callable[[int], object]] = {
            "imagefolder": lambda i: folder[i],
            "packed": lambda i: packed[i],
            "decode_limit": decode_only,
        }
        # Same output, checked on a sample: ImageFolder and the packed data list files in the same order.
        for i in range(0, len(packed), 997):
            assert torch.equal(folder[i][0], packed[i][0]) and torch.equal(packed[i][0], decode_only(i))
        order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(0)).tolist()
        for read_one in readers.values():  # warm the page cache and the allocators
            _rate(read_one, order)
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.passes):
            for name, read_one in readers.items():
                rates[name].append(_rate(read_one, order))
    median = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "packed_vs_imagefolder": round(median["packed"] / median["imagefolder"], 3),
        "packed_vs_decode_limit": round(median["packed"] / median["decode_limit"], 3),
        "pack_images_per_s": round(pack_rate, 1),
        "images_per_s": {name: round(value, 1) for name, value in median.items()},
        "pack_workers": args.workers,
        "pack_images": summary.count,
        "read_images": len(order),
        "passes": args.passes,
    }
    result["targets_met"] = {key: result[key] >= target for key, target in TARGETS.items()}
    print(f"pack: {summary.count} images in {pack_seconds:.1f} s with {args.workers} workers", file=sys.stderr)
    for name, value in median.items():
        print(f"read {name:>12}: {value:,.0f} images/s (median of {args.passes})", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
