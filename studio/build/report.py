"""Tables about a merge, as rows (for the UI) and as text (for the terminal)."""

from __future__ import annotations

from studio.build.plan import MergePlan, ModelRow
from studio.formatting import format_table, human_bytes, human_count

COMPAT_HEADERS = ["role", "model", "family", "layers", "hidden", "intermediate", "heads", "kv heads",
                  "parameters", "dtype", "size", "where"]


def compatibility_rows(rows: list[ModelRow]) -> list[list[str]]:
    return [[r.role, r.ref, str(r.family), *(str(r.facts[k]) for k in ("num_hidden_layers", "hidden_size",
             "intermediate_size", "num_attention_heads", "num_key_value_heads")), human_count(r.parameters), r.dtype,
             human_bytes(r.size_bytes), "local" if r.local else "Hub"] for r in rows]


def estimate_rows(plan: MergePlan) -> list[list[str]]:
    e = plan.memory_estimates()
    return [
        ["output architecture", plan.output.name],
        ["experts", f"{len(plan.config.experts)} ({plan.config.experts_per_token} per token)"],
        ["parameters", human_count(plan.parameters)],
        ["output dtype", plan.dtype_name or "as in the sources"],
        ["size on disk", human_bytes(e["output"])],
        ["memory to run, bf16", human_bytes(e["bf16"])],
        ["memory to run, 4-bit", human_bytes(e["4bit"])],
        ["peak memory of the merge", human_bytes(e["merge_peak"])],
    ]


def compatibility_table(rows: list[ModelRow]) -> str:
    return format_table(COMPAT_HEADERS, compatibility_rows(rows))


def estimates_table(plan: MergePlan) -> str:
    return format_table(None, estimate_rows(plan))
