"""Rebuild ``crma_lightning/assets/tiny_tokenizer``: a 512-token byte-level BPE for tests and CPU runs.

Trained on the Python standard library's top-level ``*.py`` sources (PSF licence, ~5 MB, on every
machine with Python), found through ``sysconfig``, read in sorted order so the result is
byte-for-byte reproducible for a given Python version. Takes ~2 s.

Special tokens: ``<pad>`` = 0, ``<|endoftext|>`` = 1 (eos, also bos as in GPT-2). Ids 0-2 are the
ones synthetic tasks leave free (``crma_lightning.data.synthetic.FIRST_TOKEN``).

    python scripts/build_tiny_tokenizer.py [--out DIR]
"""

import argparse
import json
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 512
PAD, EOS = "<pad>", "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "crma_lightning" / "assets" / "tiny_tokenizer"


def stdlib_sources() -> list[Path]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        raise SystemExit(f"no *.py files under {sysconfig.get_paths()['stdlib']}")
    return files


def train(files: list[Path]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((f.read_text(encoding="utf-8", errors="replace") for f in files), trainer)
    return tok


def save(tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Large model_max_length: data.py truncates itself and tokenises whole documents for
    # group_texts, which would otherwise warn on every long record.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, model_max_length=1 << 30
    )
    fast.save_pretrained(str(out))
    # transformers 5 resolves "PreTrainedTokenizerFast" too; the explicit class and the special
    # tokens map keep the folder readable by transformers 4 and other tools.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    files = stdlib_sources()
    tok = train(files)
    save(tok, args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"trained on {len(files)} files; vocab {tok.get_vocab_size()}; wrote {args.out} ({size} bytes)")


if __name__ == "__main__":
    main()
