"""GGUF files: the one file with weights, tokenizer and metadata (llama.cpp's format), read over mmap."""

from nbllm.gguf.reader import GGUFFile, TensorInfo, open_gguf

__all__ = ["GGUFFile", "TensorInfo", "open_gguf"]
