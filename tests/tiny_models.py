"""A tiny random CLS-pooled XLM-RoBERTa sentence-transformers model (bge-m3's shape, 32 dimensions), built offline.

The tokenizer is a Unigram (SentencePiece-style) model trained here on a few sentences, with XLM-R's special tokens
(<s>=0, <pad>=1, </s>=2): no token_type_ids, padding with id 1, like the real family."""

from __future__ import annotations

import sys
from pathlib import Path

CORPUS = ["the quick brown fox jumps over the lazy dog", "an embedding cache pays for each text once",
          "multilingual text: été, 中文, عربى, русский", "sentence transformers exported to onnx",
          "a tiny random model for tests", "emoji 🙂 and numbers 12345"] * 20


def build(out: Path) -> Path:
    """Writes the sentence-transformers directory under `out` and returns it."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(CORPUS, vocab_size=150, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                unk_token="<unk>", show_progress=False)
    unigram.post_processor = TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = XLMRobertaTokenizerFast(tokenizer_object=unigram._tokenizer, bos_token="<s>", eos_token="</s>",
                                        sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                        mask_token="<mask>", model_max_length=64)
    raw = out / "transformer"
    tokenizer.save_pretrained(str(raw))
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, type_vocab_size=1)
    XLMRobertaModel(config).save_pretrained(str(raw))
    word = models.Transformer(str(raw), max_seq_length=64)
    pool = models.Pooling(32, pooling_mode="cls")
    st_dir = out / "sentence-transformers"
    SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu").save(str(st_dir))
    return st_dir


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
