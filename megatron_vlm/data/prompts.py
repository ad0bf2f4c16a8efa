"""Prompts as a model's family formats them: text with ``<image>`` placeholders and its images ->
transformers' processor output and our model's forward inputs (``batch.py``'s micro-batch).

A model family (``ModelConfig.family``) names its prompt format here; the converters write the same
processor next to an export (``conversion/families``), generation and evaluation prompt with it, so
a prompt is processed exactly as the exported processor processes it:

  idefics2  transformers' ``Idefics2Processor`` (images at native aspect ratio, longest edge capped,
            optional splitting into 4 crops + the image); every ``<image>`` becomes fake, image x N,
            fake. Also the processor of the CLIP / MLP variants trained in this format (squares at
            the encoder's size with its own normalization).
  idefics3  transformers' ``Idefics3Processor`` (tiles of image_size with row/column tokens).
  idefics1  transformers' ``IdeficsProcessor`` (one ``<image>`` per image, squares at the vision
            tower's size, CLIP normalization); it takes text and images interleaved.

A processor is built from an ``ImageConfig`` (how images are resized, split and normalized: what
the exporter writes by default, ``inference/prompts.py``, or a training mixture's) and the number of
``<image>`` tokens an image becomes (the connector's).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_vlm.config import ModelConfig
from megatron_vlm.data.batch import MicroBatch, forward_inputs, micro_batch, one_document_per_row
from megatron_vlm.data.chat import CHAT_TEMPLATES
from megatron_vlm.data.images import ImageConfig
from megatron_vlm.data.tokens import IMAGE_TOKEN


class Idefics2Prompts:
    """transformers' Idefics2Processor."""

    def processor(self, config: ModelConfig, tokenizer: Any, image: ImageConfig, image_seq_len: int) -> Any:
        from transformers import Idefics2ImageProcessor, Idefics2Processor

        if image.resize == "square":
            size = {"height": image.longest_edge, "width": image.longest_edge}
        else:
            size = {"longest_edge": image.longest_edge, "shortest_edge": image.shortest_edge}
        image_processor = Idefics2ImageProcessor(
            size=size, do_image_splitting=image.split, image_mean=list(image.mean), image_std=list(image.std)
        )
        return Idefics2Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=CHAT_TEMPLATES["idefics2"].jinja,  # what fine-tuning renders (data/chat.py)
        )

    def encode(
        self, config: ModelConfig, processor: Any, texts: list[str], images: list[list[Any]]
    ) -> tuple[dict[str, torch.Tensor], MicroBatch]:
        """Prompts (``<image>`` where each image goes) and each prompt's images -> (the processor's
        output, as transformers' model takes it; our model's forward inputs: right-padded rows, one
        document each, the real images batch-major)."""
        processor.tokenizer.padding_side = "right"
        if not any(images):  # a text-only batch: the processor wants no images argument
            hf = dict(processor(text=texts, padding=True, return_tensors="pt"))
            pixels, mask = torch.zeros(0, 3, 1, 1), torch.zeros(0, 1, 1, dtype=torch.bool)
        else:
            hf = dict(processor(text=texts, images=[list(row) for row in images], padding=True, return_tensors="pt"))
            if int((hf["input_ids"] == config.image_token_id).sum()) == 0:
                raise ValueError("the tokenizer's <image> id does not match the model's image_token_id")
            flat_pixels = hf["pixel_values"].flatten(0, 1)
            flat_mask = hf["pixel_attention_mask"].flatten(0, 1).bool()
            real = flat_mask.flatten(1).any(-1)  # the processor pads rows with all-zero images
            pixels, mask = flat_pixels[real], flat_mask[real]
        batch = micro_batch(
            hf["input_ids"], one_document_per_row(hf["attention_mask"]), pixels, mask, config.image_token_id
        )
        return hf, forward_inputs(batch)


class Idefics3Prompts(Idefics2Prompts):
    """transformers' Idefics3Processor: images resized to at most 4 x image_size on their longest
    edge, then split into (and/or squared to) image_size tiles of ``image_seq_len`` tokens each (of
    the ImageConfig only ``split`` and the normalization are read: the tiles follow the model)."""

    def processor(self, config: ModelConfig, tokenizer: Any, image: ImageConfig, image_seq_len: int) -> Any:
        from transformers import Idefics3ImageProcessor, Idefics3Processor

        side = config.vision.image_size
        image_processor = Idefics3ImageProcessor(
            size={"longest_edge": 4 * side},
            max_image_size={"longest_edge": side},
            do_image_splitting=image.split,
            image_mean=list(image.mean),
            image_std=list(image.std),
        )
        return Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=CHAT_TEMPLATES["idefics3"].jinja,
        )


class Idefics1Prompts:
    """transformers' IdeficsProcessor: one ``<image>`` token (between fake tokens) per image, the
    image resized square at the vision tower's size."""

    def processor(self, config: ModelConfig, tokenizer: Any, image: ImageConfig, image_seq_len: int) -> Any:
        from transformers import IdeficsImageProcessor, IdeficsProcessor

        tokens = ["<fake_token_around_image>", IMAGE_TOKEN]
        if any(token not in tokenizer.get_vocab() for token in tokens):  # as Idefics1's tokenizer was made
            tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        expected = [config.fake_image_token_id, config.image_token_id]
        if ids != expected:
            raise ValueError(
                f"the tokenizer gives {dict(zip(tokens, ids, strict=True))} but the model's ids are "
                f"{dict(zip(tokens, expected, strict=True))}: export with the model's own tokenizer"
            )
        side = config.vision.image_size
        if image.resize != "square" or image.longest_edge != side or image.split or image_seq_len != 1:
            raise ValueError(
                f"the idefics1 prompt format takes whole images resized square at {side} px, one <image> token each"
            )
        image_processor = IdeficsImageProcessor(image_size=side, image_mean=list(image.mean), image_std=list(image.std))
        return IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer, image_size=side)

    def encode(
        self, config: ModelConfig, processor: Any, texts: list[str], images: list[list[Any]]
    ) -> tuple[dict[str, torch.Tensor], MicroBatch]:
        """As ``Idefics2Prompts.encode``; IdeficsProcessor takes each prompt as text and images
        interleaved in one list."""
        processor.tokenizer.padding_side = "right"
        prompts = []
        for text, row_images in zip(texts, images, strict=True):
            pieces = text.split(IMAGE_TOKEN)
            if len(pieces) != len(row_images) + 1:
                raise ValueError(f"prompt {text!r} has {len(pieces) - 1} {IMAGE_TOKEN} for {len(row_images)} images")
            prompt: list[Any] = [pieces[0]] if pieces[0].strip() else []
            for image, piece in zip(row_images, pieces[1:], strict=True):
                prompt += [image, piece] if piece.strip() else [image]
            prompts.append(prompt)
        hf = dict(processor(text=prompts, padding=True, return_tensors="pt"))
        counts = (hf["input_ids"] == config.image_token_id).sum(dim=1)
        if int(counts.sum()) != sum(len(row) for row in images):
            raise ValueError("the tokenizer's <image> id does not match the model's image_token_id")
        slots = torch.arange(hf["pixel_values"].shape[1])[None, :] < counts[:, None]  # real images first
        pixels = hf["pixel_values"][slots]
        mask = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.bool)
        batch = micro_batch(
            hf["input_ids"], one_document_per_row(hf["attention_mask"]), pixels, mask, config.image_token_id
        )
        return hf, forward_inputs(batch)


PROMPT_FORMATS: dict[str, Any] = {
    "idefics2": Idefics2Prompts(),
    "idefics3": Idefics3Prompts(),
    "idefics1": Idefics1Prompts(),
}


def prompt_format(config: ModelConfig) -> Any:
    """The prompt format of the model's family."""
    try:
        return PROMPT_FORMATS[config.family]
    except KeyError:
        raise ValueError(
            f"no prompt format for model family {config.family!r}; known: {sorted(PROMPT_FORMATS)}"
        ) from None


class PromptEncoder:
    """A model's prompt format with its processor built once: ``encode(texts, images)``, ``decode(ids)``."""

    def __init__(self, config: ModelConfig, tokenizer: Any, image: ImageConfig, image_seq_len: int) -> None:
        self.config, self.image, self.image_seq_len = config, image, image_seq_len
        self.format = prompt_format(config)
        self.processor = self.format.processor(config, tokenizer, image, image_seq_len)
        self.tokenizer = self.processor.tokenizer

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Where a generated answer ends: the tokenizer's end of sequence or the model's ``<end_of_utterance>``."""
        ends = (self.tokenizer.eos_token_id, self.config.end_of_utterance_token_id)
        return tuple(i for i in ends if i is not None)

    def encode(self, texts: list[str], images: list[list[Any]]) -> tuple[dict[str, torch.Tensor], MicroBatch]:
        return self.format.encode(self.config, self.processor, texts, images)

    def decode(self, token_ids: list[int]) -> str:
        """Generated ids -> text, special tokens (image tokens, EOS) left out."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
