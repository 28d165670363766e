"""Benchmark of the COCO data path: index start-up, worker memory, train-time throughput.

    python -m bench.data_loader --data-root /path/to/coco

1. Writes a synthetic instances file the size of COCO train2017 (118,287 images, ~860,000
   instances with COCO-like polygon sizes, 1 % crowd RLE) and times building the index from it
   with COCOSegmentation in a fresh process (cold: JSON + index + cache write; warm: from the
   cache), with the process's peak RSS. Image files are not needed for that.
2. Iterates labels over that index with 1 and with N DataLoader workers and reports the peak total
   PSS (proportional set size: shared pages divided among the processes sharing them) and RSS of
   the main process plus its workers. An index held in Python objects grows every worker by
   copy-on-read; flat numpy buffers stay shared.
3. Loads real images (--data-root or DEEPLAB_COCO_ROOT) with the full train pipeline (decode,
   label rasterisation, random scale/crop, flip, blur, tensors) in-process with one torch thread,
   as one DataLoader worker does, and reports images per second.

Targets: index < 30 s, >= 100 images/s per worker, N-worker PSS < 2x 1-worker PSS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# The 80 COCO category ids.
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
# (width, height) of COCO images, roughly in their proportions.
IMAGE_SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (640, 426), (500, 375),
               (640, 360), (612, 612)]


# ------------------------------------------------------------------ synthetic annotation file

def _polygons(rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray):
    """One random star-shaped polygon per entry: flat coordinate lists, areas and boxes."""
    count = len(widths)
    points = rng.integers(6, 41, count)  # COCO polygons average ~23 points
    starts = np.concatenate([[0], np.cumsum(points)[:-1]])
    owner = np.repeat(np.arange(count), points)
    local = np.arange(points.sum()) - starts[owner]
    short = np.minimum(widths, heights).astype(np.float64)
    # Log-uniform sizes: many small objects, some large, as in COCO.
    radius = np.exp(rng.uniform(np.log(3.0), np.log(0.45 * short)))
    cx, cy = rng.uniform(0, widths), rng.uniform(0, heights)
    angle = (local + rng.uniform(0, 0.8, local.size)) / points[owner] * 2 * np.pi
    r = radius[owner] * rng.uniform(0.55, 1.0, local.size)
    x = np.round(np.clip(cx[owner] + r * np.cos(angle), 0, widths[owner] - 1), 2)
    y = np.round(np.clip(cy[owner] + r * np.sin(angle), 0, heights[owner] - 1), 2)
    following = starts[owner] + (local + 1) % points[owner]
    area = 0.5 * np.abs(np.add.reduceat(x * y[following] - x[following] * y, starts))
    x0, y0 = np.minimum.reduceat(x, starts), np.minimum.reduceat(y, starts)
    x1, y1 = np.maximum.reduceat(x, starts), np.maximum.reduceat(y, starts)
    flat = np.empty(2 * x.size)
    flat[0::2], flat[1::2] = x, y
    flat_list = flat.tolist()
    bounds = np.concatenate([2 * starts, [flat.size]]).tolist()
    coordinates = [flat_list[bounds[i]:bounds[i + 1]] for i in range(count)]
    boxes = np.round(np.stack([x0, y0, x1 - x0, y1 - y0], 1), 2).tolist()
    return coordinates, np.round(area, 2).tolist(), boxes


def _crowd_rle(rng: np.random.Generator, width: int, height: int):
    """An uncompressed RLE rectangle (column-major runs) like COCO's crowd regions."""
    w = int(rng.integers(40, max(41, width // 2)))
    h = int(rng.integers(30, max(31, height // 2)))
    x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    counts = [x0 * height + y0]
    for _ in range(w - 1):
        counts += [h, height - h]
    counts += [h, (height - y0 - h) + (width - x0 - w) * height]
    return {"counts": counts, "size": [height, width]}, float(w * h), [x0, y0, w, h]


def write_synthetic_coco(root: Path, num_images: int, num_instances: int, seed: int) -> Path:
    """Write ``root/annotations/instances_train2017.json`` (and an empty ``train2017/``)."""
    rng = np.random.default_rng(seed)
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    size_index = rng.integers(0, len(IMAGE_SIZES), num_images)
    sizes = np.array(IMAGE_SIZES)[size_index]
    images = [{"license": 1, "file_name": f"{i + 1:012d}.jpg",
               "coco_url": f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg",
               "height": int(h), "width": int(w), "date_captured": "2013-11-14 11:18:45",
               "flickr_url": "http://farm1.staticflickr.com/1/1_1_z.jpg", "id": i + 1}
              for i, (w, h) in enumerate(sizes)]
    image_of = np.sort(rng.integers(0, num_images, num_instances))
    # About a third of COCO's instances are people; the rest spread over the other categories.
    categories = np.where(rng.random(num_instances) < 0.3, 1,
                          rng.choice(COCO_IDS[1:], num_instances))
    crowd = rng.random(num_instances) < 0.01
    two_parts = rng.random(num_instances) < 0.1
    path = root / "annotations" / "instances_train2017.json"
    with open(path, "w") as file:
        file.write('{"info": {"description": "synthetic COCO-sized benchmark file"}, '
                   '"licenses": [], "images": ')
        json.dump(images, file)
        file.write(', "annotations": [')
        chunk = 50_000
        for begin in range(0, num_instances, chunk):
            end = min(begin + chunk, num_instances)
            owners = image_of[begin:end]
            widths, heights = sizes[owners, 0], sizes[owners, 1]
            polygons, areas, boxes = _polygons(rng, widths, heights)
            extra, extra_areas, _ = _polygons(rng, widths, heights)
            annotations = []
            for k in range(end - begin):
                index = begin + k
                if crowd[index]:
                    segmentation, area, box = _crowd_rle(rng, int(widths[k]), int(heights[k]))
                elif two_parts[index]:
                    segmentation = [polygons[k], extra[k]]
                    area, box = areas[k] + extra_areas[k], boxes[k]
                else:
                    segmentation, area, box = [polygons[k]], areas[k], boxes[k]
                annotations.append({
                    "segmentation": segmentation, "area": area, "iscrowd": int(crowd[index]),
                    "image_id": int(owners[k]) + 1, "bbox": box,
                    "category_id": int(categories[index]), "id": index + 1,
                })
            text = json.dumps(annotations)[1:-1]
            file.write(("" if begin == 0 else ", ") + text)
        file.write('], "categories": ')
        json.dump([{"supercategory": "thing", "id": i, "name": f"category {i}"}
                   for i in COCO_IDS], file)
        file.write("}")
    return path


# ------------------------------------------------------------------ process memory

def _memory_kib(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of a process in KiB from /proc/<pid>/smaps_rollup; (0, 0) if it has gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return pss, rss


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _tree_memory_mib() -> tuple[float, float, int]:
    """Total PSS and RSS in MiB of this process and its children, and how many processes."""
    pids = [os.getpid()] + _children(os.getpid())
    totals = np.array([_memory_kib(pid) for pid in pids]).sum(0)
    return totals[0] / 1024, totals[1] / 1024, len(pids)


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------ measurements (child side)

def child_index(root: str, cache_dir: str) -> dict:
    start = time.perf_counter()
    from dataloader.datasets.coco import COCOSegmentation

    imported = time.perf_counter()
    dataset = COCOSegmentation(root, split="train", cache_dir=cache_dir)
    done = time.perf_counter()
    index_mib = sum(getattr(dataset, name).nbytes for name in (
        "ids", "_heights", "_widths", "_name_offsets", "_name_bytes", "_ann_offsets",
        "_ann_bytes")) / 2**20
    return {"images": len(dataset), "seconds": done - imported, "import_seconds": imported - start,
            "peak_rss_mib": _peak_rss_mib(), "index_mib": index_mib}


class _LabelHistogram:
    """Rasterise each label and return its class histogram (small to send between processes)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import torch

        label = self.dataset.label_array(index)
        return torch.from_numpy(np.bincount(label.ravel(), minlength=256))


def child_workers(root: str, cache_dir: str, workers: int, samples: int, seed: int) -> dict:
    import torch

    from dataloader.datasets.coco import COCOSegmentation

    dataset = COCOSegmentation(root, split="train", cache_dir=cache_dir)
    before_pss, before_rss, _ = _tree_memory_mib()
    generator = torch.Generator().manual_seed(seed)
    batch_size = 8
    loader = torch.utils.data.DataLoader(
        _LabelHistogram(dataset), batch_size=batch_size, shuffle=True, num_workers=workers,
        generator=generator)
    peak_pss = peak_rss = 0.0
    processes = 1
    seen = 0
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        seen += len(batch)
        if step % 10 == 0:
            pss, rss, count = _tree_memory_mib()
            if pss > peak_pss:
                peak_pss, peak_rss, processes = pss, rss, count
        if seen >= samples:
            break
    seconds = time.perf_counter() - start
    del loader
    return {"workers": workers, "samples": seen, "seconds": seconds,
            "main_pss_before_mib": before_pss, "main_rss_before_mib": before_rss,
            "peak_pss_mib": peak_pss, "peak_rss_mib": peak_rss, "processes": processes}


def _run_child(arguments: list[str]) -> dict:
    output = subprocess.run([sys.executable, "-m", "bench.data_loader", *arguments], check=True,
                            capture_output=True, text=True, cwd=REPO)
    return json.loads(output.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ throughput

def measure_throughput(root: str, base_size: int, crop_size: int, images: int) -> dict:
    import torch

    from dataloader import custom_transforms as tr
    from dataloader.datasets.coco import COCOSegmentation
    from dataloader.utils import load_image

    torch.set_num_threads(1)  # what a DataLoader worker gets
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache_dir:
        dataset = COCOSegmentation(root, split="train", cache_dir=cache_dir)
        order = [i % len(dataset) for i in range(images)]
        for i in order[:10]:  # warm the page cache and the allocators
            dataset[i]

        def rate(step) -> float:
            start = time.perf_counter()
            for i in order:
                step(i)
            return len(order) / (time.perf_counter() - start)

        transform = tr.train_transform(base_size, crop_size)
        result = {
            "images_in_split": len(dataset),
            "decode_per_s": rate(lambda i: load_image(dataset.image_path(i))),
            "label_per_s": rate(dataset.label_array),
            "decode_label_per_s": rate(dataset.__getitem__),
            "full_train_per_s": rate(lambda i: transform(dataset[i])),
        }
    return result


# ------------------------------------------------------------------ script

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.data_loader", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("DEEPLAB_COCO_ROOT"),
                        help="real COCO 2017 folder for the throughput part (default: "
                             "$DEEPLAB_COCO_ROOT); without it that part is skipped")
    parser.add_argument("--num-images", type=int, default=118_287)
    parser.add_argument("--num-instances", type=int, default=860_001)
    parser.add_argument("--work-dir", default=None,
                        help="keep the synthetic file here (reused when present) instead of a "
                             "temporary folder")
    parser.add_argument("--workers", type=int, default=8, help="the many-workers case")
    parser.add_argument("--label-samples", type=int, default=2000,
                        help="labels rasterised per worker configuration")
    parser.add_argument("--throughput-images", type=int, default=320)
    parser.add_argument("--base-size", type=int, default=513)
    parser.add_argument("--crop-size", type=int, default=513)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-synthetic", action=argparse.BooleanOptionalAction, default=False,
                        help="only measure the throughput on real data")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return parser


def main(args: argparse.Namespace) -> int:
    if args.child:
        kind, *rest = args.child
        if kind == "index":
            result = child_index(rest[0], rest[1])
        else:
            result = child_workers(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]))
        print(json.dumps(result))
        return 0

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}")
    targets_met = True
    if not args.skip_synthetic:
        targets_met &= report_synthetic(args.work_dir, num_images=args.num_images,
                                        num_instances=args.num_instances, seed=args.seed,
                                        workers=args.workers, label_samples=args.label_samples)
    if args.data_root:
        targets_met &= report_throughput(args.data_root, base_size=args.base_size,
                                         crop_size=args.crop_size,
                                         images=args.throughput_images)
    else:
        print("[3] skipped: pass --data-root or set DEEPLAB_COCO_ROOT for the throughput part")
    return 0 if targets_met else 1


def report_synthetic(work_dir: str | None, *, num_images: int, num_instances: int, seed: int,
                     workers: int, label_samples: int) -> bool:
    """Parts [1] and [2] on the synthetic file (written into ``work_dir``, or a temporary
    folder); whether their targets were met."""
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="coco-bench-"))
    try:
        root = work / "synthetic"
        annotation_file = root / "annotations" / "instances_train2017.json"
        if not annotation_file.is_file():
            start = time.perf_counter()
            write_synthetic_coco(root, num_images, num_instances, seed)
            print(f"wrote the synthetic file in {time.perf_counter() - start:.1f} s "
                  "(not part of any target)")
        print(f"synthetic file: {num_images} images, {num_instances} instances, "
              f"{annotation_file.stat().st_size / 2**20:.0f} MiB")
        cache_dir = work / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        cold = _run_child(["--child", "index", str(root), str(cache_dir)])
        warm = _run_child(["--child", "index", str(root), str(cache_dir)])
        print(f"[1] index, cold (JSON parse + index + cache write): {cold['seconds']:.1f} s, "
              f"peak RSS {cold['peak_rss_mib']:.0f} MiB; {cold['images']} train images kept, "
              f"index arrays {cold['index_mib']:.0f} MiB")
        print(f"    index, warm (from the cache): {warm['seconds']:.2f} s, "
              f"peak RSS {warm['peak_rss_mib']:.0f} MiB   target < 30 s: "
              f"{'met' if cold['seconds'] < 30 else 'MISSED'}")
        runs = [_run_child(["--child", "workers", str(root), str(cache_dir), str(count),
                            str(label_samples), str(seed)])
                for count in (1, workers)]
        for run in runs:
            print(f"[2] {run['workers']} worker(s): peak total PSS {run['peak_pss_mib']:.0f} "
                  f"MiB (RSS sum {run['peak_rss_mib']:.0f} MiB, {run['processes']} "
                  f"processes; main before the loader {run['main_pss_before_mib']:.0f} MiB); "
                  f"{run['samples'] / run['seconds']:.0f} labels/s")
        ratio = runs[1]["peak_pss_mib"] / runs[0]["peak_pss_mib"]
        print(f"    PSS {workers} workers / 1 worker = {ratio:.2f}   target < 2: "
              f"{'met' if ratio < 2 else 'MISSED'}")
        return cold["seconds"] < 30 and ratio < 2
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)


def report_throughput(data_root: str, *, base_size: int, crop_size: int, images: int) -> bool:
    """Part [3] on real data; whether its target was met."""
    result = measure_throughput(data_root, base_size, crop_size, images)
    print(f"[3] throughput on {data_root} ({result['images_in_split']} train images, "
          f"{images} loads, crop {crop_size}, 1 torch thread):")
    print(f"    decode {result['decode_per_s']:.0f}/s, label {result['label_per_s']:.0f}/s, "
          f"decode+label {result['decode_label_per_s']:.0f}/s, full train pipeline "
          f"{result['full_train_per_s']:.0f} images/s per worker   target >= 100: "
          f"{'met' if result['full_train_per_s'] >= 100 else 'MISSED'}")
    return result["full_train_per_s"] >= 100


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
