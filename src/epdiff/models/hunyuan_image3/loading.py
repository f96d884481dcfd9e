"""Building this rank's part of the HunyuanImage-3.0 transformer and filling it."""

from __future__ import annotations

import torch

from ...loader import LOAD_FORMATS
from ...loader.dummy import init_dummy_weights
from ...loader.safetensors_loader import SafetensorsCheckpoint
from ...quantization import get_quantization_config
from .config import HunyuanImage3Config, read_generation_config
from .model import HunyuanImage3Transformer
from .weights import checkpoint_quantization, load_checkpoint


def load_model(model_dir: str, parallel, dtype=torch.float32, device="cpu", load_format: str = "safetensors",
               config: HunyuanImage3Config | None = None, quantization: str | None = None,
               text_head: bool = False):
    """This rank's part of the model, filled from the checkpoint (reading only this rank's share)
    or, with load_format='dummy', with random weights made on the device. Returns (model, the
    checkpoint or None).

    quantization: a scheme of epdiff.quantization (the routed experts quantized as a
    high-precision checkpoint is read, or read as stored from a pre-quantized one); None keeps
    them in dtype, except that a pre-quantized checkpoint (config.json with
    `quantization_config`) always loads as stored. text_head: ln_f and lm_head too (writing text)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {load_format!r}; choose one of {', '.join(LOAD_FORMATS)}")
    if config is None:
        config = HunyuanImage3Config.from_pretrained(model_dir)
        read_generation_config(model_dir)  # its settings are checked before any weight is read
    stored = checkpoint_quantization(config, model_dir)
    # A pre-quantized checkpoint's own settings win (EngineConfig.resolve refused any other scheme).
    quant_config = stored or get_quantization_config(quantization)
    checkpoint = SafetensorsCheckpoint(model_dir) if load_format == "safetensors" else None
    with torch.device(device):
        model = HunyuanImage3Transformer(config, parallel, dtype=dtype, device=device, quant_config=quant_config,
                                         text_head=text_head)
    if checkpoint is None:
        init_dummy_weights(model)
    else:
        load_checkpoint(model, checkpoint, stored)
    model.eval()
    return model, checkpoint
