"""Vision-token masking: the fast path vs seed 002's method, 256 image tokens + 20 text tokens.

    fast       `token_masking.masked_final_position_updates`: every masked key of a layer in one
               batched computation (masked attention rows, then o_proj + MLP batched)
    per_token  seed 002's method (`token_masking_reference`): one call of the layer per masked
               token, on the same cached layer input

Both start from the same captured layer inputs (one baseline forward of the whole Qwen3-VL with
the image), mask every position (276 keys), and are checked to agree before timing. Repetitions
are interleaved and medians reported. Models have random weights:

    tiny       REFERENCE §2's tiny Qwen3-VL (text hidden 32, 2 layers)
    2b         Qwen3-VL-2B's text and vision sizes (hidden 2048, 16/8 heads, head_dim 128, MLP
               6144, vocab 151936; vision hidden 1024), with fewer layers (--layers-2b)

On a small CPU the per-token method is slow at 2B size: `--reference-positions K` times it on K
evenly spaced keys and scales linearly to all keys (it is one identical layer call per key, so
its cost is linear by construction); the printout says when it did so.

    python bench/bench_vision_masking.py                    # both models
    python bench/bench_vision_masking.py --models tiny --repeats 5
    python bench/bench_vision_masking.py --models 2b --device cuda --reference-positions 0
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import (
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from sparse_viz.analysis.masking.final_position import masked_final_position_updates
from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs
from sparse_viz.analysis.masking.reference import reference_final_position_updates
from sparse_viz.pretrained.adapter import ArchitectureAdapter

from timing import print_cpu  # bench/timing.py (the script's own folder is on sys.path)

IMAGE_PX = 512  # 512 / 16-px patches = 32x32 patches, merged 2x2 -> 16x16 = 256 tokens
N_TEXT = 20
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 1000, 1001, 1002, 1003


def build_model(size: str, n_layers: int, device: str, dtype: torch.dtype) -> Qwen3VLForConditionalGeneration:
    if size == "tiny":
        text = dict(vocab_size=1100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, mrope=[2, 1, 1])
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, deepstack_visual_indexes=[0, 1])
    else:  # Qwen3-VL-2B sizes
        text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, mrope=[24, 20, 20])
        vision = dict(depth=3, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=[0, 1, 2])
    mrope = text.pop("mrope")
    config = Qwen3VLConfig(
        text_config=dict(
            **text, num_hidden_layers=n_layers, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": mrope, "mrope_interleaved": True},
        ),
        vision_config=dict(**vision, out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=True,
    )
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    if size == "tiny":  # large weights so attention is peaked, as in the tests
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not name.endswith("norm.weight"):
                    parameter.normal_(0, 0.1 if name.startswith("model.visual") else 0.3)
    return model.to(device=device, dtype=dtype).eval()


def build_inputs(device: str, dtype: torch.dtype) -> dict:
    """10 text tokens, <|vision_start|>, 256 image pads, <|vision_end|>, 10 text tokens (+2 specials)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (IMAGE_PX, IMAGE_PX, 3), dtype=np.uint8), "RGB")
    processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                         size={"shortest_edge": 32 * 32, "longest_edge": 1024 * 1024})
    processed = processor(images=[image], return_tensors="pt")
    n_image = int(processed["image_grid_thw"][0].prod()) // 4
    text = torch.randint(10, 900, (N_TEXT,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = text[: N_TEXT // 2] + [VISION_START] + [IMAGE_PAD] * n_image + [VISION_END] + text[N_TEXT // 2 :]
    input_ids = torch.tensor([ids], device=device)
    return {
        "input_ids": input_ids,
        "mm_token_type_ids": (input_ids == IMAGE_PAD).int(),
        "pixel_values": processed["pixel_values"].to(device=device, dtype=dtype),
        "image_grid_thw": processed["image_grid_thw"].to(device),
        "n_image": n_image,
    }


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(size: str, n_layers: int, device: str, dtype: torch.dtype, repeats: int, reference_positions: int) -> None:
    model = build_model(size, n_layers, device, dtype)
    adapter = ArchitectureAdapter.for_model(model)
    inputs = build_inputs(device, dtype)
    input_ids = inputs.pop("input_ids")
    n_image = inputs.pop("n_image")
    position_ids, _ = model.model.get_rope_index(input_ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    model_inputs = {**inputs, "position_ids": position_ids}
    n_tokens = input_ids.shape[1]
    positions = list(range(n_tokens))
    with torch.no_grad():
        captured, _ = capture_layer_inputs(adapter, input_ids, None, model_inputs)
    sampled = positions
    if 0 < reference_positions < n_tokens:
        sampled = sorted({int(p) for p in np.linspace(0, n_tokens - 1, reference_positions)})

    # agreement first (layer 0, on the sampled keys)
    fast = masked_final_position_updates(adapter, 0, captured[0], sampled)
    slow = reference_final_position_updates(adapter, 0, captured[0], sampled)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(fast.full, slow.full, rtol=tol, atol=tol * fast.full.abs().max().item())

    fast_times, slow_times = [], []
    for _ in range(repeats):  # interleaved
        fast_times.append(timed(lambda: [masked_final_position_updates(adapter, layer, captured[layer], positions)
                                         for layer in range(n_layers)], device))
        slow_times.append(timed(lambda: [reference_final_position_updates(adapter, layer, captured[layer], sampled)
                                         for layer in range(n_layers)], device))
    fast_median = statistics.median(fast_times)
    # the reference makes 1 + len(keys) identical layer calls per layer
    scale = (1 + len(positions)) / (1 + len(sampled))
    slow_median = statistics.median(slow_times) * scale
    note = "" if scale == 1 else f" (timed on {len(sampled)} of {len(positions)} keys, scaled x{scale:.1f})"
    print(
        f"{size:>4} | {n_layers} layer(s), {n_image} image + {n_tokens - n_image} text/special tokens, {device}, "
        f"{str(dtype).removeprefix('torch.')}\n"
        f"     fast      {fast_median * 1e3:10.1f} ms  (median of {repeats})\n"
        f"     per-token {slow_median * 1e3:10.1f} ms{note}\n"
        f"     ratio     {slow_median / fast_median:10.1f}x"
    )


def main() -> None:
    print_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,2b", help="comma list of tiny, 2b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers-tiny", type=int, default=2)
    parser.add_argument("--layers-2b", type=int, default=1, help="text layers of the 2B-sized model (28 in the real one)")
    parser.add_argument("--reference-positions", type=int, default=24,
                        help="2B model on CPU: keys the per-token method is timed on (0 = all)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    for size in args.models.split(","):
        n_layers = args.layers_tiny if size == "tiny" else args.layers_2b
        reference_positions = 0 if size == "tiny" else args.reference_positions
        bench(size, n_layers, args.device, dtype, args.repeats, reference_positions)


if __name__ == "__main__":
    main()
