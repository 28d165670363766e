"""Where datasets live on this machine.

Edit ``DEFAULT_ROOTS`` once for your machine, or set the environment variable of a dataset (its
entry in ``dataloader/datasets/__init__.py`` names it: ``DEEPLAB_COCO_ROOT`` for ``coco``, ...);
``train.py --data-root`` overrides both for one run.
"""
from __future__ import annotations

import os
from pathlib import Path

from dataloader.datasets import dataset_entry

REPO_DIR = Path(__file__).resolve().parent

#: dataset name -> its folder on this machine. A dataset missing here is found through its
#: environment variable or ``--data-root``.
DEFAULT_ROOTS: dict[str, str] = {
    "coco": "/path/to/coco",
    "cocostuff": "/path/to/cocostuff",
    "pascal": "/path/to/VOCdevkit/VOC2012",
    "folder": "/path/to/my_dataset",
    # Generated on first use into this git-ignored folder.
    "demo": str(REPO_DIR / "data" / "demo"),
}


def db_root_dir(dataset: str, root: str | None = None) -> str:
    """The root folder of ``dataset``: ``root`` (``--data-root``) if given, else its environment
    variable if set, else its entry in ``DEFAULT_ROOTS``. The folder of a generated dataset (the
    demo) need not exist.

    Raises:
        ValueError: ``dataset`` is not in the registry.
        FileNotFoundError: with one line naming ``--data-root`` (and the variable) when the folder
            does not exist or none is given.
    """
    entry = dataset_entry(dataset)
    if root:
        if not entry.generated and not os.path.isdir(root):
            raise FileNotFoundError(f"--data-root {root} does not exist")
        return root
    root = os.environ.get(entry.variable) or DEFAULT_ROOTS.get(dataset)
    if root is None:
        raise FileNotFoundError(
            f"{dataset} dataset has no root: set {entry.variable}=/path/to/{dataset}, add it to "
            f"DEFAULT_ROOTS in mypath.py or pass --data-root"
        )
    if not entry.generated and not os.path.isdir(root):
        raise FileNotFoundError(
            f"{dataset} dataset root {root} does not exist: set {entry.variable}=/path/to/{dataset} "
            f"or pass --data-root"
        )
    return root
