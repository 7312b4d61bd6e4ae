"""`cairn train | prepare | eval | generate | serve`: parse, call the library, print. Errors are one line, exit 2."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from cairn.util.errors import CairnError, SharedError
from cairn.util.log import setup as setup_logging


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --d-mod is not --d-model: options are spelled out
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit code 2, instead of usage + message
        raise CairnError(f"{message} (see `{self.prog} --help`)")


CFG = "cfg:"  # argparse dest prefix of the generated config options


def _add_config_options(p) -> None:
    """Every config field as `--name VALUE` (also `--name_with_underscores` and `--section.name`);
    a lone `--flag` means true. Values stay text here: the config coerces and checks them."""
    from cairn.config.sections import field_index

    taken = set(p._option_string_actions)  # the command's own options (--max-steps) win
    for key, (section, name, _) in field_index().items():
        if "." in key:
            continue
        dashed = name.replace("_", "-")
        flags = {f"--{dashed}", f"--{name}"} | ({f"--{section}.{name}", f"--{section}.{dashed}"} if section else set())
        p.add_argument(*sorted(flags - taken), dest=CFG + dashed, nargs="?", const="true", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)


def _add_device(p) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


def _add_train(sub) -> None:
    from cairn.config.sections import describe_options
    from cairn.config.presets import PRESETS

    p = sub.add_parser(
        "train", help="train a model from scratch, or on from a trained run (--init-from)",
        description="Train a GPT-style model. Settings come from a preset, then a TOML config file, then "
                    "--key value overrides (any option below, with - or _, e.g. --lr 1e-3 --d-model 256).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config options (as --key value; in a TOML file under [model], [data], [train]):\n"
               + describe_options())
    p.add_argument("--preset", help=f"named preset: {', '.join(PRESETS)} (default: plain defaults)")
    p.add_argument("--config", help="TOML config file applied after the preset")
    p.add_argument("--data", help="data source: hub dataset id (default roneneldan/TinyStories), or a local "
                                  ".txt/.jsonl/.parquet file, a directory or a glob of them")
    p.add_argument("--out", help="run directory for config, metrics and checkpoints (default runs/<name>)")
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps; the schedule is planned for it")
    p.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue the run in RUN_DIR from its newest checkpoint; 'auto': resume --out if it "
                        "has a checkpoint, else start it")
    p.add_argument("--restart", metavar="RUN_DIR",
                   help="start the run in RUN_DIR over, with its saved config: its old contents are moved aside "
                        "into RUN_DIR.before-restart-<time> (nothing is deleted)")
    p.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="save a checkpoint and stop once step N is done, keeping the planned schedule")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (report lines only)")
    _add_config_options(p)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss, perplexity and bits per byte of a trained model",
                       description="Evaluate a run's final checkpoint (or the given checkpoint directory).")
    p.set_defaults(func=cmd_eval)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data", help="evaluate every story of this source (no split) instead of the run's split")
    p.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="split of the run's data (default test; train shows how far it overfits)")
    p.add_argument("--batch-size", type=int, default=0, help="rows per batch (default: the run's)")
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: loss, perplexity, bits_per_byte, tokens")
    p.add_argument("--task", choices=("loss", "words"), default="loss",
                   help="loss: held-out loss (default); words: one story per prompt of --data (JSONL with "
                        "\"prompt\" and \"words\"), the fraction that use all their words")
    p.add_argument("--seed", type=int, default=0, help="words: the first prompt's sampling seed (default 0)")
    p.add_argument("--limit", type=int, default=0, help="words: only the first N prompts (default all)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a trained model",
                       description="Continue a prompt (or each prompt of a file), printing the text as it is "
                                   "written; a sample ends at <|endoftext|>, a stop string or --max-new-tokens.")
    p.set_defaults(func=cmd_generate)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="text to continue (a prompt longer than the context keeps its end)")
    which.add_argument("--prompt-file", metavar="FILE",
                       help="prompts to continue, one per line, or JSON Lines (.jsonl) with a \"prompt\" field")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="samples per prompt, with seeds --seed, --seed + 1, ... (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within the top-p probability mass (1 = all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="make tokens already in the prompt or text less likely, e.g. 1.2 (default 1 = off)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="end a sample where this text appears (not printed); repeatable")
    p.add_argument("--seed", type=int, default=1234, help="random seed: same seed, same text (default 1234)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per sample: prompt, text, tokens, finish_reason, tokens_per_s")
    p.add_argument("--no-stream", action="store_true", help="print each sample whole when it is done")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (no KV cache)")
    p.add_argument("--no-template", action="store_true",
                   help="an instruction-tuned run: continue the prompt as plain text instead of answering it as an "
                        "instruction through the run's chat template")
    _add_device(p)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to an instruction-tuned run in the terminal",
                       description="Type an instruction, the answer streams. The conversation is kept while it fits "
                                   "the context (then its oldest turns are dropped). Commands: /reset, "
                                   "/temperature T, /quit. Reads lines from stdin, so it can be piped.")
    p.set_defaults(func=cmd_chat)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--max-new-tokens", type=int, default=300, help="longest answer in tokens (default 300)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the first answer, +1 for each next (default 1234)")
    _add_device(p)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a trained model: OpenAI-compatible API and a playground page",
                       description="Serve a run's final checkpoint (or the given checkpoint) over HTTP: "
                                   "POST /v1/completions (OpenAI's shapes, streaming included), GET /v1/models, "
                                   "GET /health, and a playground page at /. Needs the serve extra: "
                                   "pip install 'cairn-lm[serve]'. See docs/serving.md.")
    p.set_defaults(func=cmd_serve)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: $CAIRN_API_KEY)")
    p.add_argument("--max-concurrency", type=int, default=16, metavar="N",
                   help="sequences generated at once, batched together; requests beyond get 429 (default 16)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="sequences decoded in one forward pass; the others in flight wait their turn "
                        "(default: --max-concurrency)")
    p.add_argument("--max-body", type=int, default=1_000_000, metavar="BYTES",
                   help="largest request body; larger get 413 (default 1000000)")
    p.add_argument("--max-tokens", type=int, default=2048, metavar="N",
                   help="most tokens one completion may ask for (default 2048)")
    p.add_argument("--model-name", help="the model's id in the API (default: the directory's name)")
    _add_device(p)


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="draw training curves of one or more runs into a PNG",
                       description="Draw loss (train and validation) against steps and against tokens seen, the "
                                   "learning rate and the throughput of one or more runs, read from their "
                                   "metrics.jsonl, into one picture; one colour per run. Needs matplotlib: "
                                   "pip install 'cairn-lm[plot]'.")
    p.set_defaults(func=cmd_plot)
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run directories (each holds metrics.jsonl)")
    p.add_argument("--out", metavar="FILE.png",
                   help="picture to write (.png; .svg and .pdf work too); default RUN_DIR/plot.png for one run, "
                        "runs.png in the current directory for several")
    p.add_argument("--title", help="figure title (default: the run name, or the number of runs)")


def _add_export(sub) -> None:
    p = sub.add_parser("export",
                       help="export a trained model to Hugging Face format (GPT-2 or Llama, as its architecture)",
                       description="Write a run's final checkpoint (or the given checkpoint) as a Hugging Face "
                                   "model, GPT-2 or Llama as its block is (a mix of the two is refused): config.json, "
                                   "generation_config.json, model.safetensors and "
                                   "tokenizer files, loadable offline with transformers' AutoModelForCausalLM "
                                   "and AutoTokenizer.")
    p.set_defaults(func=cmd_export)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--format", choices=("hf",), default="hf", help="export format (default hf)")
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory to write")


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train an own byte-level BPE tokenizer (`tokenizer train`)",
                       description="Own tokenizers: `cairn tokenizer train` writes a directory that "
                                   "`cairn train --tokenizer DIR` uses.")
    p.set_defaults(func=cmd_tokenizer)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", parser_class=Parser)
    t = tsub.add_parser("train", help="train a byte-level BPE on a data source",
                        description="Learn a byte-level BPE (GPT-2's kind, with <|endoftext|> as a special token) "
                                    "on the cleaned stories of --data, by default only on the training split "
                                    "(`cairn train`'s seeded shuffle and cut), and report its compression on the "
                                    "held-out stories against GPT-2's.")
    t.add_argument("--data", required=True, help="data source, as for `cairn train --data`")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary (at most; >= 257)")
    t.add_argument("--out", required=True, metavar="DIR", help="directory to write tokenizer.json into")
    t.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default 2)")
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/hub data")
    t.add_argument("--txt-separator", default="<|endoftext|>", help="story separator line in .txt files")
    t.add_argument("--hub-split", default="train", help="split of a hub dataset (default train)")
    t.add_argument("--seed", type=int, default=42, help="shuffle seed of the split (default 42, as cairn train)")
    t.add_argument("--train-frac", type=float, default=0.8,
                   help="learn from the first fraction of the shuffled stories (default 0.8); use the "
                        "train_frac of your runs or less")
    t.add_argument("--n-samples", type=int, default=0, help="keep the first N shuffled stories (0 = all)")
    t.add_argument("--all", action="store_true", help="learn from every story (no held-out stories)")


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize a data source into the token cache, on every core, without training",
        description="Read, clean, split and tokenize --data into the token cache that `cairn train` then maps "
                    "(the same cache for the same data and settings). The source is streamed in chunks, so "
                    "memory stays small whatever its size, and chunks are tokenized on --workers processes. "
                    "Prints the splits, tokens, throughput (MB/s of input), time and peak memory.")
    p.set_defaults(func=cmd_prepare)
    p.add_argument("--data", help="data source, as for `cairn train --data` (default: the config's)")
    p.add_argument("--preset", help="take the data settings of this preset (as `cairn train --preset`)")
    p.add_argument("--config", help="take the data settings of this TOML config file")
    p.add_argument("--tokenizer", help="gpt2 (default) or a directory made by `cairn tokenizer train`")
    p.add_argument("--workers", type=int, default=0,
                   help="tokenizer processes (default 0: every usable core; small sources use one)")
    p.add_argument("--seed", type=int, help="shuffle seed of the split (default 42)")
    p.add_argument("--n-samples", type=int, help="keep the first N shuffled stories (default 0 = all)")
    p.add_argument("--train-frac", type=float, help="fraction of stories for training (default 0.8)")
    p.add_argument("--val-frac", type=float, help="fraction for validation; the rest is test (default 0.1)")
    p.add_argument("--text-field", help="field holding the text in .jsonl/.parquet/hub data (default text)")
    p.add_argument("--txt-separator", help="story separator line in .txt files, or 'blank' (default <|endoftext|>)")
    p.add_argument("--hub-split", help="split of a hub dataset (default train)")
    p.add_argument("--cache-dir", help="cache root (default $CAIRN_CACHE or ~/.cache/cairn)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")


def build_parser() -> Parser:
    from cairn.version import __version__

    parser = Parser(prog="cairn", description="Train GPT-style language models from scratch.")
    parser.add_argument("--version", action="version", version=f"cairn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    _add_train(sub)
    _add_prepare(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_serve(sub)
    _add_chat(sub)
    _add_plot(sub)
    _add_export(sub)
    _add_tokenizer(sub)
    sub.add_parser("bench", help="time training steps and generation against plain PyTorch references "
                                 "(`cairn bench --help`)", add_help=False)
    return parser


# ---------------------------------------------------------------- commands

def _not_empty(args, command: str, *flags: str) -> None:
    for flag in flags:
        value = getattr(args, flag, None)
        if value is not None and not str(value).strip():
            raise CairnError(f"--{flag.replace('_', '-')} is empty: give a value or leave the option out "
                             f"(see `cairn {command} --help`)")


def _check_out(out: Path) -> None:
    """The run directory must be a directory, or creatable as one (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise CairnError(f"--out {str(out)!r} is a file, not a directory: choose another --out")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CairnError(f"cannot create run directory {str(out)!r}: {str(parent)!r} is a file; "
                                 "choose another --out")
            break


def _config_overrides(args, extra: list[str]) -> dict[str, str]:
    """The `--key value` config options given, by config key; anything argparse did not know is refused."""
    for arg in extra:
        if arg.startswith("--") and len(arg) > 2:
            key = arg[2:].split("=", 1)[0]
            raise CairnError(f"unknown option {key!r}: run `cairn train --help` to see every option")
        raise CairnError(f"unexpected argument {arg!r}: options are --key value (see `cairn train --help`)")
    return {k[len(CFG):]: v for k, v in vars(args).items() if k.startswith(CFG)}


def train_config(args, overrides: dict[str, str]) -> tuple[object, Path, bool]:
    """(config, run directory, resume?) from the preset, config file, saved run and overrides."""
    from cairn.config.sections import RunConfig, apply_overrides, validate
    from cairn.config.presets import config_file, preset
    from cairn.training.resume import run_config

    resume = False
    saved = args.restart or (args.resume if args.resume != "auto" else None)
    if args.restart and args.resume:
        raise CairnError("--resume and --restart exclude each other: give one of them")
    if saved:
        flag = "--restart" if args.restart else "--resume"
        run = Path(saved)
        if args.out and Path(args.out) != run:
            raise CairnError(f"{flag} RUN_DIR and --out name different directories: give one of them")
        cfg = run_config(run)
        if args.preset or args.config:
            raise CairnError(f"{flag} RUN_DIR uses the run's saved config: drop --preset/--config "
                             "(overrides like --max-steps are allowed)")
        out, resume = run, not args.restart
    else:
        base = preset(args.preset) if args.preset else None
        # without --preset, a `preset = "..."` line in the file picks the base
        cfg = config_file(args.config, base) if args.config else (base or RunConfig())
        out = Path(args.out) if args.out else Path("runs") / cfg.name
        resume = args.resume == "auto"
    _check_out(out)
    if args.data is not None:
        overrides["source"] = args.data
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    cfg = apply_overrides(cfg, overrides)
    if cfg.init_from and not saved:  # the architecture and tokenizer of the run it starts from
        from cairn.training.init_from import apply as start_from

        cfg = start_from(cfg, overrides)
    return validate(cfg), out, resume


def cmd_train(args, extra: list[str], started: float) -> int:
    from cairn.training import train

    overrides = _config_overrides(args, extra)
    _not_empty(args, "train", "preset", "config", "data", "out", "resume", "restart")
    if args.stop_after < 0:
        raise CairnError(f"--stop-after must be zero (off) or a step number, got {args.stop_after}")
    cfg, out, resume = train_config(args, overrides)
    progress = not args.no_progress and sys.stderr.isatty()
    setup_logging(progress=progress)
    train(cfg, out, resume=resume, restart=bool(args.restart), stop_after=args.stop_after, progress=progress,
          started=started)
    return 0


def _prepare_config(args):
    """The run config whose data settings `cairn prepare` uses: preset, then config file, then flags."""
    from cairn.config.sections import RunConfig, apply_overrides, validate
    from cairn.config.presets import config_file, preset

    _not_empty(args, "prepare", "data", "preset", "config", "tokenizer", "cache_dir")
    if args.workers < 0:
        raise CairnError(f"--workers must be 0 (every usable core) or more, got {args.workers}")
    base = preset(args.preset) if args.preset else None
    cfg = config_file(args.config, base) if args.config else (base or RunConfig())
    overrides = {key: getattr(args, key) for key in ("seed", "tokenizer", "n_samples", "train_frac", "val_frac",
                                                     "text_field", "txt_separator", "hub_split", "cache_dir")
                 if getattr(args, key) is not None}
    if args.data is not None:
        overrides["source"] = args.data
    return validate(apply_overrides(cfg, overrides))


def cmd_prepare(args) -> int:
    from cairn.data.report import prepare, report_lines
    from cairn.data.run_tokenizer import for_data

    cfg = _prepare_config(args)
    setup_logging(stream=sys.stderr, quiet=args.json)
    report = prepare(cfg, for_data(cfg.tokenizer, cfg.data, cfg.seed), workers=args.workers,
                     progress=not (args.no_progress or args.json) and sys.stderr.isatty())
    print(json.dumps(report) if args.json else "\n".join(report_lines(report)))
    return 0


def cmd_eval(args) -> int:
    from cairn.eval.evaluate import evaluate_run
    from cairn.runtime.device import set_threads

    _not_empty(args, "eval", "data")
    setup_logging(stream=sys.stderr)
    set_threads(0)
    if args.task == "words":
        return _eval_words(args)
    r = evaluate_run(args.path, data=args.data, split=args.split, batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps({k: r[k] for k in ("loss", "perplexity", "bits_per_byte", "tokens")}))
    else:
        print(f"{r['checkpoint']} on {r['what']}: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}, "
              f"{r['bits_per_byte']:.4f} bits/byte, {r['tokens']:,} tokens")
    return 0


def _eval_words(args) -> int:
    from cairn.tasks.words import evaluate_words

    if args.data is None:
        raise CairnError("--task words needs --data FILE.jsonl of prompts with their \"words\"")
    if args.limit < 0:
        raise CairnError(f"--limit must be zero (all) or more, got {args.limit}")
    r = evaluate_words(args.path, args.data, device=args.device, seed=args.seed, limit=args.limit)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['checkpoint']}: {r['honoured']} of {r['prompts']} stories use all their words "
              f"({100 * r['rate']:.1f}%); {100 * r['word_rate']:.1f}% of the single words"
              + ("" if r["prompt_gain"] is None else
                 f"; prompt gain {r['prompt_gain']:.2f} nats per word token (teacher-forced on the stories)"))
    return 0


def _prompts(args) -> list[str]:
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


def cmd_generate(args) -> int:
    from dataclasses import replace

    from cairn.tokenizer.chat_template import ChatTemplate, instruction, render
    from cairn.inference.generate import SamplingConfig, TextStream
    from cairn.checkpoint.load import load
    from cairn.runtime.device import set_threads

    prompts = _prompts(args)
    if args.num_samples < 1:
        raise CairnError(f"--num-samples must be 1 or more, got {args.num_samples}")
    s = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, repetition_penalty=args.repetition_penalty)
    s.check(flags=True)
    set_threads(0)
    loaded = load(args.path, args.device)
    stream_out = not (args.json or args.no_stream)
    first = True
    # an instruction-tuned run answers each prompt as an instruction, through its chat template
    template = ChatTemplate.from_config(loaded.config.data) \
        if loaded.config.data.format == "sft" and not args.no_template else None
    for prompt in prompts:
        ids = None
        if template is not None:
            ids = instruction(template, loaded.tokenizer, prompt)
            prompt = render(template, [{"role": "user", "content": prompt}], answer=True)
        for i in range(args.num_samples):
            sample = TextStream(loaded.model, loaded.tokenizer, prompt, replace(s, seed=s.seed + i), stop=args.stop,
                                use_cache=not args.no_cache, prompt_ids=ids)
            if not (args.json or first):
                sys.stdout.write("\n")
            first = False
            if stream_out:
                _show(prompt)
                for piece in sample:
                    _show(piece)
            else:
                for _ in sample:
                    pass
            rate = sample.tokens / max(sample.seconds, 1e-9)
            if args.json:
                print(json.dumps({"prompt": prompt, "seed": s.seed + i, "text": sample.text, "tokens": sample.tokens,
                                  "finish_reason": sample.finish_reason, "tokens_per_s": round(rate, 1)}),
                      flush=True)
                continue
            if not stream_out:
                _show(prompt + sample.text)
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(f"[{sample.tokens} tokens in {sample.seconds:.2f}s, {rate:.1f} tokens/s, "
                  f"finish: {sample.finish_reason}]", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from cairn.runtime.device import set_threads
    from cairn.serve import serve

    _not_empty(args, "serve", "host", "model_name")
    setup_logging(stream=sys.stderr)
    set_threads(0)
    serve(args.path, host=args.host, port=args.port, api_key=args.api_key, max_concurrency=args.max_concurrency,
          max_batch=args.max_batch, max_body=args.max_body, max_tokens=args.max_tokens, device=args.device,
          model_name=args.model_name)
    return 0


def cmd_chat(args) -> int:
    from cairn.inference.chat import ChatSession, run_chat
    from cairn.tokenizer.chat_template import ChatTemplate
    from cairn.inference.generate import SamplingConfig
    from cairn.checkpoint.load import load
    from cairn.runtime.device import set_threads

    s = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       seed=args.seed)
    s.check(flags=True)
    set_threads(0)
    loaded = load(args.path, args.device, merge=True)
    if loaded.config.data.format != "sft":
        print(f"({loaded.path} was not instruction-tuned (data.format {loaded.config.data.format!r}): its answers "
              "continue the template's text)", file=sys.stderr)
    session = ChatSession(loaded.model, loaded.tokenizer, ChatTemplate.from_config(loaded.config.data), s)
    run_chat(session, sys.stdin, sys.stdout, sys.stderr, interactive=sys.stdin.isatty())
    return 0


def _show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_plot(args) -> int:
    from cairn.trackers.plot import default_out, plot_runs

    out = args.out if args.out is not None else default_out(args.paths)
    if not str(out).strip():
        raise CairnError("--out is empty: give a file name such as plot.png, or leave --out out")
    plot_runs(args.paths, out, title=args.title)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from cairn.export.hf import export_hf

    if not args.out.strip():
        raise CairnError("--out is empty: give a new directory to write the export into")
    out = export_hf(args.path, args.out)
    kind = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    print(f"wrote {out} (Hugging Face format, {kind})")
    return 0


def cmd_tokenizer(args) -> int:
    from cairn.tokenizer.base import gpt2
    from cairn.data.run_tokenizer import training_texts
    from cairn.tokenizer.learn import bytes_per_token, train_bpe

    if args.tokenizer_command != "train":
        raise CairnError("give a subcommand: cairn tokenizer train --data SOURCE --vocab-size N --out DIR")
    for flag in ("data", "out"):
        if not getattr(args, flag).strip():
            raise CairnError(f"--{flag} is empty: give a value (see `cairn tokenizer train --help`)")
    if args.seed < 0 or args.n_samples < 0:
        raise CairnError("--seed and --n-samples must be zero or more")
    learn, held_out = training_texts(args.data, text_field=args.text_field, txt_separator=args.txt_separator,
                                     hub_split=args.hub_split, seed=args.seed, n_samples=args.n_samples,
                                     train_frac=args.train_frac, all_stories=args.all)
    start = time.perf_counter()
    tok = train_bpe(learn, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"trained {tok.name}: {tok.vocab_size} tokens, <|endoftext|> = id {tok.eot_id}, on {len(learn)} stories "
          f"in {time.perf_counter() - start:.1f}s; wrote {Path(args.out) / 'tokenizer.json'}")
    if held_out:
        own, ref = bytes_per_token(tok, held_out), bytes_per_token(gpt2(), held_out)
        print(f"held-out {len(held_out)} stories: {own:.3f} bytes/token ({tok.name}) vs {ref:.3f} (gpt2)")
    print(f"use it with: cairn train --tokenizer {args.out} ...")
    return 0


def process_started() -> float:
    """When this process began, on the time.monotonic() clock: a time budget then covers the
    interpreter's start and the imports (torch's take seconds), which a wall clock around the
    command counts too. Read from /proc (Linux); elsewhere, now."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        began = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - began
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic()
    now = time.monotonic()
    return now - min(max(age, 0.0), now)


def main(argv: Optional[list[str]] = None) -> int:
    # a --time-budget counts from the command's start: the process's, when this is the program
    # (argv from the command line); a call from Python code starts its own clock here
    program = argv is None
    started = process_started() if program else time.monotonic()
    code = _command(list(sys.argv[1:] if program else argv), started)
    if program:
        _spare_the_exit_a_collection()
    return code


def _spare_the_exit_a_collection() -> None:
    """The process ends once the command returns, and the interpreter's shutdown then runs the
    garbage collector over every object still alive, torch's and cairn's: 1.4 to 2.8 s on a 2-core
    machine busy with other work (0.35 s frozen), after the run's end yet within what a
    --time-budget counts (the whole process). Frozen objects are left out of those collections and
    their memory goes back with the process; cairn closes its own files (with-blocks, logging's
    handlers at exit), so none of them waits on a collection to be flushed."""
    gc.freeze()


def _command(argv: list[str], started: float) -> int:
    try:
        if argv[:1] == ["bench"]:
            from cairn.bench.speed import main as bench_main

            return bench_main(argv[1:])
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "train":
            return cmd_train(args, extra, started)
        if extra:
            raise CairnError(f"unknown option {extra[0]!r} for `cairn {args.command}` "
                             f"(see `cairn {args.command} --help`)")
        return args.func(args)
    except CairnError as e:
        if os.environ.get("CAIRN_DEBUG"):
            raise
        if not isinstance(e, SharedError):  # under torchrun rank 0 already said it
            print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - storage failures come in many libraries' types
        # a storage failure that no command caught where it happened: still one line
        from cairn.util.failures import storage_problem

        problem = storage_problem(e)
        if problem is None or os.environ.get("CAIRN_DEBUG"):
            raise  # a bug: its traceback is worth seeing
        where = f" ({problem.path})" if problem.path else ""
        print(f"error: {problem.what}{where}: {problem.advice}, then run the command again "
              "(set CAIRN_DEBUG=1 to see where it failed)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
