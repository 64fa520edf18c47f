"""GPU hazards check: what a real GPU does that the interpreter and the ahead-of-time report cannot show.

    python -m bench.hazards --out DIR          # on a GPU machine (about a minute on an H100)
    python -m bench.hazards --out DIR --smoke  # the script's own plumbing, tiny sizes, on the CPU interpreter

Each section runs on its own (a failure is recorded, not fatal) and adds rows to DIR/hazards_NAME.json
(``--json-name``); a table is printed last. Sections:

- ``env``: device, capability, what torch says of bf16 (with and without emulation), versions.
- ``ceilings``: a device-to-device copy (GB/s, bytes read + written) and a bf16 matmul (TFLOP/s), medians.
- ``specialise``: every Triton op at the integer values the JIT specialises (1, multiples of 16) and the
  dropout seeds 0, 1, 16, 17: compiles, runs, and matches the reference. The JIT's own compile hook records
  every specialisation it compiled (kernel, signature, constexprs, which arguments it took as 1 or as
  divisible by 16) into DIR/jit_NAME.json.
- ``fp16_loss_scale``: the fused loss head's dW of the rows that are never a target, in fp16 under a
  gradient seed of 65536, against a float64 reference, for each backend.
- ``grad_scaler``: 20 fp16 GradScaler training steps against fp32 on the same batches, per backend.
- ``loss_stride``: the loss head's GEMMs and the Triton loss kernel at row stride 50257 against 50304.
- ``loss_chunks``: the Triton loss head's forward + backward time and peak memory per chunk size.
- ``determinism``: two backward passes of one model on one batch, bitwise.
- ``decode``: greedy cached decoding tokens/s per backend, and how many Triton compiles decoding caused.
- ``plan_memory``: ``gpt2 plan``'s step memory against the allocator's real peak, and the step time, per recompute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from gpt2_kernels.runtime import default_dtype

ROWS: list[dict] = []
SPECIALISATIONS: list[dict] = []


def row(section: str, what: str, value, note: str = "") -> None:
    ROWS.append({"section": section, "what": what, "value": value, "note": note})
    print(f"[{section}] {what}: {value} {note}", flush=True)


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return text[:300]


def median_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    """Median time of ``fn`` in ms, with CUDA events (host clock + synchronize on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref||, with ||ref|| floored at 1e-6 per element: a gradient that is exactly zero in exact
    arithmetic (one key: softmax's gradient vanishes) is compared on an absolute scale, not divided by zero."""
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(y).all():
        return float("nan")
    return float((y - ref).norm() / ref.norm().clamp(min=1e-6 * ref.numel() ** 0.5))


# ---------------------------------------------------------------------------------------------------------------------


def install_jit_hook() -> None:
    """Record every Triton compile (the JIT's own specialisation) into SPECIALISATIONS."""
    try:
        from triton import knobs
    except ImportError:
        return

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        configs = compile.get("configs") or [{}]
        attrs = configs[0]
        try:
            attrs = {str(k): str(v) for k, v in dict(attrs).items()}
        except Exception:  # noqa: BLE001 - the attrs format changed between Triton versions
            attrs = str(attrs)
        SPECIALISATIONS.append({
            "kernel": fn.name, "signature": {str(k): str(v) for k, v in compile["signature"].items()},
            "constants": {str(k): str(v) for k, v in compile["constants"].items()}, "attrs": attrs,
            "num_warps": compile["num_warps"], "num_stages": compile["num_stages"],
        })
        return False

    knobs.runtime.jit_cache_hook = hook


def compiles() -> int:
    return len(SPECIALISATIONS)


# ---------------------------------------------------------------------------------------------------------------------


def sec_env(dev, smoke):
    import triton

    row("env", "torch / triton", f"{torch.__version__} / {triton.__version__}")
    if dev.type != "cuda":
        row("env", "device", "cpu (interpreter)")
        return
    row("env", "device", torch.cuda.get_device_name(dev))
    row("env", "capability", torch.cuda.get_device_capability(dev))
    row("env", "is_bf16_supported()", torch.cuda.is_bf16_supported())
    with contextlib.suppress(TypeError):
        row("env", "is_bf16_supported(including_emulation=False)", torch.cuda.is_bf16_supported(False))
    p = torch.cuda.get_device_properties(dev)
    row("env", "SMs / shared per block optin", f"{p.multi_processor_count} / "
        f"{getattr(p, 'shared_memory_per_block_optin', '?')}")


def sec_ceilings(dev, smoke):
    n = (1 << 28) if not smoke else (1 << 16)  # 256 Mi bf16 elements = 512 MiB
    a = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    ms = median_ms(lambda a=a, b=b: b.copy_(a))
    row("ceilings", "d2d copy GB/s (read+write)", round(2 * a.numel() * 2 / ms / 1e6, 1), f"{ms:.3f} ms")
    m = 8192 if not smoke else 64
    x = torch.randn(m, m, device=dev, dtype=default_dtype(dev))
    y = torch.randn_like(x)
    ms = median_ms(lambda: x @ y)
    row("ceilings", f"matmul {m}^3 {x.dtype} TFLOP/s", round(2 * m**3 / ms / 1e9, 1), f"{ms:.3f} ms")


def _ops(backend, dev):
    import gpt2_kernels.registry
    return gpt2_kernels.registry.build_ops(backend, dev)


def sec_specialise(dev, smoke):
    from gpt2_kernels import ref
    from gpt2_kernels.attention import attention_bwd, attention_fwd

    dt = torch.float32
    # attention: Tq, Tk pairs that hit the 1 and 16-divisible specialisations (shift = Tk - Tq too).
    for Tq, Tk in ((1, 1), (1, 2), (1, 16), (1, 17), (2, 17), (16, 16), (16, 32), (17, 33), (64, 65)):
        try:
            q = torch.randn(1, 2, Tq, 64, device=dev, dtype=dt)
            k = torch.randn(1, 2, Tk, 64, device=dev, dtype=dt)
            v = torch.randn(1, 2, Tk, 64, device=dev, dtype=dt)
            o, lse = attention_fwd(q, k, v, True, 0.0, 0)
            do = torch.randn_like(o)
            dq, dk, dv = attention_bwd(do, q, k, v, o, lse, True, 0.0, 0)
            qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
            orf = ref.attention(qr, kr, vr, True, 0.0)
            orf.backward(do)
            err = max(rel_err(o, orf), rel_err(dq, qr.grad), rel_err(dk, kr.grad), rel_err(dv, vr.grad))
            row("specialise", f"attention Tq={Tq} Tk={Tk} fp32 fwd+bwd rel err", f"{err:.2e}")
        except Exception as e:  # noqa: BLE001
            row("specialise", f"attention Tq={Tq} Tk={Tk}", "ERROR", _short(e))
    for seed in (0, 1, 2, 16, 17, 2**31 - 2):
        try:
            q = torch.randn(1, 2, 33, 64, device=dev, dtype=dt)
            o, lse = attention_fwd(q, q, q, True, 0.1, seed)
            dq, dk, dv = attention_bwd(torch.randn_like(o), q, q, q, o, lse, True, 0.1, seed)
            row("specialise", f"attention dropout seed={seed}", "ok" if torch.isfinite(dq).all() else "NaN")
        except Exception as e:  # noqa: BLE001
            row("specialise", f"attention dropout seed={seed}", "ERROR", _short(e))
    tri = _ops("triton", dev)
    for n in (1, 2, 16, 17):
        for name, fn in (("layer_norm", _check_ln), ("mlp", _check_mlp), ("loss", _check_loss)):
            try:
                row("specialise", f"{name} rows={n} fp32 fwd+bwd rel err", f"{fn(tri, n, dev):.2e}")
            except Exception as e:  # noqa: BLE001
                row("specialise", f"{name} rows={n}", "ERROR", _short(e))
    for V in (1, 16, 17, 50257):
        try:
            row("specialise", f"loss V={V} rows=8 rel err", f"{_check_loss(tri, 8, dev, V=V):.2e}")
        except Exception as e:  # noqa: BLE001
            row("specialise", f"loss V={V}", "ERROR", _short(e))


def _grads_vs_ref(fn, ref_fn, inputs, out_grad=None):
    a = [t.detach().clone().requires_grad_() for t in inputs]
    b = [t.detach().clone().requires_grad_() for t in inputs]
    ya, yb = fn(*a), ref_fn(*b)
    g = torch.randn_like(yb) if out_grad is None else out_grad
    ya.backward(g)
    yb.backward(g)
    return max([rel_err(ya, yb)] + [rel_err(x.grad, y.grad) for x, y in zip(a, b)])


def _check_ln(ops, n, dev):
    from gpt2_kernels import ref

    x, w, b = torch.randn(n, 768, device=dev), torch.randn(768, device=dev), torch.randn(768, device=dev)
    return _grads_vs_ref(ops.layer_norm, ref.layer_norm, [x, w, b])


def _check_mlp(ops, n, dev):
    from gpt2_kernels import ref

    C = 64
    x = torch.randn(n, C, device=dev)
    ws = [torch.randn(4 * C, C, device=dev) * 0.1, torch.randn(4 * C, device=dev) * 0.1,
          torch.randn(C, 4 * C, device=dev) * 0.1, torch.randn(C, device=dev) * 0.1]
    return _grads_vs_ref(ops.mlp, ref.mlp, [x] + ws)


def _check_loss(ops, n, dev, V=97):
    from gpt2_kernels import ref

    h, w = torch.randn(n, 64, device=dev), torch.randn(V, 64, device=dev) * 0.1
    t = torch.randint(0, V, (n,), device=dev)
    return _grads_vs_ref(lambda a, b: ops.linear_cross_entropy(a, b, t), lambda a, b: ref.linear_cross_entropy(a, b, t),
                         [h, w], out_grad=torch.tensor(1.0, device=dev))


def sec_fp16_loss_scale(dev, smoke):
    import gpt2_kernels.registry
    from gpt2_kernels import ref

    N, V, C = (4096, 16384, 64) if not smoke else (256, 1024, 32)
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, C, generator=g) * 0.5
    w = torch.randn(V, C, generator=g) * 0.5
    t = torch.randint(0, V // 8, (N,), generator=g)  # only the first V/8 rows are ever a target
    seed = 65536.0
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    (ref.linear_cross_entropy(h64, w64, t) * seed).backward()
    never = torch.ones(V, dtype=torch.bool)
    never[t.unique()] = False
    row("fp16_loss_scale", "shape N, V, C / non-target rows", f"{N}, {V}, {C} / {int(never.sum())}")
    for backend in ("torch", "triton", "ext"):
        if gpt2_kernels.registry.unavailable_reason(backend, dev) is not None:
            continue
        try:
            op = gpt2_kernels.registry.build_ops(backend, dev).linear_cross_entropy
            hh = h.to(dev, torch.float16).requires_grad_()
            ww = w.to(dev, torch.float16).requires_grad_()
            (op(hh, ww, t.to(dev)) * seed).backward()
            dw = ww.grad.double().cpu()
            zero = (dw[never] == 0).all(dim=1).float().mean().item()
            row("fp16_loss_scale", f"{backend}: dW non-target rows rel err",
                f"{rel_err(dw[never], w64.grad[never]):.2e}",
                f"all-zero rows {zero:.1%}")
            row("fp16_loss_scale", f"{backend}: dW target rows rel err", f"{rel_err(dw[~never], w64.grad[~never]):.2e}")
            row("fp16_loss_scale", f"{backend}: dh rel err", f"{rel_err(hh.grad.cpu(), h64.grad):.2e}")
        except Exception as e:  # noqa: BLE001
            row("fp16_loss_scale", backend, "ERROR", _short(e))


def _model(preset, backend, dev, **kw):
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset(preset, **kw), backend=backend).to(dev)


def sec_grad_scaler(dev, smoke):
    import gpt2_kernels.registry
    steps = 20 if not smoke else 3
    preset, B, T = ("shakespeare", 8, 128) if not smoke else ("tiny", 2, 16)
    torch.manual_seed(1)
    cfg_model = _model(preset, "torch", dev)
    V = cfg_model.config.vocab_size
    batches = [torch.randint(0, V, (B, T + 1), device=dev) for _ in range(steps)]
    ref_losses = None
    for backend in ("torch", "triton", "ext"):
        if gpt2_kernels.registry.unavailable_reason(backend, dev) is not None:
            continue
        for dtype in (torch.float32, torch.float16):
            try:
                model = _model(preset, backend, dev)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
                losses = []
                for xb in batches:
                    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                        _, loss = model(xb[:, :-1], xb[:, 1:])
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                if ref_losses is None:
                    ref_losses = losses
                diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
                row("grad_scaler", f"{backend} {str(dtype)[6:]}: loss first/last, max |diff| vs torch fp32",
                    f"{losses[0]:.4f} / {losses[-1]:.4f}", f"max diff {diff:.4f}")
            except Exception as e:  # noqa: BLE001
                row("grad_scaler", f"{backend} {dtype}", "ERROR", _short(e))


def sec_loss_stride(dev, smoke):
    for dt in ({default_dtype(dev), torch.float16} if dev.type == "cuda" else (torch.float32,)):
        _loss_stride(dev, dt, smoke)


def _loss_stride(dev, dt, smoke):
    rows, C = (2048, 768) if not smoke else (64, 32)
    V, Vp = (50257, 50304) if not smoke else (257, 320)
    h = torch.randn(rows, C, device=dev, dtype=dt)
    w = torch.randn(Vp, C, device=dev, dtype=dt) * 0.05
    targets = torch.randint(0, V, (rows,), device=dev)
    odd = torch.empty(rows, V, device=dev, dtype=dt)
    pad = torch.empty(rows, Vp, device=dev, dtype=dt)[:, :V]
    name = str(dt)[6:]
    for label, z in (("stride 50257", odd), ("stride 50304 (view)", pad)):
        times = _loss_gemm_times(h, w[:V], z, targets, V)
        row("loss_stride", f"{name} {label}: logits GEMM (out=) / matmul / dh GEMM / dW GEMM / CE kernel ms",
            " / ".join(f"{x:.3f}" for x in times))
    # The padded layout as the fix runs it: the product into a (rows, Vp) buffer from the padded weight.
    zp = torch.empty(rows, Vp, device=dev, dtype=dt)
    times = [median_ms(lambda: torch.mm(h, w.t(), out=zp)), median_ms(lambda: torch.mm(zp, w)),
             median_ms(lambda: torch.mm(zp.t(), h))]
    row("loss_stride", f"{name} padded weight (Vp rows): logits GEMM / dh / dW ms",
        " / ".join(f"{x:.3f}" for x in times))


def _loss_gemm_times(h, wv, z, t, V):
    from gpt2_kernels import linear_cross_entropy as lce

    out = [median_ms(lambda: torch.mm(h, wv.t(), out=z) if z.is_contiguous() else z.copy_(h @ wv.t())),
           median_ms(lambda: torch.matmul(h, wv.t())), median_ms(lambda: torch.mm(z, wv)),
           median_ms(lambda: torch.mm(z.t(), h))]
    scale = torch.ones(1, device=h.device)
    z.normal_()
    return out + [median_ms(lambda: lce.cross_entropy_rows_(z, t, V, -1, scale))]


def sec_loss_chunks(dev, smoke):
    from gpt2_kernels import chunked_loss
    from gpt2_kernels import linear_cross_entropy as lce

    N, C, V = (8192, 768, 50257) if not smoke else (256, 32, 257)
    dt = default_dtype(dev)
    h = torch.randn(N, C, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(V, C, device=dev, dtype=dt) * 0.05).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)
    flops = 6 * N * C * V
    for rows in ((256, 512, 1024, 2048, 4096, 8192) if not smoke else (64, 256)):
        try:
            def step(rows=rows):
                h.grad = w.grad = None
                plan = chunked_loss.ChunkPlan(rows, chunked_loss.padded_vocab(V))
                chunked_loss.linear_cross_entropy(h, w, t, -1, lce.cross_entropy_rows_, compute_dtype=dt,
                                                  plan=plan).backward()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            ms = median_ms(step, warmup=2, reps=7)
            peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else float("nan")
            row("loss_chunks", f"triton {str(dt)[6:]} N={N} chunk={rows} (padded): fwd+bwd ms, TFLOP/s, peak MiB",
                f"{ms:.3f}, {flops / ms / 1e9:.0f}, {peak:.0f}")
        except Exception as e:  # noqa: BLE001
            row("loss_chunks", f"chunk={rows}", "ERROR", _short(e))


def sec_determinism(dev, smoke):
    import gpt2_kernels.registry
    preset, B, T = ("gpt2", 4, 256) if not smoke else ("tiny", 2, 16)
    for backend in ("triton", "ext"):
        if gpt2_kernels.registry.unavailable_reason(backend, dev) is not None:
            continue
        try:
            model = _model(preset, backend, dev)
            x = torch.randint(0, model.config.vocab_size, (B, T + 1), device=dev)
            grads = []
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=default_dtype(dev), enabled=dev.type == "cuda"):
                    _, loss = model(x[:, :-1], x[:, 1:])
                loss.backward()
                grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
            same = sum(bool(torch.equal(a, b)) for a, b in zip(*grads))
            row("determinism", f"{backend}: params with bitwise-equal grads over two backwards",
                f"{same}/{len(grads[0])}")
        except Exception as e:  # noqa: BLE001
            row("determinism", backend, "ERROR", _short(e))


def sec_decode(dev, smoke):
    import torch.nn.functional as F

    import gpt2_kernels.registry
    from gpt2_kernels.attention import attention_fwd

    dt = default_dtype(dev)
    for Tk in ((128, 1024) if not smoke else (16,)):
        q = torch.randn(1, 12, 1, 64, device=dev, dtype=dt)
        k, v = torch.randn(1, 12, Tk, 64, device=dev, dtype=dt), torch.randn(1, 12, Tk, 64, device=dev, dtype=dt)
        t_tri = median_ms(lambda q=q, k=k, v=v: attention_fwd(q, k, v, True))
        t_sdpa = median_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        row("decode", f"attention Tq=1 Tk={Tk} B=1 nh=12 {str(dt)[6:]}: triton / SDPA us",
            f"{t_tri * 1e3:.1f} / {t_sdpa * 1e3:.1f}")

    preset, prompt, new = ("gpt2", 64, 128) if not smoke else ("tiny", 4, 8)
    for backend in ("torch", "triton", "ext"):
        if gpt2_kernels.registry.unavailable_reason(backend, dev) is not None:
            continue
        for dtype in ((default_dtype(dev), torch.float32) if dev.type == "cuda" else (torch.float32,)):
            try:
                model = _model(preset, backend, dev).eval()
                idx = torch.randint(0, model.config.vocab_size, (1, prompt), device=dev)
                with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                    model.generate(idx, 4, greedy=True)  # warm-up: compiles the prompt's and a step's kernels
                    c0 = compiles()
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    model.generate(idx, new, greedy=True)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    dt_s = time.perf_counter() - t0
                row("decode", f"{backend} {str(dtype)[6:]} {preset} B=1 prompt {prompt}: tok/s, Triton compiles while "
                    f"decoding {new}", f"{new / dt_s:.1f}, {compiles() - c0}")
            except Exception as e:  # noqa: BLE001
                row("decode", f"{backend} {dtype}", "ERROR", _short(e))


def sec_plan_memory(dev, smoke):
    """``gpt2 plan``'s step memory (parameters, gradients, AdamW, activations; no slack, no context) against the
    allocator's peak over a real bf16 train step (fused AdamW), and the step time, per recompute mode."""
    from gpt2 import plan as P

    dtype = default_dtype(dev)
    cases = ([("gpt2", 8), ("gpt2-medium", 8)] if not smoke else [("tiny", 2)])
    T = 1024 if not smoke else 16
    for preset, B in cases:
        for mode in ("none", "block"):
            try:
                model = _model(preset, "triton", dev, block_size=T)
                model.set_recompute(mode)
                req = P.Request(model.config, preset, 80.0, T, dtype, tokens_per_step=B * T,
                                backend="triton", device_type="cuda")
                spec, _ = P.trace_spec("triton", "cuda")
                parts = P._parts(req, P.activation_lines(model.config, T, dtype, mode, spec), B)
                predicted = parts["total"] - parts["slack"] - parts["context"]
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
                xb = torch.randint(0, model.config.vocab_size, (B, T + 1), device=dev)

                def step(model=model, opt=opt, xb=xb):
                    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                        _, loss = model(xb[:, :-1], xb[:, 1:])
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                step()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                ms = median_ms(step, warmup=1, reps=5 if not smoke else 1)
                real = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else float("nan")
                row("plan_memory", f"{preset} B={B} T={T} {str(dtype)[6:]} recompute={mode}: planned / real GiB, ms",
                    f"{predicted / 2**30:.2f} / {real / 2**30:.2f}, {ms:.1f}", f"real/planned {real / predicted:.3f}")
                del model, opt, step
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                row("plan_memory", f"{preset} {mode}", "ERROR", _short(e))


SECTIONS = {
    "env": sec_env, "ceilings": sec_ceilings, "specialise": sec_specialise, "fp16_loss_scale": sec_fp16_loss_scale,
    "grad_scaler": sec_grad_scaler, "loss_stride": sec_loss_stride, "loss_chunks": sec_loss_chunks,
    "determinism": sec_determinism, "decode": sec_decode, "plan_memory": sec_plan_memory,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the JSON files")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU run of the plumbing")
    p.add_argument("--only", default="", help="comma-separated sections (default: all)")
    p.add_argument("--json-name", default="all", help="names the files: hazards_NAME.json, jit_NAME.json")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("hazards: no GPU; rerun with TRITON_INTERPRET=1 --smoke for the CPU plumbing run", file=sys.stderr)
        return 2
    install_jit_hook()
    names = [s for s in a.only.split(",") if s] or list(SECTIONS)
    for name in names:
        t0 = time.perf_counter()
        try:
            SECTIONS[name](dev, a.smoke)
        except Exception as e:  # noqa: BLE001
            row(name, "section", "ERROR", _short(e))
            traceback.print_exc()
        row(name, "seconds", round(time.perf_counter() - t0, 1))
        (out / f"hazards_{a.json_name}.json").write_text(json.dumps(ROWS, indent=1))
        (out / f"jit_{a.json_name}.json").write_text(json.dumps(SPECIALISATIONS, indent=1))
    print("\n| section | what | value | note |\n|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['section']} | {r['what']} | {r['value']} | {r['note']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
