"""Vision inputs: image loading errors, the token map against the image processor, MRoPE ids."""

from __future__ import annotations

import pytest
from test_vision_tiny_model import (
    test_image,
    tiny_image_processor,
    tiny_qwen3_vl,
    tiny_vl_tokenizer,
)

from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.vision import (
    IMAGE_PAD,
    describe_token_map,
    encode_vision_prompt,
    load_image,
)


def test_64px_image_with_merge_2_gives_the_processors_grid_and_token_count():
    image = test_image(64, 64)
    processor = tiny_image_processor()
    grid = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert grid == [1, 4, 4]  # 64 px / 16-px patches, as the processor reports
    tokenizer = tiny_vl_tokenizer()
    inputs = encode_vision_prompt(tokenizer, processor, "Test", [image], chat=True)
    (only,) = inputs.token_map.images
    # hand count: 4x4 patches, merged 2x2 -> 2x2 grid -> 4 tokens of 32x32 px
    assert (only.grid_rows, only.grid_cols, only.num_tokens, only.cell_pixels) == (2, 2, 4, 32)
    ids = inputs.input_ids[0].tolist()
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert [i for i, t in enumerate(ids) if t == pad] == list(range(only.start, only.stop))
    assert tokenizer.convert_ids_to_tokens(ids[only.start - 1]) == "<|vision_start|>"
    assert tokenizer.convert_ids_to_tokens(ids[only.stop]) == "<|vision_end|>"
    assert inputs.mm_token_type_ids[0].tolist() == [int(t == pad) for t in ids]
    assert inputs.token_map.token_kinds[only.start - 1] == "special"
    assert only.pixel_box(only.start + 3) == (32, 32, 64, 64)  # cell (1, 1)
    assert describe_token_map(inputs.token_map) == f"Vision token ranges: [({only.start}, {only.stop})]\nTotal vision tokens: 4"


def test_seed_001_example_128px_image_is_16_tokens():
    inputs = encode_vision_prompt(tiny_vl_tokenizer(), tiny_image_processor(), "Test", [test_image(128, 128)])
    assert inputs.token_map.num_image_tokens == 16


def test_non_square_image_grid_and_resized_size():
    image = test_image(100, 70)  # resized by the processor to multiples of 32 px
    processor = tiny_image_processor()
    _, h, w = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    inputs = encode_vision_prompt(tiny_vl_tokenizer(), processor, "x", [image])
    (only,) = inputs.token_map.images
    assert (only.grid_rows, only.grid_cols) == (h // 2, w // 2)
    assert only.resized_size == (w * 16, h * 16) and inputs.images[0].size == (w * 16, h * 16)
    assert only.original_size == (100, 70)


def test_mrope_position_ids_match_the_models_own():
    model, tokenizer, processor = tiny_qwen3_vl(n_layers=1)
    inputs = encode_vision_prompt(tokenizer, processor, "x", [test_image(64, 96)])
    position_ids = inputs.model_inputs(model)["position_ids"]
    assert position_ids.shape == (3, 1, inputs.input_ids.shape[1])
    # Hand rule: text positions count up; an image's tokens share t, and rows/cols add to h/w.
    (only,) = inputs.token_map.images
    start = only.start
    t, h, w = position_ids[:, 0, start : only.stop]
    assert (t == start).all()
    assert h.tolist() == [start + r for r in range(only.grid_rows) for _ in range(only.grid_cols)]
    assert w.tolist() == [start + c for _ in range(only.grid_rows) for c in range(only.grid_cols)]
    after = position_ids[:, 0, only.stop]
    assert (after == start + max(only.grid_rows, only.grid_cols)).all()


def test_text_only_prompt_on_vl_tokenizer_has_no_image_tokens():
    inputs = encode_vision_prompt(tiny_vl_tokenizer(), tiny_image_processor(), "hello", [])
    assert inputs.token_map.images == [] and inputs.pixel_values is None
    assert "image" not in inputs.token_map.token_kinds
    assert inputs.token_map.positions("text") == list(range(inputs.input_ids.shape[1]))


def test_prompt_with_its_own_image_pad_is_rejected():
    with pytest.raises(UserInputError, match="image_pad"):
        encode_vision_prompt(tiny_vl_tokenizer(), tiny_image_processor(), f"sneaky {IMAGE_PAD}", [test_image()])


def test_bad_images_are_one_line_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(UserInputError, match="is not a file"):
        load_image(tmp_path)
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(UserInputError, match="not an image"):
        load_image(tmp_path / "text.png")
    good = tmp_path / "good.png"
    test_image(64, 64).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserInputError, match="corrupt"):
        load_image(tmp_path / "truncated.png")
    assert load_image(good).size == (64, 64)
