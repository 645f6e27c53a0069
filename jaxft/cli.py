"""The ``jaxft`` command line (also ``python -m jaxft``).

Every subcommand explains itself with ``--help``. Errors print one paragraph and exit with status 2;
``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from jaxft.errors import JaxftError

# Domain errors and file-system errors are the user's to fix: one paragraph, exit 2. Anything else is a bug in
# jaxft and keeps its traceback.
EXPECTED_ERRORS = (JaxftError, OSError)
# The commands that run on every host of a multi-host job (the others work on one process's devices).
MULTI_PROCESS_COMMANDS = ("train", "sweep", "eval")


def _refuse_existing(folder: str | Path, flag: str = "--overwrite"):
    """The library's own check says overwrite=True; on the command line the answer is a flag."""
    from jaxft.files import occupied

    if occupied(folder):
        raise FileExistsError(f"{folder}: already exists and is not empty; pass {flag} to replace it, or choose "
                              "another folder")


def _at_least(minimum: int):
    """argparse type: a whole number >= ``minimum`` (argparse's own one-line error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _train(args) -> int:
    """Full fine-tuning, LoRA or QLoRA SFT from a HF model folder, as one YAML file describes it (see configs/). The
    resolved config, metrics.jsonl, curves.png, checkpoints and the exported adapter land in output_dir.
    """
    from jaxft.recipes import sft
    from jaxft.recipes.config import load_run_config

    cfg = load_run_config(args.config, args.set or [])
    if not (args.resume or args.overwrite):
        _refuse_existing(cfg.output_dir, "--overwrite (or --resume to continue it)")
    summary = sft.run(cfg, resume=args.resume, overwrite=args.overwrite)
    if _main_process():
        print(json.dumps(summary, indent=2, default=float))
    return 0


def _demo(args) -> int:
    """Pretrain a tiny Llama-style base on generated text (cached), quantize it to NF4, QLoRA fine-tune it on a chat
    task with exactly checkable answers (increment every digit), and print exact match before/after on held-out
    problems.
    """
    from jaxft.recipes import demo

    cfg = demo.DemoConfig.quick() if args.quick else demo.DemoConfig()
    out = Path(args.out)
    if not args.overwrite:
        _refuse_existing(out)
    result = demo.run(out, cfg, overwrite=args.overwrite)
    print()
    print(demo.table(result))
    return 0


def _sweep(args) -> int:
    """Train the run config once per point of a grid, one run after another, and compare: sweep.csv, sweep.md and
    sweep.json (final train loss, eval loss, eval token accuracy, tokens/s as mean ± std over seeds; trainable
    params), loss_curves.png (one curve per config) and heatmap_r_alpha.png (the eval metric over lora.r x
    lora.lora_alpha). Runs land in OUT/<name>, e.g. OUT/r8-a16-s0, each an ordinary run folder; the resolved grid is
    saved as OUT/sweep.yaml.
    """
    from jaxft.recipes import sweep

    result = sweep.run(args.config, args.grid, sets=args.set or [], out=args.out, overwrite=args.overwrite,
                       resume=args.resume, parallel=args.parallel, exact_match=args.exact_match)
    if _main_process():
        print(Path(result["dir"], "sweep.md").read_text())
    return 0


def _plot(args) -> int:
    """Draw the train loss and every eval metric of several run folders on one figure (a PNG), one line per run,
    labelled by the config keys whose values differ between the runs (e.g. lora.r=8, optim.lr=0.001).
    """
    from jaxft.recipes.plot import plot_runs

    print(plot_runs(args.run_dirs, args.out, overwrite=args.overwrite))
    return 0


def _use_compile_cache(args):
    """Turns on the persistent compilation cache before anything compiles, unless the flags or the environment
    turn it off."""
    from jaxft import compile_cache

    compile_cache.configure(args.compile_cache, args.no_compile_cache)


def _start_processes(command: str):
    """Joins the other processes of a multi-host run (JAXFT_* variables, or a cluster jax detects) before anything
    touches the devices; process 0 says what the run spans, on stderr, so eval's JSON on stdout stays parseable."""
    from jaxft import parallel

    if parallel.initialize_distributed() and _main_process():
        print(f"jaxft {command}: {parallel.process_summary()}", file=sys.stderr, flush=True)


def _main_process() -> bool:
    """Process 0 prints a multi-host run's results (the others hold the same)."""
    import jax

    return jax.process_index() == 0


def _load(model: str, adapter: str | None, quant: str | None):
    """(config, params) of a model folder with an adapter attached; an adapter of a task head (PEFT's SEQ_CLS,
    TOKEN_CLS, QUESTION_ANS) brings the head, so the base may be a causal LM."""
    import jaxft
    from jaxft.hf.peft_format import adapter_head

    is_adapter = adapter is not None and (Path(adapter) / "adapter_config.json").is_file()
    cfg, params = jaxft.from_pretrained(model, quant=quant, head=adapter_head(adapter) if is_adapter else None)
    if adapter and not is_adapter:
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json there (is it a PEFT adapter folder, "
                                "such as a run's output_dir/adapter?)")
    if adapter:
        params = jaxft.load_adapter(adapter, params, cfg)
    return cfg, params


def _eval(args) -> int:
    """Evaluate a HF model folder, with a PEFT adapter if given, on data files over one pass, as its head says. A
    causal LM on SFT data (the formats train reads: chat messages, prompt/completion, text): mean cross-entropy of
    the target tokens (assistant turns for chats), perplexity, and token accuracy (argmax = label, teacher-forced).
    A sequence classifier: accuracy and macro-F1 (or the multi-label / regression metrics); a token classifier:
    token accuracy and seqeval's entity-level F1 (BIO labels); a QA head: SQuAD's exact match and F1. Preference
    data (``--task``, or pairs given to a one-label sequence classifier: a reward model): the objective's metrics,
    and with ``--scores`` every record's rewards (``jaxft.recipes.preference_scores``). Prints JSON.
    """
    import jaxft
    from jaxft.config import ConfigError
    from jaxft.data import DataConfig
    from jaxft.hf.tokenizer import tokenizer_folder
    from jaxft.recipes import preference_scores
    from jaxft.recipes.scoring import chat_exact_match, data_metrics, task_scores

    if args.scores:
        preference_scores.check_scores_file(args.scores, args.overwrite, args.data)
    cfg, params = _load(args.model, args.adapter, args.quant)
    tokenizer = jaxft.load_tokenizer(tokenizer_folder(args.model, args.adapter))
    data = DataConfig(paths=tuple(args.data), template=args.template, max_length=args.max_length,
                      batch_size=args.batch_size, dedup=None, skip_bad_records=args.skip_bad_records)
    settings = {"beta": args.beta, "loss_type": args.loss_type and tuple(args.loss_type)}
    task = preference_scores.eval_task(args.task, cfg.head, data.paths, has_adapter=args.adapter is not None,
                                       settings=settings, doc_stride=args.doc_stride, max_answer_length=args.max_answer_length)
    preference = isinstance(task, tuple(preference_scores.PREFERENCE_TASKS.values()))
    if args.exact_match and (cfg.head is not None or preference):
        raise ConfigError("--exact-match scores generated chat replies on SFT chat data; "
                          + (f"this model has a {cfg.head.kind} head" if cfg.head else "this data is preference data"))
    if args.scores and not preference:
        raise ConfigError("--scores writes the rewards of preference data's records (--task reward or dpo)")
    with _template_flag("--template"):
        if preference:
            result, lines = preference_scores.preference_eval(task, cfg, params, tokenizer, data,
                                                              scores=bool(args.scores))
        else:
            result = data_metrics(cfg, params, tokenizer, data, task)
            result.update(task_scores(task, cfg, params, tokenizer, data))
        if args.exact_match:
            result.update(chat_exact_match(cfg, params, tokenizer, data, args.exact_match))
    if _main_process():  # every process evaluated the whole data; one JSON on stdout, one scores file
        if args.scores:
            preference_scores.write_scores(args.scores, lines)
        print(json.dumps(result, indent=2, default=float))
    return 0


@contextlib.contextmanager
def _template_flag(flag: str):
    """Chat-template errors name the flag of this command (``--template``) instead of data.template."""
    from jaxft.data.chat import TemplateError

    try:
        yield
    except TemplateError as e:
        raise e.naming(flag) from None


def _generate(args) -> int:
    """Batch generation for --prompt/--file, or an interactive prompt when neither is given (Ctrl-D ends)."""
    import jaxft
    from jaxft.data.chat import resolve_template
    from jaxft.hf.tokenizer import tokenizer_folder
    from jaxft.models.generate import stop_token_ids
    from jaxft.peft.prefix import prompt_inputs

    prompts = list(args.prompt or [])
    if args.file:
        if not Path(args.file).is_file():
            raise FileNotFoundError(f"--file {args.file}: no such file (expected a text file, one prompt per line)")
        prompts += [line.rstrip("\n") for line in Path(args.file).read_text().splitlines() if line.strip()]
    cfg, params = _load(args.model, args.adapter, args.quant)
    params, hooks = prompt_inputs(cfg, params)  # a prompt-style adapter's prefix
    tok = jaxft.load_tokenizer(tokenizer_folder(args.model, args.adapter))
    chat, template = args.chat or args.chat_template is not None, None
    if chat:
        with _template_flag("--chat-template"):
            template = resolve_template(tok, args.chat_template)
    interactive = not prompts
    while True:
        if interactive:
            try:
                prompts = [input("> ")]
            except EOFError:
                return 0
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       chat_template=template) if chat else tok.encode(p) for p in prompts]
        outs = jaxft.generate(cfg, params, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, hooks=hooks,
                              stop_token_ids=stop_token_ids(cfg, tok.eos_token_id), seed=args.seed)
        for p, out in zip(prompts, outs):
            print(f"{p}\t{tok.decode(out, skip_special_tokens=True)}" if not interactive
                  else tok.decode(out, skip_special_tokens=True))
        if not interactive:
            return 0


def _export(args) -> int:
    """Write the adapter in PEFT format, or with --merged a dense HF model with the adapter folded in; the tokenizer
    and chat template go along. --gguf writes the merged model (or a plain HF folder without --adapter) as one GGUF
    file for llama.cpp / Ollama instead, its weights in --gguf-type, with tokenizer and chat template in it.
    """
    import jaxft
    from jaxft.hf.peft_format import read_adapter_config
    from jaxft.hf.tokenizer import tokenizer_folder
    from jaxft.recipes.skeleton import with_pad_token, write_export

    if args.gguf is not None:
        return _export_gguf(args)
    if args.adapter is None:
        raise JaxftError("jaxft export --out needs --adapter DIR (the adapter to write or merge); to convert a plain "
                         "model folder, use --gguf FILE")
    out = Path(args.out)
    if not args.overwrite:
        _refuse_existing(out)
    cfg, params = _load(args.model, args.adapter, None)
    tok = jaxft.load_tokenizer(tokenizer_folder(args.model, args.adapter))  # before anything is written
    if args.merged:
        write_export(out, jaxft.merge(params), tok, model_cfg=with_pad_token(cfg, tok), overwrite=args.overwrite)
    else:
        acfg = read_adapter_config(Path(args.adapter))
        write_export(out, params, tok, model_cfg=cfg, acfg=acfg, base_model=str(Path(args.model).resolve()),
                     overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _convert(args) -> int:
    """Convert a GGUF file of a Llama, Mistral or Qwen2 model (llama.cpp's format, any of the types F32, F16, BF16,
    Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K-Q6_K) into a Hugging Face model folder: config.json, safetensors with the
    dequantized weights, the tokenizer and its chat template.
    """
    from jaxft.gguf.convert import gguf_to_hf

    if not args.overwrite:
        _refuse_existing(args.out)
    gguf_to_hf(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def _export_gguf(args) -> int:
    """``jaxft export MODEL [--adapter DIR] --gguf FILE``: the merged model as one GGUF file."""
    from jaxft.gguf.write import save_merged_gguf

    out = Path(args.gguf)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--gguf {out}: already exists; pass --overwrite to replace it, or choose another file")
    cfg, params = _load(args.model, args.adapter, None)
    save_merged_gguf(cfg, params, out, args.model, args.adapter, gguf_type=args.gguf_type, overwrite=args.overwrite)
    print(f"wrote {out} ({args.gguf_type})")
    return 0


def _inspect(args) -> int:
    """Build the model of a run config from its config.json alone (adapters, 4-bit base; no weights are read) and
    print trainable vs total params and an estimate of the train step's memory per device, term by term, for the
    configured mesh and any --mesh shapes. The estimate needs no devices; --compile checks it against XLA's
    memory_analysis() of the real step compiled on the devices here.
    """
    import jax

    from jaxft.analysis import memory
    from jaxft.parallel import MeshConfig
    from jaxft.recipes.config import load_run_config, with_token_batch

    # grad_accum as the run on --processes processes derives it from task.tokens_per_batch
    cfg = with_token_batch(load_run_config(args.config, args.set or []), args.processes)
    model = memory.abstract_model(cfg)  # shapes only: no weights are read
    n_train, n_total = memory.param_counts(cfg, model.model_cfg, model.params)
    print(f"trainable params: {n_train:,} || all params: {n_total:,} || trainable%: {100 * n_train / n_total:.4f}")
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)  # a -1 takes the devices the run would have
    shapes = [cfg.mesh.shape(args.devices or jax.device_count()) if -1 in sizes else sizes]
    shapes += [s for s in args.mesh or [] if s not in shapes]
    estimates = [memory.estimate(cfg, s, processes=args.processes, model=model) for s in shapes]
    measured = None
    if args.compile:
        devices = jax.devices()
        measured = [memory.compiled_memory(cfg, MeshConfig(*s), devices[:_size(s)]) if _size(s) <= len(devices)
                    else None for s in shapes]
    print(memory.format_table(estimates, measured))
    if measured and None in measured:
        print(f"(-: that mesh needs more than the {len(jax.devices())} devices here, so it was not compiled)")
    return 0


def _tokenizer_train(args) -> int:
    """Train a tokenizer on text sources (text files, globs, folders, JSONL / parquet with a text field,
    datasets.save_to_disk folders, hf:NAME[[:CONFIG]:SPLIT]) and write it as a Hugging Face tokenizer folder:
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, the chat template, and for sentencepiece models
    tokenizer.model. transformers' AutoTokenizer and jaxft load it.
    """
    from jaxft.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer_from_sources

    if not args.overwrite:
        _refuse_existing(args.out)
    cfg = TokenizerTrainConfig(
        vocab_size=args.vocab_size, model_type=args.model_type, bos_token=args.bos_token, eos_token=args.eos_token,
        unk_token=args.unk_token, pad_token=args.pad_token, extra_special_tokens=tuple(args.extra_special_token or ()),
        add_bos_token=args.add_bos_token, add_eos_token=args.add_eos_token, byte_fallback=args.byte_fallback,
        character_coverage=args.character_coverage, max_documents=args.max_documents,
        max_characters=args.max_characters, max_sentences=args.max_sentences, chat_template=args.chat_template,
        text_field=args.text_field, document=args.document, skip_bad_files=args.skip_bad_files, seed=args.seed,
        threads=args.threads)
    out = train_tokenizer_from_sources(args.sources, args.out, cfg, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _data_tokenize(args) -> int:
    """Write the pre-tokenized store a pretraining run reads (the folder its data.store names): one pass of the rows
    of data.paths, cleaned, tokenized with the run's tokenizer and packed as the run would stream them, as
    memory-mapped numpy shards with a manifest of the settings and tokenizer (jaxft.data.token_store). The run
    then reads its rows from there, and refuses the store if its data settings or tokenizer change.
    """
    from jaxft.config import ConfigError
    from jaxft.data.text_config import TextDataConfig
    from jaxft.data.token_store import write_token_store
    from jaxft.hf.tokenizer import load_tokenizer
    from jaxft.recipes.config import load_run_config
    from jaxft.recipes.skeleton import base_config

    cfg = load_run_config(args.config, args.set or [])
    if not isinstance(cfg.data, TextDataConfig) or cfg.data.store is None:
        raise ConfigError(f"{args.config}: data.store: `jaxft data tokenize` writes the folder that data.store of a "
                          "data: {type: text} section names; add data.store: FOLDER (or --set data.store=FOLDER)")
    manifest = write_token_store(cfg.data, load_tokenizer(cfg.tokenizer_dir), cfg.data.store,
                                 overwrite=args.overwrite, vocab_size=base_config(cfg).vocab_size)
    print(json.dumps({"store": cfg.data.store, "rows": manifest["rows"], "row_length": manifest["row_length"],
                      "shards": len(manifest["shards"])}))
    return 0


def _size(shape) -> int:
    return shape[0] * shape[1] * shape[2]


def _mesh_shape(text: str) -> tuple[int, int, int]:
    """``data,fsdp,tensor`` sizes, e.g. ``1,8,1``."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a mesh shape; expected three positive sizes "
                                         "data,fsdp,tensor such as 1,8,1")
    return tuple(int(p) for p in parts)


def _command(sub, name: str, run, compiles: bool = True, **texts) -> argparse.ArgumentParser:
    """A sub-command whose parsed arguments go to ``run``; its description is ``run``'s docstring (as in click). A
    command that ``compiles`` jax programs takes the compilation cache's flags (:mod:`jaxft.compile_cache`)."""
    p = sub.add_parser(name, description=run.__doc__, **texts)
    p.set_defaults(func=run, compiles=compiles)
    if compiles:
        cache = p.add_mutually_exclusive_group()
        cache.add_argument("--compile-cache", metavar="DIR", help="keep compiled programs in DIR, so the next run "
                           "of the same config loads them (default: $JAXFT_COMPILE_CACHE, else jax's own "
                           "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/jaxft/xla or under $XDG_CACHE_HOME when set; "
                           "bounded by $JAXFT_COMPILE_CACHE_MAX_BYTES, default 2 GiB)")
        cache.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh and keep "
                           "nothing (also: JAXFT_COMPILE_CACHE=off)")
    return p


def _train_command(sub):
    """``jaxft train``'s arguments."""
    p = _command(sub, "train", _train, help="fine-tune per a YAML run config")
    p.add_argument("config", help="YAML run config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. lora.r=8")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")


def _sweep_command(sub):
    """``jaxft sweep``'s arguments."""
    p = _command(sub, "sweep", _sweep, help="train a grid of run configs and compare them",
                 epilog="example: jaxft sweep configs/demo-cpu.yaml --grid lora.r=4,8,16 alpha=2r "
                 "optim.lr=1e-3,3e-3 seeds=3")
    p.add_argument("config", help="YAML run config (the base of every run)")
    p.add_argument("--grid", action="extend", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="grid dimensions: KEY=V1,V2,... with YAML values (r, alpha, lr, dropout are short for "
                   "lora.r, lora.lora_alpha, optim.lr, lora.lora_dropout); a value like 2r, 2*r or r is derived "
                   "from each point's lora.r; seeds=N repeats every point with train.seed 0..N-1")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base config value")
    p.add_argument("--out", help="sweep folder (default: the config's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in its folder: runs whose "
                   "summary.json exists are kept, the others are trained (again, from scratch)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sweep folder")
    p.add_argument("--parallel", action="store_true", help="train the runs together on the devices "
                   "(jaxft.recipes.multi) instead of one after another")
    p.add_argument("--exact-match", type=_at_least(0), default=0, metavar="N", help="also score each run's greedy "
                   "replies to the first N chats of eval_data: the share exactly equal to the reference answer")


def _eval_command(sub):
    """``jaxft eval``'s arguments."""
    p = _command(sub, "eval", _eval, help="held-out metrics of a model (+ adapter) on data, as its head says",
                 epilog="examples: jaxft eval BASE --adapter runs/demo-cpu/adapter --quant nf4 "
                 "--data jaxft-demo/data/eval.jsonl; jaxft eval REWARD_MODEL --data pairs.jsonl --scores scores.jsonl")
    p.add_argument("model", help="HF model folder (the base)")
    p.add_argument("--adapter", help="PEFT adapter folder to apply (e.g. a run's output_dir/adapter)")
    p.add_argument("--quant", choices=["nf4", "fp4"], help="load the base in 4 bits (as QLoRA trained it)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="JSON/JSONL/CSV/parquet file(s)")
    p.add_argument("--template", help="chat template: a built-in name or .jinja file (default: the tokenizer's)")
    p.add_argument("--max-length", type=_at_least(1), default=2048, help="tokens per row (longer examples are cut)")
    p.add_argument("--batch-size", type=_at_least(1), default=8, help="rows per batch")
    p.add_argument("--exact-match", type=_at_least(0), default=0, metavar="N", help="also generate greedy replies "
                   "to the first N chats and report the share exactly equal to the reference answer (e.g. the demo "
                   "task)")
    p.add_argument("--doc-stride", type=_at_least(0), default=128, metavar="N", help="a QA head: tokens two windows "
                   "of a long context share (as task.doc_stride)")
    p.add_argument("--max-answer-length", type=_at_least(1), default=30, metavar="N", help="a QA head: the longest "
                   "answer predicted, in tokens")
    p.add_argument("--task", metavar="TASK", help="preference data: reward, dpo, orpo, simpo or kto, the "
                   "objective whose metrics to report (default: pairs given to a one-label sequence classifier are "
                   "a reward model's); dpo and kto need --adapter (their reference is the base with it off); "
                   "--max-length is then tokens per sequence (prompt + one completion)")
    p.add_argument("--beta", type=float, help="dpo, orpo, simpo, kto: the objective's beta (default: the task's)")
    p.add_argument("--loss-type", nargs="+", metavar="TYPE", help="dpo: TRL's loss type(s), e.g. sigmoid, ipo, "
                   "hinge (default: sigmoid)")
    p.add_argument("--scores", metavar="OUT.jsonl", help="--task reward or dpo: also write every record's rewards, "
                   "one JSON line per record in input order: {line, chosen, rejected} for a pair, {line, score} for "
                   "a single completion (prompt/completion, messages or text records); a record dropped by "
                   "truncation or --skip-bad-records gets no line (dropped_records counts them)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --scores file")
    p.add_argument("--skip-bad-records", action="store_true", help="drop (and count) bad records instead of "
                   "stopping at the first")


def _demo_command(sub):
    """``jaxft demo``'s arguments."""
    p = _command(sub, "demo", _demo, help="run the offline end-to-end demo")
    p.add_argument("--out", default="jaxft-demo", help="output folder (default: ./jaxft-demo)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _generate_command(sub):
    """``jaxft generate``'s arguments."""
    p = _command(sub, "generate", _generate, help="generate from a model (+ adapter)")
    p.add_argument("model", help="HF model folder (the base)")
    p.add_argument("--adapter", help="PEFT adapter folder to apply")
    p.add_argument("--quant", choices=["nf4", "fp4"], help="load the base in 4 bits")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--file", help="a file of prompts, one per line")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template as a user turn")
    p.add_argument("--chat-template", metavar="NAME|FILE.jinja", help="the chat template for --chat (implies it): "
                   "a built-in name or a .jinja file, as data.template (default: the tokenizer's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0); the same seed "
                   "gives the same sample")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)


def _export_command(sub):
    """``jaxft export``'s arguments."""
    from jaxft.gguf.layout import GGUF_TYPES

    p = _command(sub, "export", _export, help="export an adapter (PEFT format), a merged HF model, or a GGUF file")
    p.add_argument("model", help="HF model folder (the base)")
    p.add_argument("--adapter", help="PEFT adapter folder (required with --out; optional with --gguf)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output folder")
    where.add_argument("--gguf", metavar="FILE", help="write the merged model as this GGUF file (llama.cpp, Ollama)")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the base weights (--gguf always does)")
    p.add_argument("--gguf-type", choices=sorted(GGUF_TYPES), default="f16",
                   help="type of the GGUF file's 2-D weights (default: f16; norms and biases stay f32)")
    p.add_argument("--overwrite", action="store_true")


def _convert_command(sub):
    """``jaxft convert``'s arguments."""
    p = _command(sub, "convert", _convert, compiles=False, help="convert a GGUF file into a Hugging Face model folder")
    p.add_argument("model", help="GGUF file (*.gguf)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written weights (default float32, which loses nothing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _inspect_command(sub):
    """``jaxft inspect``'s arguments."""
    p = _command(sub, "inspect", _inspect, help="parameter counts and per-device memory of a run config")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--mesh", action="append", type=_mesh_shape, metavar="DATA,FSDP,TENSOR",
                   help="also estimate for this mesh shape (repeatable), e.g. --mesh 1,8,1 --mesh 8,1,1")
    p.add_argument("--devices", type=_at_least(1), metavar="N",
                   help="device count that resolves a -1 in the config's mesh (default: the devices here)")
    p.add_argument("--processes", type=_at_least(1), default=1, metavar="N",
                   help="processes the run has; each feeds data.batch_size rows (default: 1)")
    p.add_argument("--compile", action="store_true",
                   help="also compile the real step on the devices here and print its memory_analysis()")


def _data_command(sub):
    """``jaxft data``'s sub-commands."""
    data = sub.add_parser("data", help="prepare pretraining data", description="Prepare pretraining data.")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = _command(commands, "tokenize", _data_tokenize, compiles=False, help="write a run's pre-tokenized store "
                 "(data.store) from its data.paths", epilog="example: jaxft data tokenize pretrain.yaml")
    p.add_argument("config", help="the run's YAML config (data: {type: text, store: FOLDER, ...})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store folder")


def _plot_command(sub):
    """``jaxft plot``'s arguments."""
    p = _command(sub, "plot", _plot, compiles=False, help="compare runs' loss and eval curves on one figure",
                 epilog="example: jaxft plot runs/r8 runs/r16 --out curves.png")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (each with config.yaml and "
                   "metrics.jsonl)")
    p.add_argument("--out", required=True, help="the PNG to write, e.g. curves.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _tokenizer_command(sub):
    """``jaxft tokenizer train``'s arguments: the fields of :class:`jaxft.data.tokenizer_train.TokenizerTrainConfig`."""
    from jaxft.data.chat import BUILTIN_TEMPLATES
    from jaxft.data.text_config import DOCUMENT_UNITS
    from jaxft.data.tokenizer_train import MODEL_TYPES

    group = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="tokenizer_command",
                                                                               required=True, metavar="ACTION")
    p = _command(group, "train", _tokenizer_train, compiles=False, help="train a tokenizer on text sources",
                 epilog="example: jaxft tokenizer train 'corpus/**/*.txt' --out tok --vocab-size 32000")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="text file, glob, folder, *.jsonl, *.parquet, "
                   "datasets folder or hf:NAME[[:CONFIG]:SPLIT]")
    p.add_argument("--out", required=True, help="the tokenizer folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--vocab-size", type=_at_least(1), default=32000, help="ids in all, special tokens included")
    p.add_argument("--model-type", default="unigram", choices=MODEL_TYPES, help="sentencepiece unigram (default) "
                   "or bpe (Llama-2 style), or byte_bpe (GPT-2 style byte-level BPE)")
    for name in ("bos", "eos", "unk", "pad"):
        p.add_argument(f"--{name}-token", metavar="TOKEN", help=f"the {name.upper()} token (default: sentencepiece "
                       "<s> </s> <unk>; byte_bpe <|endoftext|> as BOS and EOS; no pad token)")
    p.add_argument("--extra-special-token", action="append", metavar="TOKEN", help="another special token, one id "
                   "(repeatable), e.g. <|im_start|>")
    p.add_argument("--add-bos-token", action=argparse.BooleanOptionalAction, help="add BOS to every encoded text "
                   "(default: yes for sentencepiece, no for byte_bpe)")
    p.add_argument("--add-eos-token", action="store_true", help="add EOS to every encoded text")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True, help="sentencepiece: "
                   "characters outside the vocabulary as UTF-8 byte tokens instead of <unk> (default: yes)")
    p.add_argument("--character-coverage", type=float, default=0.9995, help="sentencepiece: the share of characters "
                   "the vocabulary covers (the rest: bytes or <unk>)")
    p.add_argument("--max-documents", type=_at_least(1), metavar="N", help="read at most N documents")
    p.add_argument("--max-characters", type=_at_least(1), metavar="N", help="read at most N characters")
    p.add_argument("--max-sentences", type=_at_least(1), metavar="N", help="sentencepiece: train on a seeded random "
                   "sample of N lines of those read (its input_sentence_size)")
    p.add_argument("--chat-template", choices=sorted(BUILTIN_TEMPLATES), help="save this built-in chat template; "
                   "its <|...|> markers become special tokens")
    p.add_argument("--text-field", default="text", help="JSONL / parquet / dataset field holding the text")
    p.add_argument("--document", default="file", choices=DOCUMENT_UNITS, help="a plain text file is one document, "
                   "or one per line / paragraph")
    p.add_argument("--skip-bad-files", action="store_true", help="skip the rest of a file that cannot be read (not "
                   "UTF-8, bad JSON, no text field) with a warning, instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="the same seed and input give the same files")
    p.add_argument("--threads", type=_at_least(1), help="sentencepiece training threads (default: every core)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxft", description="Fine-tune Llama-family models in JAX "
                                     "(LoRA, QLoRA/NF4, full) from Hugging Face folders, on CPU, GPU and TPU meshes.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_command(sub)
    _sweep_command(sub)
    _eval_command(sub)
    _demo_command(sub)
    _generate_command(sub)
    _export_command(sub)
    _convert_command(sub)
    _inspect_command(sub)
    _plot_command(sub)
    _tokenizer_command(sub)
    _data_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.compiles:
            _use_compile_cache(args)
        if args.command in MULTI_PROCESS_COMMANDS:
            _start_processes(args.command)
        return args.func(args)
    except EXPECTED_ERRORS as e:
        if args.debug:
            raise
        message = " ".join(str(e).split())
        print(f"jaxft {args.command}: error: {message}\n(run with --debug for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
