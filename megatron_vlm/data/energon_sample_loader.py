"""Megatron-Energon's sample loader for our shards (``.nv-meta/sample_loader.py`` of a prepared
dataset; ``tools/prepare_energon.py`` installs it). Standalone: energon imports this file by path, in
environments that need not have megatron-vlm installed.

Our tars (``data/shards.py``) hold per sample ``KEY.json`` ({"kind", "layout": ["text" | "image",
...], "texts": [...]}) and its images: ``KEY.<i>.<ext>`` for interleaved documents (the i-th image),
``KEY.<ext>`` + ``KEY.txt`` for pairs and pages. Energon groups the members by key and decodes the
images (by extension) before calling ``sample_loader`` with {part: value}. ``energon prepare``'s field
map names one image extension; a shard may hold JPEG and PNG images (``images.canonical_encoding``
stores some as PNG), so the image is found by kind of part, not by a fixed name.
"""

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def _is_image(part: str) -> bool:
    return part.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def sample_loader(raw: dict) -> dict:
    meta = raw["json"]
    if meta.get("kind") == "interleaved":  # InterleavedSample: texts and images in document order
        images = sorted((int(part.split(".")[0]), value) for part, value in raw.items() if _is_image(part))
        texts, pictures = iter(meta["texts"]), iter(value for _, value in images)
        sequence = [next(pictures) if kind == "image" else next(texts) for kind in meta["layout"]]
        if len(images) != meta["layout"].count("image"):
            raise ValueError(f"sample {raw.get('__key__')}: {len(images)} images for its layout {meta['layout']}")
        return dict(sequence=sequence)
    # CaptioningSample: a pair's or a page's image and its text
    (image,) = [value for part, value in raw.items() if _is_image(part)]
    return dict(image=image, caption=raw["txt"])


def part_filter(part: str) -> bool:
    return part in ("json", "txt") or _is_image(part)
