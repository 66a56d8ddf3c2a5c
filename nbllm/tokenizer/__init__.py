"""Tokenizers built from GGUF vocabularies (llama.cpp semantics on HF `tokenizers`), streaming
detokenization, and chat templates."""

from nbllm.tokenizer.tokenizer import Tokenizer, from_gguf

__all__ = ["Tokenizer", "from_gguf"]
