"""Block swap on a full-size A14B expert: step time and peak VRAM by blocks_to_swap (GPU).

One process, one GPU. Measured in this order, each step skipped once `--deadline` seconds have
passed (the skipped ones are listed):

1. host->device copy bandwidth of one bf16 block (0.65 GiB): page-locked by cudaHostRegister
   (what block swap uses), by PyTorch's pinned allocator, and pageable;
2. the bf16 matmul rate (8192^3), for the FLOP floor of a forward pass;
3. the Wan2.1 VAE (full size, random float32 weights) decoding 720p: peak memory of 2-latent-
   frame decodes per tile size, then the full 81 frames with the largest tile whose probe
   leaves room, under a simulated 12 GB card;
4. the DiT (T2V-A14B expert, 40 blocks, random weights made on the GPU; bf16, and fp8-kept
   weights as `quant="fp8_e4m3fn"` stores them), one forward pass = one model evaluation of a
   sampling step (CFG makes a step two of them), for each (dtype, size, blocks_to_swap) in
   PLAN's priority order. `auto@N` is `auto_blocks_to_swap` under a simulated N GB card:
   `torch.cuda.set_per_process_memory_fraction` at N GiB less CARD_RESERVE (the CUDA context
   and the display take that much of a real card outside PyTorch's allocator). Each result:
   forward time, the ratio to blocks_to_swap=0 at the same size and dtype measured in this run,
   peak allocated and reserved VRAM, the activation estimate, and whether the output is
   bit-identical to the resident model's.

    python bench/block_swap.py --out results.json [--deadline 300] [--dry-run]

`--dry-run` runs the same code on the CPU with a tiny model (the swap machinery with the CPU as
its device), to check the script before spending GPU time.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wan_core.dit.model as dit_model  # noqa: E402
from wan_core.configs import T2V_A14B_DIT  # noqa: E402
from wan_core.dit import WanDiT  # noqa: E402
from wan_core.offload import activation_bytes, auto_blocks_to_swap  # noqa: E402
from wan_core.offload.buffers import PinnedBuffer  # noqa: E402
from wan_core.ops.linear import convert_linears_to_fp8, quantize_fp8  # noqa: E402

GIB = 2 ** 30
CARD_RESERVE = GIB // 2
SIZES = {"480p": (480, 832), "720p": (720, 1280)}
FRAMES = 81
# (dtype, size, setting, timed forwards), most important first; a setting is a block count,
# "auto@<GB>", "staged@<count>" (host copies not pinned) or "unchunked@0" (CHUNK_TOKENS off).
PLAN = [
    ("bf16", "480p", 0, 2), ("bf16", "480p", 40, 2),
    ("bf16", "720p", 0, 2), ("bf16", "720p", 40, 2),
    ("fp8", "720p", 40, 1), ("fp8", "720p", "auto@12", 1),
    ("bf16", "720p", "auto@12", 1), ("bf16", "720p", "auto@16", 1), ("bf16", "720p", "auto@24", 1),
    ("fp8", "720p", 0, 1), ("fp8", "720p", "auto@16", 1), ("fp8", "720p", "auto@24", 1),
    ("bf16", "480p", "auto@12", 1), ("bf16", "480p", "auto@16", 1), ("bf16", "480p", "auto@24", 1),
    ("bf16", "480p", "staged@40", 1), ("bf16", "480p", "unchunked@0", 1),
    ("bf16", "480p", 10, 1), ("bf16", "480p", 20, 1), ("bf16", "480p", 30, 1),
    ("fp8", "480p", 0, 2), ("fp8", "480p", 40, 1), ("fp8", "480p", "auto@12", 1), ("fp8", "480p", "auto@16", 1),
    ("fp8", "480p", "auto@24", 1),
    ("bf16", "720p", "unchunked@0", 1), ("bf16", "720p", 20, 1), ("fp8", "720p", 20, 1),
    ("bf16", "720p", 10, 1), ("bf16", "720p", 30, 1), ("fp8", "720p", 10, 1), ("fp8", "720p", 30, 1),
    ("fp8", "480p", 10, 1), ("fp8", "480p", 20, 1), ("fp8", "480p", 30, 1),
]
VAE_TILES = (256, 384, 512, 640)


def random_tensor(name: str, meta: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Random weights on the generator's device, scaled as wan_core.testing draws them: matrices
    and kernels N(0, 1/fan_in), norm gains 1 + N(0, 0.2^2), the rest N(0, 0.2^2)."""
    value = torch.randn(meta.shape, generator=generator, device=generator.device, dtype=dtype)
    if meta.ndim >= 2 and not name.endswith("modulation"):
        return value / math.sqrt(math.prod(meta.shape[1:]))
    gain = "." in name and name.split(".")[-2].startswith("norm") and name.endswith(".weight")
    return value * 0.2 + (1 if gain else 0)


def random_expert(config, device: torch.device, *, fp8: bool = False) -> WanDiT:
    """A DiT with random weights made on `device` (bf16, or fp8-kept block linears with
    per-tensor scales), as load_dit would hold it."""
    with torch.device("meta"):
        model = WanDiT(config)
    if fp8:
        convert_linears_to_fp8(model.blocks, fp8_dtype=torch.float8_e4m3fn, bias_dtype=torch.bfloat16)
    generator = torch.Generator(device).manual_seed(0)
    tensors = {}
    for name, meta in model.state_dict().items():
        if name.endswith(".weight_scale"):
            continue
        value = random_tensor(name, meta, generator, torch.bfloat16)
        if meta.dtype == torch.float8_e4m3fn:
            tensors[name], tensors[name + "_scale"] = quantize_fp8(value)
        else:
            tensors[name] = value
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = time.perf_counter()
        self.cuda = not args.dry_run
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.report: dict = {"skipped": [], "results": []}
        self.log = open(args.log, "a") if args.log else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {text}"
        print(line, flush=True)
        if self.log:
            self.log.write(line + "\n")
            self.log.flush()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn) -> float:
        self.sync()
        begin = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - begin

    def cap(self, gigabytes) -> None:
        """Simulate a card of `gigabytes` GB (None: the whole GPU)."""
        if not self.cuda:
            return
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        fraction = 1.0 if gigabytes is None else (gigabytes * GIB - CARD_RESERVE) / total
        torch.cuda.set_per_process_memory_fraction(fraction, self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> tuple[int, int]:
        if not self.cuda:
            return 0, 0
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)

    # --- 1, 2 ----------------------------------------------------------------------------------

    def bandwidth(self, nbytes: int) -> None:
        if not self.cuda:
            return
        target = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        begin = time.perf_counter()
        registered = PinnedBuffer(nbytes)  # page-locked while this object lives
        seconds = time.perf_counter() - begin
        self.report["pinning_GBps"] = nbytes / seconds / 1e9
        self.say(f"page-locking {nbytes / GIB:.2f} GiB (allocate + cudaHostRegister): {seconds * 1e3:.0f} ms, "
                 f"{'registered' if registered._unregister else 'torch pin_memory fallback'}")
        sources = {"pinned (cudaHostRegister)": registered.tensor,
                   "pinned (torch pin_memory)": torch.empty(nbytes, dtype=torch.uint8, pin_memory=True),
                   "pageable": torch.empty(nbytes, dtype=torch.uint8)}
        for name, source in sources.items():
            source.fill_(1)
            target.copy_(source, non_blocking=True)
            seconds = statistics.median(self.timed(lambda: target.copy_(source, non_blocking=True)) for _ in range(5))
            self.report.setdefault("bandwidth_GBps", {})[name] = nbytes / seconds / 1e9
            self.say(f"host->device {name}: {nbytes / seconds / 1e9:.1f} GB/s ({nbytes / GIB:.2f} GiB in "
                     f"{seconds * 1e3:.1f} ms)")

    def matmul_rate(self) -> None:
        n = 8192 if self.cuda else 512
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        a @ b
        seconds = statistics.median(self.timed(lambda: a @ b) for _ in range(10))
        self.report["matmul_TFLOPs"] = 2 * n ** 3 / seconds / 1e12
        self.say(f"bf16 matmul {n}^3: {self.report['matmul_TFLOPs']:.0f} TFLOP/s")

    # --- 3: the VAE ----------------------------------------------------------------------------

    def vae(self) -> None:
        from wan_core.vae import WAN21_VAE, Tiling, WanVAE

        config = WAN21_VAE if self.cuda else WAN21_VAE.tiny(8, 8)
        height, width = SIZES["720p"] if self.cuda else (64, 96)
        with torch.device("meta"):
            vae = WanVAE(config)
        generator = torch.Generator(self.device).manual_seed(0)
        vae.load_state_dict({name: random_tensor(name, meta, generator, torch.float32) if meta.is_floating_point()
                             else torch.zeros_like(meta, device=self.device)
                             for name, meta in vae.state_dict().items()}, strict=True, assign=True)
        vae.eval()
        generator = torch.Generator().manual_seed(0)
        latent = torch.randn(1, config.z_dim, 21, height // 8, width // 8, generator=generator).to(self.device)
        probes = {}
        with torch.no_grad():
            vae.decode(latent[:, :, :1], tile=Tiling((256, 256), (64, 64)))  # kernels chosen and loaded
            for tile in VAE_TILES if self.cuda else (32,):
                self.cap(None)
                self.reset_peak()
                before = torch.cuda.memory_allocated() if self.cuda else 0
                seconds = self.timed(lambda: vae.decode(latent[:, :, :2], tile=Tiling((tile, tile), (64, 64) if
                                                                                        self.cuda else (16, 16))))
                probes[tile] = self.peaks()[1] - before
                self.say(f"VAE 720p, 2 latent frames, tile {tile} overlap 64: peak reserved "
                         f"{probes[tile] / GIB:.2f} GiB above the weights, {seconds:.1f} s")
            canvas = 3 * FRAMES * height * width * 4  # the float32 output video
            fitting = [t for t, p in probes.items() if p + canvas + GIB <= 12 * GIB - CARD_RESERVE] or [min(probes)]
            tile = max(fitting)
            self.cap(12)
            self.reset_peak()
            before = torch.cuda.memory_allocated() if self.cuda else 0
            try:
                seconds = self.timed(lambda: vae.decode(latent, tile=Tiling((tile, tile), (64, 64) if self.cuda
                                                                            else (16, 16))))
                allocated, reserved = self.peaks()
                full = {"tile": tile, "seconds": seconds, "peak_allocated": allocated, "peak_reserved": reserved,
                        "weights_and_latent": before}
                self.say(f"VAE 720p x {FRAMES} frames, tile {tile} overlap 64, simulated 12 GB card: "
                         f"{seconds:.1f} s, peak allocated {allocated / GIB:.2f} GiB, reserved {reserved / GIB:.2f} GiB")
            except torch.cuda.OutOfMemoryError:
                full = {"tile": tile, "oom": True}
                self.say(f"VAE tile {tile}: out of memory under the 12 GB cap")
            self.cap(None)
        self.report["vae"] = {"probes_reserved_above_weights": probes, "full_decode": full}
        del vae, latent
        if self.cuda:
            torch.cuda.empty_cache()

    # --- 4: the DiT ----------------------------------------------------------------------------

    def expert(self, dtype: str) -> WanDiT:
        config = T2V_A14B_DIT if self.cuda else T2V_A14B_DIT.tiny(dim=256, num_heads=2, ffn_dim=384, text_dim=4096,
                                                                   freq_dim=256, num_layers=40)
        return random_expert(config, self.device, fp8=dtype == "fp8")

    def inputs(self, size: str) -> dict:
        height, width = SIZES[size] if self.cuda else (32, 48)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(1, 16, (FRAMES - 1) // 4 + 1, height // 8, width // 8, generator=generator)
        context = torch.randn(512, 4096, generator=generator) * 0.5
        return {"x": x.to(self.device, torch.bfloat16), "t": torch.tensor([900.0], device=self.device),
                "context": [context.to(self.device, torch.bfloat16)]}

    def flops(self, model: WanDiT, inputs: dict) -> float:
        c = model.config
        tokens = math.prod(s // p for s, p in zip(inputs["x"].shape[2:], c.patch_size))
        text = c.text_len
        per_block = (2 * tokens * (6 * c.dim ** 2 + 2 * c.dim * c.ffn_dim) + 2 * text * 2 * c.dim ** 2
                     + 4 * tokens * tokens * c.dim + 4 * tokens * text * c.dim)
        return c.num_layers * per_block

    def set_up(self, model: WanDiT, setting, size: str) -> int:
        layers = model.config.num_layers
        kind, _, value = str(setting).partition("@")
        dit_model.CHUNK_TOKENS = 10 ** 9 if kind == "unchunked" else self.chunk_tokens
        if not value:
            count, host_memory = int(kind), "pinned"
        elif kind == "auto":
            self.cap(int(value))
            free = None if self.cuda else int(value) * GIB // 2000  # a tiny model: a tiny card
            count = auto_blocks_to_swap(model, self.device, latent_shape=self.shape[size], free_memory=free)
            host_memory = "pinned"
        else:
            count, host_memory = int(value), "staged" if kind == "staged" else "pinned"
        if self.cuda:
            model.enable_block_swap(count, device=self.device, host_memory=host_memory)
        elif count:
            model.placement.enable_swap(range(layers - count, layers), "cpu", prefetch=1, pinned=host_memory == "pinned")
        else:
            model.disable_block_swap()
        return count

    def dit(self) -> None:
        self.chunk_tokens = dit_model.CHUNK_TOKENS
        models: dict[str, WanDiT] = {}
        inputs = {size: self.inputs(size) for size in SIZES}
        self.shape = {size: tuple(v["x"].shape) for size, v in inputs.items()}
        reference, base_time, active = {}, {}, None
        for dtype, size, setting, repeats in PLAN:
            label = f"{dtype} {size} {setting}"
            estimate = base_time.get((dtype, size), 3.0 if size == "480p" else 12.0) * (repeats + 1) + 5
            if self.elapsed() + estimate > self.args.deadline:
                self.report["skipped"].append(label)
                continue
            if dtype not in models:
                if active is not None:
                    models[active].to("cpu")
                begin = time.perf_counter()
                models[dtype] = self.expert(dtype)
                self.say(f"{dtype} expert made on the device in {time.perf_counter() - begin:.1f} s")
            elif active != dtype:
                models[active].to("cpu")
            active = dtype
            model = models[dtype]
            try:
                begin = time.perf_counter()
                count = self.set_up(model, setting, size)
                model.to(self.device)
                setup = time.perf_counter() - begin
                if (dtype, size) not in base_time and setting == 0:  # first use of this size: kernels
                    with torch.no_grad():
                        self.timed(lambda: model(**inputs[size]))
                self.reset_peak()
                out = None
                times = []
                for _ in range(repeats):
                    with torch.no_grad():
                        def forward():
                            nonlocal out
                            out = model(**inputs[size])
                        times.append(self.timed(forward))
                allocated, reserved = self.peaks()
                seconds = min(times)
                if setting == 0:
                    base_time[(dtype, size)], reference[(dtype, size)] = seconds, out
                base = base_time.get((dtype, size))
                identical = None if (dtype, size) not in reference else torch.equal(out, reference[(dtype, size)])
                result = {"dtype": dtype, "size": size, "setting": str(setting), "blocks_swapped": count,
                          "seconds": times, "ratio_to_resident": seconds / base if base else None,
                          "floor_fraction": self.flops(model, inputs[size]) / self.report["matmul_TFLOPs"] / 1e12
                          / seconds, "peak_allocated": allocated, "peak_reserved": reserved,
                          "weights_on_device": model.placement.device_bytes(),
                          "activation_estimate": activation_bytes(model, self.shape[size]),
                          "bit_identical_to_resident": identical, "setup_seconds": setup}
                self.say(f"{label}: {count} swapped, {seconds:.3f} s" +
                         (f" (x{seconds / base:.3f} of resident)" if base else "") +
                         f", peak {allocated / GIB:.2f} GiB allocated / {reserved / GIB:.2f} reserved, weights "
                         f"{result['weights_on_device'] / GIB:.2f} GiB, est. activations "
                         f"{result['activation_estimate'] / GIB:.2f} GiB, identical {identical}")
            except torch.cuda.OutOfMemoryError as error:
                result = {"dtype": dtype, "size": size, "setting": str(setting), "oom": str(error)[:200]}
                self.say(f"{label}: out of memory")
            finally:
                self.cap(None)
                dit_model.CHUNK_TOKENS = self.chunk_tokens
            self.report["results"].append(result)
            out = None

    def run(self) -> None:
        self.report["device"] = torch.cuda.get_device_name() if self.cuda else platform.processor() or "cpu"
        self.report["torch"] = torch.__version__
        self.say(f"{self.report['device']}, torch {torch.__version__}")
        self.bandwidth(40 * 2 ** 24)  # ~ one bf16 A14B block (0.65 GiB)
        self.matmul_rate()
        self.vae()
        self.dit()
        self.say(f"skipped (deadline): {self.report['skipped']}")
        table(self.report)


def table(report: dict) -> None:
    print("\n| dtype | size | blocks_to_swap | swapped | forward s | x resident | FLOP floor | peak alloc GiB | "
          "peak reserved GiB | weights GiB | est. act. GiB | bit-identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        if "oom" in r:
            print(f"| {r['dtype']} | {r['size']} | {r['setting']} | | OOM | | | | | | | |")
            continue
        ratio = f"{r['ratio_to_resident']:.3f}" if r["ratio_to_resident"] else ""
        print(f"| {r['dtype']} | {r['size']} | {r['setting']} | {r['blocks_swapped']} | {min(r['seconds']):.3f} | "
              f"{ratio} | {r['floor_fraction']:.1%} | {r['peak_allocated'] / GIB:.2f} | "
              f"{r['peak_reserved'] / GIB:.2f} | {r['weights_on_device'] / GIB:.2f} | "
              f"{r['activation_estimate'] / GIB:.2f} | {r['bit_identical_to_resident']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--log", type=Path, default=None, help="also append the progress lines to this file")
    parser.add_argument("--deadline", type=float, default=300, help="start no step after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (checks the script)")
    args = parser.parse_args()
    bench = Bench(args)
    try:
        bench.run()
    finally:
        if args.out:
            args.out.write_text(json.dumps(bench.report, indent=1, default=str))


if __name__ == "__main__":
    main()
