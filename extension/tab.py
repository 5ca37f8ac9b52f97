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


def save(name: str, loras: list[str]) -> str:
    try:
        pools.save_pool(name, loras)
    except (ValueError, OSError) as error:
        return f"**{error}**"
    return pool_table()


def build():
    """on_ui_tabs: [(blocks, title, elem_id)]."""
    import gradio as gr
    from modules.ui_components import ToolButton

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            # A typed entry "name:0.7" gives that LoRA its scale in the pool (1.0 otherwise).
            chosen = gr.Dropdown(
                choices=lora_names(),
                value=[],
                multiselect=True,
                allow_custom_value=True,
                label="LoRAs (name or name:scale)",
                elem_id="loratorio_tab_loras",
            )
            refresh_button = ToolButton(value="\U0001f504", elem_id="loratorio_tab_refresh")
        words = gr.Markdown(value="")
        with gr.Row():
            name = gr.Textbox(value="", label="Pool name", elem_id="loratorio_tab_name")
            save_button = gr.Button(
                value="Save pool (an empty choice deletes it)", elem_id="loratorio_tab_save"
            )
        table = gr.Markdown(value=pool_table())
        chosen.change(fn=describe, inputs=[chosen], outputs=[words])
        refresh_button.click(fn=lambda: gr.update(choices=refresh()), inputs=[], outputs=[chosen])
        save_button.click(fn=save, inputs=[name, chosen], outputs=[table])
    return [(tab, "LoRAtorio", "loratorio_tab")]
