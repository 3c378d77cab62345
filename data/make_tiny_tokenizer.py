"""Train the small BPE tokenizer shipped for tiny test models (no hub download needed).

python data/make_tiny_tokenizer.py     # writes llmops/assets/tiny-tokenizer/
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB = 512  # tiny on purpose: tests build 64-dim models whose embedding must stay small


def main(sample="data/sample/shakespeare.jsonl", out="llmops/assets/tiny-tokenizer"):
    texts = [json.loads(line)["text"] for line in open(sample, encoding="utf-8")]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    print(f"saved {len(fast)}-token tokenizer to {out}")


if __name__ == "__main__":
    main()
