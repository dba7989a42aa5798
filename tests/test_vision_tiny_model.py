"""Tiny random Qwen3-VL (REFERENCE §2's config) with a byte-level tokenizer, for fast offline tests.

Not a test module: it holds the builders the vision tests share (named test_vision_* so that
it stays among the vision test files). `tiny_qwen3_vl()` -> (model, tokenizer, image_processor);
`save_tiny_vl(...)` writes a directory that `load_model` and the CLI accept; `test_image()`
draws a deterministic RGB picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tiny_models import byte_tokenizer, redraw_parameters, tiny_text_config
from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen3-VL's template in miniature: an image item renders as <|vision_start|><|image_pad|><|vision_end|>.
VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_vl_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = VL_CHAT_TEMPLATE
    return tokenizer


def tiny_image_processor() -> Qwen2VLImageProcessorPil:
    """16-px patches, merge 2 (one language token per 32x32 px), no upscaling of small images."""
    return Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 512 * 512}
    )


def tiny_qwen3_vl(n_layers: int = 3, seed: int = 0, deepstack_scale: float = 1.0):
    """Tiny Qwen3-VL: text hidden 32, head_dim 8, 4/2 heads, mrope [2,1,1]; vision depth 2,
    DeepStack after text layers 0 and 1. Weights redrawn large so attention is peaked."""
    tokenizer = tiny_vl_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=dict(
            tiny_text_config(tokenizer, n_layers, max_positions=2048),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=32,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            deepstack_visual_indexes=[0, 1],
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = Qwen3VLForConditionalGeneration(config)
    redraw_parameters(model, seed, scales={"model.visual": 0.1})
    with torch.no_grad():
        for merger in model.model.visual.deepstack_merger_list:
            for parameter in merger.parameters():
                parameter.mul_(deepstack_scale)
    return model.float().eval(), tokenizer, tiny_image_processor()


def save_tiny_vl(model, tokenizer, image_processor, directory: Path) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    return directory


def test_image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with a bright square: deterministic, not constant."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 0 * x], axis=-1)
    pixels += rng.normal(0, 20, pixels.shape)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = 255
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


test_image.__test__ = False  # a builder, not a test
