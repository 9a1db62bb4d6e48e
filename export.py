"""
Export a trained adapter for use outside this repository.

    python export.py --model=<base> --adapter_dir=<adapter> --out=<dir>          # merged model
    python export.py --model=<base> --adapter_dir=<adapter> --format=peft         # adapter alone
    python export.py        # the demo: out/demo/base + out/demo/lora -> out/export/lora-merged

merged: the adapter is folded into the base weights (W += scale * B A for LoRA; any adapter on a
projection that has a `merge`) and written as a Hugging Face folder (config.json, model.safetensors,
the base's tokenizer files) that transformers loads with AutoModelForCausalLM: no adapter code, no
extra latency. Adapters that are not a change of W (series, parallel, prefix, prompt) are refused.
peft: the adapter alone, in the folder layout Hugging Face PEFT loads (LoRA only).

A --out that already holds files is refused unless --overwrite=true (then the earlier export's files
are replaced once the new ones are written); an --out inside the base or adapter folder, never.
"""
import os
import sys
from pathlib import Path

import adapter_io
import adapters
from checkpoints import save_model
from cli import (DEMO_DIR, ConfigError, check_choice, configure, fail, load_for_tool,
                 tool_dirs)
from files import check_outside, check_unused, check_writable, write_atomic
from slots import slots

DEFAULTS = dict(
    model="",             # base model folder; "" = the demo's base (<demo_dir>/base)
    adapter_dir="",       # folder of a trained adapter (ours or PEFT); "" = the demo's lora
    out="",               # "" = out/export/<adapter folder name>-<format>
    format="merged",      # merged | peft
    overwrite=False,      # replace an earlier export in --out (else a folder with files is refused)
    demo_dir=DEMO_DIR,
)
# the files of a checkpoint folder that belong to its tokenizer (copied beside the merged weights)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "encoder.json", "vocab.bpe", "generation_config.json")
# what either format writes: an earlier export's files that the new one does not write go
EXPORT_FILES = ("config.json", "model.safetensors", "adapter_config.json",
                "adapter_model.safetensors", *TOKENIZER_FILES)


def unmergeable(model):
    """Kinds of the attached adapters with no fold into W (off the projections, or no merge)."""
    names = {n for _, _, slot in slots(model) for n, m in slot.items()
             if not hasattr(m, "merge")}
    return sorted({model.adapter_configs[n]["kind"] for n in names})


def export_merged(model, model_dir, out):
    """Fold every adapter into W; write the weights and the tokenizer files as a HF folder. Returns
    the names of the files written."""
    adapters.merge(model)
    save_model(model, out)  # base weights only: the merged adapters now live inside them
    written = ["config.json", "model.safetensors"]
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            write_atomic(Path(out) / name, src.read_bytes())
            written.append(name)
    return written


def main(argv=None):
    try:
        cfg, _ = configure(sys.argv[1:] if argv is None else argv, DEFAULTS, __doc__)
        check_choice(cfg, "format", ("merged", "peft"))
        model_dir, adapter_dir = tool_dirs(cfg, need_adapter=True)
    except ConfigError as e:
        fail(e)
    name = os.path.basename(os.path.normpath(adapter_dir))
    out = cfg.out or os.path.join("out", "export", f"{name}-{cfg.format}")
    try:  # before the (long) load, and reading only: a --out in use or inside an input, at once
        check_outside(out, "--out", {"--model": model_dir, "--adapter_dir": adapter_dir})
        earlier = check_unused(out, "--out", cfg.overwrite)
        model = load_for_tool(cfg, need_adapter=True)[0]
    except ValueError as e:  # a ConfigError too
        fail(e)
    kinds = unmergeable(model) if cfg.format == "merged" else []
    if kinds:
        fail(f"a {', '.join(kinds)} adapter cannot be merged into the base weights (only adapters "
             "that change a projection's W, like lora, fold into it); use --format=peft for a "
             "LoRA, or ship the adapter folder itself")
    try:
        check_writable(out, "--out")  # makes the folder: only for an export that will be written
        if cfg.format == "peft":
            adapter_io.save_adapter(model, out, name=adapters.adapter_names(model)[0],
                                    base_model=model_dir, format="peft")
            written = ["adapter_config.json", "adapter_model.safetensors"]
        else:
            written = export_merged(model, model_dir, out)
        for f in set(earlier) & set(EXPORT_FILES) - set(written):  # e.g. a PEFT export's files
            os.remove(os.path.join(out, f))
    except (OSError, ValueError, KeyError) as e:
        fail(e)
    print(f"wrote {out}: " + ("base + merged adapter as a Hugging Face folder (transformers: "
                              "AutoModelForCausalLM.from_pretrained)" if cfg.format == "merged" else
                              "the LoRA adapter in PEFT's layout (PeftModel.from_pretrained)"))
    return out


if __name__ == "__main__":
    main()
