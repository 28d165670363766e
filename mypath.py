"""Where datasets live on this machine.

Edit ``DEFAULT_ROOTS`` once for your machine, or set the environment variable of a dataset;
``train.py --data-root`` overrides both for one run.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent

#: dataset name -> (environment variable, default root)
DEFAULT_ROOTS: dict[str, tuple[str, str]] = {
    "coco": ("DEEPLAB_COCO_ROOT", "/path/to/coco"),
    "cocostuff": ("DEEPLAB_COCOSTUFF_ROOT", "/path/to/cocostuff"),
    "pascal": ("DEEPLAB_VOC_ROOT", "/path/to/VOCdevkit/VOC2012"),
    "folder": ("DEEPLAB_FOLDER_ROOT", "/path/to/my_dataset"),
    # Generated on first use into this git-ignored folder.
    "demo": ("DEEPLAB_DEMO_ROOT", str(REPO_DIR / "data" / "demo")),
}


def db_root_dir(dataset: str, root: str | None = None) -> str:
    """The root folder of ``dataset``: ``root`` (``--data-root``) if given, else its environment
    variable if set, else the default. The demo dataset's folder need not exist (it is generated).

    Raises:
        FileNotFoundError: with one line naming ``--data-root`` (and the variable) when the folder
            does not exist.
    """
    must_exist = dataset != "demo"
    if root:
        if must_exist and not os.path.isdir(root):
            raise FileNotFoundError(f"--data-root {root} does not exist")
        return root
    if dataset not in DEFAULT_ROOTS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(DEFAULT_ROOTS))}")
    variable, default = DEFAULT_ROOTS[dataset]
    root = os.environ.get(variable) or default
    if must_exist and not os.path.isdir(root):
        raise FileNotFoundError(
            f"{dataset} dataset root {root} does not exist: set {variable}=/path/to/{dataset} "
            f"or pass --data-root"
        )
    return root
