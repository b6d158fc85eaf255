r"""Text -> Megatron indexed dataset (.bin/.idx) for pretrain_spiral.py. Nothing is downloaded.

    python tools/preprocess_data.py --input a.jsonl b.txt --output-prefix data/my_text \
        [--tokenizer-model path/to/tokenizer_folder | --vocab-size 32000] [--json-keys text] \
        [--workers 8] [--force]

JSONL files give one document per line (text under --json-keys); other files are one document
each. A folder stands for every file under it, a quoted pattern ('src/**/*.py') for the files it
matches, in sorted order. Without --tokenizer-model a byte-level BPE is trained on the input and saved next to the
data (<output-prefix>_tokenizer/), where the training job finds it. PREFIX.meta.json records
which tokenizer made the data; the job refuses another. Train with: --data-path <output-prefix>
(and --tokenizer-model DIR for data made with a given tokenizer).
"""

import argparse
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL or plain text files, folders (every file under them) or quoted patterns ('src/**/*.py')")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer-model", "--tokenizer", dest="tokenizer",
                   help="a tokenizer.json or a folder holding one (Megatron-LM's name; --tokenizer is an alias)")
    p.add_argument("--vocab-size", type=int, default=512, help="vocabulary of a trained BPE")
    p.add_argument("--json-keys", "--json-key", dest="json_key", nargs="+", default=["text"], metavar="KEY",
                   help="the text field of JSONL records (Megatron-LM's name, one key here; --json-key is an alias)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that tokenize (Megatron-LM's flag; the output is the same for any number)")
    p.add_argument("--append-eod", action="store_true",
                   help="taken as Megatron-LM's flag: every document always ends with the end-of-document token")
    p.add_argument("--tokenizer-type", choices=["HuggingFaceTokenizer"],
                   help="taken as Megatron-LM's flag: the tokenizer is always a Hugging Face tokenizer.json")
    p.add_argument("--save-tokenizer", help="where a trained BPE goes (default PREFIX_tokenizer)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = p.parse_args(argv)
    if len(args.json_key) > 1:  # Megatron-LM writes one dataset per key
        p.error(f"--json-keys {' '.join(args.json_key)}: one key per run (each key's text is its own "
                f"dataset: run once per key with its own --output-prefix)")
    args.json_key = args.json_key[0]
    if args.workers < 1:
        p.error(f"--workers {args.workers} must be >= 1")
    return args


def main(argv) -> int:
    from spiral_megatron.errors import SaveFailed
    from spiral_megatron.job.data.preprocess import preprocess

    args = parse_args(argv)
    try:
        preprocess(args.input, args.output_prefix, args.tokenizer, args.vocab_size, args.json_key,
                   args.save_tokenizer, args.force, args.workers)
    except SaveFailed as e:  # a full disk, a broken mount: nothing half-written is left
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from spiral_megatron.job.run.console import quiet_tool

    with quiet_tool("preprocess_data"):  # Megatron's known-harmless warnings counted in one line
        sys.exit(main(sys.argv[1:]))
