"""Benchmark tasks, one small file each (as lmms-eval's): where its data comes from, how a query and
its in-context examples become a prompt, how an answer is extracted, and which metrics it reports.
A task file defines a ``Task`` subclass and registers an instance; every module of this package is
imported here, so adding a benchmark (DocVQA with ANLS, MMMU with multiple choice, ...) is adding
its file.
"""

from __future__ import annotations

import importlib
import pkgutil

from megatron_vlm.evaluation.tasks.base import Task, register, task, tasks

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Task", "register", "task", "tasks"]
