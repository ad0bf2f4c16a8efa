"""Model families the converters read and write (one file each; see ``base.py``).

idefics2.py    Idefics2ForConditionalGeneration
idefics3.py    Idefics3ForConditionalGeneration (SigLIP, pixel-shuffle connector, Llama-3)
"""

import importlib
import pkgutil

from megatron_vlm.conversion.families.base import family, family_for_hf, family_of, register_family

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["family", "family_for_hf", "family_of", "register_family"]
