"""The LoRAtorio tab: named pools from the WebUI's LoRA list, and each LoRA's trigger words."""

from __future__ import annotations

import sys

from loratorio_core.lora import LoRAFileError, read_metadata, split_scale, trigger_words

from . import pools


def lora_names() -> list[str]:
    networks = sys.modules.get("networks")
    return sorted(networks.available_networks) if networks is not None else []


def refresh() -> list[str]:
    networks = sys.modules.get("networks")
    if networks is not None:
        networks.list_available_networks()
    return lora_names()


def describe(names: list[str]) -> str:
    """Markdown: each chosen LoRA (``name`` or ``name:scale``) with its trigger words (from its
    training metadata)."""
    networks = sys.modules.get("networks")
    lines = []
    for chosen in names:
        try:
            name, _ = split_scale(chosen)
        except ValueError as error:
            lines.append(f"- **{chosen}**: {error}")
            continue
        entry = networks.available_networks.get(name) if networks is not None else None
        if entry is None:
            lines.append(f"- **{name}**: not in the LoRA list (refresh it)")
            continue
        try:
            words = trigger_words(read_metadata(entry.filename))
        except LoRAFileError as error:
            words, note = [], f" ({error.problem})"
        else:
            note = ""
        lines.append(
            f"- **{name}**: {', '.join(words) if words else 'no trigger words in its metadata'}{note}"
        )
    return "\n".join(lines)


def pool_names() -> list[str]:
    try:
        return sorted(pools.read_pools())
    except ValueError:
        return []


def pool_table() -> str:
    try:
        current = pools.read_pools()
    except ValueError as error:
        return f"**{error}**"
    if not current:
        return "No pools yet: choose LoRAs, name the pool, save. Then type its name in the accordion's Pool."
    return "\n".join(f"- **{name}**: {', '.join(loras)}" for name, loras in sorted(current.items()))


def save(name: str, loras: list[str], scales: str = "") -> str:
    """Save the pool ``name`` of the chosen ``loras`` with the ``scales`` typed beside them."""
    try:
        pools.save_pool(name, with_scales(loras, scales))
    except (ValueError, OSError) as error:
        return f"**{error}**"
    return pool_table()


def with_scales(loras: list[str], scales: str) -> list[str]:
    """The chosen entries with typed ``name:scale`` entries (comma-separated): a typed entry takes
    the place of the chosen one of its name, or is added after them."""
    typed = {}
    for entry in (e.strip() for e in scales.split(",")):
        if entry:
            typed[split_scale(entry)[0]] = entry
    chosen = [typed.pop(split_scale(entry)[0], entry) for entry in loras]
    return chosen + list(typed.values())


def typed_values_in_multiselect(gr) -> bool:
    """gradio 4 (Forge f2) takes typed entries in a multiselect dropdown; gradio 3 (A1111 1.10, old
    Forge) refuses them at construction (ValueError), so there the scales get a textbox of their own."""
    return int(str(getattr(gr, "__version__", "3")).split(".")[0]) >= 4


def build():
    """on_ui_tabs: [(blocks, title, elem_id)]."""
    import gradio as gr
    from modules.ui_components import ToolButton

    typed = typed_values_in_multiselect(gr)
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            # A typed entry "name:0.7" gives that LoRA its scale in the pool (1.0 otherwise).
            chosen = gr.Dropdown(
                choices=lora_names(),
                value=[],
                multiselect=True,
                allow_custom_value=typed,
                label="LoRAs (name or name:scale)" if typed else "LoRAs",
                elem_id="loratorio_tab_loras",
            )
            refresh_button = ToolButton(value="\U0001f504", elem_id="loratorio_tab_refresh")
        scales = None
        if not typed:
            scales = gr.Textbox(
                value="",
                label="Scales (name:scale, comma-separated; 1.0 for the others)",
                elem_id="loratorio_tab_scales",
            )
        words = gr.Markdown(value="")
        with gr.Row():
            name = gr.Textbox(value="", label="Pool name", elem_id="loratorio_tab_name")
            save_button = gr.Button(
                value="Save pool (an empty choice deletes it)", elem_id="loratorio_tab_save"
            )
        table = gr.Markdown(value=pool_table())
        chosen.change(fn=describe, inputs=[chosen], outputs=[words])
        refresh_button.click(fn=lambda: gr.update(choices=refresh()), inputs=[], outputs=[chosen])
        save_button.click(fn=save, inputs=[name, chosen] + ([scales] if scales else []), outputs=[table])
    return [(tab, "LoRAtorio", "loratorio_tab")]
