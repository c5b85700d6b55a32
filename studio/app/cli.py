"""`python -m studio`: merge and plan from the command line, with mergekit-moe's flag names."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path

from studio.errors import StudioError
from studio.inspect.settings import ChatSettings

SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12,
              "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
ROUTE_SETTINGS = ChatSettings(temperature=0.0, max_new_tokens=32)  # `route` answers short and greedy
IGNORED_FLAGS = {
    "--allow-crimes": "architecture checks are always on and explain each misfit",
    "--lazy-unpickle": "tensors are always read lazily",
    "--clone-tensors": "tensors are never shared between outputs",
    "--low-cpu-memory": "the merge always streams one tensor at a time",
    "--write-model-card": "a model card is always written",
    "--cuda": "use --device cuda",
}


def parse_size(text: str) -> int:
    """Bytes from '500M', '5B' (mergekit: billions of bytes), '2GiB' or a plain number."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    unit = match and match[2].upper()
    if not match or unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 500M, 5B or 2GiB")
    return int(float(match[1]) * SIZE_UNITS[unit])


def positive_int(text: str) -> int:
    """An integer of at least 1 (a batch of 0 or -1 prompts cannot run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; give 1 or more")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio", description="Build Mixture-of-Experts models "
                                     "from dense fine-tunes (mergekit-moe compatible).")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge a mergekit-moe config into a model folder")
    merge.add_argument("config", help="mergekit-moe YAML config")
    merge.add_argument("out", help="output folder")
    merge.add_argument("--out-shard-size", type=parse_size, default=parse_size("5B"),
                       help="maximum bytes per weight file: 500M, 5B, 2GiB (default 5B)")
    merge.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                       help="where the hidden-state pass runs; auto spreads the base over every GPU, then CPU")
    merge.add_argument("--load-in-4bit", action="store_true", help="run the hidden-state pass in 4-bit")
    merge.add_argument("--load-in-8bit", action="store_true", help="run the hidden-state pass in 8-bit")
    merge.add_argument("--random-seed", type=int, help="seed for random gates and noise_scale")
    merge.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_identical_experts",
                       action="store_true", help="allow every expert to be the same model")
    merge.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                       help="gate_mode expert_text: train the written routers end to end on the experts' text when "
                            "the merged model fits the device (default on)")
    merge.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                       help="copy the base tokenizer into the output (default on)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder when done")
    merge.add_argument("--quality-text", metavar="TEXTS",
                       help="after the merge, score held-out texts (YAML as for `quality`, or `zoo`) with the base, "
                            "each expert and the MoE; the table goes to the log and the model card")
    merge.add_argument("--batch-size", type=positive_int, default=16,
                       help="prompts per forward pass for hidden gates (1 or more)")
    _common(merge)

    plan = commands.add_parser("plan", help="check a config's models and estimate sizes; writes nothing")
    plan.add_argument("config", help="mergekit-moe YAML config")
    plan.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_identical_experts",
                      action="store_true", help=argparse.SUPPRESS)
    _common(plan)

    routing = commands.add_parser("eval-routing", help="how often held-out prompts reach their intended expert")
    routing.add_argument("model", help="merged MoE folder")
    routing.add_argument("prompts", help="YAML mapping each expert (index or source model) to held-out prompts")
    _common(routing)

    quality = commands.add_parser("quality", help="held-out loss of the MoE, its base and each expert per domain, "
                                                  "and the share of each expert's gain the MoE keeps")
    quality.add_argument("model", help="merged MoE folder (its mergekit_moe_config.yml names the base and experts)")
    quality.add_argument("texts", help="YAML mapping each expert (index, source model or folder name) to held-out "
                                       "texts (strings or {file: path}, a path or hf://datasets/OWNER/NAME/FILE), or "
                                       "`zoo` for the bundled zoo's own")
    quality.add_argument("--max-tokens", type=positive_int, default=16_384, help="tokens scored per domain")
    _common(quality)

    chat = commands.add_parser("chat", help="chat with an MoE in the terminal; after each reply, the dominant "
                                            "expert of each layer")
    chat.add_argument("model", help="MoE folder or Hub id")
    _generation_flags(chat, None)
    _common(chat)

    route = commands.add_parser("route", help="which expert each layer chose for every token of a prompt and its "
                                              "answer: a table, and figures in an HTML file")
    route.add_argument("model", help="MoE folder or Hub id")
    route.add_argument("prompt", help="the user message (or, with --raw, the text itself)")
    route.add_argument("--layer", type=int, help="decoder layer of the token heatmap (default: the last MoE layer)")
    route.add_argument("--html", default="route.html", help="where the figures go (default route.html)")
    route.add_argument("--json", help="also save the trace as JSON here")
    route.add_argument("--csv", help="also save the trace as CSV here (one row per token and layer)")
    _generation_flags(route, ROUTE_SETTINGS)
    _common(route)

    preview = commands.add_parser("preview", help="which expert each layer would choose for each token of a test "
                                                  "prompt, computed from a config without merging")
    preview.add_argument("config", help="mergekit-moe YAML config")
    preview.add_argument("prompt", nargs="+", help="test prompts, encoded as the config encodes its own prompts")
    preview.add_argument("--gate-mode", help="try another gate mode than the config's")
    preview.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    preview.add_argument("--html", help="also write the figures of each prompt to this HTML file")
    _common(preview)
    return parser


def _generation_flags(parser: argparse.ArgumentParser, fallback: ChatSettings | None) -> None:
    """Sampling flags; those left out come from `fallback`, or when it is None from the model's
    generation_config.json, else ChatSettings' own (`_load_chat`)."""
    defaults = fallback or ChatSettings()
    where = "" if fallback else "the model's generation_config.json, else "

    def default(name: str) -> str:
        return f"(default {where}{getattr(defaults, name):g})"

    parser.add_argument("--precision", default="4bit", help="4bit (NF4, experts included; default), 8bit, bf16, fp32")
    parser.add_argument("--device", default="auto",
                        help="auto (default) spreads the model over every GPU, then the CPU; cpu; cuda")
    parser.add_argument("--system", default="", help="system prompt")
    parser.add_argument("--temperature", type=float, help=f"0 is greedy {default('temperature')}")
    parser.add_argument("--top-p", type=float, help=f"nucleus sampling {default('top_p')}")
    parser.add_argument("--top-k", type=int, help=f"sample among the k likeliest tokens {default('top_k')}")
    parser.add_argument("--max-new-tokens", type=positive_int, help=f"answer length limit {default('max_new_tokens')}")
    parser.add_argument("--repetition-penalty", type=float, help=f"1 is off {default('repetition_penalty')}")
    parser.add_argument("--stop", action="append", default=[], help="stop the answer at this text (repeatable)")
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--raw", action="store_true",
                        help="continue the text as it is (BOS + text), without the chat template: for base models "
                             "and the zoo's code, math and stories experts")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run code that ships with a model, from the Hub or its folder (Phi MoE and DeepSeek "
                             "MoE merges need it); only for models you trust")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging; tracebacks on error")


def _strip_ignored(argv: list[str]) -> tuple[list[str], list[str]]:
    kept, notes = [], []
    for arg in argv:
        flag = arg.split("=")[0]
        if flag in IGNORED_FLAGS or flag.replace("--no-", "--") in IGNORED_FLAGS:
            notes.append(f"Note: {flag} is accepted for mergekit compatibility and does nothing here: "
                         f"{IGNORED_FLAGS[flag.replace('--no-', '--')]}.")
        else:
            kept.append(arg)
    return kept, notes


class Stopped(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP: unwinds like Ctrl-C, so a merge removes its staging folder on every one."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Set by the signal handler; a merge polls it, so a signal whose KeyboardInterrupt some library swallowed
# (an early Ctrl-C during imports) still stops the merge before anything is renamed into place.
STOP = threading.Event()
MAX_MESSAGE = 4000
LOADS_MODELS = {"merge", "quality", "eval-routing", "chat", "route", "preview"}  # transformers loads their models
SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
_DEFERRED: dict = {"on": False, "pending": None}  # inside _signals_deferred: a signal waits for the block's end


def _on_signal(signum: int, frame) -> None:
    STOP.set()
    if _DEFERRED["on"]:
        _DEFERRED["pending"] = signum
        return
    raise Stopped(signum)


def _catch_signals() -> dict:
    """Install the handler; returns the previous handlers (main() called in-process puts them back)."""
    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _on_signal) for signum in SIGNALS}


@contextmanager
def _signals_deferred():
    """SIGINT, SIGTERM and SIGHUP that arrive while the block runs are raised (as Stopped) when it ends."""
    _DEFERRED["on"] = True
    try:
        yield
    finally:
        _DEFERRED["on"] = False
        pending, _DEFERRED["pending"] = _DEFERRED["pending"], None
        if pending is not None:
            raise Stopped(pending)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error exits 2 with one paragraph (the traceback only with -v)."""
    argv, notes = _strip_ignored(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(argv)
    for note in notes:
        print(note, file=sys.stderr)
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)])
    previous = _catch_signals()
    try:
        with _without_loading_bars(args.command != "merge") if args.command in LOADS_MODELS else nullcontext():
            return {"merge": _merge, "plan": _plan, "eval-routing": _eval_routing, "quality": _quality, "chat": _chat,
                    "route": _route, "preview": _preview}[args.command](args)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print(f"Interrupted ({signal.Signals(signum).name}); no output was left behind.", file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # StudioError, and anything else: never a bare traceback
        if args.verbose:
            traceback.print_exc()
        print(f"Error: {_paragraph(exc)}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def _without_loading_bars(hub_bars: bool):
    """transformers' "Loading weights" bars off: the studio says what it loads. huggingface_hub's download bars
    stay on unless `hub_bars` is false (`merge`, whose own bar shows the downloads)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    loading, downloads = transformers_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # which switches huggingface_hub's bars off too
    if downloads and hub_bars:
        enable_progress_bars()
    try:
        yield
    finally:
        if loading:
            transformers_logging.enable_progress_bar()
        (enable_progress_bars if downloads else disable_progress_bars)()


def _paragraph(exc: BaseException) -> str:
    """One paragraph for any error: ours as written, another's with its type and a pointer to -v."""
    if isinstance(exc, StudioError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        text += f" ({type(exc).__name__}). Run with -v for the traceback."
    else:
        text = f"unexpected {type(exc).__name__}: {exc}. Run with -v for the traceback."
    text = re.sub(r"\n\s*\n", "\n", text.strip())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + " [...]"


def _merge(args: argparse.Namespace) -> int:
    from studio.app.progress import MergeBar
    from studio.build.merge import CancelToken, MergeOptions, merge
    from studio.config import load_config
    from studio.devices import check_device

    config = load_config(args.config)
    check_device(args.device)
    texts = _quality_texts(args.quality_text) if args.quality_text else None  # a bad file named before the merge
    options = MergeOptions(out_shard_size=args.out_shard_size, device=args.device, load_in_4bit=args.load_in_4bit,
                           load_in_8bit=args.load_in_8bit, random_seed=args.random_seed,
                           trust_remote_code=args.trust_remote_code,
                           allow_identical_experts=args.allow_identical_experts,
                           copy_tokenizer=args.copy_tokenizer, overwrite=args.overwrite, batch_size=args.batch_size,
                           refine_routers=args.refine)
    shown = _MergeBarOnTerminal(MergeBar.for_config(config))
    try:
        result = merge(config, args.out, options, progress=shown.update, cancel=CancelToken(STOP), log=shown.write)
    finally:
        shown.close()
    if texts:
        _report_quality(result.out, texts, args.trust_remote_code)
    print(result.out)
    return 0


class _MergeBarOnTerminal:
    """The merge's one bar on stderr, as the Build tab shows it: every stage's share, the stages under way in
    words, and log lines printed above it. When stderr is not a terminal (a log file, a pipe), the bar becomes a
    line "[ 45%] stages under way" at most every LINE_EVERY seconds, and one at the end."""

    STEPS = 1000
    LINE_EVERY = 10.0  # seconds

    def __init__(self, merge_bar) -> None:
        self.merge_bar, self.bar, self.lined = merge_bar, None, None
        self.terminal = sys.stderr.isatty()

    def update(self, progress) -> None:
        self.merge_bar.update(progress)
        if not self.terminal:
            self._line(final=progress.stage == "done")
            return
        from tqdm import tqdm

        if self.bar is None:
            with _signals_deferred():  # a bar half-built by an interrupt prints a traceback when collected
                # miniters=0: a new label is drawn even when the share has not moved, at most every mininterval
                self.bar = tqdm(total=self.STEPS, bar_format="{percentage:3.0f}%|{bar:20}| {elapsed} {desc}",
                                miniters=0, mininterval=0.5, file=sys.stderr)
        self.bar.set_description_str(self.merge_bar.label, refresh=False)
        self.bar.update(round(self.merge_bar.fraction * self.STEPS) - self.bar.n)

    def _line(self, final: bool) -> None:
        now = time.monotonic()
        if final or self.lined is None or now - self.lined >= self.LINE_EVERY:
            print(f"[{self.merge_bar.fraction:4.0%}] {self.merge_bar.label}", file=sys.stderr, flush=True)
            self.lined = now

    def write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)  # above the bar, if there is one

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _quality_texts(arg: str) -> dict | str:
    """`zoo`, or the texts of a YAML file (studio.inspect.quality.load_texts)."""
    from studio.inspect.quality import load_texts

    return "zoo" if arg == "zoo" else load_texts(arg)


def _report_quality(model: Path, texts: dict | str, trust_remote_code: bool) -> None:
    """Score the finished merge on held-out text; the table goes to stderr and into the model card."""
    from studio.build.card import quality_section
    from studio.inspect.quality import QualityReport, measure_quality

    report = measure_quality(model, texts, trust_remote_code=trust_remote_code,
                             log=lambda m: print(m, file=sys.stderr))
    print(report.table(), file=sys.stderr)
    with open(Path(model) / "README.md", "a", encoding="utf-8") as card:
        card.write(quality_section(report.rows(), QualityReport.HEADERS))


def _plan(args: argparse.Namespace) -> int:
    from studio.build.plan import compatibility, make_plan
    from studio.build.report import compatibility_table, estimates_table
    from studio.config import check_rules, load_config
    from studio.sources import open_models

    config = load_config(args.config)
    errors, warnings = check_rules(config, args.allow_identical_experts)
    for warning in warnings:
        print(f"Warning: {warning}")
    if errors:  # before any model is opened: these rules need no model file, and Hub models would be downloaded
        raise StudioError("\n".join(errors))
    sources = open_models(config.model_refs(), fetch_weights=False)
    rows, misfits = compatibility(config, sources)
    print(compatibility_table(rows))
    if misfits:
        raise StudioError("\n".join(misfits))
    plan = make_plan(config, sources)
    print()
    print(estimates_table(plan))
    return 0


def _eval_routing(args: argparse.Namespace) -> int:
    from studio import safe_yaml
    from studio.inspect.evaluate import evaluate_routing, load_prompts

    try:  # the prompts file gets the config's limits (size, nesting, aliases, duplicate keys) before it is read
        safe_yaml.load(safe_yaml.decode(Path(args.prompts).read_bytes(), args.prompts), args.prompts)
    except OSError as exc:
        raise StudioError(f"Cannot read the prompts file {args.prompts}: {exc.strerror}.") from None
    print(evaluate_routing(args.model, load_prompts(args.prompts), trust_remote_code=args.trust_remote_code).table())
    return 0


def _quality(args: argparse.Namespace) -> int:
    from studio.inspect.quality import measure_quality

    report = measure_quality(args.model, _quality_texts(args.texts), args.max_tokens, args.trust_remote_code,
                             log=lambda m: print(m, file=sys.stderr))
    print(report.table())
    return 0


def _load_chat(args: argparse.Namespace, fallback=None):
    """The model and the settings to answer with: the flags given, else `fallback`, else the model's own defaults
    (its generation_config.json). The flags are checked before the model is loaded."""
    from dataclasses import replace

    from studio.devices import check_device
    from studio.inspect.chat import load_chat_model

    given = {name: value for name, value in (("temperature", args.temperature), ("top_p", args.top_p),
                                             ("top_k", args.top_k), ("max_new_tokens", args.max_new_tokens),
                                             ("repetition_penalty", args.repetition_penalty)) if value is not None}
    ChatSettings(**given)  # a bad value is named now, not after the load
    check_device(args.device)
    print(f"Loading {args.model} at {args.precision} ...", file=sys.stderr)
    model = load_chat_model(args.model, args.precision, args.device, args.trust_remote_code)
    print(model.describe(), file=sys.stderr)
    settings = replace(fallback or model.defaults, system_prompt=args.system, stop=tuple(args.stop), seed=args.seed,
                       **given)
    if fallback is None:
        print(f"Generation settings from {model.defaults_from}; flags override them.", file=sys.stderr)
    return model, settings


def _chat(args: argparse.Namespace) -> int:
    from studio.trace import RouterTrace

    model, settings = _load_chat(args)
    print("Type a text to continue; /exit (or Ctrl-D) quits." if args.raw else
          "Type a message; /reset starts over, /exit (or Ctrl-D) quits.", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        answer = []
        print("model> ", end="", flush=True)
        for piece in model.stream(line if args.raw else history, settings):
            if isinstance(piece, RouterTrace):
                print(f"\n[{_dominant_line(piece)}]")
            else:
                answer.append(piece)
                print(piece, end="", flush=True)
        history.append({"role": "assistant", "content": "".join(answer)})


def _dominant_line(trace, part: str = "answer") -> str:
    """One line: per layer, the expert that most tokens of the part chose first, and their share."""
    from pathlib import PurePath

    return "  ".join(f"L{layer} {PurePath(trace.labels[e]).name} {share:.0%}"
                     for layer, (e, share) in zip(trace.layers, trace.dominant(part)))


def _route(args: argparse.Namespace) -> int:
    from studio.inspect.plots import write_report

    model, settings = _load_chat(args, fallback=ROUTE_SETTINGS)
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    reply = model.reply(prompt, settings)
    trace = reply.trace
    layer = trace.layers[trace.layer_position(args.layer)] if args.layer is not None else None
    print(f"Answer: {reply.text}\n")
    _print_trace(trace)
    print(f"Answer routing: {_dominant_line(trace)}")
    print(f"Figures: {write_report(trace, args.html, layer)}")
    if args.json:
        trace.save(args.json)
    if args.csv:
        Path(args.csv).write_text(trace.to_csv(), encoding="utf-8")
    return 0


def _print_trace(trace) -> None:
    from studio.formatting import format_table

    rows = [[str(t), trace.part_of(t), repr(token)] + [f"{e} {p:.2f}" for e, p in zip(
            trace.top1()[:, t].tolist(), trace.probabilities[:, t].max(dim=-1).values.tolist())]
            for t, token in enumerate(trace.tokens)]
    print("First-choice expert (and its probability) per token and layer:")
    print(format_table(["#", "part", "token", *(f"L{l}" for l in trace.layers)], rows))
    print("\nExperts: " + ", ".join(f"{e} = {label}" for e, label in enumerate(trace.labels)))


def _preview(args: argparse.Namespace) -> int:
    from studio.build.merge import MergeOptions
    from studio.build.preview import preview_routing
    from studio.config import load_config
    from studio.inspect.plots import write_report

    config = load_config(args.config)
    if args.gate_mode:
        config = config.model_validate({**config.model_dump(), "gate_mode": args.gate_mode})
    from studio.devices import check_device

    check_device(args.device)
    options = MergeOptions(device=args.device, trust_remote_code=args.trust_remote_code)
    log = (lambda m: print(m, file=sys.stderr)) if args.verbose else (lambda m: None)
    traces = preview_routing(config, args.prompt, options, log)
    for i, (prompt, trace) in enumerate(zip(args.prompt, traces)):
        print(f"\nPrompt: {prompt!r}")
        _print_trace(trace)
        print(f"Prompt routing: {_dominant_line(trace, 'prompt')}")
        if args.html:
            path = Path(args.html)
            path = path.with_stem(f"{path.stem}-{i + 1}") if len(traces) > 1 else path
            print(f"Figures: {write_report(trace, path)}")
    return 0
