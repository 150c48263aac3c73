"""`explain(model)`: the surgery made visible: sites found, passes and the nodes they inserted, store bytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsurgery.errors import KVSurgeryError
from kvsurgery.manager import GraphReport
from kvsurgery.runtime import Surgery

_SHOWN_OPS = ("scaled_dot_product_attention", "softmax", "matmul")


@dataclass
class Explanation:
    surgery: Surgery

    @property
    def store_bytes(self) -> int | None:
        store = self.surgery.last_store
        return store.nbytes if store is not None and store.layers else None

    def uncompressed_bytes(self) -> int | None:
        """Bytes an uncompressed cache of the same batch, prompt and decode length would take (sliding layers
        hold their window, as transformers' caches do)."""
        store = self.surgery.last_store
        if store is None or not store.layers:
            return None
        total_tokens = store.prompt_len + store.max_new_tokens
        total = 0
        for layer in store.layers:
            plan = layer.plan
            tokens = min(total_tokens, plan.sliding_window or total_tokens)
            per_token = plan.n_kv_heads * (plan.head_dim + plan.v_head_dim) * layer.k.element_size()
            total += layer.k.shape[0] * tokens * per_token
        return total

    def __str__(self) -> str:
        s = self.surgery
        recipe = s.recipe
        budget = f", budget {recipe.budget}" if recipe.budget is not None else ""
        lines = [f"kvsurgery recipe '{recipe.text}'{budget} on {type(s.model).__name__}"]
        lines.append(f"attention sites found by Dynamo capture of a decode step ({len(s.sites)}):")
        lines += _site_lines(s.sites)
        lines.append("passes, in order: " + ", ".join(f"{p.spec()} [{p.phase}]" for p in recipe.passes))
        lines += [f"  added by default: {a}" for a in recipe.added]
        lines.append(f"model graph before surgery (decode step, transformers' own cache): {s.discovery_counts}")
        if not s.reports:
            lines.append("no graph rewritten yet: run generate() or forward() once to see the inserted nodes")
        for report in s.reports.values():
            lines += _graph_lines(report)
        lines += _store_lines(self)
        return "\n".join(lines)


def _layers(layers: list[int]) -> str:
    return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


def _site_lines(sites) -> list[str]:
    """One line per run of consecutive layers whose attention looks the same."""
    lines, run = [], [sites[0]]
    for site in sites[1:]:
        if site.describe() == run[-1].describe() and site.layer == run[-1].layer + 1:
            run.append(site)
            continue
        lines.append(_site_run(run))
        run = [site]
    return [*lines, _site_run(run)]


def _site_run(run) -> str:
    module = run[0].module if len(run) == 1 else run[0].module.replace(f".{run[0].layer}.", ".{i}.", 1)
    return f"  {_layers([s.layer for s in run])} {module}: {run[0].describe()}"


def _graph_lines(report: GraphReport) -> list[str]:
    keep = lambda counts: {k: v for k, v in counts.items() if k in _SHOWN_OPS or k.startswith("kvsurgery")}  # noqa: E731
    lines = [f"{report.phase} graph: before {keep(report.before)} -> after {keep(report.after)}"]
    groups: dict[str, list[int]] = {}
    for site in report.sites:
        inserted = "; ".join(f"{name}: {', '.join(ops)}" for name, ops in site.inserted.items())
        groups.setdefault(inserted, []).append(site.layer)
    for inserted, layers in groups.items():
        lines.append(f"  {_layers(layers)}: {inserted or 'nothing inserted'}")
    return lines


def _store_lines(expl: Explanation) -> list[str]:
    store = expl.surgery.last_store
    if store is None or not store.layers:
        return ["cache: no store allocated yet"]
    mib = 2.0**20
    plans = [layer.plan for layer in store.layers]
    lines = [
        f"cache: {expl.store_bytes / mib:.2f} MiB allocated (batch {store.layers[0].k.shape[0]}, "
        f"prompt {store.prompt_len} tokens, {len(plans)} layers)"
    ]
    groups: dict[str, list[int]] = {}
    for plan in plans:
        keeps = sorted(set(plan.keep))
        kept = f"{keeps[0]}" if len(keeps) == 1 else f"{keeps[0]}..{keeps[-1]}"
        if plan.sliding_window:
            policy = f"sliding window {plan.sliding_window}: at most {kept} tokens per KV head, oldest evicted"
        elif plan.evict and plan.room:
            policy = f"{kept} tokens per KV head kept at prefill + room for {plan.room} decoded tokens, evicting"
        elif plan.evict:
            policy = f"{kept} tokens per KV head, one evicted per decoded token"
        else:
            policy = f"{kept} tokens per KV head kept at prefill + room for {plan.room} decoded tokens"
        if plan.storage:
            policy += f"; {plan.storage}"
        groups.setdefault(policy, []).append(plan.layer)
    lines += [f"  {_layers(layers)}: {policy}" for policy, layers in groups.items()]
    full = expl.uncompressed_bytes()
    if full:
        lines.append(
            f"  an uncompressed cache of the same tokens: {full / mib:.2f} MiB ({expl.store_bytes / full:.0%} used)"
        )
    return lines


def explain(model: torch.nn.Module) -> Explanation:
    """Describe the surgery applied to `model` (print it)."""
    surgery = model.__dict__.get("_kvsurgery")
    if surgery is None:
        raise KVSurgeryError("kvsurgery.explain: this model has no kvsurgery applied (call kvsurgery.apply first)")
    return Explanation(surgery)
