r"""Convert a SpiralForCausalLM folder (tools/convert_to_hf.py) through Megatron-Bridge's AutoBridge
(docs/BRIDGE.md), as Bridge's own examples/conversion/convert_checkpoints.py does for its models.

    python examples/bridge/convert_checkpoints.py import --hf-model hf/mine --megatron-path checkpoints/mine-bridge
    python examples/bridge/convert_checkpoints.py export --hf-model hf/mine --megatron-path checkpoints/mine-bridge \
        --hf-path hf/mine-back

`import` writes a Bridge checkpoint of the folder's model (AutoBridge.import_ckpt); `export` writes
the Megatron checkpoint back as a folder of the same architecture (AutoBridge.export_ckpt), with
the model code and tokenizer of --hf-model. One process, on the CPU.
"""

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=("import", "export"), help="HF -> Megatron, or Megatron -> HF")
    p.add_argument("--hf-model", required=True, help="a folder written by tools/convert_to_hf.py")
    p.add_argument("--megatron-path", required=True, help="the Bridge checkpoint folder (written by import)")
    p.add_argument("--hf-path", help="export: the folder to write")
    args = p.parse_args(argv)
    if args.direction == "export" and not args.hf_path:
        p.error("export needs --hf-path")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import spiral_megatron.bridge  # noqa: F401  (registers SpiralBridge; the CPU shim where CUDA is absent)
    from megatron.bridge import AutoBridge

    if args.direction == "import":
        from megatron.bridge.training.model_load_save import temporary_distributed_context

        with temporary_distributed_context(backend="gloo"):  # on the CPU, as Bridge's export_ckpt runs
            AutoBridge.import_ckpt(args.hf_model, args.megatron_path, trust_remote_code=True)
    else:
        bridge = AutoBridge.from_hf_pretrained(args.hf_model, trust_remote_code=True)
        bridge.export_ckpt(args.megatron_path, args.hf_path, show_progress=False, source_path=args.hf_model)
    print(f"{args.direction}: {args.megatron_path if args.direction == 'import' else args.hf_path} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
