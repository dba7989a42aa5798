"""Qwen3-VL inputs for the probes: images in, model inputs and a vision token map out.

The full `Qwen3VLProcessor` needs torchvision (its video processor), which has no CPU build
here, so the pieces are assembled directly (REFERENCE §2):

1. each image is opened with PIL (`load_image`) and turned into patches by the checkpoint's
   image processor (`Qwen2VLImageProcessorPil`), which also reports `image_grid_thw`
   (temporal, height, width) in 16-px patches;
2. the prompt is rendered (chat template by default for VL models, an image content item per
   image) and each `<|image_pad|>` is expanded to N = t*h*w / merge**2 copies, as the processor
   does;
3. `mm_token_type_ids` (0 text, 1 image) are built, and the MRoPE position ids (3, 1, T) are
   computed once with the model's `get_rope_index` and passed explicitly (never the cached
   `rope_deltas`).

The vision token map records, per image, the range of its tokens, and per image token its cell
on the merged patch grid (`grid_row`, `grid_col`) and its pixel box in the resized image (one
token covers `patch * merge` pixels square).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sparse_viz.errors import UserInputError

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_MODEL_TYPES = frozenset({"qwen3_vl"})
TOKEN_KINDS = ("text", "image", "special")


# -- images ------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> Any:
    """Open an image file fully (decoding errors surface here, not later) as RGB.

    Returns:
        PIL.Image.Image in mode RGB.

    Raises:
        UserInputError: the file is missing, is a directory, is not an image, or is corrupt.
    """
    from PIL import Image, UnidentifiedImageError

    name = str(path)
    file = Path(path).expanduser()
    if not file.exists():
        raise UserInputError(f"image {name!r} does not exist")
    if not file.is_file():
        raise UserInputError(f"image {name!r} is not a file")
    try:
        with Image.open(file) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise UserInputError(f"image {name!r} is not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise UserInputError(f"image {name!r} is corrupt: {error}") from None


def is_vision_model(model: Any) -> bool:
    """True for a loaded Qwen3-VL model (its config's model_type)."""
    return getattr(getattr(model, "config", None), "model_type", None) in VISION_MODEL_TYPES


def build_image_processor(model: Any, name_or_path: str | os.PathLike | None = None) -> Any:
    """The checkpoint's image processor, without torchvision.

    Reads `preprocessor_config.json` from `name_or_path` when there is one, else builds one
    from the vision config (patch size, spatial merge, temporal patch size).

    Returns:
        transformers.Qwen2VLImageProcessorPil.
    """
    from transformers import Qwen2VLImageProcessorPil

    if name_or_path is not None and (Path(name_or_path) / "preprocessor_config.json").is_file():
        try:
            return Qwen2VLImageProcessorPil.from_pretrained(str(name_or_path))
        except (OSError, ValueError) as error:
            raise UserInputError(f"cannot read the image processor of {str(name_or_path)!r}: {error}") from None
    vision = model.config.vision_config
    return Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
    )


# -- the vision token map ----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTokens:
    """Where one image sits in the sequence and how its tokens tile it.

    Attributes:
        image_index: 0-based order of the image in the prompt.
        start, stop: its `<|image_pad|>` tokens are positions start..stop-1.
        grid_rows, grid_cols: the merged grid (image_grid_thw's h and w / merge); one token per cell,
            row-major, so position start + r * grid_cols + c is cell (r, c) (t = 1 for images).
        cell_pixels: side of one token's square in the resized image (patch * merge).
        resized_size: (width, height) of the image the model saw.
        original_size: (width, height) of the file.
    """

    image_index: int
    start: int
    stop: int
    grid_rows: int
    grid_cols: int
    cell_pixels: int
    resized_size: tuple[int, int]
    original_size: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start

    def cell(self, position: int) -> tuple[int, int]:
        """(grid_row, grid_col) of the image token at sequence `position`."""
        offset = (position - self.start) % (self.grid_rows * self.grid_cols)
        return divmod(offset, self.grid_cols)

    def pixel_box(self, position: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in the resized image of the token at `position`."""
        row, col = self.cell(position)
        size = self.cell_pixels
        return (col * size, row * size, (col + 1) * size, (row + 1) * size)


@dataclass
class VisionTokenMap:
    """Kind of every position, and the image tokens' places on their images.

    Attributes:
        token_kinds: per position, "text", "image" or "special" (tokenizer special tokens such
            as <|vision_start|>, <|im_start|>).
        images: one ImageTokens per image, in prompt order.
    """

    token_kinds: list[str]
    images: list[ImageTokens] = field(default_factory=list)

    def ranges(self) -> list[tuple[int, int]]:
        """[(start, stop)] per image, stop exclusive (seed 001's "Vision token ranges")."""
        return [(image.start, image.stop) for image in self.images]

    @property
    def num_image_tokens(self) -> int:
        return sum(image.num_tokens for image in self.images)

    def positions(self, kind: str) -> list[int]:
        """Positions to mask for `--mask kind`: "vision" image tokens, "text" every other token,
        "all" every position."""
        if kind == "all":
            return list(range(len(self.token_kinds)))
        if kind == "vision":
            return [p for p, k in enumerate(self.token_kinds) if k == "image"]
        if kind == "text":
            return [p for p, k in enumerate(self.token_kinds) if k != "image"]
        raise UserInputError(f"unknown --mask {kind!r}; use text, vision or all")

    def image_at(self, position: int) -> ImageTokens | None:
        for image in self.images:
            if image.start <= position < image.stop:
                return image
        return None

    def extended(self, n_new: int = 1) -> VisionTokenMap:
        """The map after `n_new` generated (text) tokens are appended."""
        return replace(self, token_kinds=self.token_kinds + ["text"] * n_new)

    def to_json(self) -> dict:
        return {
            "ranges": [list(r) for r in self.ranges()],
            "num_image_tokens": self.num_image_tokens,
            "token_kinds": self.token_kinds,
            "images": [
                {
                    "image_index": im.image_index,
                    "start": im.start,
                    "stop": im.stop,
                    "grid_rows": im.grid_rows,
                    "grid_cols": im.grid_cols,
                    "cell_pixels": im.cell_pixels,
                    "resized_size": list(im.resized_size),
                    "original_size": list(im.original_size),
                }
                for im in self.images
            ],
        }


# -- prompt + images -> model inputs -----------------------------------------------------------


@dataclass
class VisionInputs:
    """One sequence ready for a Qwen3-VL forward.

    Attributes:
        input_ids: (1, T) int64, `<|image_pad|>` already expanded.
        mm_token_type_ids: (1, T) int32, 0 text, 1 image.
        pixel_values: (sum of patches, C*t*p*p) float, or None for a text-only prompt.
        image_grid_thw: (n_images, 3) int64, or None.
        token_map: the VisionTokenMap of input_ids.
        images: the RGB images resized to what the model saw (for overlays).
    """

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    token_map: VisionTokenMap
    images: list[Any] = field(default_factory=list)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> VisionInputs:
        pixels = self.pixel_values
        if pixels is not None:
            pixels = pixels.to(device=device, dtype=dtype or pixels.dtype)
        grid = self.image_grid_thw.to(device) if self.image_grid_thw is not None else None
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            mm_token_type_ids=self.mm_token_type_ids.to(device),
            pixel_values=pixels,
            image_grid_thw=grid,
        )

    def appended(self, token_id: int) -> VisionInputs:
        """The inputs with one generated text token appended."""
        new = torch.tensor([[token_id]], dtype=self.input_ids.dtype, device=self.input_ids.device)
        zero = torch.zeros(1, 1, dtype=self.mm_token_type_ids.dtype, device=self.mm_token_type_ids.device)
        return replace(
            self,
            input_ids=torch.cat([self.input_ids, new], dim=1),  # (1, T+1)
            mm_token_type_ids=torch.cat([self.mm_token_type_ids, zero], dim=1),  # (1, T+1)
            token_map=self.token_map.extended(1),
        )

    def model_inputs(self, model: Any, vision_attention: str = "causal") -> dict[str, Any]:
        """Keyword arguments for `model(input_ids=..., **model_inputs)`, MRoPE ids included.

        Args:
            model: the Qwen3-VL model (for `get_rope_index`).
            vision_attention: "causal" (the model's own mask) or "bidirectional" (a
                COUNTERFACTUAL: see `vision_attention_mask`).

        Returns:
            {"mm_token_type_ids", "position_ids" (3, 1, T), and "pixel_values",
            "image_grid_thw" when there are images, "attention_mask" (1, 1, T, T) when
            bidirectional}.
        """
        extra = {}
        if vision_attention == "bidirectional":
            dtype = next(model.parameters()).dtype
            extra["attention_mask"] = vision_attention_mask(self.token_map, dtype, self.input_ids.device)
        elif vision_attention != "causal":
            raise UserInputError(f"unknown vision attention {vision_attention!r}; use causal or bidirectional")
        return {
            **extra,
            "mm_token_type_ids": self.mm_token_type_ids,
            "position_ids": mrope_position_ids(model, self),
            **(
                {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}
                if self.pixel_values is not None
                else {}
            ),
        }


def vision_attention_mask(token_map: VisionTokenMap, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """COUNTERFACTUAL mask: causal, except that tokens of one image see each other both ways.

    This is seed 001's "bidirectional vision" assumption, NOT what Qwen3-VL's language model
    does (its attention is purely causal; only the vision tower is bidirectional). It changes
    every layer's hidden states at image positions; the final query, which comes after the
    images, still sees every earlier key, so the fast masking path applies unchanged.

    Returns:
        (1, 1, T, T) additive float mask: 0 visible, finfo.min hidden.
    """
    n = len(token_map.token_kinds)
    query = torch.arange(n, device=device)[:, None]
    key = torch.arange(n, device=device)[None, :]
    visible = key <= query  # (T, T)
    for image in token_map.images:
        block = slice(image.start, image.stop)
        visible[block, block] = True
    mask = torch.zeros(n, n, dtype=dtype, device=device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]  # (1, 1, T, T)


def mrope_position_ids(model: Any, inputs: VisionInputs) -> torch.Tensor:
    """MRoPE position ids (3, 1, T) from the model's own `get_rope_index`."""
    position_ids, _ = model.model.get_rope_index(
        inputs.input_ids, inputs.mm_token_type_ids, image_grid_thw=inputs.image_grid_thw
    )
    return position_ids  # (3, 1, T)


def render_vl_prompt(tokenizer: Any, prompt: str, n_images: int, chat: bool = True) -> str:
    """The prompt text with one `<|vision_start|><|image_pad|><|vision_end|>` per image.

    With `chat`, the tokenizer's chat template renders one user turn whose content is the
    images followed by the text (Qwen3-VL's message format); without it, the image blocks are
    placed before the prompt.

    Raises:
        UserInputError: chat requested but the tokenizer has no template, or the template did
            not place one image pad per image.
    """
    if IMAGE_PAD in prompt:
        raise UserInputError(f"the prompt text contains {IMAGE_PAD} of its own; pass images with --image")
    block = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
    if not chat:
        return block * n_images + prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserInputError("the tokenizer has no chat template; pass --no-chat")
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    if text.count(IMAGE_PAD) != n_images:
        raise UserInputError(
            f"the chat template placed {text.count(IMAGE_PAD)} image pad(s) for {n_images} image(s)"
        )
    return text


def encode_vision_prompt(
    tokenizer: Any,
    image_processor: Any,
    prompt: str,
    images: Sequence[Any] = (),
    *,
    chat: bool = True,
    max_positions: int | None = None,
    reserve: int = 0,
) -> VisionInputs:
    """Token ids, pixel values, mm_token_type_ids and the vision token map of prompt + images.

    Args:
        tokenizer: the checkpoint's tokenizer (must know `<|image_pad|>` when images are given).
        image_processor: e.g. from `build_image_processor`.
        prompt: the prompt text.
        images: PIL images (see `load_image`), in prompt order.
        chat: render with the chat template (default for VL models).
        max_positions: context length to check against (with `reserve` more tokens), or None.
        reserve: tokens that will be generated later.

    Returns:
        VisionInputs on CPU.

    Raises:
        UserInputError: the tokenizer lacks the vision tokens, or the prompt is too long.
    """
    images = list(images)
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if images and (pad_id is None or pad_id == tokenizer.unk_token_id):
        raise UserInputError(f"the tokenizer has no {IMAGE_PAD} token: is this a vision-language checkpoint?")
    text = render_vl_prompt(tokenizer, prompt, len(images), chat=chat)

    pixel_values = image_grid_thw = None
    if images:
        processed = image_processor(images=images, return_tensors="pt")
        pixel_values = processed["pixel_values"]  # (sum of patches, C*t*p*p)
        image_grid_thw = processed["image_grid_thw"].long()  # (n_images, 3)
    merge = int(getattr(image_processor, "merge_size", 2))
    patch = int(getattr(image_processor, "patch_size", 16))

    # Expand each pad to its image's token count, as Qwen3VLProcessor does.
    pieces = text.split(IMAGE_PAD)
    expanded = pieces[0]
    counts = []
    for index, piece in enumerate(pieces[1:]):
        n = int(image_grid_thw[index].prod()) // merge**2
        counts.append(n)
        expanded += IMAGE_PAD * n + piece
    encoded = tokenizer(expanded, return_tensors="pt", add_special_tokens=not chat)
    input_ids = encoded["input_ids"].long()  # (1, T)
    n_tokens = input_ids.shape[1]
    if n_tokens == 0:
        raise UserInputError("the prompt is empty after tokenisation")
    if max_positions is not None and n_tokens + reserve > max_positions:
        raise UserInputError(
            f"the prompt has {n_tokens} tokens (+{reserve} to generate), longer than the model's context of {max_positions}"
        )

    is_image = input_ids[0] == pad_id  # (T,)
    special_ids = set(getattr(tokenizer, "all_special_ids", []))
    kinds = [
        "image" if image else ("special" if token in special_ids else "text")
        for token, image in zip(input_ids[0].tolist(), is_image.tolist())
    ]
    token_images = image_token_spans(is_image, images, counts, image_grid_thw, merge, patch)
    resized = [image.resize(span.resized_size) for image, span in zip(images, token_images)]

    return VisionInputs(
        input_ids=input_ids,
        mm_token_type_ids=is_image.to(torch.int32)[None],  # (1, T)
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        token_map=VisionTokenMap(token_kinds=kinds, images=token_images),
        images=resized,
    )


def image_token_spans(
    is_image: torch.Tensor, images: Sequence[Any], counts: Sequence[int], image_grid_thw: torch.Tensor | None,
    merge: int, patch: int,
) -> list[ImageTokens]:
    """Where each image's tokens sit: image i's are the i-th run of `counts[i]` consecutive pads.

    Args:
        is_image: (T,) bool, True at `<|image_pad|>` tokens.
        images: the PIL images (for their original sizes).
        counts: tokens per image; image_grid_thw: (n_images, 3) in patches.
        merge, patch: the image processor's spatial merge and patch size.

    Raises:
        UserInputError: an image's tokens are not contiguous, or the text has pads of its own.
    """
    image_positions = is_image.nonzero().flatten().tolist()
    spans = []
    cursor = 0
    for index, (image, count) in enumerate(zip(images, counts)):
        start = image_positions[cursor]
        stop = start + count
        if image_positions[cursor : cursor + count] != list(range(start, stop)):
            raise UserInputError(f"image {index}'s {count} tokens are not contiguous after tokenisation")
        _, grid_h, grid_w = (int(v) for v in image_grid_thw[index])
        spans.append(
            ImageTokens(
                image_index=index,
                start=start,
                stop=stop,
                grid_rows=grid_h // merge,
                grid_cols=grid_w // merge,
                cell_pixels=patch * merge,
                resized_size=(grid_w * patch, grid_h * patch),
                original_size=tuple(image.size),
            )
        )
        cursor += count
    if cursor != len(image_positions):
        raise UserInputError(f"the prompt text contains {IMAGE_PAD} tokens of its own")
    return spans


def describe_token_map(token_map: VisionTokenMap) -> str:
    """Seed 001's two lines: "Vision token ranges: [(1, 17)]" and the total count."""
    return f"Vision token ranges: {token_map.ranges()}\nTotal vision tokens: {token_map.num_image_tokens}"
