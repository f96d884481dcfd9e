"""The VAE decode of one 1024² image on one GPU, as the pipeline runs it and in variants: channels-last
3-D activations and weights, cuDNN's autotuner, bf16 instead of fp16 autocast, the 3-D convolutions
as 2-D ones (a conv per temporal tap, or one conv with the taps stacked into the channels; one frame
convolves with the middle tap only). --profile: the pipeline decode's longest kernels.

    python benchmarks/vae_decode.py --size 1024 --profile

The decoder's convolutions are ~104 TFLOP at 1024² (one latent frame decoded to four, the late
levels at full width on four frames); the script prints the rate each variant reaches.

HunyuanImage-3.0's release VAE config (32 latent channels, 16× spatial, one latent frame decoded
to four, the last kept), dummy weights, fp32 weights under autocast as the pipeline decodes
(HunyuanImage3Pipeline.decode). Each variant: a warm-up, then the median of --runs decodes, CUDA
events; its image against the pipeline's (uint8 levels). Writes vae_decode.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from epdiff.models.hunyuan_image3.vae import RELEASE_VAE_CONFIG, AutoencoderKLConv3D, to_uint8

VARIANTS = {  # name: (autocast dtype, channels-last weights and input, cudnn.benchmark, 3-D convs as 2-D: how)
    "pipeline (fp16 autocast)": (torch.float16, False, False, None),
    "+ channels-last": (torch.float16, True, False, None),
    "+ cudnn.benchmark": (torch.float16, False, True, None),
    "3-D convs as 2-D convs over frames": (torch.float16, False, False, "per tap"),
    "3-D convs as one 2-D conv, taps stacked into channels": (torch.float16, False, False, "stacked"),
    "taps stacked, channels-last": (torch.float16, True, False, "stacked"),
    "taps stacked, channels-last, cudnn.benchmark": (torch.float16, True, True, "stacked"),
    "3-D convs without the taps that read zero frames": (torch.float16, False, False, "trimmed"),
}


def conv3d_as_2d(self, x):
    """A zero-padded k×3×3 Conv3d (k = 1 or 3) as 2-D convolutions: each frame's output is the sum
    over the temporal taps of a 2-D conv of the frame that tap reads (a missing frame is zero):
    the frames go into the batch, one 2-D conv per tap."""
    kt = self.kernel_size[0]
    B, C, T, H, W = x.shape
    frames = x.transpose(1, 2).reshape(B * T, C, H, W)
    weight, bias = self.weight, self.bias
    if kt == 1:
        out = F.conv2d(frames, weight[:, :, 0], bias, padding=self.padding[1:])
    else:
        out = None
        for tap in range(kt):  # tap reads frame t + tap - 1
            shift = tap - kt // 2
            lo, hi = max(0, -shift), min(T, T - shift)  # output frames with a real input frame
            if lo >= hi:
                continue
            src = x[:, :, lo + shift:hi + shift].transpose(1, 2).reshape(-1, C, H, W)
            part = F.conv2d(src, weight[:, :, tap], None, padding=self.padding[1:]).view(B, hi - lo, -1, H, W)
            if out is None:
                out = torch.zeros(B, T, part.shape[2], H, W, dtype=part.dtype, device=part.device)
            out[:, lo:hi] += part
        out = out.reshape(B * T, -1, H, W)
        if bias is not None:
            out = out + bias.to(out.dtype)[None, :, None, None]
    return out.view(B, T, -1, H, W).transpose(1, 2)


def conv3d_taps_stacked(self, x):
    """A zero-padded k×3×3 Conv3d as one 2-D convolution per frame batch: frame t's input is frames
    t-1, t, t+1 stacked into the channels (zeros past the ends), the weight's taps likewise. One
    frame: the middle tap alone (the others read zeros)."""
    kt = self.kernel_size[0]
    B, C, T, H, W = x.shape
    if kt == 1 or T == 1:
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)
        out = F.conv2d(frames, self.weight[:, :, kt // 2], self.bias, padding=self.padding[1:])
    else:
        padded = F.pad(x, (0, 0, 0, 0, kt // 2, kt // 2))
        stacked = torch.cat([padded[:, :, tap:tap + T] for tap in range(kt)], dim=1)  # [B, kt·C, T, H, W]
        frames = stacked.transpose(1, 2).reshape(B * T, kt * C, H, W)
        if x.is_contiguous(memory_format=torch.channels_last_3d):
            frames = frames.contiguous(memory_format=torch.channels_last)
        weight = self.weight.permute(0, 2, 1, 3, 4).reshape(self.out_channels, kt * C, *self.kernel_size[1:])
        out = F.conv2d(frames, weight, self.bias, padding=self.padding[1:])
    return out.view(B, T, -1, H, W).transpose(1, 2)


def conv3d_trimmed(self, x):
    """A zero-padded 3×3×3 Conv3d that skips the temporal taps reading the zero frames past the
    ends (exact): the inner frames by a 3-D conv without temporal padding, each end frame by the two
    taps that read real frames; one frame: the middle tap as a 2-D conv. 22 % fewer multiply-adds
    in the release decoder (its levels of one and two frames, and the end frames of four)."""
    kt, T = self.kernel_size[0], x.shape[2]
    if kt != 3:
        return conv3d_original(self, x)
    pad = (0,) + tuple(self.padding[1:])
    weight, bias = self.weight, self.bias
    if T == 1:
        return F.conv2d(x[:, :, 0], weight[:, :, 1], bias, padding=pad[1:]).unsqueeze(2)
    first = F.conv3d(x[:, :, :2], weight[:, :, 1:].contiguous(), bias, padding=pad)
    last = F.conv3d(x[:, :, -2:], weight[:, :, :2].contiguous(), bias, padding=pad)
    inner = [F.conv3d(x, weight, bias, padding=pad)] if T > 2 else []
    return torch.cat([first, *inner, last], dim=2)


conv3d_original = nn.Conv3d.forward


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print the pipeline decode's 15 longest kernels")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    vae = AutoencoderKLConv3D(dict(RELEASE_VAE_CONFIG), with_encoder=False).cuda().eval()
    latents = torch.randn(1, vae.latent_channels, args.size // 16, args.size // 16, device="cuda")
    conv3d = nn.Conv3d.forward
    forwards = {None: conv3d, "per tap": conv3d_as_2d, "stacked": conv3d_taps_stacked, "trimmed": conv3d_trimmed}
    # Every tap counted, as the 3-D kernels compute them: the rate each variant reaches on that work.
    flops = []
    hooks = [m.register_forward_hook(lambda m, i, out: flops.append(2 * out.numel() * m.weight[0].numel()))
             for m in vae.decoder.modules() if isinstance(m, nn.Conv3d)]
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        vae.decode_latents(latents)
    for hook in hooks:
        hook.remove()
    tflop = sum(flops) / 1e12
    print(f"decoder convolutions: {tflop:.1f} TFLOP at {args.size}²", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.inference_mode(), \
                torch.autocast("cuda", dtype=torch.float16):
            vae.decode_latents(latents)
            torch.cuda.synchronize()
        events = [(getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0), e.count, e.key)
                  for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(us for us, _, _ in events)
        print(f"pipeline decode: {total / 1e3:.1f} ms of kernels; the longest:")
        for us, count, key in sorted(events, reverse=True)[:15]:
            print(f"  {us / 1e3:8.2f} ms  x{count:<4d} {key[:120]}")
    results, reference = [], None
    for name, (dtype, channels_last, benchmark, as_2d) in VARIANTS.items():
        torch.backends.cudnn.benchmark = benchmark
        nn.Conv3d.forward = forwards[as_2d]
        model = vae.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
        times = []
        for run in range(args.runs + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                start.record()
                images = model.decode_latents(latents)
                end.record()
            torch.cuda.synchronize()
            if run:
                times.append(start.elapsed_time(end) / 1e3)
        pixels = to_uint8(images.float())
        reference = pixels if reference is None else reference
        differ = (pixels.int() - reference.int()).abs()
        row = dict(variant=name, seconds=statistics.median(times), max_level_diff=int(differ.max()),
                   mean_level_diff=float(differ.float().mean()))
        row["conv_tflops_per_s"] = tflop / row["seconds"]
        results.append(row)
        print(json.dumps(row), flush=True)
    torch.backends.cudnn.benchmark = False
    nn.Conv3d.forward = conv3d
    for row in results:
        print(f"| {row['variant']} | {row['seconds']:.3f} s | {row['conv_tflops_per_s']:.0f} TFLOP/s | "
              f"{row['max_level_diff']} levels at most, {row['mean_level_diff']:.3f} on average |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "vae_decode.json"), "w") as f:
            json.dump(dict(size=args.size, device=torch.cuda.get_device_name(), conv_tflop=tflop, results=results),
                      f, indent=1)


if __name__ == "__main__":
    main()
