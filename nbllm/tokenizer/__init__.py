"""Tokenizers built from GGUF vocabularies (llama.cpp semantics on HF `tokenizers`), streaming
detokenization, and chat templates."""

from nbllm.tokenizer.chat_template import ChatTemplate
from nbllm.tokenizer.detokenizer import Detokenizer
from nbllm.tokenizer.tokenizer import Tokenizer, from_gguf

__all__ = ["ChatTemplate", "Detokenizer", "Tokenizer", "from_gguf"]
