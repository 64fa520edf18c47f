"""The headline GPU run (issue 21): one table of the numbers that say where the project stands against its peers.

``python -m bench.headline --out OUTDIR`` (``bench/gpu_headline.sh OUTDIR`` on a GPU) writes ``headline.json`` and
``headline.md`` in OUTDIR, in three sections, each under its own time cap (shares of ``--budget``; a row that is
still running at its section's end is stopped by an alarm, and the rows after it are skipped with that reason):

- ``train``: one whole training step (forward, backward, fused AdamW) of the ``--preset`` on ``--batch`` x ``--seq``
  tokens in ``--dtype``: ours with ``--backend auto``, ``triton`` and ``triton`` under ``torch.compile``; the
  nanoGPT-style model (``bench.common.NanoGPTLike``: SDPA attention) eager and compiled; transformers'
  ``GPT2LMHeadModel`` (SDPA). Tokens/s, MFU against the matmul rate measured here (``Ceilings.matmul_median``), peak
  memory.
- ``ops``: each op forward + backward at ``--op-shape`` for ours (``triton``), ``native`` (PyTorch's fastest built-ins,
  where the registry has that backend) and the reference under ``torch.compile``: host time per call (the Python
  call's return, before any synchronisation) and device time (CUDA events around the call; wall time after a
  synchronisation on a CPU). A row whose host time is at least 80% of its device time is host-bound: the GPU waited
  for the launches.
- ``decode``: cached greedy decoding, batch 1, of ``--decode-preset`` in ``--dtype``: ours eager (``graph=False``),
  the static step run eagerly, the static step replayed as a CUDA graph (``gpt2.decode``), and transformers'
  ``generate`` with its weights in the same dtype. New tokens/s over the whole call; the graph's tokens are checked
  against the eager path's.

Every row fails soft: its error is recorded and the rest runs. ``--rows`` picks rows by name (``train:auto``,
``ops:triton``, ``decode:graph``...). On a CPU the same code runs on small presets, which is how its plumbing is
tested (bench/test_bench_tools.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import resource
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import common
from bench.shapes import parse_shape

# In the order they run: the goals' rows first, the slowest to compile last, so a section cut short keeps them.
TRAIN_ROWS = ("auto", "nanogpt-like-compile", "triton", "nanogpt-like", "transformers", "triton-compile")
OP_IMPLS = ("triton", "native", "torch-compile")
DECODE_ROWS = ("eager", "static", "graph", "transformers")
SECTIONS = {"train": TRAIN_ROWS, "ops": OP_IMPLS, "decode": DECODE_ROWS}
# Each section's share of the budget; what is left over covers the start (imports, the matmul rate) and the files.
SHARES = {"train": 0.45, "ops": 0.28, "decode": 0.17}
ROW_SHARE = 0.6  # no row runs past this share of its section's time
GOALS = {"train_auto_vs_nanogpt_compile": 1.15, "train_auto_tokens_per_s": 470e3, "decode_graph_tokens_per_s": 1000,
         "decode_graph_vs_transformers": 3.0}


_BUDGET = {"s": 330.0}  # the run's --budget, for the rows' caps


class RowTimeout(Exception):
    """A row ran past the time left to its section."""


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise RowTimeout in the main thread after ``seconds`` (SIGALRM; a C++ call is interrupted when it returns)."""
    def fire(signum, frame):
        raise RowTimeout(f"stopped after {seconds:.0f} s: the section's time cap")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _free(device: torch.device) -> None:
    """Let the next row start from an empty device: dynamo's caches hold the compiled rows' models."""
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # the process's peak so far


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    return common.autocast(device, dtype)


def _hf(model, dtype: torch.dtype | None = None):
    """transformers' twin of ``model`` (SDPA attention), in ``dtype`` when given; ImportError where transformers is
    missing (``hf_twin`` says so with a pytest skip)."""
    try:
        twin = common.hf_twin(model, "transformers")
    except BaseException as e:  # pytest's Skipped is a BaseException
        if type(e).__name__ == "Skipped":
            raise ImportError(str(e)) from None
        raise
    return twin.to(dtype) if dtype is not None and dtype != torch.float32 else twin


# ----------------------------------------------------------------------------------------------- train step


def train_row(name: str, args, device: torch.device, dtype: torch.dtype, matmul: dict | None) -> dict:
    """One training-step row: ms per step, tokens/s, MFU against ``matmul``, peak memory."""
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig.from_preset(args.preset)
    B, T = args.batch, min(args.seq, config.block_size)
    compiled = name.endswith("-compile")
    base = name.removesuffix("-compile")
    ours = base in ("auto", "triton", "torch", "ext", "native")
    if base == "triton" and device.type == "cpu":
        raise ValueError("triton runs on the CPU only under TRITON_INTERPRET=1, an interpreter far too slow to time")
    model = GPT(config, backend=base if ours else "torch").to(device).train()
    model.check_inputs = False
    if ours:
        model.set_backend(base)
        if hasattr(model, "choose_backends"):  # ops left to auto are timed before torch.compile traces
            model.choose_backends(B, T, dtype, mode="train")
        trained, loss_of = model, (lambda m: lambda idx, tg: m(idx, tg)[1])
    elif base == "nanogpt-like":
        trained, loss_of = common.NanoGPTLike.from_gpt(model), (lambda m: lambda idx, tg: m(idx, tg)[1])
    elif base == "transformers":
        trained, loss_of = _hf(model), (lambda m: lambda idx, tg: m(idx, labels=idx).loss)
    else:
        raise ValueError(f"unknown train row {name!r}; rows are {', '.join(TRAIN_ROWS)}")
    flops = model.flops_per_token(T) * B * T
    if trained is not model:
        del model
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    fn = loss_of(torch.compile(trained) if compiled else trained)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randint(0, config.vocab_size, (B, T), device=device, generator=gen),) * 2 for _ in range(2)]

    def step(i):
        idx, targets = batches[i % len(batches)]
        with _autocast(device, dtype):
            loss = fn(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(3 if compiled else 2):  # compilation, autotuning, optimizer state
        step(i)
    common.synchronize(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    common.synchronize(device)
    t = (time.perf_counter() - t0) / args.steps
    row = {"ms_per_step": 1e3 * t, "tokens_per_s": B * T / t, "tflops": flops / t / 1e12,
           "mfu_vs_measured": flops / t / (matmul["tflops"] * 1e12) if matmul else None,
           "peak_mem_mib": _peak_mib(device), "loss": float(loss.detach())}
    return row


# ----------------------------------------------------------------------------------------------- ops


def _has_backend(name: str) -> bool:
    import gpt2_kernels.registry

    return name in gpt2_kernels.registry.BACKENDS


def op_rows(args, device: torch.device, dtype: torch.dtype, deadline: float, wanted: tuple) -> list[dict]:
    """Every (op, implementation) row of the ops section, each forward + backward at ``args.op_shape``."""
    shape = parse_shape(args.op_shape)
    dname = {v: k for k, v in common.DTYPES.items()}[dtype]
    rows = []
    for impl in wanted:  # every op of one implementation, then the next: a section cut short loses whole columns
        for op in args.ops:
            module = importlib.import_module(f"bench.bench_{op}")
            if impl == "native" and not _has_backend("native"):
                rows.append({"section": "ops", "op": op, "name": impl, "skipped": "the registry has no native "
                             "backend here (issue 'auto never slower' has not landed)"})
                continue
            case = common.OpCase(op, impl, "fwd+bwd", dname, shape)
            rows.append(_run_row("ops", impl, deadline, device,
                                 lambda c=case, m=module: op_row(c, m, device, dtype, args), op=op, shape=shape.name))
    return rows


def op_row(case, module, device: torch.device, dtype: torch.dtype, args) -> dict:
    """Host and device ms per forward + backward call of one op implementation."""
    fn = common.load_impl(case, device, module.PEERS)
    s = module.make_inputs(case.shape, dtype, device, torch.Generator(device=device).manual_seed(1234))

    def call():
        out = fn(*s.args, **s.kwargs)
        g = s.grad_out if s.grad_out is not None else torch.ones_like(out)
        torch.autograd.grad(out, s.grad_inputs, g)

    for _ in range(2):  # compilation, autotuning, allocator
        call()
    host, dev = [], []
    for _ in range(args.reps):
        common.synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        call()
        host.append(time.perf_counter() - t0)
        if device.type == "cuda":
            end.record()
            end.synchronize()
            dev.append(start.elapsed_time(end) / 1e3)
        else:
            dev.append(time.perf_counter() - t0)
    h, d = statistics.median(host), statistics.median(dev)
    return {"host_ms": 1e3 * h, "device_ms": 1e3 * d, "bound": "host" if h >= 0.8 * d else "device"}


# ----------------------------------------------------------------------------------------------- decoding


def decode_setup(args, device: torch.device):
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    block = max(GPTConfig.from_preset(args.decode_preset).block_size, args.prompt + args.new_tokens)
    model = GPT(GPTConfig.from_preset(args.decode_preset, block_size=block), backend="auto").to(device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), device=device, generator=gen)
    return model, prompt


def decode_row(name: str, model, prompt: torch.Tensor, args, device: torch.device, dtype: torch.dtype,
               eager_tokens: dict) -> dict:
    """New tokens/s of one decoder over whole calls (prefill included), the median of ``args.reps`` calls."""
    from gpt2 import decode

    n = args.new_tokens
    if name == "transformers":
        twin = _hf(model, dtype)

        def run():
            with torch.no_grad():
                return twin.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                     pad_token_id=0, attention_mask=torch.ones_like(prompt))
    elif name == "static":
        def run():
            with _autocast(device, dtype), torch.no_grad():
                return torch.cat([prompt] + list(decode.stream(model, prompt, n, greedy=True)), dim=1)
    elif name in ("eager", "graph"):
        def run():
            with _autocast(device, dtype):
                return model.generate(prompt, n, greedy=True, graph=name == "graph")
    else:
        raise ValueError(f"unknown decode row {name!r}; rows are {', '.join(DECODE_ROWS)}")
    run()  # compilation, capture, allocator
    times = []
    for _ in range(args.reps):
        common.synchronize(device)
        t0 = time.perf_counter()
        out = run()
        common.synchronize(device)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    row = {"tokens_per_s": n / t, "ms_per_call": 1e3 * t}
    if name == "eager":
        eager_tokens["tokens"] = out
    elif "tokens" in eager_tokens:
        row["same_tokens_as_eager"] = bool(torch.equal(out.to(eager_tokens["tokens"].device), eager_tokens["tokens"]))
    return row


def decode_rows(args, device: torch.device, dtype: torch.dtype, deadline: float, names: tuple) -> list[dict]:
    """The decoding section's rows, on one model and prompt."""
    if not names:
        return []
    try:
        model, prompt = decode_setup(args, device)
    except Exception as e:  # noqa: BLE001 - every row fails soft
        return [{"section": "decode", "name": n, "error": f"{type(e).__name__}: {e}"} for n in names]
    eager: dict = {}
    return [_run_row("decode", n, deadline, device, lambda n=n: decode_row(n, model, prompt, args, device, dtype,
                                                                           eager)) for n in names]


# ----------------------------------------------------------------------------------------------- driver


def _run_row(section: str, name: str, deadline: float, device: torch.device, fn, **labels) -> dict:
    """``fn()``'s numbers as a row, or its error; skipped when the section's time is up."""
    row = {"section": section, "name": name, **labels}
    left = min(deadline - time.monotonic(), ROW_SHARE * SHARES[section] * _BUDGET["s"])
    if left < 2:
        row["skipped"] = "the section's time cap was reached"
        return row
    t0 = time.monotonic()
    try:
        with _alarm(left):
            row.update(fn())
    except Exception as e:  # noqa: BLE001 - every row fails soft
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        row["error"] = f"{type(e).__name__}: {msg}"
    row["seconds"] = round(time.monotonic() - t0, 2)
    _free(device)
    return row


def run(args) -> dict:
    device = common.bench_device() if args.device == "auto" else torch.device(args.device)
    if args.dtype == "auto":
        from gpt2.runtime import auto_dtype

        dtype = auto_dtype(device)[0] if device.type == "cuda" else torch.float32
    else:
        dtype = common.DTYPES[common.DTYPE_ALIASES.get(args.dtype, args.dtype)]
    start = time.monotonic()
    wanted = _wanted(args.rows)
    _BUDGET["s"] = args.budget
    result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "device": common.device_name(device), "dtype": str(dtype).replace("torch.", ""),
              "torch": torch.__version__, "budget_s": args.budget,
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "rows": []}
    matmul = None
    if args.matmul == "measure" and wanted["train"]:
        try:
            matmul = common.Ceilings(device).matmul_median(dtype)
        except Exception as e:  # noqa: BLE001
            result["matmul_error"] = f"{type(e).__name__}: {e}"
    result["matmul"] = matmul
    rows = result["rows"]
    deadline = time.monotonic()
    section_rows = {"train": lambda names, deadline: [
        _run_row("train", n, deadline, device, lambda n=n: train_row(n, args, device, dtype, matmul)) for n in names],
        "ops": lambda names, deadline: op_rows(args, device, dtype, deadline, names),
        "decode": lambda names, deadline: decode_rows(args, device, dtype, deadline, names)}
    for section in ("train", "ops", "decode"):
        deadline = max(deadline, time.monotonic()) + SHARES[section] * args.budget
        rows += section_rows[section](wanted[section], deadline)
    result["goals"] = goals(rows)
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def _wanted(rows: list[str] | None) -> dict[str, tuple]:
    """The rows to run per section: every row, or those ``--rows`` names as ``section:name`` (or ``section`` for all
    of a section's rows)."""
    if not rows:
        return dict(SECTIONS)
    picked: dict[str, list] = {s: [] for s in SECTIONS}
    for item in rows:
        section, _, name = item.partition(":")
        if section not in SECTIONS or (name and name not in SECTIONS[section]):
            known = ", ".join(f"{s}:{n}" for s, ns in SECTIONS.items() for n in ns)
            raise SystemExit(f"--rows: unknown row {item!r}; rows are {known}")
        picked[section] += [name] if name else list(SECTIONS[section])
    return {s: tuple(dict.fromkeys(v)) for s, v in picked.items()}


def _find(rows: list[dict], section: str, name: str, key: str):
    for r in rows:
        if r["section"] == section and r["name"] == name and key in r:
            return r[key]
    return None


def goals(rows: list[dict]) -> dict:
    """Issue 21's goals, each with the value this run measured (None where a row did not run) and whether it is met."""
    auto, nano = _find(rows, "train", "auto", "tokens_per_s"), _find(rows, "train", "nanogpt-like-compile",
                                                                     "tokens_per_s")
    graph, hf = _find(rows, "decode", "graph", "tokens_per_s"), _find(rows, "decode", "transformers", "tokens_per_s")
    values = {"train_auto_vs_nanogpt_compile": auto / nano if auto and nano else None,
              "train_auto_tokens_per_s": auto, "decode_graph_tokens_per_s": graph,
              "decode_graph_vs_transformers": graph / hf if graph and hf else None}
    return {k: {"value": v, "goal": GOALS[k], "met": None if v is None else v >= GOALS[k]} for k, v in values.items()}


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return format(v, spec) if isinstance(v, float) else str(v)


def _note(r: dict) -> str:
    return (r.get("error") or r.get("skipped") or "").replace("|", "/")


def markdown(result: dict) -> str:
    """The Markdown tables of a ``run`` result."""
    rows, cfg = result["rows"], result["config"]
    mm = result.get("matmul")
    out = [f"# Headline run, {result['date']} on {result['device']} ({result['dtype']}, torch {result['torch']})", "",
           f"Matmul rate: {_fmt(mm['tflops'])} TFLOP/s ({mm['how']})" if mm else "Matmul rate: not measured", ""]
    train = [r for r in rows if r["section"] == "train"]
    nano = _find(rows, "train", "nanogpt-like-compile", "tokens_per_s")
    if train:
        out += [f"## Train step {cfg['preset']} {cfg['batch']} x {cfg['seq']}", "",
                "| row | ms/step | tokens/s | MFU (measured matmul) | peak MiB | vs nanogpt-like compiled | note |",
                "|---|---|---|---|---|---|---|"]
        for r in train:
            tps = r.get("tokens_per_s")
            mfu = r.get("mfu_vs_measured")
            out.append(f"| {r['name']} | {_fmt(r.get('ms_per_step'), '.1f')} | {_fmt(tps, '.0f')} | "
                       f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {_fmt(r.get('peak_mem_mib'), '.0f')} | "
                       f"{f'{tps / nano:.2f}x' if tps and nano else '-'} | {_note(r)} |")
        out.append("")
    ops = sorted((r for r in rows if r["section"] == "ops"), key=lambda r: cfg["ops"].index(r["op"]))  # by op
    if ops:
        out += [f"## Ops forward + backward at {cfg['op_shape']}", "",
                "| op | impl | host ms | device ms | bound | vs torch-compile | note |", "|---|---|---|---|---|---|---|"]
        for r in ops:
            d, ref = r.get("device_ms"), _find([x for x in ops if x.get("op") == r["op"]], "ops", "torch-compile",
                                                "device_ms")
            out.append(f"| {r['op']} | {r['name']} | {_fmt(r.get('host_ms'), '.3f')} | {_fmt(d, '.3f')} | "
                       f"{r.get('bound', '-')} | {f'{ref / d:.2f}x' if d and ref else '-'} | {_note(r)} |")
        out.append("")
    dec = [r for r in rows if r["section"] == "decode"]
    hf = _find(rows, "decode", "transformers", "tokens_per_s")
    if dec:
        out += [(f"## Decoding {cfg['decode_preset']}, batch 1, greedy, prompt {cfg['prompt']}, "
                 f"{cfg['new_tokens']} new tokens"), "",
                "| row | tokens/s | ms/call | vs transformers | same tokens as eager | note |", "|---|---|---|---|---|---|"]
        for r in dec:
            tps = r.get("tokens_per_s")
            out.append(f"| {r['name']} | {_fmt(tps, '.0f')} | {_fmt(r.get('ms_per_call'), '.1f')} | "
                       f"{f'{tps / hf:.2f}x' if tps and hf else '-'} | {_fmt(r.get('same_tokens_as_eager'))} | "
                       f"{_note(r)} |")
        out.append("")
    out += ["## Goals (issue 21)", "", "| goal | measured | target | met |", "|---|---|---|---|"]
    for k, g in result["goals"].items():
        out.append(f"| {k} | {_fmt(g['value'])} | {_fmt(g['goal'])} | {_fmt(g['met'])} |")
    out += ["", f"Total: {result['seconds']} s of a {result['budget_s']} s budget."]
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.headline", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for headline.json and headline.md")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (the GPU's own: bf16 from sm_80; fp32 on a CPU), fp32, bf16")
    p.add_argument("--preset", default="gpt2", help="the train step's preset (default gpt2, the 124M model)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row (default 10)")
    p.add_argument("--op-shape", default="124M-B16-T1024", help="the ops' shape (bench/shapes.py names)")
    p.add_argument("--ops", default=",".join(common.OPS), help=f"ops to time (default {','.join(common.OPS)})")
    p.add_argument("--reps", type=int, default=5, help="timed calls per op or decoding row (default 5)")
    p.add_argument("--decode-preset", default="gpt2")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rows", default=None, help="comma-separated rows to run, as section:name or section "
                   "(default all: train, ops, decode)")
    p.add_argument("--matmul", choices=["measure", "skip"], default="measure",
                   help="measure the matmul rate MFU is taken against (about 10 s on a CPU), or skip it")
    p.add_argument("--budget", type=float, default=330, help="seconds for the whole run (default 330)")
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in args.ops if o not in common.OPS]
    if bad:
        p.error(f"--ops: unknown op(s) {', '.join(bad)}; ops are {', '.join(common.OPS)}")
    args.rows = [r for r in args.rows.split(",") if r] if args.rows else None
    for name in ("batch", "seq", "steps", "reps", "prompt", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (out / "headline.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out / "headline.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
