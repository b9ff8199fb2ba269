"""Build peftc's offline byte-level tokenizer (peftc/assets/byte_tokenizer/).

Config-built tiny models have no tokenizer of their own; this one needs no download and covers
every byte: 4 special tokens (<pad>=0, <s>=1, </s>=2, <unk>=3) + 256 byte symbols = 260 ids.
Tiny model configs set vocab_size to 260 to match. Encoding with special tokens frames a text as
`<s> text </s>` and a pair as `<s> a </s> b </s>` (type ids 0 / 1), so encoder heads that read the
first position (sequence classification) and span heads (question answering) see a fixed start
token and a separator, as with BERT's [CLS]/[SEP]. Language modelling encodes without specials.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, processors
from tokenizers.pre_tokenizers import ByteLevel

OUT = Path(__file__).resolve().parents[1] / "peftc" / "assets" / "byte_tokenizer"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def main() -> None:
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B:1 </s>:1",
        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
    )
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(OUT / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 1024,
        "padding_side": "right",
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT} ({len(vocab)} tokens)")


if __name__ == "__main__":
    main()
