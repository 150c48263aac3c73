"""Double Sparsity channel calibration: rank each query head's channels by the `qk` statistic mean |q * k| (post-RoPE).

    kvsurgery calibrate doublesparse --model smollm2-135m --out channels.json

The statistic is accumulated over every calibration block; the reference script kept only the last block's value
(docs/doublesparse.md, "Deviations from the reference code"), so orderings it shipped reflect one 512-token
block. The post-RoPE q and k are read from the model's own graph: one Dynamo capture of a forward pass, whose
attention computations are found the way `apply` finds them, then interpreted block by block.
"""

from __future__ import annotations

import argparse
import pathlib

import torch
from torch import fx
from tqdm.auto import tqdm

from kvsurgery.calibration.artefact import Artefact, ModelIdentity, save
from kvsurgery.calibration.corpus import calibration_blocks
from kvsurgery.compiler.private_compile import PrivateCompile
from kvsurgery.errors import CalibrationError
from kvsurgery.fx_utils import example, module_path, trace_source
from kvsurgery.sites import find_attention, layer_index

METHOD = "doublesparse"
STATISTIC = "qk"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="packaged model name (smollm2-135m) or a local HF folder")
    parser.add_argument("--out", required=True, help="artefact path: .json (orderings) or .safetensors (+ statistic)")
    parser.add_argument("--blocks", type=int, default=16, help="calibration blocks (default 16)")
    parser.add_argument("--block-len", type=int, default=512, help="tokens per block (default 512, as the paper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated calibration text")


def calibrate(args: argparse.Namespace) -> pathlib.Path:
    from kvsurgery.models import load_model

    model, tokenizer = load_model(args.model)
    artefact = calibrate_model(model, tokenizer, blocks=args.blocks, block_len=args.block_len, seed=args.seed)
    return save_channels(artefact, args.out)


def save_channels(artefact: Artefact, path: str | pathlib.Path) -> pathlib.Path:
    """JSON keeps the orderings only; safetensors keeps them and the statistic as tensors."""
    if pathlib.Path(path).suffix == ".json":
        return save(Artefact(artefact.method, artefact.model, artefact.params, artefact.data), path)
    return save(Artefact(artefact.method, artefact.model, artefact.params, {}, artefact.tensors), path)


class _Recorder(fx.Interpreter):
    """Runs a captured forward and accumulates sum |q * k| per layer from the attention inputs it meets."""

    def __init__(self, gm: fx.GraphModule, wanted: dict[fx.Node, tuple[int, str]], sums: dict[int, torch.Tensor]):
        super().__init__(gm)
        self.wanted, self.sums, self.pending = wanted, sums, {}

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if node in self.wanted:
            layer, role = self.wanted[node]
            self.pending.setdefault(layer, {})[role] = out
            if len(self.pending[layer]) == 2:
                parts = self.pending.pop(layer)
                self.sums[layer] += _abs_qk(parts["q"], parts["k"])
        return out


def _abs_qk(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """sum over batch and tokens of |q * k| per (query head, channel), k repeated over its query group: [H, D]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q.double() * k.double()).abs().sum(dim=(0, 2))


def _attention_inputs(gm: fx.GraphModule, model: torch.nn.Module, n_layers: int) -> dict[fx.Node, tuple[int, str]]:
    """The post-RoPE query and key node of every decoder layer's attention in a captured forward."""
    wanted: dict[fx.Node, tuple[int, str]] = {}
    layers = []
    for match in find_attention(gm.graph):
        layer = layer_index(module_path(match.output), model, None)
        q, k = example(match.q), example(trace_source(match.k))
        if q is None or k is None or k.dim() != 4 or k.shape[-1] != q.shape[-1] or q.shape[1] % k.shape[1]:
            raise CalibrationError(f"cannot read post-RoPE queries and keys of layer {layer}'s attention")
        wanted[match.q] = (layer, "q")
        wanted[trace_source(match.k)] = (layer, "k")
        layers.append(layer)
    if sorted(layers) != list(range(n_layers)):
        raise CalibrationError(
            f"found attention for layers {sorted(layers)} but the model has {n_layers}; "
            "load it with attn_implementation='sdpa' or 'eager'"
        )
    return wanted


def _forward(model: torch.nn.Module, ids: torch.Tensor):
    return model(input_ids=ids, use_cache=False)


def qk_statistic(model: torch.nn.Module, blocks: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """Mean |q * k| over every token of every block, per (layer, query head, channel): [L, H, D] float64."""
    text = model.config.get_text_config(decoder=True)
    n_layers = text.num_hidden_layers
    sums: dict[int, torch.Tensor] = {}
    runner = {}

    def backend(gm: fx.GraphModule, example_inputs):
        wanted = _attention_inputs(gm, model, n_layers)
        runner["recorder"] = _Recorder(gm, wanted, sums)
        return lambda *args: runner["recorder"].run(*args)

    device = model.get_input_embeddings().weight.device
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    for layer in range(n_layers):
        sums[layer] = torch.zeros(heads, head_dim, dtype=torch.float64, device=device)
    # released on exit: nothing compiled for the calibration keeps the model alive afterwards
    with (
        torch.no_grad(),
        PrivateCompile(_forward, f"kvsurgery_calibrate_{id(model):x}", backend, fullgraph=True) as step,
    ):
        for block in tqdm(blocks, desc="doublesparse calibration", unit="block", disable=not progress):
            step(model, block[None].to(device))
    return torch.stack([sums[layer] for layer in range(n_layers)]).cpu() / blocks.numel()


def channel_order(stat: torch.Tensor) -> torch.Tensor:
    """Channels of each (layer, head) by decreasing statistic (ties: lower channel first): [L, H, D] int64."""
    return torch.sort(stat, dim=-1, descending=True, stable=True).indices


def calibrate_model(
    model: torch.nn.Module, tokenizer=None, blocks: int = 16, block_len: int = 512, seed: int = 0, progress: bool = True
) -> Artefact:
    """The Double Sparsity artefact of `model`: per-head channel orderings (data) and the statistic (tensors)."""
    if blocks < 1 or block_len < 2:
        raise CalibrationError(f"need blocks >= 1 and block_len >= 2, got {blocks} and {block_len}")
    text = model.config.get_text_config(decoder=True)
    ids = calibration_blocks(tokenizer, text.vocab_size, blocks, block_len, seed)
    stat = qk_statistic(model, ids, progress)
    order = channel_order(stat)
    params = {
        "statistic": STATISTIC,
        "blocks": blocks,
        "block_len": block_len,
        "seed": seed,
        "text": "kvsurgery.calibration.corpus" if tokenizer is not None else "seeded random token ids",
    }
    return Artefact(
        METHOD,
        ModelIdentity.of(model),
        params,
        {"channels": order.tolist()},
        {"channels": order.to(torch.int32), STATISTIC: stat.float()},
    )


def load_channels(path: str | pathlib.Path, model: torch.nn.Module) -> torch.Tensor:
    """Channel orderings [L, H, D] from an artefact made for `model` (.json or .safetensors)."""
    from kvsurgery.calibration.artefact import load

    artefact = load(path, METHOD, model)
    if "channels" in artefact.tensors:
        return artefact.tensors["channels"].long()
    if "channels" not in artefact.data:
        raise CalibrationError(f"{path} has no channel orderings; recalibrate: kvsurgery calibrate {METHOD} ...")
    return torch.tensor(artefact.data["channels"], dtype=torch.long)
