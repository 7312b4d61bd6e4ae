"""`cairn generate`: continue a prompt (or each prompt of a file), printing the text as it is written."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Optional

from cairn.cli.options import Subcommands, add_device, add_sampling, checked, sampling
from cairn.inference.sampling import SamplingConfig
from cairn.util.errors import CairnError

if TYPE_CHECKING:
    from cairn.checkpoint.load import Loaded
    from cairn.inference.generate import TextStream
    from cairn.tokenizer.chat_template import ChatTemplate

# the sampling settings `cairn generate` offers as options, in the order its --help lists them
SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed")


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("generate", help="generate text from a trained model",
                       description="Continue a prompt (or each prompt of a file), printing the text as it is "
                                   "written; a sample ends at <|endoftext|>, a stop string or --max-new-tokens.")
    p.set_defaults(func=run)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="text to continue (a prompt longer than the context keeps its end)")
    which.add_argument("--prompt-file", metavar="FILE",
                       help="prompts to continue, one per line, or JSON Lines (.jsonl) with a \"prompt\" field")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="samples per prompt, with seeds --seed, --seed + 1, ... (default 1)")
    add_sampling(p, SamplingConfig(), SAMPLING)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per sample: prompt, text, tokens, finish_reason, tokens_per_s")
    p.add_argument("--no-stream", action="store_true", help="print each sample whole when it is done")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (no KV cache)")
    p.add_argument("--no-template", action="store_true",
                   help="an instruction-tuned run: continue the prompt as plain text instead of answering it as an "
                        "instruction through the run's chat template")
    add_device(p)


def run(args: argparse.Namespace) -> int:
    from cairn.checkpoint.load import load
    from cairn.inference.generate import TextStream
    from cairn.runtime.device import set_threads
    from cairn.tokenizer.chat_template import instruction, render

    prompts = _prompts(args)
    if args.num_samples < 1:
        raise CairnError(f"--num-samples must be 1 or more, got {args.num_samples}")
    # each sample of a prompt with its own seed (--seed + i), every one checked before the model loads:
    # the seeds are all that differ and the last is the largest, so checking it checks them all (a list
    # of every sample's settings made --num-samples 10^11 fill the memory before anything was written)
    base = sampling(args, SamplingConfig(), SAMPLING)
    checked(replace(base, seed=base.seed + args.num_samples - 1))
    set_threads(0)
    loaded = load(args.path, args.device)
    template = _template(loaded, args.no_template)
    first = True
    for prompt in prompts:
        ids: Optional[list[int]] = None
        if template is not None:
            ids = instruction(template, loaded.tokenizer, prompt)
            prompt = render(template, [{"role": "user", "content": prompt}], answer=True)
        for i in range(args.num_samples):
            s = replace(base, seed=base.seed + i)
            sample = TextStream(loaded.model, loaded.tokenizer, prompt, s, use_cache=not args.no_cache,
                                prompt_ids=ids)
            if not (args.json or first):
                sys.stdout.write("\n")  # a blank line between samples
            first = False
            _write(prompt, sample, s.seed, as_json=args.json, stream=not (args.json or args.no_stream))
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    from cairn.inference.generate import read_prompts

    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
    for prompt in prompts:
        if not prompt.strip():
            raise CairnError("--prompt is empty: give some text to continue, e.g. --prompt 'Once upon a time'")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 in argv arrive as lone surrogates
            raise CairnError("--prompt is not valid UTF-8 text: pass the prompt in UTF-8") from None
    return prompts


def _template(loaded: Loaded, no_template: bool) -> Optional[ChatTemplate]:
    """An instruction-tuned run answers each prompt as an instruction, through its chat template."""
    from cairn.data.formats import get_format
    from cairn.tokenizer.chat_template import ChatTemplate

    if not get_format(loaded.config.data.format).chat or no_template:
        return None
    return ChatTemplate.from_config(loaded.config.chat)


def _write(prompt: str, sample: TextStream, seed: int, *, as_json: bool, stream: bool) -> None:
    """Run `sample` to its end, printing it: streamed, whole, or as one JSON line; its speed on stderr."""
    if stream:
        _show(prompt)
        for piece in sample:
            _show(piece)
    else:
        for _ in sample:
            pass
    rate = sample.tokens / max(sample.seconds, 1e-9)
    if as_json:
        print(json.dumps({"prompt": prompt, "seed": seed, "text": sample.text, "tokens": sample.tokens,
                          "finish_reason": sample.finish_reason, "tokens_per_s": round(rate, 1)}), flush=True)
        return
    if not stream:
        _show(prompt + sample.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"[{sample.tokens} tokens in {sample.seconds:.2f}s, {rate:.1f} tokens/s, "
          f"finish: {sample.finish_reason}]", file=sys.stderr)


def _show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
